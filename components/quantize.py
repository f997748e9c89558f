"""KFP component of stage ``quantize``: a packed low-bit model."""

from kfp.dsl import Artifact, Dataset, Input, Model, Output


def quantize(recipe: str, root: str, step: str, quantized: Output[Model], model: Input[Model] = None,
             calib: Input[Dataset] = None, allocation: Input[Artifact] = None,
             mlflow_uri: str = "", parent_run: str = "", run_key: str = "", force: bool = False):
    from pqflow.components._base import run_component

    run_component("quantize", recipe, root, step, quantized,
                  {"model": model, "calib": calib, "allocation": allocation}, mlflow_uri, parent_run, run_key, force)
