"""A loaded pqflow model turned back into plain ``nn.Linear`` / ``nn.Embedding`` modules.

Packed layers are dequantized exactly (codes, scales and zeros as the model computes with them),
LoRA adapters are folded into the dense weight (``W + B A * scaling``, the float sum the adapter
computes), and pruned widths are read off the layers. What the exports share.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from pqflow import architectures as arch
from pqflow.export import ExportError, ExportOptions
from pqflow.methods.prune.surgery import SHAPES_KEY
from pqflow.models import LoadedModel, load_model_artifact
from pqflow.quant.linear import QuantEmbedding, QuantLinear, TiedQuantHead


@dataclass(frozen=True)
class LayerWidths:
    n_heads: int
    n_kv_heads: int
    intermediate: int


def is_lora(mod: nn.Module) -> bool:
    """A peft LoRA-wrapped layer. Only a LoRA artifact's loader imports peft, so without peft in
    ``sys.modules`` there is none (and the export image need not carry peft)."""
    if "peft" not in sys.modules:
        return False
    from peft.tuners.lora.layer import LoraLayer

    return isinstance(mod, LoraLayer)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().contiguous(), requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().float().contiguous(), requires_grad=False)
    return lin


def _dense_weight(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(module, QuantLinear):
        return module.dequantize(torch.float32), module.bias
    return module.weight.detach().float(), getattr(module, "bias", None)


@torch.no_grad()
def densify(model: nn.Module) -> nn.Module:
    """Replace packed layers, LoRA-wrapped layers and quantized embeddings in place (float32)."""
    for name, mod in list(model.named_modules()):
        if is_lora(mod) and name:
            base = mod.get_base_layer()
            w, b = _dense_weight(base)
            for adapter in mod.active_adapters:
                if adapter in mod.lora_A:
                    w = w + mod.get_delta_weight(adapter).float()
            set_module(model, name, _linear(w, b))
    for name, mod in list(model.named_modules()):
        if isinstance(mod, QuantEmbedding):
            emb = nn.Embedding(mod.out_features, mod.in_features, padding_idx=mod.padding_idx, device="meta")
            emb.weight = nn.Parameter(mod.dequantize(torch.float32).contiguous(), requires_grad=False)
            set_module(model, name, emb)
        elif isinstance(mod, QuantLinear):
            set_module(model, name, _linear(*_dense_weight(mod)))
    for name, mod in list(model.named_modules()):
        if isinstance(mod, TiedQuantHead):
            set_module(model, name, _linear(model.get_input_embeddings().weight, None))
    if getattr(model.config, "tie_word_embeddings", False) and model.get_output_embeddings() is not None:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    return model


def proj_rows(p: arch.Proj) -> int:
    """A role's output width; read off the module (a packed or LoRA-wrapped linear has no float
    ``weight`` to measure) unless the role is a row slice of a fused linear."""
    return p.module.out_features if p.rows is None else len(range(p.module.out_features)[p.rows])


def layer_widths(model: nn.Module) -> list[LayerWidths]:
    """Each decoder layer's (query heads, KV heads, MLP width), read off its linears."""
    out = []
    for layer in arch.decoder_layers(model):
        p, hd = arch.projections(layer), arch.head_dim(layer)
        out.append(LayerWidths(proj_rows(p["q"]) // hd, proj_rows(p["k"]) // hd, proj_rows(p["up"])))
    return out


def uniform_widths(model: nn.Module) -> tuple[LayerWidths | None, int | None]:
    """(the one width every layer has, None) or (None, index of the first layer that differs)."""
    widths = layer_widths(model)
    for i, w in enumerate(widths):
        if w != widths[0]:
            return None, i
    return (widths[0] if widths else None), None


def _uneven(prefix: str, first: int, fmt: str) -> ExportError:
    return ExportError(
        f"{prefix}.{first} has another width than {prefix}.0 (pruned unevenly); {fmt} uses the standard "
        "config with one width for every layer: export with --uneven pad (zero-pad every layer to the widest) or "
        "--uneven native (per-layer widths where the format has them; recipe stages.export.uneven), or prune with "
        "allocation 'uniform'")


def uneven_error(model: nn.Module, first: int, fmt: str) -> ExportError:
    return _uneven(arch.layers_prefix(model), first, fmt)


def check_uniform_shapes(src: Path, fmt: str, options: ExportOptions | None = None) -> None:
    """Fail before the model is loaded when its config lists uneven pruned widths (unless the
    options pad them or write them natively)."""
    if options is not None and options.uneven != "error":
        return
    cfg = source_config(src)
    shapes = (cfg or {}).get(SHAPES_KEY) or []
    for i, shape in enumerate(shapes):
        if shape != shapes[0]:
            raise _uneven(arch.config_layers_prefix(cfg), i, fmt)


def source_config(src: Path) -> dict | None:
    """The artifact's ``config.json`` (None when it has none)."""
    path = Path(src) / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def check_family(src: Path) -> None:
    """Refuse, before anything loads or is written, a family the exporters do not write (the
    adapter's EXPORT refusal: one line naming the family and why)."""
    cfg = source_config(src)
    if cfg is not None:
        arch.require(cfg, arch.EXPORT)


def load_for_export(src: Path, fmt: str, options: ExportOptions,
                    per_layer_widths: bool = False) -> tuple[LoadedModel, dict | None]:
    """The model at ``src``, checked for uneven widths before it loads and padded when asked
    (``pad``, or ``native`` for a format that holds no per-layer widths): (the loaded model, the
    padding summary or None)."""
    from pqflow.export.pad import pad_uniform

    check_family(src)
    check_uniform_shapes(src, fmt, options)
    loaded = load_model_artifact(src)
    arch.require(loaded.model, arch.EXPORT)
    pad = options.uneven == "pad" or (options.uneven == "native" and not per_layer_widths)
    return loaded, pad_uniform(loaded.model) if pad else None


def standard_config(model: nn.Module, fmt: str) -> None:
    """Uniformly pruned widths go into the model's config (a standard one: no pqflow keys, no
    quantization config); uneven widths have no place in it."""
    width, first_uneven = uniform_widths(model)
    if first_uneven is not None:
        raise uneven_error(model, first_uneven, fmt)
    cfg = model.config
    if width is not None:
        cfg.head_dim = arch.head_dim(arch.decoder_layers(model)[0])  # not hidden / heads once heads are pruned
        arch.set_config_shape(model, width.n_heads, width.n_kv_heads, width.intermediate)
    for key in (SHAPES_KEY, "quantization_config"):
        if hasattr(cfg, key):
            delattr(cfg, key)
