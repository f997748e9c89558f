"""KFP component of stage ``finetune``: recovery fine-tuning of the compressed model."""

from kfp.dsl import Input, Model, Output


def finetune(recipe: str, root: str, step: str, finetuned: Output[Model], model: Input[Model] = None,
             mlflow_uri: str = "", parent_run: str = "", run_key: str = "", force: bool = False):
    from pqflow.components._base import run_component

    run_component("finetune", recipe, root, step, finetuned, {"model": model}, mlflow_uri, parent_run, run_key, force)
