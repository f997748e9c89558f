"""Recovery fine-tuning benchmark on SmolLM2-135M pruned 20% and quantized to 4 bits.

The compressed model is built through the real stages (``run_stage``, cached by fingerprint in the
work folder): ``calibrate`` (64 x 512-token windows of the WikiText-2 train split, seed 0),
``importance`` (Taylor, 16 windows), ``prune`` (width, 20% of non-embedding parameters, global
allocation, reformation on 32 windows), ``quantize`` (RTN, 4 bits, groups of 64, asymmetric).

Rows (each in its own subprocess, so peak RSS is that row's):

- ``pruned``: the pruned float model, no tuning (context; bytes as saved, fp32);
- ``compressed``: pruned + 4-bit, no tuning — the baseline every tuned row is compared with;
- ``lora``: LoRA (r 16, all 7 linears) on the frozen packed 4-bit base, default init;
- ``lora-loftq``: the pruned float model quantized by LoftQ (same 4-bit g64 grid) + LoRA;
- ``peqa``: only the quantization scales of the packed model;
- ``lora-bf16``: LoRA on the pruned 16-bit float base, merged after training: the memory
  reference for "fp16 LoRA" (trainable params, peak RSS; peak memory is reached in the first
  steps). It runs 3 steps only: on CPUs without AVX512-BF16/AMX (this one has AVX2) bf16 and
  fp16 matmuls are emulated, ~200 s a step against ~7 s for the packed 4-bit rows, so its ppl
  is not a recovery result.

All tuned rows share the step budget (``--steps``, 4 x 256 tokens a step) and a wall-clock cap
(``--max-minutes``, the cosine schedule follows whichever ends first). Test perplexity: WikiText-2
test, 512-token windows, the first 40, computed in a *fresh* process that loads the artifact from
disk (``pqflow.models.load_model_artifact``), so every ppl below is what the saved model reproduces.

    python bench/finetune.py                          # everything (about 1.5 h on 2 busy cores)
    python bench/finetune.py --rows compressed,peqa   # a subset; rows merge into the JSON
    python bench/finetune.py --check                  # re-evaluate saved artifacts, compare with the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import markdown_table, use_shared_data  # bench/ is on sys.path when a bench runs as a script

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "finetune.json"
SEQLEN, WINDOWS = 512, 40
ROWS = ["pruned", "compressed", "lora", "lora-loftq", "peqa", "lora-bf16"]
LORA = {"r": 16, "alpha": 32, "dropout": 0.05, "lr": 2e-4}
METHODS = {
    "lora": ("lora", "compressed", {**LORA}),
    "lora-loftq": ("lora", "pruned", {**LORA, "init": "loftq", "loftq_bits": 4, "loftq_group_size": 64,
                                      "loftq_iter": 2}),
    "peqa": ("peqa", "compressed", {"lr": 5e-5}),
    "lora-bf16": ("lora", "pruned", {**LORA, "base_dtype": "bfloat16", "merge": True,
                                  "steps": 3, "eval_every": 3}),
}


def recipe(work: Path, finetune: dict | None = None) -> dict:
    stages = {
        "calibrate": {"n_windows": 64, "seqlen": SEQLEN, "seed": 0},
        "importance": {"enabled": True, "method": "taylor", "params": {"n_windows": 16}},
        "prune": {"enabled": True, "method": "width", "ratio": 0.2,
                  "params": {"correction": "reformation", "correct_windows": 32}},
        "quantize": {"enabled": True, "method": "rtn", "bits": 4, "group_size": 64},
    }
    if finetune:
        stages["finetune"] = {"enabled": True, **finetune}
    return {"name": "bench-finetune", "model": {"source": "smollm2-135m"}, "stages": stages,
            "storage": {"root": f"file://{work}"}}


def prepare(work: Path) -> dict:
    """calibrate -> importance -> prune -> quantize; returns artifact folders (cached)."""
    from pqflow.recipe import parse_recipe
    from pqflow.runner import run_stage

    r = parse_recipe(recipe(work))
    arts = {k: str(work / k) for k in ("calib", "importance", "pruned", "compressed")}
    t0 = time.perf_counter()
    run_stage("calibrate", r, {}, arts["calib"])
    run_stage("importance", r, {"calib": arts["calib"]}, arts["importance"])
    run_stage("prune", r, {"calib": arts["calib"], "importance": arts["importance"]}, arts["pruned"])
    run_stage("quantize", r, {"model": arts["pruned"]}, arts["compressed"])
    return {**arts, "seconds": time.perf_counter() - t0}


def test_ppl(folder: Path, threads: int | None) -> dict:
    import torch

    from pqflow.data import eval_windows, load_text, tokenize
    from pqflow.models import load_model_artifact, weight_bytes
    from pqflow.perplexity import perplexity

    if threads:
        torch.set_num_threads(threads)
    loaded = load_model_artifact(folder)
    if loaded.model.dtype in (torch.bfloat16, torch.float16):
        loaded.model.float()  # 16-bit weights, fp32 compute, as every other row computes
    ids = tokenize(loaded.tokenizer, load_text("wikitext2", "test"))
    res = perplexity(loaded.model, eval_windows(ids, SEQLEN, WINDOWS), batch_size=4)
    return {"ppl": round(res.ppl, 3), "bytes": weight_bytes(folder)}


def packed_tensors_equal(a: Path, b: Path) -> bool:
    """Codes and zero points of two pqflow-quant artifacts byte-identical."""
    from safetensors import safe_open

    with safe_open(str(a / "model.safetensors"), "pt") as fa, safe_open(str(b / "model.safetensors"), "pt") as fb:
        keys = [k for k in fa.keys() if k.endswith((".qweight", ".zeros"))]  # noqa: SIM118 - safe_open API
        if not keys or sorted(keys) != sorted(k for k in fb.keys() if k.endswith((".qweight", ".zeros"))):  # noqa: SIM118
            return False
        return all(fa.get_tensor(k).numpy().tobytes() == fb.get_tensor(k).numpy().tobytes() for k in keys)


def train_row(row: str, work: Path, steps: int, minutes: float, threads: int | None) -> dict:
    from pqflow.recipe import parse_recipe
    from pqflow.runner import run_stage

    method, base, extra = METHODS[row]
    params = {"steps": steps, "max_minutes": minutes, "batch_size": 4, "seqlen": 256, "eval_every": 25,
              "eval_windows": 16, "seed": 0, **({"threads": threads} if threads else {}), **extra}
    r = parse_recipe(recipe(work, {"method": method, "params": params}))
    out = run_stage("finetune", r, {"model": str(work / base)}, str(work / row), force=True)
    return dict(out.summary)


def worker(args: argparse.Namespace) -> None:
    work = Path(args.work)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if args.worker == "prepare":
        res = prepare(work)
    elif args.worker.startswith("eval:"):
        res = test_ppl(work / args.worker[5:], args.threads)
    else:
        res = train_row(args.worker, work, args.steps, args.max_minutes, args.threads)
    from pqflow.runtime import peak_rss_mb

    res["process_peak_rss_mb"] = peak_rss_mb()
    Path(args.result).write_text(json.dumps(res))


def spawn(args: argparse.Namespace, what: str) -> dict:
    res_file = Path(args.work) / f".result-{what.replace(':', '-')}.json"
    cmd = [sys.executable, __file__, "--worker", what, "--work", args.work, "--result", str(res_file),
           "--steps", str(args.steps), "--max-minutes", str(args.max_minutes)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    print(f"[bench] {what} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    res = json.loads(res_file.read_text())
    res["wall_s"] = time.perf_counter() - t0
    return res


def auto_threads() -> int:
    """One thread when the machine is oversubscribed: with 2 threads on 2 busy cores the OpenMP
    barriers spin and a training step gets ~3x slower than on one thread (measured here)."""
    n = os.cpu_count() or 1
    return 1 if os.getloadavg()[0] > n else n


def config_of(row: str, args: argparse.Namespace) -> str:
    pruned = "width 20% taylor+reformation"
    if row == "pruned":
        return f"{pruned}, fp32"
    if row == "compressed":
        return f"{pruned}, rtn 4g64"
    method, base, extra = METHODS[row]
    if extra.get("init") == "loftq":
        base_desc = f"{pruned}, loftq {extra['loftq_bits']}g{extra['loftq_group_size']}"
    else:
        base_desc = f"{pruned}, rtn 4g64" if base == "compressed" else f"{pruned}, {extra.get('base_dtype', 'fp32')}"
    skip = ("loftq_bits", "loftq_group_size", "steps", "eval_every", "base_dtype")
    keys = " ".join(f"{k}={v}" for k, v in extra.items() if k not in skip)
    return f"{base_desc}; {method} {keys}; {extra.get('steps', args.steps)} steps x 4x256 tok, " \
        f"cap {args.max_minutes:g} min"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(ROWS))
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--max-minutes", type=float, default=18.0)
    ap.add_argument("--threads", default="auto", help="torch threads: a number, or auto (see auto_threads)")
    ap.add_argument("--work", default=str(REPO / "pqflow-artifacts" / "bench-finetune"))
    ap.add_argument("--check", action="store_true", help="re-evaluate saved artifacts against the JSON")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    use_shared_data()
    if args.worker:
        args.threads = int(args.threads) if args.threads not in (None, "auto") else None
        worker(args)
        return
    args.threads = auto_threads() if args.threads == "auto" else int(args.threads)
    Path(args.work).mkdir(parents=True, exist_ok=True)
    if args.check:
        check(args)
        return
    prep = spawn(args, "prepare")
    rows = {r["method"]: r for r in (json.loads(RESULTS.read_text()) if RESULTS.is_file() else [])}
    baseline = None
    for row in args.rows.split(","):
        train: dict = {}
        if row in METHODS:
            train = spawn(args, row)
        ev = spawn(args, f"eval:{row}")
        rec = {"method": row, "config": config_of(row, args), "ppl": ev["ppl"], "bytes": ev["bytes"],
               "seconds": round(train.get("train_seconds", prep["seconds"] if row == "compressed" else 0.0), 1),
               "peak_rss_mb": round(train.get("peak_rss_mb", ev["process_peak_rss_mb"])),
               "trainable_params": train.get("trainable_params", 0),
               "steps": train.get("steps", 0),
               "val_ppl_before": _r(train.get("val_ppl_before")), "val_ppl_best": _r(train.get("val_ppl_best")),
               "threads": args.threads}
        if "peak_gpu_mb" in train:
            rec["peak_gpu_mb"] = round(train["peak_gpu_mb"])
        if row == "peqa":
            rec["codes_identical"] = packed_tensors_equal(Path(args.work) / "compressed", Path(args.work) / "peqa")
        rows[row] = rec
        RESULTS.write_text(json.dumps([rows[k] for k in ROWS if k in rows] +
                                      [v for k, v in rows.items() if k not in ROWS], indent=1))
    baseline = rows.get("compressed", {}).get("ppl")
    for r in rows.values():
        if baseline and r["method"] in METHODS:
            r["ppl_drop_vs_compressed"] = round(1 - r["ppl"] / baseline, 4)
    out = [rows[k] for k in ROWS if k in rows]
    RESULTS.write_text(json.dumps(out, indent=1))
    print_table(out)


def _r(v: float | None) -> float | None:
    return round(v, 3) if v is not None else None


def check(args: argparse.Namespace) -> None:
    ok = True
    for r in json.loads(RESULTS.read_text()):
        if not (Path(args.work) / r["method"]).is_dir():
            print(f"{r['method']}: no artifact in {args.work}, skipped")
            continue
        ev = spawn(args, f"eval:{r['method']}")
        same = abs(ev["ppl"] - r["ppl"]) <= 1e-3 and ev["bytes"] == r["bytes"]
        ok &= same
        print(f"{r['method']}: ppl {ev['ppl']} (reported {r['ppl']}), bytes {ev['bytes']} "
              f"(reported {r['bytes']}): {'OK' if same else 'MISMATCH'}")
    sys.exit(0 if ok else 1)


def print_table(rows: list[dict]) -> None:
    """The rows with human units (drop in %, MiB, thousands separators)."""
    shown = [{"method": r["method"], "config": r["config"], "ppl": f"{r['ppl']:.2f}",
              "vs compressed": f"{-100 * r['ppl_drop_vs_compressed']:+.1f}%" if "ppl_drop_vs_compressed" in r else "",
              "bytes": f"{r['bytes'] / 2**20:.1f} MiB", "train s": f"{r['seconds']:.0f}", "steps": r["steps"],
              "trainable params": f"{r['trainable_params']:,}", "peak RSS MiB": r["peak_rss_mb"]} for r in rows]
    print(markdown_table(shown, list(shown[0]) if shown else []))


if __name__ == "__main__":
    main()
