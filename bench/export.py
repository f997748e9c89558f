"""Export benchmark on SmolLM2-135M: each quantized model exported to compressed-tensors, GGUF and
hf-dense, scored in the engine that reads the format on pqflow's WikiText-2 test windows (512
tokens, the first ``--windows``), beside pqflow's own ppl of the same artifact and its bytes.

- ``compressed-tensors``: scored in the clean venv holding only torch, transformers and the pinned
  compressed-tensors (tests/ct_score.py's loaders; pqflow is never imported there).
- ``gguf``: scored in llama.cpp (llama-cpp-python, token ids fed directly, ``--threads`` for every
  run), plus batch-1 speed as llama-bench measures it: prefill of one 512-token prompt (pp512) and
  greedy decode of ``--decode-tokens`` tokens from an empty cache (tg128), and that decode again
  after the 512-token prompt (``decode_d512``), measured interleaved with an F16 GGUF of the
  unquantized model in the same process and the same threads (median of ``--repeats``). The ``fp16`` row is that F16 GGUF scored on its own.
- ``hf-dense``: scored by plain transformers in a subprocess that never imports pqflow.

Each quantized model is built once by the real ``quantize`` stage under ``--work`` and reused while
its fingerprint holds; pqflow's ppl of each artifact is cached there too (keyed by the artifact's
and the windows' digests). Every (config, format) row runs in its own worker process; the engine
scores in a process of its own, whose peak RSS is the row's ``peak_rss_mb``.

    python bench/export.py                                   # rtn-4g64, every format, 40 windows
    python bench/export.py --windows 8 --formats gguf        # a quick look
    python bench/export.py --configs rtn-4g64,rtn-4g32,rtn-8pcs,gptq-4g64
    # llama.cpp built with other flags than the portable test wheel (each row records its system_info):
    PQFLOW_WHEEL_DIR=~/.cache/pqflow/wheels-native PIP_NO_CACHE_DIR=1 CMAKE_ARGS="-DGGML_NATIVE=ON \
        -DGGML_CUDA=OFF -DGGML_METAL=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" bench/llama_cpp_wheel.sh ~/.cache/pqflow/venvs/llama-native    # a venv holding numpy
    python bench/export.py --formats gguf --configs rtn-4g64 --llama-python ~/.cache/pqflow/venvs/llama-native/bin/python

Configs: ``METHOD-BITS(gGROUP|pc)[s][-eBITS]`` (``s`` = symmetric, asymmetric otherwise; ``-e4``: the
embedding, and so the tied output head, quantized too, with the linears' group size and symmetry), or
``METHOD@NAME``: a mixed-precision model, the ``quantize`` stage with METHOD and the bit allocation
``bench/results/allocations/NAME.json`` (a ``bit-search`` stage's ``allocation.json``; see the README
there for the command that made each; its sha256 is in the row's provenance inputs).

``--calib-windows`` sets the calibration windows the quantize stage draws for methods that need them
(gptq, mrem; default 128, the quantize bench's setting; the row records it, and a model built with
another count is cached under its own name). ``--quant-params JSON`` passes the quantize method's
params (e.g. ``'{"steps": 10}'`` for a shorter MREM; recorded as the row's ``quant_params``).

    python bench/export.py --formats compressed-tensors --calib-windows 32 --configs gptq-4g64,mrem-4g64
    python bench/export.py --formats compressed-tensors --calib-windows 32 --configs gptq@search-3.0 \
        --fallback widen    # the allocation's g128 choices leave a ragged last group on 576 inputs
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import statistics
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from common import (  # bench/ is on sys.path when a bench runs as a script
    markdown_table,
    run_row,
    save_rows,
    use_shared_data,
)

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "bench" / "results" / "export.json"
CT_SCORE_DIR = REPO / "tests"  # ct_score.py, ct_venv.py, llama_score.py: the engines' side, shared with the tests
FORMATS = ["compressed-tensors", "gguf", "hf-dense"]
ENGINE = {"compressed-tensors": "transformers + compressed-tensors (clean venv)", "gguf": "llama.cpp",
          "hf-dense": "transformers"}
SEQLEN = 512
FP16 = "fp16"  # the unquantized model; only its GGUF is a row (the speed baseline)
CONFIG_RE = re.compile(r"^(?P<method>[a-z0-9]+)-(?P<bits>[2348])(?:g(?P<group>\d+)|pc)(?P<sym>s?)(?:-e(?P<emb>[2348]))?$")
ALLOC_RE = re.compile(r"^(?P<method>[a-z0-9]+)@(?P<name>[A-Za-z0-9][A-Za-z0-9._-]*)$")
ALLOCATIONS = REPO / "bench" / "results" / "allocations"  # NAME.json: allocations of METHOD@NAME configs
CALIB_WINDOWS = 128  # the quantize bench's calibration; --calib-windows overrides

# Scores an exported Hugging Face folder with transformers, never importing pqflow: tests/ct_score.py's
# loaders (plain from_pretrained; the library's own decompression only where transformers cannot load
# a compressed-tensors folder) and its ppl. ct_score.ppl is exp(mean per-window NLL) over the windows it
# gets; windows all have the same length, so chunks combine exactly as exp(mean of chunk log-ppls).
TF_ENGINE = r"""
import json, math, sys, time
sys.path.insert(0, sys.argv[1])
import torch
import ct_score
folder, ids_path, allow_library, chunk, threads = sys.argv[2], sys.argv[3], sys.argv[4] == "1", int(sys.argv[5]), int(sys.argv[6])
torch.set_num_threads(threads)
windows = torch.tensor(json.load(open(ids_path)))
t0 = time.perf_counter()
try:
    model, loader, error = ct_score.load_plain(folder), "from_pretrained", None
except Exception as e:
    if not allow_library:
        raise
    model, loader, error = ct_score.load_library(folder), "compressed-tensors decompress", str(e).splitlines()[0][:300]
load_s = time.perf_counter() - t0
t0 = time.perf_counter()
chunks = windows.split(chunk)
ppl = math.exp(sum(math.log(ct_score.ppl(model.eval(), c)) * len(c) for c in chunks) / len(windows))
secs = time.perf_counter() - t0
assert not any(m == "pqflow" or m.startswith("pqflow.") for m in sys.modules), "pqflow was imported"
import transformers
versions = {"torch": torch.__version__, "transformers": transformers.__version__}
if "compressed_tensors" in sys.modules:
    versions["compressed_tensors"] = sys.modules["compressed_tensors"].__version__
print(json.dumps({"ppl": ppl, "loader": loader, "loader_error": error, "load_s": load_s, "score_s": secs,
                  "eval_tok_s": windows.numel() / secs, "versions": versions,
                  "peak_rss_mb": int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) / 1024}))
"""


# -- small helpers ------------------------------------------------------------------------------

def sha256_file(path: Path) -> str:
    # imported here: the llama.cpp engine process runs this file and must not import pqflow
    from pqflow.artifacts import sha256_file as digest

    return digest(path)


def allocation_file(config: str) -> Path | None:
    """The allocation of a ``METHOD@NAME`` config (None for a uniform config)."""
    m = ALLOC_RE.match(config)
    return ALLOCATIONS / f"{m['name']}.json" if m else None


def parse_config(config: str) -> dict[str, Any]:
    """``rtn-4g64`` -> the quantize stage's settings (``-e4``: the embedding, and a tied head, at 4 bits).
    ``gptq@NAME``: the allocation decides every decoder linear; 4g64 asymmetric is only the stage's
    default for a linear the allocation leaves out, as in bench/bitsearch.py."""
    if a := ALLOC_RE.match(config):
        path = allocation_file(config)
        if not path.is_file():
            raise SystemExit(f"config '{config}': no allocation {path.relative_to(REPO)}")
        return {"method": a["method"], "bits": 4, "group_size": 64, "symmetric": False, "embedding_bits": None}
    m = CONFIG_RE.match(config)
    if not m:
        raise SystemExit(f"config '{config}': expected METHOD-BITS(gGROUP|pc)[s][-eBITS] or METHOD@ALLOCATION, e.g. "
                         "rtn-4g64, rtn-8pcs, rtn-4g64-e4, gptq@search-3.0")
    return {"method": m["method"], "bits": int(m["bits"]), "group_size": int(m["group"]) if m["group"] else None,
            "symmetric": bool(m["sym"]), "embedding_bits": int(m["emb"]) if m["emb"] else None}


def pkg_versions(names: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = version(n)
        except PackageNotFoundError:
            pass
    return out


def git_commit() -> dict[str, Any]:
    """HEAD and whether the files a row depends on differ from it (read-only: no index refresh)."""
    def git(*a: str) -> str:
        return subprocess.run(["git", "--no-optional-locks", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()

    dirty = git("status", "--porcelain", "--", "core", "bench/export.py", "bench/results/allocations", "tests/ct_score.py")
    return {"commit": git("rev-parse", "HEAD"), "dirty": bool(dirty)}


def own_peak_rss_mb() -> float:
    """This process's peak RSS since its exec. Not getrusage's ru_maxrss: Linux carries that over
    exec from the forking parent, so an engine started by a big worker would report the worker."""
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmHWM:")[1].split()[0]) / 1024


# -- artifacts: the quantized models and the unquantized one --------------------------------------

def quant_recipe(work: Path, config: str, calib_windows: int = CALIB_WINDOWS, params: dict | None = None) -> dict:
    quantize = {"enabled": True, **parse_config(config)} | ({"params": params} if params else {})
    return {
        "name": "bench-export",
        "model": {"source": "smollm2-135m"},
        "stages": {
            # used by methods that need calibration (gptq, mrem): the quantize bench's setting by default
            "calibrate": {"n_windows": calib_windows, "seqlen": SEQLEN, "seed": 0},
            "quantize": quantize,
        },
        "storage": {"root": f"file://{work}"},
    }


def allocation_artifact(work: Path, path: Path) -> str:
    """``path`` (an ``allocation.json``) as an allocation artifact under ``work``, fingerprinted by its
    sha256; the file is copied byte for byte."""
    from pqflow.artifacts import build_manifest, open_artifact, publish, read_manifest, staging_dir

    digest = sha256_file(path)
    uri = f"file://{work}/alloc-{path.stem}"
    existing = read_manifest(uri)
    if existing is not None and existing.get("fingerprint") == digest:
        open_artifact(uri)  # verified, or it raises
        return uri
    tmp = staging_dir(uri)
    (tmp / "allocation.json").write_bytes(path.read_bytes())
    publish(tmp, uri, build_manifest(tmp, stage="bit-search", params={"bench": path.stem}, inputs={},
                                     fingerprint=digest, summary={}))
    return uri


def calibrated(config: str) -> bool:
    """Whether the config's quantize method draws calibration windows (gptq, mrem; not rtn)."""
    from pqflow.methods.quant import REGISTRY

    return config != FP16 and getattr(REGISTRY.module(parse_config(config)["method"]), "NEEDS_CALIBRATION", False)


def params_tag(params: dict | None) -> str:
    """A cache-name suffix for non-default method params."""
    if not params:
        return ""
    return "-p" + hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:8]


def quantized_artifact(work: Path, config: str, calib_windows: int = CALIB_WINDOWS, params: dict | None = None) -> Path:
    """The ``quantize`` stage's artifact for ``config``; the stage skips it when up to date."""
    from pqflow.recipe import parse_recipe
    from pqflow.runner import run_stage

    if not calibrated(config):
        calib_windows = CALIB_WINDOWS  # unused by the method: keeps the artifact's cache name and fingerprint
    out = work / (f"q-{config}" + ("" if calib_windows == CALIB_WINDOWS else f"-c{calib_windows}") + params_tag(params))
    alloc = allocation_file(config)
    inputs = {"allocation": allocation_artifact(work, alloc)} if alloc else {}
    run_stage("quantize", parse_recipe(quant_recipe(work, config, calib_windows, params)), inputs, f"file://{out}")
    return out


def fp16_artifact(work: Path) -> Path:
    """The source model's weights in fp16 as a plain pqflow model artifact (what gguf writes as F16)."""
    import torch

    from pqflow.artifacts import (
        build_manifest,
        canonical_digest,
        open_artifact,
        publish,
        read_manifest,
        staging_dir,
    )
    from pqflow.models import SMOLLM2_GGUF, cast_float, load_source, save_model, smollm2_dir

    out = work / FP16
    fp = canonical_digest({"source": "smollm2-135m", "dtype": "float16",
                           "gguf": sha256_file(smollm2_dir() / SMOLLM2_GGUF)})
    existing = read_manifest(str(out))
    if existing is not None and existing.get("fingerprint") == fp:
        open_artifact(str(out))  # verified, or it raises
        return out
    src = load_source("smollm2-135m")
    cast_float(src.model, torch.float16)
    stage = staging_dir(str(out))
    save_model(src.model, src.tokenizer, stage)
    publish(stage, str(out), build_manifest(stage, stage="source", params={"dtype": "float16"},
                                            inputs={}, fingerprint=fp))
    return out


def artifact(work: Path, config: str, calib_windows: int = CALIB_WINDOWS, params: dict | None = None) -> Path:
    return fp16_artifact(work) if config == FP16 else quantized_artifact(work, config, calib_windows, params)


def eval_ids(work: Path, tokenizer: Any, n: int) -> Path:
    """pqflow's evaluation windows (the ``evaluate`` stage's protocol) as a JSON list of token ids."""
    from pqflow.data import eval_windows, load_text, tokenize

    path = work / f"windows-{SEQLEN}x{n}.json"
    if not path.is_file():
        windows = eval_windows(tokenize(tokenizer, load_text("wikitext2", "test")), SEQLEN, n)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(windows.tolist()))
        tmp.replace(path)
    return path


def pqflow_ppl(work: Path, src: Path, n_windows: int) -> tuple[float, Path]:
    """pqflow's ppl of the artifact at ``src`` (cached by artifact and windows digest) and the windows."""
    import torch

    from pqflow.artifacts import open_artifact
    from pqflow.models import cast_float, load_model_artifact
    from pqflow.perplexity import perplexity

    digest = open_artifact(str(src)).digest
    cache = work / "pqflow-ppl.json"
    known = json.loads(cache.read_text()) if cache.is_file() else {}
    ids = work / f"windows-{SEQLEN}x{n_windows}.json"
    key = f"{digest}:{sha256_file(ids)}" if ids.is_file() else None
    if key in known:
        return known[key], ids
    loaded = load_model_artifact(src)
    ids = eval_ids(work, loaded.tokenizer, n_windows)
    if src.name == FP16:  # fp16 weights, fp32 compute, as every quantized model computes on CPU
        cast_float(loaded.model, torch.float32)
    windows = torch.tensor(json.loads(ids.read_text()))
    ppl = perplexity(loaded.model, windows, batch_size=4).ppl
    known[f"{digest}:{sha256_file(ids)}"] = ppl
    cache.write_text(json.dumps(known, indent=1))
    return ppl, ids


# -- engines ------------------------------------------------------------------------------------

def clean_venv() -> Path:
    """tests/ct_venv.py's clean venv (the tests' cache folder, so it is built once for both)."""
    from pqflow.export.compressed_tensors import CT_VERSION

    sys.path.insert(0, str(CT_SCORE_DIR))
    from ct_venv import clean_venv as build

    return build(CT_VERSION)


def transformers_score(python: Path, folder: Path, ids: Path, allow_library: bool, threads: int) -> dict:
    res = subprocess.run([str(python), "-c", TF_ENGINE, str(CT_SCORE_DIR), str(folder), str(ids),
                          "1" if allow_library else "0", "4", str(threads)],
                         capture_output=True, text=True, env={**os.environ, "PYTHONPATH": ""}, cwd="/")
    if res.returncode:
        raise RuntimeError(f"transformers scoring failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def gguf_score(gguf: Path, ids: Path, fp16_gguf: Path | None, args: argparse.Namespace) -> dict:
    """llama.cpp in a process of its own (only llama_cpp and numpy imported): see gguf_engine."""
    job = {"gguf": str(gguf), "ids": str(ids), "fp16_gguf": str(fp16_gguf) if fp16_gguf else None,
           "threads": args.threads, "decode_tokens": args.decode_tokens, "repeats": args.repeats}
    res = subprocess.run([args.llama_python or sys.executable, __file__, "--gguf-engine", json.dumps(job)],
                         capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"llama.cpp scoring failed: {res.stderr.strip()[-2000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _llama(path: str, n_ctx: int, logits_all: bool, threads: int) -> Any:
    import llama_cpp

    return llama_cpp.Llama(model_path=path, n_ctx=n_ctx, n_batch=min(n_ctx, SEQLEN), logits_all=logits_all,
                           n_threads=threads, n_threads_batch=threads, verbose=False)


def llama_ppl(path: str, windows: list[list[int]], threads: int) -> tuple[float, float]:
    """pqflow's protocol in llama.cpp (tests/llama_score.py, shared with the tests): ppl, seconds."""
    sys.path.insert(0, str(CT_SCORE_DIR))
    from llama_score import llama_ppl as score

    llm = _llama(path, len(windows[0]), True, threads)
    t0 = time.perf_counter()
    ppl = score(llm, windows)
    secs = time.perf_counter() - t0
    llm.close()
    return ppl, secs


def prefill_speed(llm: Any, prompt: list[int]) -> float:
    """Batch 1: one prompt eval from an empty cache (llama-bench's ``pp``), tokens/s."""
    llm.reset()
    t0 = time.perf_counter()
    llm.eval(prompt)
    return len(prompt) / (time.perf_counter() - t0)


def decode_speed(llm: Any, context: list[int], n_decode: int) -> tuple[float, list[int]]:
    """Batch 1: ``context`` evaluated untimed, then ``n_decode`` greedy steps timed (argmax of the
    last logits, which is all a logits_all=False context keeps), tokens/s. A one-token context is
    llama-bench's ``tg`` (decode from an empty cache); a 512-token one is its ``tg`` at depth 512."""
    import numpy as np

    n_vocab = llm.n_vocab()
    llm.reset()
    llm.eval(context)
    out = []
    t0 = time.perf_counter()
    for _ in range(n_decode):
        logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))
        out.append(int(logits.argmax()))
        llm.eval(out[-1:])
    return n_decode / (time.perf_counter() - t0), out


SPEEDS = ("prefill", "decode", "decode_d512")


def gguf_engine(job: dict) -> dict:
    """Score ``job['gguf']`` and time it against ``job['fp16_gguf']``: the same prompt, threads and
    context size, runs interleaved (model, fp16, model, fp16, ...) so load on the shared cores hits
    both alike; medians of the repeats, after one untimed warm-up each (page faults of the mmap).

    Three speeds, llama-bench's protocol: ``prefill`` of the 512-token window (pp512), ``decode``
    of ``decode_tokens`` from an empty cache (tg128, the headline), and ``decode_d512``, the same
    decode after the 512-token window (attention over a long F16 KV cache costs both models alike,
    so the ratio is lower there)."""
    import llama_cpp

    windows = json.loads(Path(job["ids"]).read_text())
    ppl, score_s = llama_ppl(job["gguf"], windows, job["threads"])
    prompt, n_dec = windows[0], job["decode_tokens"]
    models = {"model": job["gguf"]} | ({"fp16": job["fp16_gguf"]} if job["fp16_gguf"] else {})
    llms = {k: _llama(p, len(prompt) + n_dec, False, job["threads"]) for k, p in models.items()}
    for llm in llms.values():
        prefill_speed(llm, prompt[:64])
        decode_speed(llm, prompt[:1], 4)
    runs: dict[str, list[tuple[float, ...]]] = {k: [] for k in llms}
    texts = {}
    for _ in range(job["repeats"]):
        for k, llm in llms.items():
            pre = prefill_speed(llm, prompt)
            dec, toks = decode_speed(llm, prompt[:1], n_dec)
            deep, _ = decode_speed(llm, prompt, n_dec)
            runs[k].append((pre, dec, deep))
            texts[k] = toks
    for llm in llms.values():
        llm.close()
    med = {k: [statistics.median(r[i] for r in rs) for i in range(len(SPEEDS))] for k, rs in runs.items()}
    out = {"ppl": ppl, "score_s": score_s, "eval_tok_s": len(windows) * len(prompt) / score_s,
           **{f"{s}_tok_s": v for s, v in zip(SPEEDS, med["model"], strict=True)},
           "runs": {k: [[round(x, 1) for x in r] for r in rs] for k, rs in runs.items()},
           # which SIMD paths the build uses (the wheel is built with GGML_NATIVE=OFF)
           "versions": {"llama_cpp_python": llama_cpp.__version__,
                        "system_info": llama_cpp.llama_print_system_info().decode().strip()},
           "peak_rss_mb": own_peak_rss_mb()}
    if "fp16" in med:
        out.update({f"fp16_{s}_tok_s": v for s, v in zip(SPEEDS, med["fp16"], strict=True)})
        out["greedy_tokens_agree"] = sum(a == b for a, b in zip(texts["model"], texts["fp16"], strict=True))
    assert not any(m == "pqflow" or m.startswith("pqflow.") for m in sys.modules), "pqflow was imported"
    return out


# -- one row ------------------------------------------------------------------------------------

def export(src: Path, fmt: str, out: Path, args: argparse.Namespace, dtype: str) -> tuple[dict, float]:
    from pqflow.export import ExportOptions, export_artifact

    t0 = time.perf_counter()
    summary = export_artifact(str(src), fmt, f"file://{out}", ExportOptions(fallback=args.fallback, dtype=dtype),
                              force=True)
    return summary, time.perf_counter() - t0


def provenance(args: argparse.Namespace, ids: Path, digests: dict[str, str], engine_versions: dict) -> dict:
    """What reproduces a row: the command, the commit, the versions, the digests of its inputs."""
    from pqflow.artifacts import versions
    from pqflow.data import source_file
    from pqflow.models import SMOLLM2_GGUF, smollm2_dir

    wt = source_file("wikitext2", "test")
    return {
        "command": " ".join([Path(sys.executable).name, "bench/export.py", *args.argv]),
        **git_commit(),
        "versions": {**versions(), **pkg_versions(("gguf", "llama_cpp_python", "compressed-tensors", "numpy")),
                     "engine": engine_versions},
        "inputs": {"source_gguf_sha256": sha256_file(smollm2_dir() / SMOLLM2_GGUF),
                   "wikitext2_test_sha256": sha256_file(wt) if wt else None,
                   "windows_sha256": sha256_file(ids), **digests},
    }


def score(config: str, fmt: str, out: Path, ids: Path, args: argparse.Namespace) -> dict:
    """The export at ``out`` in its engine: ppl, and for gguf the speed against the F16 GGUF."""
    from pqflow.export import export_artifact

    if fmt == "compressed-tensors":
        return transformers_score(clean_venv(), out, ids, True, args.threads)
    if fmt == "hf-dense":
        return transformers_score(Path(sys.executable), out, ids, False, args.threads)
    if config == FP16:
        eng = gguf_score(out / "model.gguf", ids, None, args)
        eng.update({f"fp16_{s}_tok_s": eng[f"{s}_tok_s"] for s in SPEEDS})
        return eng
    # the F16 baseline: the unquantized model exported the same way (skipped when up to date)
    fp16_out = Path(args.work) / "exports" / f"{FP16}-gguf"
    export_artifact(str(fp16_artifact(Path(args.work))), "gguf", f"file://{fp16_out}")
    return gguf_score(out / "model.gguf", ids, fp16_out / "model.gguf", args)


def engine_fields(eng: dict, config: str, args: argparse.Namespace) -> dict:
    row = {k: round(eng[k], 1) for s in SPEEDS for k in (f"{s}_tok_s", f"fp16_{s}_tok_s") if k in eng}
    if "fp16_decode_tok_s" in eng and config != FP16:
        row.update({f"{s}_speedup_vs_fp16": round(eng[f"{s}_tok_s"] / eng[f"fp16_{s}_tok_s"], 3) for s in SPEEDS})
        row["speed_runs"] = {"columns": list(SPEEDS), **eng["runs"]}
        row["decode_tokens"], row["speed_repeats"] = args.decode_tokens, args.repeats
        row["greedy_tokens_agree_with_fp16"] = eng["greedy_tokens_agree"]
    if "loader" in eng:
        row["loader"] = eng["loader"]
        if eng["loader_error"]:
            row["loader_error"] = eng["loader_error"]
    return row


SUMMARY_KEYS = ("file_type", "linear_types", "widened", "requantized", "lossless", "schemes", "config_groups",
                "float_fallbacks", "transformers_loader", "compressed_tensors", "params")


def worker(config: str, fmt: str, args: argparse.Namespace) -> dict:
    from pqflow.artifacts import open_artifact
    from pqflow.export import ExportError

    work = Path(args.work)
    src = artifact(work, config, args.calib_windows, args.quant_params)
    ours, ids = pqflow_ppl(work, src, args.windows)
    src_art = open_artifact(str(src))
    dtype = {"compressed-tensors": args.ct_dtype, "hf-dense": args.dense_dtype, "gguf": "float16"}[fmt]
    row = {"format": fmt, "engine": engine_label(fmt, args), "config": config, "dtype": dtype, "pqflow_ppl": round(ours, 3),
           "pqflow_bytes": src_art.manifest["bytes"], "windows": args.windows, "seqlen": SEQLEN,
           "threads": args.threads, "fallback": args.fallback}
    if calibrated(config):
        row["calib_windows"] = args.calib_windows
    if args.quant_params and config != FP16:
        row["quant_params"] = args.quant_params
    digests = {"artifact_digest": src_art.digest}
    if alloc := allocation_file(config):
        row["allocation"] = str(alloc.relative_to(REPO))
        digests["allocation_sha256"] = sha256_file(alloc)
    out = work / "exports" / f"{config}-{fmt}"
    try:
        summary, export_s = export(src, fmt, out, args, dtype)
    except ExportError as e:  # the format cannot hold this model exactly: a row that says why
        return {**row, "error": str(e), **provenance(args, ids, digests, {})}
    eng = score(config, fmt, out, ids, args)
    out_art = open_artifact(str(out))
    row.update({
        "ppl": round(eng["ppl"], 3), "ppl_delta_pct": round(100 * (eng["ppl"] - ours) / ours, 3),
        "bytes": out_art.manifest["bytes"], "seconds": round(export_s, 1),
        "score_seconds": round(eng["score_s"], 1), "engine_eval_tok_s": round(eng["eval_tok_s"], 1),
        "peak_rss_mb": round(eng["peak_rss_mb"]), "export_peak_rss_mb": round(own_peak_rss_mb()),
        **engine_fields(eng, config, args),
        "export_summary": {k: summary[k] for k in SUMMARY_KEYS if k in summary},
        **provenance(args, ids, {**digests, "export_digest": out_art.digest}, eng["versions"]),
    })
    return row


# -- driver -------------------------------------------------------------------------------------

COLUMNS = ["format", "engine", "config", "ppl", "pqflow_ppl", "ppl_delta_pct", "bytes", "pqflow_bytes",
           "prefill_tok_s", "decode_tok_s", "fp16_prefill_tok_s", "fp16_decode_tok_s", "decode_speedup_vs_fp16",
           "decode_d512_speedup_vs_fp16", "seconds", "peak_rss_mb"]


def table(rows: list[dict]) -> str:
    cols = COLUMNS + (["error"] if any(r.get("error") for r in rows) else [])
    return markdown_table([{**r, **{k: f"{r[k]:,}" for k in ("bytes", "pqflow_bytes") if k in r}} for r in rows],
                          cols)


def jobs(configs: list[str], formats: list[str]) -> list[tuple[str, str]]:
    out = [(FP16, "gguf")] if "gguf" in formats else []
    return out + [(c, f) for c in configs for f in formats]


def run_job(config: str, fmt: str, args: argparse.Namespace) -> dict | None:
    print(f"[bench] {config} {fmt} ...", file=sys.stderr, flush=True)
    return run_row([sys.executable, __file__, "--worker", config, fmt, *args.argv],
                   Path(args.work) / f"row-{config}-{fmt}.json", f"{config} {fmt}")


def engine_label(fmt: str, args: argparse.Namespace) -> str:
    """The engine column; a llama.cpp other than this venv's is named by its venv folder, so that a
    native build's rows sit beside the portable wheel's instead of replacing them."""
    if fmt == "gguf" and args.llama_python:
        return f"{ENGINE[fmt]} ({Path(args.llama_python).expanduser().absolute().parents[1].name})"
    return ENGINE[fmt]


def merge(rows: list[dict], row: dict, configs: list[str]) -> list[dict]:
    key = ("format", "config", "engine")
    rows = [r for r in rows if tuple(r[k] for k in key) != tuple(row[k] for k in key)] + [row]
    order = {c: i for i, c in enumerate([FP16, *configs])}
    return sorted(rows, key=lambda r: (order.get(r["config"], 99), r["config"], FORMATS.index(r["format"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", default="rtn-4g64", help="comma-separated, e.g. rtn-4g64,rtn-4g32,rtn-8pcs,gptq-4g64")
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--windows", type=int, default=40, help="the first N 512-token WikiText-2 test windows")
    ap.add_argument("--calib-windows", type=int, default=CALIB_WINDOWS,
                    help="calibration windows of the quantize stage (gptq, mrem); recorded in each row")
    ap.add_argument("--quant-params", type=json.loads, default=None,
                    help="JSON params of the quantize method, e.g. '{\"steps\": 10}' (recorded in each row)")
    ap.add_argument("--threads", type=int, default=2, help="threads of every engine and every speed run")
    ap.add_argument("--llama-python", help="the Python whose llama_cpp scores and times the GGUFs (default: this "
                    "one; e.g. a venv with a llama.cpp built for this CPU: bench/llama_cpp_wheel.sh with "
                    "CMAKE_ARGS=-DGGML_NATIVE=ON); its build's system_info goes into each row")
    ap.add_argument("--decode-tokens", type=int, default=128, help="decode steps timed (llama-bench's tg128)")
    ap.add_argument("--repeats", type=int, default=3, help="speed runs per GGUF (median reported)")
    ap.add_argument("--fallback", default="error", choices=["error", "widen", "requant"])
    ap.add_argument("--ct-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--dense-dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--work", default=os.environ.get("PQFLOW_BENCH_WORK", "/tmp/pqflow-bench-export"))
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--worker", nargs=2, metavar=("CONFIG", "FORMAT"), help=argparse.SUPPRESS)
    ap.add_argument("--gguf-engine", metavar="JOB", help=argparse.SUPPRESS)
    argv = sys.argv[1:]
    args = ap.parse_args(argv)
    if args.gguf_engine:
        print(json.dumps(gguf_engine(json.loads(args.gguf_engine))))
        return
    # the bench's own command line: what a row records and what its workers are started with
    args.argv = argv[: argv.index("--worker")] + argv[argv.index("--worker") + 3:] if args.worker else argv
    use_shared_data()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    configs = [c for c in args.configs.split(",") if c]
    formats = [f for f in args.formats.split(",") if f]
    for c in configs:
        parse_config(c)
    if unknown := set(formats) - set(FORMATS):
        raise SystemExit(f"unknown formats {sorted(unknown)} (known: {', '.join(FORMATS)})")
    if args.worker:
        config, fmt = args.worker
        import torch

        torch.set_num_threads(args.threads)
        row = worker(config, fmt, args)
        (work / f"row-{config}-{fmt}.json").write_text(json.dumps(row))
        return
    results = Path(args.results)
    rows = json.loads(results.read_text()) if results.is_file() else []
    for config, fmt in jobs(configs, formats):
        row = run_job(config, fmt, args)
        if row is None:
            continue
        rows = merge(rows, row, configs)
        save_rows(results, rows)
        print(table([row]), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
