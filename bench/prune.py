"""Structured-pruning benchmark on SmolLM2-135M: WikiText-2 test perplexity (512-token windows, the
first 40), bytes of the saved safetensors, seconds (importance + pruning + correction) and peak RSS,
for importance x prune method x ratio (fraction of non-embedding parameters removed), with and
without reformation, against two baselines measured in the same run:

- ``llm-pruner``: Taylor importance, the same ratio in every layer, first 4 and last 2 layers kept,
  query heads and MLP channels, no correction (LLM-Pruner's own setting);
- ``magnitude``: weight-magnitude importance in that same setting (the data-free baseline).

No fine-tuning anywhere. Calibration: 128 x 512-token windows from the WikiText-2 train split
(offline: the first 90% of valid), seed 0, through the real ``calibrate`` stage; importance and
prune run through the real stages (``run_stage``), each importance method once (cached by its
fingerprint) in its own subprocess, each prune config in its own subprocess (true peak RSS).
The "seconds" column adds the importance time to the prune time: what it costs to get that model.

    python bench/prune.py                                    # the whole matrix (hours on 2 cores)
    python bench/prune.py --ratios 0.2 --importance condition --prune hybrid --correction reformation
    python bench/prune.py --presets                          # only the two baselines
    python bench/prune.py --list                             # print the configs a selection runs
Rows merge into bench/results/prune.json by (method, config).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from common import (  # bench/ is on sys.path when a bench runs as a script
    markdown_table,
    run_row,
    save_rows,
    use_shared_data,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "prune.json"
SEQLEN, WINDOWS = 512, 40
IMPORTANCE = ["taylor", "cosine-layer", "condition", "wanda-sp", "magnitude"]
PRUNE = ["width", "depth", "hybrid"]
RATIOS = [0.1, 0.2, 0.3]
CORRECTIONS = ["none", "reformation"]
# LLM-Pruner on LLaMA-7B keeps layers 0-3 and the last 2 of 32; the same counts here.
LLM_PRUNER = {"allocation": "uniform", "head_mode": "query", "protect_first": 4, "protect_last": 2}
# Width needs structure scores and depth only layer scores: cosine-layer scores layers only, and
# condition's layer score is the same block influence as cosine-layer's.
VALID = {"width": ["taylor", "condition", "wanda-sp", "magnitude"],
         "depth": ["taylor", "cosine-layer", "wanda-sp", "magnitude"],
         "hybrid": ["taylor", "condition", "wanda-sp", "magnitude"]}
DEFAULT_PARAMS = {"width": {"allocation": "global"}, "depth": {}, "hybrid": {"layer_share": 0.5}}


def config_rows(args: argparse.Namespace) -> list[dict]:
    ratios = [float(r) for r in args.ratios.split(",")]
    corrections = args.correction.split(",")
    jobs: list[dict] = []
    presets = [("llm-pruner", "taylor"), ("magnitude-uniform", "magnitude")]
    for name, imp in presets:
        if args.no_presets:
            break
        for r in ratios:
            jobs.append({"name": name, "importance": imp, "prune": "width", "ratio": r,
                         "params": dict(LLM_PRUNER)})
            if not args.presets and "reformation" in corrections:
                jobs.append({"name": name, "importance": imp, "prune": "width", "ratio": r,
                             "params": {**LLM_PRUNER, "correction": "reformation"}})
    if args.presets:
        return jobs
    extra = json.loads(args.params)
    for prune in args.prune.split(","):
        for imp in args.importance.split(","):
            if imp not in VALID[prune]:
                continue
            for r in ratios:
                for c in corrections:
                    params = {**DEFAULT_PARAMS[prune], **extra.get(prune, {}), "correction": c}
                    jobs.append({"name": f"{imp}+{prune}", "importance": imp, "prune": prune, "ratio": r,
                                 "params": params})
    return jobs


def config_label(job: dict) -> str:
    p = {k: v for k, v in job["params"].items() if k != "correction"}
    extra = ",".join(f"{k}={v}" for k, v in sorted(p.items()))
    return f"{job['ratio']:.0%} {job['params'].get('correction', 'none')}" + (f" [{extra}]" if extra else "")


def recipe(work: Path, job: dict) -> dict:
    return {
        "name": "bench-prune",
        "model": {"source": f"hf:{work / 'source'}"},
        "stages": {
            "calibrate": {"n_windows": 128, "seqlen": SEQLEN, "seed": 0},
            "importance": {"enabled": True, "method": job["importance"], "params": job.get("imp_params", {})},
            "prune": {"enabled": True, "method": job["prune"], "ratio": job["ratio"], "params": job["params"]},
        },
        "storage": {"root": f"file://{work}"},
    }


def _key(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:12]


def setup(work: Path, calib_from: str | None) -> None:
    """The source model as an fp32 artifact (fast to load), the calibration artifact, the unpruned row."""
    from pqflow.models import load_source, save_model
    from pqflow.recipe import parse_recipe
    from pqflow.runner import run_stage

    if not (work / "source" / "pqflow_model.json").is_file():
        src = load_source("smollm2-135m")
        save_model(src.model, src.tokenizer, work / "source")
    if calib_from and not (work / "calib").exists():
        shutil.copytree(calib_from, work / "calib")
    r = parse_recipe(recipe(work, {"importance": "magnitude", "prune": "width", "ratio": 0.2, "params": {}}))
    run_stage("calibrate", r, {}, f"file://{work}/calib")


def evaluate(model, tok) -> dict:
    from pqflow.data import eval_windows, load_text, tokenize
    from pqflow.perplexity import perplexity

    ids = tokenize(tok, load_text("wikitext2", "test"))
    r = perplexity(model, eval_windows(ids, SEQLEN, WINDOWS), batch_size=4)
    return {"ppl": round(r.ppl, 3), "eval_tok_s": round(r.tokens_per_s, 1)}


PROBE = "The history of the city begins in"


def reload_check(folder: Path, ref_logits, tok) -> bool:
    """Reload the artifact in a fresh process and compare logits on a fixed input."""
    code = (
        "import sys, torch; from pqflow.models import load_model_artifact as L; l = L(sys.argv[1]); "
        "x = l.tokenizer(sys.argv[2], return_tensors='pt').input_ids; "
        "torch.save(l.model(input_ids=x).logits.detach(), sys.argv[3])"
    )
    import torch

    out = folder.parent / f"{folder.name}-logits.pt"
    subprocess.run([sys.executable, "-c", code, str(folder), PROBE, str(out)], check=True, capture_output=True)
    got = torch.load(out, weights_only=True)
    out.unlink()
    return bool(torch.equal(got, ref_logits))


def worker_importance(work: Path, job: dict) -> dict:
    from pqflow.recipe import parse_recipe
    from pqflow.runner import run_stage
    from pqflow.runtime import peak_rss_mb

    r = parse_recipe(recipe(work, job))
    uri = f"file://{work}/importance-{job['importance']}-{_key(job.get('imp_params', {}))}"
    out = run_stage("importance", r, {"calib": f"file://{work}/calib"}, uri)
    meta = json.loads((Path(uri[7:]) / "importance.json").read_text())
    return {"uri": uri, "seconds": meta["seconds"], "peak_rss_mb": round(peak_rss_mb()), "skipped": out.skipped}


def worker_prune(work: Path, job: dict) -> dict:
    import torch

    from pqflow.models import load_model_artifact
    from pqflow.recipe import parse_recipe
    from pqflow.runner import run_stage
    from pqflow.runtime import peak_rss_mb

    torch.manual_seed(0)
    r = parse_recipe(recipe(work, job))
    folder = work / f"pruned-{_key(job)}"
    uri = f"file://{folder}"
    out = run_stage("prune", r, {"calib": f"file://{work}/calib", "importance": job["imp_uri"]}, uri, force=True)
    meta = json.loads((folder / "prune.json").read_text())
    loaded = load_model_artifact(folder)
    row = {"method": job["name"], "config": config_label(job), "importance": job["importance"],
           "prune": job["prune"], "ratio": job["ratio"], "correction": job["params"].get("correction", "none"),
           "ratio_removed": round(meta["ratio_removed"], 4), "layers_dropped": len(meta["plan"]["drop"]),
           "params_after": meta["params_after"], "format": meta["format"], "bytes": out.summary["model_bytes"],
           "prune_seconds": round(meta["seconds"]["total"], 1), "params": job["params"]}
    row.update(evaluate(loaded.model, loaded.tokenizer))
    if job["ratio"] == 0.2:
        x = loaded.tokenizer(PROBE, return_tensors="pt").input_ids
        with torch.no_grad():
            ref = loaded.model(input_ids=x).logits
        row["reload_identical"] = reload_check(folder, ref, loaded.tokenizer)
        kw = {"max_new_tokens": 16, "do_sample": False, "pad_token_id": loaded.tokenizer.eos_token_id}
        row["cache_generate_equal"] = bool(torch.equal(loaded.model.generate(x, use_cache=True, **kw),
                                                       loaded.model.generate(x, use_cache=False, **kw)))
    row["prune_peak_rss_mb"] = round(peak_rss_mb())
    shutil.rmtree(folder, ignore_errors=True)  # ~0.4 GB each; the row keeps what was measured
    return row


def worker_reference(work: Path) -> dict:
    import tempfile

    import torch

    from pqflow.models import cast_float, load_model_artifact, save_model, weight_bytes
    from pqflow.runtime import peak_rss_mb

    loaded = load_model_artifact(work / "source")
    with tempfile.TemporaryDirectory() as tmp:
        save_model(cast_float(loaded.model, torch.float16), loaded.tokenizer, Path(tmp))
        b = weight_bytes(Path(tmp))
    row = {"method": "unpruned", "config": "0% (fp16 file)", "ratio": 0.0, "bytes": b, "seconds": 0.0}
    row.update(evaluate(loaded.model.float(), loaded.tokenizer))
    row["peak_rss_mb"] = round(peak_rss_mb())
    return row


COLS = ["method", "config", "ppl", "bytes", "ratio_removed", "seconds", "peak_rss_mb"]


def table(rows: list[dict]) -> str:
    return markdown_table(rows, COLS)


def sort_rows(rows: list[dict]) -> list[dict]:
    def key(r: dict) -> tuple:
        pre = {"unpruned": 0, "llm-pruner": 1, "magnitude-uniform": 2}.get(r["method"], 3)
        return (r.get("ratio", 0), pre, r["method"], r["config"])

    return sorted(rows, key=key)


def summary(rows: list[dict]) -> str:
    """The acceptance numbers at 20%: best vs LLM-Pruner, reformation gain, timing."""
    at20 = [r for r in rows if r.get("ratio") == 0.2 and "ppl" in r]
    base = [r for r in at20 if r["method"] == "llm-pruner" and r.get("correction") == "none"]
    if not base or len(at20) < 2:
        return ""
    best = min(at20, key=lambda r: r["ppl"])
    lines = [f"at 20%: LLM-Pruner setting ppl {base[0]['ppl']}; best {best['method']} {best['config']} "
             f"ppl {best['ppl']} ({best['ppl'] / base[0]['ppl']:.2f}x), {best['seconds']}s importance+prune"]
    twin = [r for r in at20 if r["method"] == best["method"] and r.get("correction") == "none"
            and {k: v for k, v in r["params"].items() if k != "correction"}
            == {k: v for k, v in best["params"].items() if k != "correction"}]
    if twin and best.get("correction") != "none":
        lines.append(f"same method without correction: ppl {twin[0]['ppl']}")
    return "\n".join(lines)


def run_child(args: list[str], work: Path) -> dict | None:
    out = work / f"child-{os.getpid()}.json"
    return run_row([sys.executable, __file__, *args, "--work", str(work), "--child-out", str(out)], out,
                   " ".join(args)[:120])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--importance", default=",".join(IMPORTANCE))
    ap.add_argument("--prune", default=",".join(PRUNE))
    ap.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    ap.add_argument("--correction", default=",".join(CORRECTIONS), help="none,reformation,mask-tuning")
    ap.add_argument("--params", default="{}", help='extra prune params per method, JSON: {"hybrid": {"layer_share": 0.7}}')
    ap.add_argument("--name", default=None, help="row name for the selection (default importance+prune)")
    ap.add_argument("--presets", action="store_true", help="only the llm-pruner and magnitude baselines")
    ap.add_argument("--no-presets", action="store_true", help="skip the baselines")
    ap.add_argument("--reference", action="store_true", help="also (re)measure the unpruned model")
    ap.add_argument("--list", action="store_true")
    ap.add_argument("--calib-from", default=None, help="copy an existing calibration artifact folder")
    ap.add_argument("--work", default=os.environ.get("PQFLOW_BENCH_WORK", "/tmp/pqflow-bench-prune"))
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--child", choices=["setup", "importance", "prune", "reference"], help=argparse.SUPPRESS)
    ap.add_argument("--job", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--child-out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    use_shared_data()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.child:
        job = json.loads(args.job) if args.job else {}
        res = {"setup": lambda: (setup(work, args.calib_from), {})[1],
               "importance": lambda: worker_importance(work, job),
               "prune": lambda: worker_prune(work, job),
               "reference": lambda: worker_reference(work)}[args.child]()
        Path(args.child_out).write_text(json.dumps(res))
        return
    jobs = config_rows(args)
    if args.name:
        for j in jobs:
            if j["name"] not in ("llm-pruner", "magnitude-uniform"):
                j["name"] = args.name
    if args.list:
        for j in jobs:
            print(j["name"], config_label(j))
        return
    t0 = time.perf_counter()
    setup_args = ["--child", "setup"] + (["--calib-from", args.calib_from] if args.calib_from else [])
    if run_child(setup_args, work) is None:
        sys.exit(1)
    results = Path(args.results)
    rows = json.loads(results.read_text()) if results.is_file() else []

    def save(row: dict) -> None:
        nonlocal rows
        rows = sort_rows([r for r in rows if (r["method"], r["config"]) != (row["method"], row["config"])] + [row])
        save_rows(results, rows)
        print(table([row]), flush=True)

    if args.reference or not any(r["method"] == "unpruned" for r in rows):
        ref = run_child(["--child", "reference"], work)
        if ref:
            save(ref)
    imp: dict[str, dict] = {}
    for job in jobs:
        name = job["importance"]
        if name not in imp:
            res = run_child(["--child", "importance", "--job", json.dumps(job)], work)
            if res is None:
                continue
            imp[name] = res
            print(f"[bench] importance {name}: {res['seconds']:.1f}s, peak RSS {res['peak_rss_mb']} MiB", file=sys.stderr)
        print(f"[bench] {job['name']} {config_label(job)} ...", file=sys.stderr, flush=True)
        row = run_child(["--child", "prune", "--job", json.dumps({**job, "imp_uri": imp[name]["uri"]})], work)
        if row is None:
            continue
        row["importance_seconds"] = round(imp[name]["seconds"], 1)
        row["seconds"] = round(imp[name]["seconds"] + row["prune_seconds"], 1)
        row["peak_rss_mb"] = max(imp[name]["peak_rss_mb"], row["prune_peak_rss_mb"])
        save(row)
    print(table(rows))
    s = summary(rows)
    if s:
        print("\n" + s)
    print(f"\n[bench] wall {time.perf_counter() - t0:.0f}s", file=sys.stderr)


if __name__ == "__main__":
    main()
