"""KFP component of stage ``calibrate``: token windows + per-linear activation statistics."""

from kfp.dsl import Dataset, Input, Model, Output


def calibrate(recipe: str, root: str, step: str, calib: Output[Dataset], model: Input[Model] = None,
              mlflow_uri: str = "", parent_run: str = "", run_key: str = "", force: bool = False):
    from pqflow.components._base import run_component

    run_component("calibrate", recipe, root, step, calib, {"model": model}, mlflow_uri, parent_run, run_key, force)
