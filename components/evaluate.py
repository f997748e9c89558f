"""KFP component of stage ``evaluate``: perplexity, bytes, speed; the final one registers the model
(with the ``export`` step's files attached when the recipe exports)."""

from kfp.dsl import Artifact, Input, Metrics, Model, Output


def evaluate(recipe: str, root: str, step: str, metrics: Output[Metrics], model: Input[Model] = None,
             export: Input[Artifact] = None, mlflow_uri: str = "", parent_run: str = "", run_key: str = "",
             force: bool = False):
    from pqflow.components._base import run_component

    run_component("evaluate", recipe, root, step, metrics, {"model": model, "export": export}, mlflow_uri,
                  parent_run, run_key, force)
