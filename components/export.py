"""KFP component of stage ``export``: the final model in the recipe's export formats."""

from kfp.dsl import Artifact, Input, Model, Output


def export(recipe: str, root: str, step: str, exported: Output[Artifact], model: Input[Model],
           mlflow_uri: str = "", parent_run: str = "", run_key: str = "", force: bool = False):
    from pqflow.components._base import run_component

    run_component("export", recipe, root, step, exported, {"model": model}, mlflow_uri, parent_run, run_key, force)
