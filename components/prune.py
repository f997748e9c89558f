"""KFP component of stage ``prune``: a physically smaller model."""

from kfp.dsl import Artifact, Dataset, Input, Model, Output


def prune(recipe: str, root: str, step: str, calib: Input[Dataset], pruned: Output[Model],
          model: Input[Model] = None, importance: Input[Artifact] = None,
          mlflow_uri: str = "", parent_run: str = "", run_key: str = "", force: bool = False):
    from pqflow.components._base import run_component

    run_component("prune", recipe, root, step, pruned, {"calib": calib, "model": model, "importance": importance},
                  mlflow_uri, parent_run, run_key, force)
