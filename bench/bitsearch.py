"""Bit-search benchmark on SmolLM2-135M: uniform vs importance-prior vs searched allocations at
equal bytes, WikiText-2 test perplexity (512-token windows, the first 40) after ``quantize``.

Budgets are average bits per decoder-linear weight *including* fp16 scales, uint8 zeros (and
biases), computed exactly as ``quantize`` stores them: 3.0, 3.5 and 4.5 bits. At each budget:

- ``uniform``: every linear at one bit width, its group size chosen so that the bytes equal the
  budget (e.g. 4-bit g48 = 4.5 bits); plus the reference row ``uniform 4g64`` (4.375 bits, the
  38.80 of DESIGN.md);
- ``importance-prior``: the greedy allocation from each prior (error, mi, importance = the
  importance stage's Taylor scores, sensitivity);
- ``nevergrad``: the ``bit-search`` stage (prior auto, 40 trials), timed end to end.

Every allocation goes through the ``quantize`` stage with one method for every row (``--quantize``,
RTN by default; bit choices exclude 4-bit g32, which is lossless on these Q4_1-derived weights) and
the saved artifact is reloaded and evaluated; bytes are read from the artifact's safetensors
header. The search and the priors score allocations with RTN fake quantization, or with GPTQ
(``--search-with gptq``: per-module GPTQ on the calibration XᵀX, in its own work dir). Rows run in
subprocesses (honest peak RSS); ``seconds`` is the time to produce the allocation.

    python bench/bitsearch.py                 # everything (~1-2 h on 2 busy cores)
    python bench/bitsearch.py --budgets 3.0   # a subset; rows merge into the JSON
    python bench/bitsearch.py --budgets 3.0 --quantize gptq --reuse --priors importance
                                              # the same allocations stored with GPTQ
    python bench/bitsearch.py --budgets 3.0 --search-with gptq --quantize gptq --priors importance
                                              # searched and stored with GPTQ
    python bench/bitsearch.py --budgets 3.0 --search-with gptq --quantize mrem-lr --reuse --no-uniform
                                              # the same allocations stored with MREM, learned rounding
    python bench/bitsearch.py --budgets 3.0 --quantize gptq-e2e --reuse --no-uniform --priors importance
                                              # RTN-scored allocations stored with GPTQ + E2E distillation
    python bench/bitsearch.py --budgets 3.0 --quantize mrem-lr256-e2e --no-uniform --priors none
                                              # the 3.0-bit search stored with MREM learned rounding on 256
                                              # windows + E2E at lr 0.005 (38.43; ~50 min on 2 cores)
    python bench/bitsearch.py --budgets 3.0 --search-with gptq --search-method nevergrad-prior \
        --quantize mrem-lr256-e2e --no-uniform --priors importance
                                              # GPTQ-scored, BO over the prior's damage-model knobs
                                              # (nevergrad-prior), stored the same way

``--search-method nevergrad-prior`` searches ~10 knobs of the prior's damage model (layer-weight
and error exponents, a depth tilt, a weight per linear kind) with Bayesian optimisation instead
of mutating the allocation; its rows say ``BO seeded by ...`` and carry the best knobs.
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
RESULTS = REPO / "bench" / "results" / "bitsearch.json"
SEQLEN, WINDOWS = 512, 40
BUDGETS = (3.0, 3.5, 4.5)
CHOICES = ["2g64", "2g32", "3pc", "3g128", "3g64", "4g128", "4g64", "8g128"]
PRIORS = ("error", "mi", "importance", "sensitivity")
TRIALS = 40
SEARCH_METHODS = ("nevergrad", "nevergrad-prior")
METHODS = ("uniform", "importance-prior", *SEARCH_METHODS)  # row order in the table


SEARCH_WITH = ("rtn", "gptq")  # quantize methods with a per-module fake quantizer for trials
# --quantize choices: the quantize stage's method, its params, and the calibration windows it draws
# (the search's calibration keeps 32; learned rounding over-fits 32 windows, see mrem's n_windows)
QUANTIZE = {"rtn": ("rtn", {}, 32), "gptq": ("gptq", {}, 32), "mrem": ("mrem", {}, 32),
            "mrem-lr": ("mrem", {"rounding": "learned"}, 128),
            "gptq-e2e": ("e2e", {"init": "gptq"}, 128),
            "gptq-e2e-lr": ("e2e", {"init": "gptq", "rounding": "learned"}, 128),
            "mrem-lr-e2e": ("e2e", {"init": "mrem", "mrem": {"rounding": "learned"}}, 128),
            "mrem-lr256-e2e": ("e2e", {"init": "mrem", "lr": 0.005, "mrem": {"rounding": "learned", "n_windows": 256}},
                               256)}


def recipe(work: Path, quantize: str = "rtn", **bit_search) -> dict:
    """``quantize`` is the quantize stage's method; the search's trials follow it."""
    return {
        "name": "bench-bitsearch",
        "model": {"source": "smollm2-135m"},
        "stages": {
            # XᵀX only feeds GPTQ-scored trials; RTN trials and the priors never read it
            "calibrate": {"n_windows": 32, "seqlen": SEQLEN, "seed": 0, "collect_xtx": quantize == "gptq"},
            "importance": {"enabled": True, "method": "taylor"},
            "bit_search": {"enabled": True, "choices": CHOICES, "heldout_windows": 8, "heldout_seqlen": 256,
                           "seed": 0, **bit_search},
            "quantize": {"enabled": True, "method": quantize, "bits": 4, "group_size": 64},
        },
        "storage": {"root": f"file://{work}"},
    }


def uniform_choice(n_weights_fn, budget_bits: float) -> tuple[int, int]:
    """The uniform (bits, group) whose exact bytes come closest to the budget without passing it
    (ties: more bits)."""
    best = None
    for bits in (4, 3, 2):
        for g in range(8, 1025, 8):
            b = n_weights_fn(bits, g)
            if b <= budget_bits and (best is None or b > best[0] + 1e-9):
                best = (b, bits, g)
    assert best is not None
    return best[1], best[2]


def publish_allocation(work: Path, name: str, doc: dict) -> str:
    from pqflow.artifacts import build_manifest, publish, staging_dir

    uri = f"file://{work}/alloc-{name}"
    tmp = staging_dir(uri)
    (tmp / "allocation.json").write_text(json.dumps(doc, indent=2, sort_keys=True))
    publish(tmp, uri, build_manifest(tmp, stage="bit-search", params={"bench": name}, inputs={},
                                     fingerprint=name, summary={}))
    return uri


# -- workers (each in its own process) ---------------------------------------------------------


def w_prepare(work: Path, search_with: str) -> dict:
    from pqflow.recipe import parse_recipe
    from pqflow.runner import run_stage

    r = parse_recipe(recipe(work, search_with, avg_bits=4.5))
    cal = run_stage("calibrate", r, {}, f"file://{work}/calib")
    imp = run_stage("importance", r, {"calib": cal.uri}, f"file://{work}/importance")
    return {"calib": cal.uri, "importance": imp.uri, "importance_seconds": imp.summary.get("importance_seconds"),
            "xtx": r.stages.calibrate.collect_xtx}


def w_priors(work: Path, budgets: list[float], search_with: str) -> dict:
    """Uniform and prior allocations for every budget, sharing one search context."""
    from functools import partial

    from pqflow.artifacts import open_artifact
    from pqflow.methods.bitsearch import budget as B
    from pqflow.methods.bitsearch.context import PriorSettings, SearchContext
    from pqflow.methods.bitsearch.space import SearchSpace, module_bytes, parse_choice
    from pqflow.models import load_source
    from pqflow.recipe import parse_recipe
    from pqflow.runtime import peak_rss_mb
    from pqflow.stages.bit_search import fake_quantizer, heldout_windows, importance_scores, open_calibration

    prep = json.loads((work / "prepare.json").read_text())
    r = parse_recipe(recipe(work, search_with, avg_bits=4.5))
    loaded = load_source("smollm2-135m")
    calib = open_calibration(open_artifact(prep["calib"]))
    space = SearchSpace.build(loaded.model, "linear", [parse_choice(c) for c in CHOICES])
    ctx = SearchContext(loaded.model, space, space.budget(4.5, None), heldout_windows(r, loaded.tokenizer),
                        calib=calib, importance=partial(importance_scores, open_artifact(prep["importance"])),
                        weight_fn=fake_quantizer(r, calib)[0], progress=False, prior_settings=PriorSettings())
    shapes = space.shapes

    def uniform_bytes(bits: int, g: int) -> float:
        c = parse_choice(f"{bits}g{g}")
        return 8 * sum(module_bytes(o, i, c, False, b) for o, i, b in shapes.values()) / space.n_weights

    out: dict = {"rows": []}
    t_prior: dict[str, float] = {}
    for p in PRIORS:  # compute each prior once; its time is charged to its rows
        t0 = time.perf_counter()
        ctx.damage(p)
        t_prior[p] = time.perf_counter() - t0
    t_err = ctx.timings.get("rounding_errors", 0.0) + ctx.timings.get("evaluator_setup", 0.0)
    for b in budgets:
        budget = space.budget(b, None)
        bits, g = uniform_choice(uniform_bytes, b)
        doc = {"modules": {m: {"bits": bits, "group_size": g} for m in space.modules}}
        out["rows"].append({"method": "uniform", "config": f"{b:g} bits: {bits}g{g}", "budget_bits": b,
                            "uri": publish_allocation(work, f"uniform-{b:g}", doc), "seconds": 0.0})
        if b == 4.5:
            doc = {"modules": {m: {"bits": 4, "group_size": 64} for m in space.modules}}
            out["rows"].append({"method": "uniform", "config": "reference: 4g64", "budget_bits": b,
                                "uri": publish_allocation(work, "uniform-4g64", doc), "seconds": 0.0,
                                "reference": True})
        for p in PRIORS:
            a = B.greedy(space, budget, ctx.damage(p))
            m = ctx.evaluator.measure(a)
            doc = space.allocation_json(a, method="importance-prior", prior=p, objective_value=m.objective)
            out["rows"].append({"method": "importance-prior", "config": f"{b:g} bits: {p}{tag(search_with)}",
                                "budget_bits": b, "prior": p, "heldout_kl": round(m.objective, 5),
                                "uri": publish_allocation(work, f"prior-{p}-{b:g}", doc),
                                "seconds": round(t_err + t_prior[p], 1)})
    out["peak_rss_mb"] = round(peak_rss_mb())
    out["layer_weights"] = {p: ctx.layer_weights(p).tolist() for p in PRIORS}
    return out


def w_search(work: Path, budget: float, search_with: str, method: str = "nevergrad") -> dict:
    from pqflow.recipe import parse_recipe
    from pqflow.runner import run_stage
    from pqflow.runtime import peak_rss_mb

    prep = json.loads((work / "prepare.json").read_text())
    r = parse_recipe(recipe(work, search_with, avg_bits=budget, method=method,
                            params={"trials": TRIALS, "prior": "auto"}))
    name = f"search-{budget:g}" + ("" if method == "nevergrad" else f"-{method}")
    t0 = time.perf_counter()
    res = run_stage("bit-search", r, {"calib": prep["calib"], "importance": prep["importance"]},
                    f"file://{work}/{name}", force=True)
    secs = time.perf_counter() - t0
    info = json.loads((work / name / "search.json").read_text())["info"]
    config = f"{budget:g} bits: {info.get('optimizer')} seeded by {info.get('prior')}{tag(search_with)}"
    return {"method": method, "config": config, "budget_bits": budget, "search_with": info.get("fake_quant"),
            "uri": res.uri, "seconds": round(secs, 1), "trials": res.summary["trials"],
            "heldout_kl": round(res.summary["objective"], 5), "prior_heldout_kl": info.get("prior_objectives"),
            **({"knobs": info["best_knobs"]} if "best_knobs" in info else {}),
            "peak_rss_mb": round(peak_rss_mb())}


def w_eval(work: Path, uri: str, method: str) -> dict:
    """Quantize with the allocation through the stage (``method``), reload the artifact, evaluate."""
    from pqflow.data import eval_windows, load_text, tokenize
    from pqflow.models import load_model_artifact
    from pqflow.perplexity import perplexity
    from pqflow.quant.report import folder_tensor_sizes, module_bytes
    from pqflow.recipe import parse_recipe
    from pqflow.runner import run_stage
    from pqflow.runtime import peak_rss_mb

    doc = recipe(work, avg_bits=4.5)
    doc["stages"]["quantize"]["method"], doc["stages"]["quantize"]["params"], n_windows = QUANTIZE[method]
    doc["stages"]["calibrate"]["n_windows"] = n_windows  # the quantize stage draws its windows as calibrate would
    r = parse_recipe(doc)
    name = uri.rstrip("/").rsplit("/", 1)[1]
    q = run_stage("quantize", r, {"allocation": uri}, f"file://{work}/q-{method}-{name}")
    qdir = Path(q.uri[len("file://"):])
    loaded = load_model_artifact(qdir)
    linears = sorted({k.rsplit(".", 1)[0] for k in folder_tensor_sizes(qdir) if ".layers." in k})
    mods = [m for m in linears if any(m.endswith(s) for s in ("_proj",))]
    lin_bytes = module_bytes(folder_tensor_sizes(qdir), mods)
    n_weights = sum(loaded.model.get_submodule(m).in_features * loaded.model.get_submodule(m).out_features
                    for m in mods)
    ids = tokenize(loaded.tokenizer, load_text("wikitext2", "test"))
    res = perplexity(loaded.model, eval_windows(ids, SEQLEN, WINDOWS), batch_size=4, progress=False)
    return {"quantize": method, "ppl": round(res.ppl, 3), "bytes": lin_bytes, "avg_bits": round(8 * lin_bytes / n_weights, 4),
            "model_bytes": q.summary["model_bytes"], "eval_peak_rss_mb": round(peak_rss_mb())}


WORKERS = {"prepare": w_prepare, "priors": w_priors, "search": w_search, "eval": w_eval}


def tag(search_with: str) -> str:
    """Config suffix of rows whose allocation depends on the search's fake quantizer."""
    return "" if search_with == "rtn" else f" ({search_with}-scored)"


def call(kind: str, work: Path, *args: str, reuse: bool = False) -> dict:
    out = work / f"out-{kind}-{'-'.join(a.rsplit('/', 1)[-1] for a in args)}.json"
    if reuse and out.is_file():
        print(f"[bench] reusing {out}", flush=True)
        return json.loads(out.read_text())
    cmd = [sys.executable, __file__, "--work", str(work), "--worker", kind, *args, "--out", str(out)]
    rc = subprocess.run(cmd).returncode
    if rc != 0 or not out.is_file():
        raise SystemExit(f"[bench] worker {kind} {args} failed (exit {rc})")
    return json.loads(out.read_text())


def table(rows: list[dict]) -> str:
    return markdown_table(rows, ["method", "config", "quantize", "ppl", "bytes", "avg_bits", "heldout_kl", "seconds", "peak_rss_mb"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budgets", default=",".join(f"{b:g}" for b in BUDGETS))
    ap.add_argument("--work", help="work dir (default $PQFLOW_BENCH_WORK or /tmp/pqflow-bench-bitsearch)")
    ap.add_argument("--results", default=str(RESULTS))
    ap.add_argument("--skip-search", action="store_true", help="uniform and prior rows only")
    ap.add_argument("--quantize", default="rtn", choices=list(QUANTIZE),
                    help="the quantize method every allocation is stored with (mrem-lr: MREM with learned rounding)")
    ap.add_argument("--search-with", default="rtn", choices=SEARCH_WITH,
                    help="fake quantizer that scores priors and trials (gptq: default --work gets a -gptq suffix)")
    ap.add_argument("--search-method", default="nevergrad", choices=SEARCH_METHODS,
                    help="nevergrad: mutate the allocation; nevergrad-prior: tune the prior's damage model")
    ap.add_argument("--no-uniform", action="store_true", help="skip the uniform rows (e.g. with a slow --quantize)")
    ap.add_argument("--priors", default=",".join(PRIORS), help="which prior rows to quantize and evaluate")
    ap.add_argument("--reuse", action="store_true",
                    help="reuse allocations (priors, searches) and evaluations already in --work")
    ap.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    use_shared_data()
    default_work = os.environ.get("PQFLOW_BENCH_WORK", "/tmp/pqflow-bench-bitsearch")
    work = Path(args.work or (default_work + ("" if args.search_with == "rtn" else f"-{args.search_with}")))
    work.mkdir(parents=True, exist_ok=True)
    if args.worker:
        kind, *rest = args.worker
        if kind == "priors":
            res = w_priors(work, [float(x) for x in rest[0].split(",")], (rest + ["rtn"])[1])
        elif kind == "search":
            res = w_search(work, float(rest[0]), *(rest[1:] or ["rtn"]))
        else:
            res = WORKERS[kind](work, *rest)
        Path(args.out).write_text(json.dumps(res))
        return
    budgets = [float(x) for x in args.budgets.split(",")]
    if not (work / "prepare.json").is_file():
        (work / "prepare.json").write_text(json.dumps(call("prepare", work, args.search_with)))
    if args.search_with == "gptq" and not json.loads((work / "prepare.json").read_text()).get("xtx"):
        raise SystemExit(f"[bench] {work} was prepared without XᵀX, which GPTQ-scored trials need: "
                         "use a fresh --work")
    sw = [] if args.search_with == "rtn" else [args.search_with]  # keeps the RTN runs' cache names
    priors = call("priors", work, ",".join(f"{b:g}" for b in budgets), *sw, reuse=args.reuse)
    rows = []
    wanted = set(args.priors.split(","))
    for row in priors["rows"]:
        row["peak_rss_mb"] = priors["peak_rss_mb"]
        if (row["method"] == "uniform" and not args.no_uniform) or row.get("prior") in wanted:
            rows.append(row)
    if not args.skip_search:
        # the default method keeps the cache names of earlier runs
        extra = [] if args.search_method == "nevergrad" else [args.search_with, args.search_method]
        for b in budgets:
            rows.append(call("search", work, f"{b:g}", *(extra or sw), reuse=args.reuse))
    results = Path(args.results)
    old = json.loads(results.read_text()) if results.is_file() else []
    for row in rows:
        row.update(call("eval", work, row["uri"], args.quantize, reuse=args.reuse))
        row.pop("uri")
        print(table([row]), flush=True)
        old = [o for o in old if (o["config"], o["method"], o.get("quantize")) != (row["config"], row["method"],
                                                                                   row["quantize"])] + [row]
        old.sort(key=lambda r: (r["budget_bits"], r.get("quantize", ""),
                                METHODS.index(r["method"]), r["config"]))
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(json.dumps(old, indent=1) + "\n")
    print(table(old))
    (work / "layer_weights.json").write_text(json.dumps(priors["layer_weights"]))


if __name__ == "__main__":
    main()
