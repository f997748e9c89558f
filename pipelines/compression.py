"""The compression pipeline, built from :func:`pqflow.plan.plan` (the same graph the local runner
uses), compiled to KFP IR YAML with one task per planned step, each in its stage's own image and
with the recipe's resources."""

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pqflow.components import COMPONENTS, component, image_for
from pqflow.plan import Step, plan
from pqflow.recipe import Recipe
from pqflow.stages import get_stage


@dataclass
class ClusterOptions:
    """Where the stages find S3 and MLflow on a cluster (see docs/orchestration.md)."""

    # (no ``from __future__ import annotations`` here: KFP reads the pipeline function's annotations)
    registry: str | None = None
    version: str | None = None
    root: str | None = None  # artifact root; default: the recipe's storage.root
    mlflow_uri: str | None = None  # default: recipe.tracking.mlflow_uri ("" = from the pod's env)
    s3_secret: str | None = None  # Kubernetes secret with AWS_* keys, mounted as env in every task
    env: dict[str, str] = field(default_factory=dict)  # extra plain env vars for every task
    image_pull_secrets: list[str] = field(default_factory=list)


def _apply_resources(task: Any, recipe: Recipe, step: Step) -> None:
    res = recipe.stage(get_stage(step.stage).key).resources
    task.set_cpu_request(res.cpu).set_cpu_limit(res.cpu)
    task.set_memory_request(res.memory).set_memory_limit(res.memory)
    if res.gpu:
        task.set_accelerator_type(res.gpu_type or "nvidia.com/gpu").set_accelerator_limit(res.gpu)
    if res.node_selector:
        from kfp import kubernetes

        for key, value in res.node_selector.items():
            kubernetes.add_node_selector(task, label_key=key, label_value=value)


def _apply_cluster(task: Any, opts: ClusterOptions) -> None:
    for k, v in opts.env.items():
        task.set_env_variable(k, v)
    if opts.s3_secret:
        from kfp import kubernetes

        kubernetes.use_secret_as_env(task, secret_name=opts.s3_secret, secret_key_to_env={
            k: k for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION")
        }, optional=False)
    if opts.image_pull_secrets:
        from kfp import kubernetes

        kubernetes.set_image_pull_secrets(task, opts.image_pull_secrets)


def pipeline_name(rec: Recipe) -> str:
    return f"pqflow-{rec.name}".lower().replace("_", "-").replace(".", "-")


def _step_component(step: Step, opts: ClusterOptions):
    """The stage's component, named after the step so that task names are step names."""
    comp = component(step.stage, image_for(step.stage, opts.registry, opts.version))
    if step.name != step.stage:
        comp.component_spec.name = step.name
        comp.name = step.name
    return comp


def build_pipeline(rec: Recipe, opts: ClusterOptions | None = None):
    """A KFP pipeline function for ``rec``: one task per step of ``plan(rec)``."""
    from kfp import dsl

    opts = opts or ClusterOptions()
    steps = plan(rec)
    comps = {s.name: _step_component(s, opts) for s in steps}
    recipe_json = json.dumps(rec.model_dump(mode="json"), sort_keys=True)
    default_root = opts.root or rec.storage.root
    default_mlflow = opts.mlflow_uri if opts.mlflow_uri is not None else (rec.tracking.mlflow_uri or "")

    @dsl.pipeline(name=pipeline_name(rec),
                  description=rec.description or f"pqflow compression pipeline for recipe {rec.name}")
    def pipeline(recipe: str = recipe_json, root: str = default_root, mlflow_uri: str = default_mlflow,
                 parent_run: str = "", force: bool = False):
        tasks: dict[str, Any] = {}
        for step in steps:
            kwargs = {
                name: tasks[src].outputs[COMPONENTS[tasks[src]._pqflow_stage].output]
                for name, src in step.inputs.items()
            }
            task = comps[step.name](recipe=recipe, root=root, step=step.name, mlflow_uri=mlflow_uri,
                                     parent_run=parent_run, run_key=dsl.PIPELINE_JOB_ID_PLACEHOLDER, force=force,
                                     **kwargs)
            task._pqflow_stage = step.stage
            task.set_display_name(step.name)
            task.set_caching_options(False)  # pqflow's manifests decide what is reused
            _apply_resources(task, rec, step)
            _apply_cluster(task, opts)
            if step.name == "evaluate" and "evaluate-baseline" in tasks:
                task.after(tasks["evaluate-baseline"])  # the quality gate reads the baseline's metrics
            tasks[step.name] = task

    return pipeline


def compile_pipeline(recipe: Recipe, out: str | Path, opts: ClusterOptions | None = None) -> Path:
    from kfp import compiler

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    compiler.Compiler().compile(build_pipeline(recipe, opts), str(out))
    return out


def load_for_compile(path: str | Path) -> Recipe:
    """Load a recipe for compiling: the schema is checked here; a method family that this build
    does not have yet is only a warning, since its stage runs in its own image on the cluster."""
    import sys

    from pqflow.errors import RecipeError
    from pqflow.recipe import load_recipe, read_recipe_data

    try:
        return load_recipe(path)
    except RecipeError as e:
        lines = getattr(e, "problems", None) or str(e).splitlines()[1:]
        if not lines or not all("methods yet" in ln for ln in lines):
            raise
        for ln in lines:
            print(f"[pqflow] warning: {ln.strip()} (not checked at compile time)", file=sys.stderr)
        return Recipe.model_validate(read_recipe_data(path))
