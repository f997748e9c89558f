"""``pqflow-lora``: a base model artifact's files plus a peft LoRA adapter.

Layout: the base's own files at the top (e.g. ``model.safetensors`` + ``quant_config.json`` of a
``pqflow-quant`` base, or a bitsandbytes / Hugging Face checkpoint), ``adapter/`` holding peft's
``adapter_config.json`` + ``adapter_model.safetensors``, and ``pqflow_model.json``:

    {"format": "pqflow-lora", "base": {<the base's own model meta>}, "adapter": "adapter",
     "merged": false}

When ``merged`` is true the top-level weights already include the adapter (float base) and the
adapter folder is kept for reference only; the loader reads the base alone.

The adapter folder must lie inside the artifact (the verified files) and hold
``adapter_model.safetensors``: peft would otherwise fall back to a pickled ``adapter_model.bin``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import nn

from pqflow.errors import SourceError
from pqflow.formats import load as load_format
from pqflow.models import LoadedModel

NAME = "pqflow-lora"
ADAPTER_DIR = "adapter"


def save(model: nn.Module, tokenizer: Any, out: Path) -> dict[str, Any]:
    """Write the adapter of the peft ``model`` into ``out/adapter``. The frozen base's files are
    already in ``out`` (the tuning method copies or writes them); the caller passes their model
    meta as ``base=`` to :func:`pqflow.formats.save_model`."""
    del tokenizer  # the base's tokenizer files are among its files
    save_adapter(model, Path(out) / ADAPTER_DIR)
    return {"adapter": ADAPTER_DIR, "merged": False}


def load_base(folder: Path, base_meta: Any) -> LoadedModel:
    """The base model of a LoRA artifact, through the loader of the format its meta names."""
    if not isinstance(base_meta, dict):
        raise SourceError(f"{folder}: a {NAME} artifact needs its base's model meta ('base'), got {base_meta!r:.80}")
    if base_meta.get("format") == NAME:
        raise SourceError(f"{folder}: a {NAME} artifact cannot have a {NAME} base")
    return load_format(Path(folder), base_meta)


def adapter_dir_of(folder: Path, rel: Any) -> Path:
    """The adapter folder ``pqflow_model.json`` names, refused unless it lies inside ``folder``."""
    root = Path(folder).resolve()
    if not isinstance(rel, str) or not (root / rel).resolve().is_relative_to(root):
        raise SourceError(f"{folder}: adapter folder {rel!r} lies outside the model artifact")
    return root / rel


def attach_adapter(model: nn.Module, adapter_dir: Path, trainable: bool = False) -> nn.Module:
    """Wrap ``model`` with the peft adapter saved in ``adapter_dir``; returns the peft model."""
    from peft import LoraConfig, PeftModel
    from peft.utils import SAFETENSORS_WEIGHTS_NAME

    from pqflow.quant.lora_layer import own_layout, register

    if not (Path(adapter_dir) / SAFETENSORS_WEIGHTS_NAME).is_file():
        # peft would read a pickled adapter_model.bin instead, or look the path up on the Hub.
        raise SourceError(f"{adapter_dir}: no {SAFETENSORS_WEIGHTS_NAME}; pqflow loads adapters only "
                          f"from safetensors")
    cfg = register(LoraConfig.from_pretrained(str(adapter_dir)))
    with own_layout():  # the adapter names the prepared model's linears (MoE experts included)
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


def load(folder: Path, meta: dict[str, Any]) -> LoadedModel:
    folder = Path(folder)
    adapter = None if meta.get("merged") else adapter_dir_of(folder, meta.get("adapter", ADAPTER_DIR))
    base = load_base(folder, meta.get("base"))
    if adapter is None:
        return base
    peft_model = attach_adapter(base.model, adapter)
    # The transformers model with the LoRA layers injected: callers see the usual model API.
    return LoadedModel(peft_model.get_base_model().eval(), base.tokenizer, str(folder))
