"""KFP component of stage ``importance``: per-layer and per-structure scores."""

from kfp.dsl import Artifact, Dataset, Input, Model, Output


def importance(recipe: str, root: str, step: str, calib: Input[Dataset], importance: Output[Artifact],
               model: Input[Model] = None, mlflow_uri: str = "", parent_run: str = "", run_key: str = "", force: bool = False):
    from pqflow.components._base import run_component

    run_component("importance", recipe, root, step, importance, {"calib": calib, "model": model},
                  mlflow_uri, parent_run, run_key, force)
