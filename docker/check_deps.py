#!/usr/bin/env python3
"""Prove each stage image's dependency set without a Docker engine.

For every stage given, this does what the stage's Dockerfile does, in a clean virtual environment:
install pqflow with only ``[<stage extra>,tracking]`` plus kfp (no editable install, nothing from the
developer's venv), ``pip check``, then run the stage on the tiny model twice:

1. ``pqflow stage <name>`` (the image's ENTRYPOINT), and
2. the stage's KFP component through ``kfp.local.SubprocessRunner(use_venv=False)``, i.e. through the
   same KFP executor (``kfp.dsl.executor_main``) that runs it in the container on a cluster.

With ``--record`` the resolved package list is written to ``docker/deps/<stage>.txt`` (what the
image will hold).

    python docker/check_deps.py calibrate evaluate --record   # ~2-5 min per stage on 2 CPU cores
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXTRAS = {"calibrate": "calibrate", "importance": "importance", "prune": "prune", "bit-search": "bitsearch",
          "quantize": "quantize", "finetune": "finetune", "export": "export",
          "evaluate": "evaluate"}
KFP = "kfp==2.17.3"
# Packages that must not be in a stage image: the other stages' extras, the orchestration-only ones.
FOREIGN = {
    "calibrate": ["matplotlib", "nevergrad", "peft", "bitsandbytes", "moto", "kfp-kubernetes"],
    "evaluate": ["nevergrad", "peft", "bitsandbytes", "moto", "kfp-kubernetes"],
}

COMPONENT_RUN = r"""
import json, sys
from kfp import dsl, local
from pqflow.components import component
from pqflow.recipe import load_recipe
stage, recipe_path, root, pipeline_root, mlflow_uri, inputs = sys.argv[1:7]
inputs = json.loads(inputs)
local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=pipeline_root)
recipe = json.dumps(load_recipe(recipe_path).model_dump(mode="json"))
comp = component(stage)
if not inputs:
    task = comp(recipe=recipe, root=root, step=stage, mlflow_uri=mlflow_uri)
    out = next(iter(task.outputs.values())) if hasattr(task, "outputs") and task.outputs else task.output
else:
    # inputs arrive as pointers from upstream tasks: an importer per input, in a local pipeline
    @dsl.pipeline
    def one_stage() -> dsl.Artifact:
        imported = {name: dsl.importer(artifact_uri=uri, artifact_class=dsl.Model, reimport=True,
                                       metadata={"pqflow_uri": uri}).output for name, uri in inputs.items()}
        return comp(recipe=recipe, root=root, step=stage, mlflow_uri=mlflow_uri, **imported).output
    out = one_stage().output
print("POINTER", json.dumps(dict(out.metadata)))
"""
# Stages that take a model: the input is made by the developer's pqflow (in a cluster, by the
# upstream stage's image) with this stage, and the recipe gets the settings the stage needs.
UPSTREAM = {"export": ("model", "quantize")}
RECIPE_EXTRA = {"export": {"export": {"formats": ["compressed-tensors", "gguf"]}, "quantize": {"enabled": True}}}

LOAD_BACK = r"""
import sys
import mlflow, pandas as pd
from pqflow.data import load_text
from pqflow.recipe import load_recipe
uri, name, recipe_path = sys.argv[1:4]
ev = load_recipe(recipe_path).stages.evaluate
mlflow.set_tracking_uri(uri)
m = mlflow.pyfunc.load_model(f"models:/{name}@candidate")
out = m.predict({"prompt": load_text(ev.data.source, "test", ev.data.field)}, params={"mode": "perplexity"})
print(float(out["ppl"][0] if hasattr(out, "columns") else out[0]["ppl"]))
"""


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, text=True, **kw)
    if done.returncode:
        # a captured stderr would otherwise be lost: the caller only sees the exit status
        raise SystemExit(f"command failed with exit status {done.returncode}: {' '.join(cmd)[:300]}\n"
                         f"{(done.stderr or '')[-4000:]}")
    return done


def stage_inputs(stage: str, recipe: Path, run_dir: Path, root: str) -> tuple[Path, dict[str, str]]:
    """(the recipe this stage runs with, its input URIs), made with the developer's pqflow."""
    if stage not in UPSTREAM:
        return recipe, {}
    import yaml

    doc = yaml.safe_load(recipe.read_text())
    for name, extra in RECIPE_EXTRA.get(stage, {}).items():
        doc.setdefault("stages", {}).setdefault(name, {}).update(extra)
    staged = run_dir / f"recipe-{stage}.yaml"
    staged.write_text(yaml.safe_dump(doc))
    name, producer = UPSTREAM[stage]
    pqflow = Path(sys.executable).parent / "pqflow"
    sh([str(pqflow), "stage", producer, "--recipe", str(staged), "--out", f"{root}/{producer}"],
       capture_output=True, cwd=run_dir)
    return staged, {name: f"{root}/{producer}"}


def check(stage: str, work: Path, recipe: Path, keep: bool = False, record: bool = False) -> dict:
    extra = EXTRAS[stage]
    venv = work / f"venv-{stage}"
    t0 = time.perf_counter()
    sh([sys.executable, "-m", "venv", "--clear", str(venv)])
    py = venv / "bin" / "python"
    # A copy of the sources, so that nothing of the developer's build (egg-info, build/) leaks in.
    src = work / f"src-{stage}"
    shutil.rmtree(src, ignore_errors=True)
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    for name in ("core", "components", "pipelines"):
        shutil.copytree(REPO / name, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH")}
    env["MLFLOW_ALLOW_FILE_STORE"] = "true"  # a server-less MLflow store for this check (skinny has no sqlite store)
    sh([str(py), "-m", "pip", "install", "--quiet", f"{src}[{extra},tracking]", KFP], env=env)
    sh([str(py), "-m", "pip", "check"], env=env)
    shutil.rmtree(src)
    installed = sh([str(py), "-m", "pip", "freeze", "--exclude", "pqflow"], capture_output=True, env=env).stdout
    names = {ln.split("==")[0].split(" @ ")[0].lower().replace("_", "-") for ln in installed.splitlines()}
    present = [p for p in FOREIGN.get(stage, []) if p in names]
    if present:
        raise SystemExit(f"{stage}: image would carry packages of other extras: {present}")
    install_s = time.perf_counter() - t0

    run_dir = work / f"run-{stage}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir()
    root = f"file://{run_dir / 'artifacts'}"
    recipe, inputs = stage_inputs(stage, recipe, run_dir, root)
    in_args = [a for name, uri in inputs.items() for a in ("--in", f"{name}={uri}")]
    # 1. the image's entrypoint
    t1 = time.perf_counter()
    cli = sh([str(venv / "bin" / "pqflow"), "stage", stage, "--recipe", str(recipe), *in_args,
              "--out", f"{root}/{stage}"], capture_output=True, cwd=run_dir, env=env)
    summary = json.loads(cli.stdout[cli.stdout.index("{\n"):])["summary"]  # stages may print before the JSON
    # 2. the KFP component through the KFP executor
    #    (tracking into a local MLflow file store: the stage's child run; evaluate also registers)
    mlruns = (run_dir / "mlruns").as_uri()
    comp = sh([str(py), "-c", COMPONENT_RUN, stage, str(recipe), f"{root}/kfp", str(run_dir / "kfp-root"), mlruns,
               json.dumps(inputs)], capture_output=True, cwd=run_dir, env=env)
    pointer = json.loads(next(ln for ln in comp.stdout.splitlines() if ln.startswith("POINTER"))[8:])
    assert pointer["pqflow_uri"].endswith(f"/{stage}"), pointer
    assert pointer.get("mlflow_run_id"), pointer
    if stage == "evaluate":
        # 3. the registered model loads back through the MLflow client of the image and reproduces ppl
        name = json.loads(json.dumps(pointer))["registered_model"]
        load = sh([str(py), "-c", LOAD_BACK, mlruns, name, str(recipe)], capture_output=True, cwd=run_dir, env=env)
        ppl = float(load.stdout.strip().splitlines()[-1])
        if abs(ppl - pointer["ppl"]) > 1e-4 * pointer["ppl"]:
            raise SystemExit(f"evaluate: models:/{name}@candidate gives ppl {ppl}, the stage logged {pointer['ppl']}")
    run_s = time.perf_counter() - t1

    deps = (REPO / "docker" / "deps" if record else work) / f"{stage}.txt"
    deps.parent.mkdir(exist_ok=True)
    deps.write_text(f"# pip freeze of a clean venv with pqflow[{extra},tracking] + {KFP} (docker/check_deps.py)\n"
                    + installed)
    if not keep:
        shutil.rmtree(venv, ignore_errors=True)
    print(f"OK {stage}: {len(names)} packages, install {install_s:.0f}s, stage + component {run_s:.0f}s; "
          f"summary {summary}", flush=True)
    return {"stage": stage, "packages": len(names), "install_s": install_s, "run_s": run_s, "summary": summary}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("stages", nargs="*", default=["calibrate", "evaluate"], choices=sorted(EXTRAS))
    ap.add_argument("--recipe", type=Path, default=REPO / "recipes" / "tiny.yaml")
    ap.add_argument("--work", type=Path, help="scratch folder (default: a temporary one)")
    ap.add_argument("--keep", action="store_true", help="keep the venvs")
    ap.add_argument("--record", action="store_true", help="write the package lists to docker/deps/<stage>.txt")
    args = ap.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="pqflow-deps-"))
    work.mkdir(parents=True, exist_ok=True)
    results = [check(s, work, args.recipe.resolve(), args.keep, args.record) for s in args.stages]
    print(json.dumps(results, indent=2))
    if args.work is None and not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
