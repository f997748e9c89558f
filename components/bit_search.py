"""KFP component of stage ``bit-search``: per-module bit allocation under the memory budget."""

from kfp.dsl import Artifact, Dataset, Input, Model, Output


def bit_search(recipe: str, root: str, step: str, calib: Input[Dataset], allocation: Output[Artifact],
               model: Input[Model] = None, importance: Input[Artifact] = None,
               mlflow_uri: str = "", parent_run: str = "", run_key: str = "", force: bool = False):
    from pqflow.components._base import run_component

    run_component("bit-search", recipe, root, step, allocation,
                  {"calib": calib, "model": model, "importance": importance}, mlflow_uri, parent_run, run_key, force)
