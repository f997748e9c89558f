"""A peft LoRA layer around our packed :class:`~pqflow.quant.QuantLinear`, registered through
peft's custom-module mechanism (``LoraConfig._register_custom_module``), so ``get_peft_model`` and
``PeftModel.from_pretrained`` treat packed layers like any other target and adapters are saved in
peft's own format.

The base stays packed and frozen: ``y = QuantLinear(x) + B(A(dropout(x))) * scaling``. Merging is
refused: folding a float delta into integer codes would re-quantize and lose the adapter.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from peft import LoraConfig
from peft.tuners.lora.layer import LoraLayer
from torch import nn

from pqflow.quant import QuantEmbedding, QuantLinear


class QuantLoraLinear(nn.Module, LoraLayer):
    def __init__(self, base_layer: nn.Module, adapter_name: str, config: LoraConfig, r: int = 0,
                 lora_alpha: int = 1, **kwargs: Any) -> None:
        super().__init__()
        LoraLayer.__init__(self, base_layer)
        if isinstance(self.get_base_layer(), QuantEmbedding):
            raise ValueError("LoRA targets linears; a packed embedding cannot take a LoRA adapter here")
        if config.use_dora:
            raise ValueError("LoRA on packed QuantLinear layers does not support DoRA")
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, r, lora_alpha=lora_alpha, config=config, **kwargs)

    def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
        return module.in_features, module.out_features

    def _get_base_layer_device_and_dtype(self, base_layer: nn.Module) -> tuple[torch.device, torch.dtype]:
        # The packed codes are uint8 and the scales fp16; adapters live in the compute dtype.
        return base_layer.scales.device, torch.float32

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        raise NotImplementedError("a LoRA adapter cannot be merged into packed integer codes; keep it beside the base")

    def unmerge(self) -> None:
        raise NotImplementedError("packed QuantLinear adapters are never merged")

    def get_delta_weight(self, adapter: str) -> torch.Tensor:
        a, b = self.lora_A[adapter].weight, self.lora_B[adapter].weight
        return (b @ a) * self.scaling[adapter]

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        result = self.base_layer(x)
        if self.disable_adapters:
            return result
        out_dtype = result.dtype
        for name in self.active_adapters:
            if name not in self.lora_A:
                continue
            a, b = self.lora_A[name], self.lora_B[name]
            h = self._cast_input_dtype(x, a.weight.dtype)
            result = result + b(a(self.lora_dropout[name](h))) * self.scaling[name]
        return result.to(out_dtype)

    def __repr__(self) -> str:
        return "lora." + super().__repr__()


def lora_config(**kwargs: Any) -> LoraConfig:
    """A ``LoraConfig`` that knows our packed layers."""
    cfg = LoraConfig(**kwargs)
    register(cfg)
    return cfg


def register(cfg: LoraConfig) -> LoraConfig:
    cfg._register_custom_module({QuantLinear: QuantLoraLinear})
    return cfg


@contextmanager
def own_layout() -> Iterator[None]:
    """Inside: peft targets and loads adapters by the model's own module names.

    With transformers 5, peft rewrites the LoRA targets (and the adapter's keys on load) of MoE
    model types for transformers' fused 3D expert tensors: a target naming the experts' down
    projection becomes the fused experts' parameter. pqflow's prepared models keep one linear per expert
    (:func:`pqflow.architectures.prepare`), which peft adapts like any other linear, so the
    rewrite would drop exactly those targets. For other model types the rewrite does nothing."""
    from peft.utils import transformers_weight_conversion as conv

    saved = conv.convert_peft_config_for_transformers, conv.convert_peft_adapter_state_dict_for_transformers

    def keep_config(peft_config: Any, model: Any, conversions: Any = None) -> None:
        del peft_config, model, conversions

    def keep_state(model: Any, peft_config: Any, adapter_state_dict: dict, adapter_name: str = "default") -> dict:
        del model, peft_config, adapter_name
        return adapter_state_dict

    conv.convert_peft_config_for_transformers = keep_config
    conv.convert_peft_adapter_state_dict_for_transformers = keep_state
    try:
        yield
    finally:
        conv.convert_peft_config_for_transformers, conv.convert_peft_adapter_state_dict_for_transformers = saved
