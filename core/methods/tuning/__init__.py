"""Recovery fine-tuning methods. Each module exposes ``Params`` (pydantic, the recipe's
``stages.finetune.params``) and

    tune(base: Base, data: TrainData, params, workdir) -> Tuned

where :class:`~pqflow.methods.tuning.common.Base` is the loaded input model with its artifact
format and folder, and :class:`~pqflow.methods.tuning.common.Tuned` carries the tuned model, the
training history and how to save it. The training loop is shared (:mod:`.train`)."""

from pqflow.registry import MethodRegistry

REGISTRY = MethodRegistry("finetune", {
    "lora": "pqflow.methods.tuning.lora",
    "peqa": "pqflow.methods.tuning.peqa",
})
