"""Quantization benchmark on SmolLM2-135M: WikiText-2 test perplexity (512-token windows, the
first 40), perplexity on a second-domain text, bytes on disk, quantization time and peak RSS,
for fp16 and every method x config.

Second domain: the Python Language Reference topics shipped with CPython
(``pydoc_data.topics``, ~465 KB of English technical prose, keys sorted, joined by blank lines);
never used for calibration. Calibration: 128 x 512-token windows from the WikiText-2 train split
(offline: the first 90% of valid), seed 0 — the ``calibrate`` stage's defaults of the demo.

Each row runs in its own subprocess (true peak RSS per method) through the real stages:
``calibrate`` once, then ``quantize`` into an artifact that is re-loaded from disk and evaluated.

    python bench/quantize.py                                  # everything
    python bench/quantize.py --methods rtn,gptq --configs 4g64 # a subset; rows merge into the JSON
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import (  # bench/ is on sys.path when a bench runs as a script
    markdown_table,
    save_rows,
    use_shared_data,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "quantize.json"
METHODS = ["fp16", "rtn", "gptq", "mrem", "bnb-nf4", "bnb-int8"]
CONFIGS = {"8pc": (8, None), "4g64": (4, 64), "4g128": (4, 128), "3g64": (3, 64), "2g64": (2, 64)}
BNB_CONFIG = {"bnb-nf4": "nf4-b64-dq", "bnb-int8": "int8-rowwise"}
SEQLEN, WINDOWS = 512, 40


def second_domain_text(work: Path) -> Path:
    import pydoc_data.topics as topics

    path = work / "python-reference-topics.txt"
    path.write_text("\n\n".join(topics.topics[k] for k in sorted(topics.topics)))
    return path


def recipe(work: Path, method: str, bits: int, group: int | None, params: dict) -> dict:
    return {
        "name": "bench-quantize",
        "model": {"source": "smollm2-135m"},
        "stages": {
            "calibrate": {"n_windows": 128, "seqlen": SEQLEN, "seed": 0},
            "quantize": {"enabled": True, "method": method, "bits": bits, "group_size": group, "params": params},
        },
        "storage": {"root": f"file://{work}"},
    }


def evaluate(model, tok, work: Path) -> dict:
    from pqflow.data import eval_windows, load_text, tokenize
    from pqflow.perplexity import perplexity

    res = {}
    for key, src in (("ppl", "wikitext2"), ("ppl_2nd", f"text:{second_domain_text(work)}")):
        ids = tokenize(tok, load_text(src, "test"))
        r = perplexity(model, eval_windows(ids, SEQLEN, WINDOWS), batch_size=4)
        res[key] = round(r.ppl, 3)
        if key == "ppl":
            res["eval_tok_s"] = round(r.tokens_per_s, 1)
    return res


def worker(method: str, config: str, work: Path, params: dict) -> dict:
    import torch

    from pqflow.models import cast_float, load_model_artifact, load_source, save_model, weight_bytes
    from pqflow.quant.report import folder_tensor_sizes, module_bytes
    from pqflow.recipe import parse_recipe
    from pqflow.runner import run_stage
    from pqflow.runtime import peak_rss_mb

    torch.manual_seed(0)
    fp_dir = work / "fp16"
    if method == "fp16":
        src = load_source("smollm2-135m")
        cast_float(src.model, torch.float16)
        save_model(src.model, src.tokenizer, fp_dir)
        model = cast_float(src.model, torch.float32)  # fp16 weights, fp32 compute (as every other row computes)
        row = {"method": "fp16", "config": "fp16", "seconds": 0.0, "bytes": weight_bytes(fp_dir)}
        row.update(evaluate(model, src.tokenizer, work))
        row["peak_rss_mb"] = round(peak_rss_mb())
        return row
    bits, group = CONFIGS.get(config, (4, 64))
    r = parse_recipe(recipe(work, method, bits, group, params))
    t0 = time.perf_counter()
    cal = run_stage("calibrate", r, {}, f"file://{work}/calib")
    out = f"file://{work}/q-{method}-{config}"
    q = run_stage("quantize", r, {"calib": cal.uri}, out, force=True)
    wall = time.perf_counter() - t0
    loaded = load_model_artifact(Path(out[len("file://"):]))
    row = {"method": method, "config": BNB_CONFIG.get(method, config), "bits": q.summary.get("avg_bits"),
           "seconds": round(q.summary["seconds"], 1), "wall_seconds": round(wall, 1),
           "bytes": q.summary["model_bytes"], "linear_bytes": q.summary["quantized_bytes"],
           "avg_bits": round(q.summary["avg_bits"], 3)}
    if fp_dir.is_dir():  # ratio to the fp16 file's bytes for the same linears, both read from disk
        qdir = Path(out[len("file://"):])
        names = sorted({k.rsplit(".", 1)[0] for k in folder_tensor_sizes(qdir) if ".layers." in k and "_proj" in k})
        fp_b = module_bytes(folder_tensor_sizes(fp_dir), [n.removesuffix(".weight") for n in names])
        row["linear_ratio_vs_fp16"] = round(q.summary["quantized_bytes"] / fp_b, 4) if fp_b else None
    row.update(evaluate(loaded.model, loaded.tokenizer, work))
    row["peak_rss_mb"] = round(peak_rss_mb())
    row["params"] = params
    return row


def table(rows: list[dict]) -> str:
    return markdown_table(rows, ["method", "config", "ppl", "ppl_2nd", "bytes", "avg_bits", "linear_ratio_vs_fp16", "seconds", "peak_rss_mb"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--configs", default=",".join(CONFIGS))
    ap.add_argument("--work", default=os.environ.get("PQFLOW_BENCH_WORK", "/tmp/pqflow-bench-quantize"))
    ap.add_argument("--params", default="{}", help='JSON per method, e.g. \'{"mrem": {"steps": 50}}\'')
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--worker", nargs=2, metavar=("METHOD", "CONFIG"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    use_shared_data()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    params = json.loads(args.params)
    if args.worker:
        method, config = args.worker
        row = worker(method, config, work, params.get(method, {}))
        (work / f"row-{method}-{config}.json").write_text(json.dumps(row))
        return
    methods = args.methods.split(",")
    jobs = [("fp16", "fp16")] if "fp16" in methods or not (work / "fp16").is_dir() else []
    for m in methods:
        if m == "fp16":
            continue
        if m.startswith("bnb-"):
            jobs.append((m, "4g64"))
        else:
            jobs.extend((m, c) for c in args.configs.split(","))
    results = Path(args.results)
    rows = json.loads(results.read_text()) if results.is_file() else []
    for method, config in jobs:
        print(f"[bench] {method} {config} ...", file=sys.stderr, flush=True)
        rc = subprocess.run([sys.executable, __file__, "--worker", method, config, "--work", str(work),
                             "--params", args.params]).returncode
        f = work / f"row-{method}-{config}.json"
        if rc != 0 or not f.is_file():
            print(f"[bench] {method} {config} failed (exit {rc})", file=sys.stderr)
            continue
        row = json.loads(f.read_text())
        f.unlink()
        rows = [r for r in rows if (r["method"], r["config"]) != (row["method"], row["config"])] + [row]
        order = {m: i for i, m in enumerate(METHODS)}
        rows.sort(key=lambda r: (order.get(r["method"], 99), list(CONFIGS).index(r["config"]) if r["config"] in CONFIGS else 0))
        save_rows(results, rows)
        print(table([row]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
