"""The ``pqflow-lora`` model format: a base model artifact's files plus a peft LoRA adapter.

Layout: the base's own files at the top (e.g. ``model.safetensors`` + ``quant_config.json`` of a
``pqflow-quant`` base, or a bitsandbytes / Hugging Face checkpoint), ``adapter/`` holding peft's
``adapter_config.json`` + ``adapter_model.safetensors``, and ``pqflow_model.json``:

    {"format": "pqflow-lora", "base": {<the base's own model meta>}, "adapter": "adapter",
     "merged": false}

When ``merged`` is true the top-level weights already include the adapter (float base) and the
adapter folder is kept for reference only; the loader reads the base alone.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from torch import nn

from pqflow.methods.tuning.common import ADAPTER_DIR
from pqflow.models import _LOADERS, LoadedModel


def load_base(folder: Path, base_meta: dict[str, Any]) -> LoadedModel:
    fmt = base_meta.get("format", "hf")
    if fmt not in _LOADERS or fmt == "pqflow-lora":
        raise ValueError(f"{folder}: unsupported base format '{fmt}' for a LoRA artifact")
    mod_name, fn = _LOADERS[fmt].split(":")
    return getattr(importlib.import_module(mod_name), fn)(Path(folder), base_meta)


def attach_adapter(model: nn.Module, adapter_dir: Path, trainable: bool = False) -> nn.Module:
    """Wrap ``model`` with the peft adapter saved in ``adapter_dir``; returns the peft model."""
    from peft import LoraConfig, PeftModel

    from pqflow.methods.tuning.lora_layer import register

    cfg = register(LoraConfig.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(model, str(adapter_dir), config=cfg, is_trainable=trainable)


def save_adapter(peft_model: nn.Module, adapter_dir: Path) -> None:
    """Write the adapter in peft's format (``adapter_model.safetensors`` + ``adapter_config.json``).

    Unlike ``PeftModel.save_pretrained`` this never calls the base model's ``state_dict()``:
    bitsandbytes 0.50 re-lays out 4-bit CPU weights in place when their state is read, which
    changes the in-memory model's logits (measured: up to 6e-3) after saving."""
    from peft.utils import SAFETENSORS_WEIGHTS_NAME, get_peft_model_state_dict
    from safetensors.torch import save_file

    adapter_dir = Path(adapter_dir)
    adapter_dir.mkdir(parents=True, exist_ok=True)
    own = {n: t.detach() for n, t in peft_model.named_parameters() if "lora_" in n}
    state = get_peft_model_state_dict(peft_model, state_dict=own, save_embedding_layers=False)
    save_file({k: v.contiguous() for k, v in state.items()}, str(adapter_dir / SAFETENSORS_WEIGHTS_NAME),
              metadata={"format": "pt"})
    cfg = peft_model.peft_config["default"]
    cfg.save_pretrained(str(adapter_dir))


def load_lora_folder(folder: Path, meta: dict[str, Any]) -> LoadedModel:
    """Loader of the ``pqflow-lora`` format (registered in :mod:`pqflow.models`)."""
    folder = Path(folder)
    base = load_base(folder, meta["base"])
    if meta.get("merged"):
        return base
    peft_model = attach_adapter(base.model, folder / meta.get("adapter", ADAPTER_DIR))
    # The transformers model with the LoRA layers injected: callers see the usual model API.
    return LoadedModel(peft_model.get_base_model().eval(), base.tokenizer, str(folder))
