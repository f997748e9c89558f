"""Whole-model plumbing: swap modules, round the float remainder, save and load ``pqflow-quant``.

Artifact layout (format ``pqflow-quant``):

- ``model.safetensors`` — packed codes (``<name>.qweight``), scales, zeros of every quantized
  module and every other tensor of the model in ``float_dtype`` (fp16); a tied output head is
  stored once, as the embedding;
- ``quant_config.json`` — per quantized module its spec (bits, group size, ...), the shape of
  every plain ``nn.Linear`` (so pruned models with uneven layers rebuild exactly), the compute
  dtype and the tie;
- ``config.json`` + tokenizer files — the base architecture.

Reload builds the architecture from ``config.json``, reshapes and swaps modules from
``quant_config.json`` and loads the tensors: logits are bit-identical to the saved model's,
because the in-memory model already holds the fp16-rounded float tensors (:func:`round_floats`).
Before anything is built, ``config.json`` and the module shapes of ``quant_config.json`` are sized
against the memory available and the bytes of ``model.safetensors`` (:mod:`pqflow.model_limits`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pqflow import architectures
from pqflow.errors import SourceError
from pqflow.model_limits import MAX_DIM, check_config, valid_dim
from pqflow.models import DTYPES, LoadedModel, load_config, load_tokenizer, weight_bytes
from pqflow.quant.linear import QuantEmbedding, QuantLinear, TiedQuantHead

QUANT_CONFIG = "quant_config.json"
WEIGHTS = "model.safetensors"
FORMAT = "pqflow-quant"
FORMAT_VERSION = 1


def get_module(model: nn.Module, name: str) -> nn.Module:
    return model.get_submodule(name)


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def quantized_modules(model: nn.Module) -> dict[str, QuantLinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}


def is_tied(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return bool(getattr(cfg, "tie_word_embeddings", False))


@torch.no_grad()
def round_floats(model: nn.Module, dtype: torch.dtype = torch.float16) -> None:
    """Round every float tensor outside the quantized modules to ``dtype`` in place (keeping the
    compute dtype), so what is saved in ``dtype`` reloads to exactly what was computed with."""
    skip = {id(t) for m in quantized_modules(model).values() for t in m.parameters()}
    # Only what is saved: non-persistent buffers (rotary frequencies) are rebuilt exactly on load.
    for t in model.state_dict(keep_vars=True).values():
        if id(t) not in skip and t.is_floating_point():
            t.data = t.data.to(dtype).to(t.dtype)


def quantize_embeddings(model: nn.Module, embed_bits: int | None, head_bits: int | None,
                        group_size: int | None, symmetric: bool) -> dict[str, Any]:
    """Quantize the input embedding and/or output head by round-to-nearest. A tied pair is
    quantized once and the head computes with the embedding's codes."""
    info: dict[str, Any] = {}
    emb = model.get_input_embeddings()
    head = model.get_output_embeddings()
    tied = is_tied(model) and head is not None and head.weight is emb.weight
    if tied and embed_bits is not None and head_bits is not None and embed_bits != head_bits:
        raise ValueError(f"tied embeddings: embedding_bits ({embed_bits}) and lm_head_bits ({head_bits}) must match")
    bits = embed_bits if embed_bits is not None else (head_bits if tied else None)
    emb_name = _name_of(model, emb)
    if bits is not None and isinstance(emb, nn.Embedding):
        qemb = QuantEmbedding.from_embedding(emb, bits, group_size, symmetric)
        set_module(model, emb_name, qemb)
        info["embedding"] = {"name": emb_name, "bits": bits}
        if tied:
            head_name = _name_of(model, head)
            set_module(model, head_name, TiedQuantHead(qemb))
            info["lm_head"] = {"name": head_name, "tied": True, "bits": bits}
    if not tied and head_bits is not None and isinstance(head, nn.Linear):
        name = _name_of(model, head)
        set_module(model, name, QuantLinear.from_linear(head, head_bits, group_size, symmetric))
        info["lm_head"] = {"name": name, "tied": False, "bits": head_bits}
    return info


def _name_of(model: nn.Module, module: nn.Module) -> str:
    for n, m in model.named_modules():
        if m is module:
            return n
    raise KeyError("module not found in model")


def quant_config(model: nn.Module, compute_dtype: torch.dtype, float_dtype: torch.dtype) -> dict[str, Any]:
    qmods = quantized_modules(model)
    heads = {n: "tied" for n, m in model.named_modules() if isinstance(m, TiedQuantHead)}
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "compute_dtype": str(compute_dtype).removeprefix("torch."),
        "float_dtype": str(float_dtype).removeprefix("torch."),
        "modules": {n: {"kind": "embedding" if isinstance(m, QuantEmbedding) else "linear", **m.spec(),
                        **({"padding_idx": m.padding_idx} if isinstance(m, QuantEmbedding) else {})}
                    for n, m in qmods.items()},
        "tied_heads": heads,
        "linear_shapes": {n: [m.out_features, m.in_features, m.bias is not None]
                          for n, m in model.named_modules() if type(m) is nn.Linear},
    }


def state_tensors(model: nn.Module, float_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The tensors to save: quantized storage as is, other floats in ``float_dtype``, shared
    tensors (tied embeddings) once."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    qnames = {f"{n}.{k}" for n, m in quantized_modules(model).items() for k, _ in m.state_dict().items()}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.data_ptr(), tuple(t.shape)) if t.numel() else None
        if key is not None and hash(key) in seen:
            continue
        if key is not None:
            seen.add(hash(key))
        if name not in qnames and t.is_floating_point():
            t = t.to(float_dtype)
        out[name] = t.detach().contiguous().clone() if t.numel() else t.detach().contiguous()
    return out


def save_quantized(model: nn.Module, tokenizer: Any, out: Path, float_dtype: torch.dtype = torch.float16
                   ) -> dict[str, Any]:
    """Saver of the ``pqflow-quant`` format (registered as :mod:`pqflow.formats.packed`)."""
    out = Path(out)
    compute = next(p for p in model.parameters() if p.is_floating_point() and not _in_quant(model, p)).dtype
    round_floats(model, float_dtype)
    cfg = quant_config(model, compute, float_dtype)
    save_file(state_tensors(model, float_dtype), str(out / WEIGHTS), metadata={"format": "pt"})
    (out / QUANT_CONFIG).write_text(json.dumps(cfg, indent=2, sort_keys=True))
    model.config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return {"quantized_modules": len(cfg["modules"])}


def _in_quant(model: nn.Module, p: torch.Tensor) -> bool:
    return any(p is q for m in quantized_modules(model).values() for q in m.parameters())


def _dtype(folder: Path, name: Any) -> torch.dtype:
    if name not in DTYPES:
        raise SourceError(f"{folder / QUANT_CONFIG}: unsupported dtype {name!r} (known: {', '.join(DTYPES)})")
    return DTYPES[name]


def module_params(cfg: dict[str, Any]) -> int:
    """Weights of the quantized modules ``quant_config.json`` lists, each dimension checked."""
    return sum(valid_dim(f"{name}.in_features", spec.get("in_features"), MAX_DIM, QUANT_CONFIG)
               * valid_dim(f"{name}.out_features", spec.get("out_features"), MAX_DIM, QUANT_CONFIG)
               for name, spec in cfg["modules"].items())


def check_sizes(folder: Path, cfg: dict[str, Any], hf_cfg: Any) -> None:
    """Refuse absurd sizes in config.json or quant_config.json before the skeleton is built."""
    for name, shape in cfg["linear_shapes"].items():
        for v in shape[:2]:
            valid_dim(f"{name} shape", v, MAX_DIM, QUANT_CONFIG)
    check_config(hf_cfg, where=str(folder), dtype=_dtype(folder, cfg["compute_dtype"]),
                 weight_bytes=weight_bytes(folder), listed_params=module_params(cfg))


def build_skeleton(folder: Path, cfg: dict[str, Any]) -> nn.Module:
    """The architecture with every module reshaped/swapped as recorded, weights uninitialised."""
    from transformers import AutoModelForCausalLM

    hf_cfg = load_config(folder)
    check_sizes(folder, cfg, hf_cfg)
    compute = _dtype(folder, cfg["compute_dtype"])
    # Built on the CPU (not meta) so that non-persistent buffers such as rotary frequencies are
    # computed by the architecture's own code; the random init is overwritten on load. Prepared
    # before anything is reshaped: the artifact names MoE experts as prepare lays them out.
    model = architectures.prepare(AutoModelForCausalLM.from_config(hf_cfg, dtype=compute, trust_remote_code=False))
    for name, (out_f, in_f, bias) in cfg["linear_shapes"].items():
        cur = model.get_submodule(name)
        if (cur.out_features, cur.in_features, cur.bias is not None) != (out_f, in_f, bias):
            with torch.device("meta"):
                set_module(model, name, nn.Linear(in_f, out_f, bias=bias, dtype=compute))
    for name, spec in cfg["modules"].items():
        sdt = _dtype(folder, spec["scale_dtype"])
        if spec["kind"] == "embedding":
            mod: QuantLinear = QuantEmbedding(spec["out_features"], spec["in_features"], spec["bits"],
                                              spec["group_size"], spec["symmetric"], sdt, spec.get("padding_idx"))
            mod.compute_dtype = compute
            mod.scale_like(model.get_submodule(name))
        else:
            mod = QuantLinear(spec["in_features"], spec["out_features"], spec["bits"], spec["group_size"],
                              spec["symmetric"], spec["bias"], sdt)
        set_module(model, name, mod)
    for name in cfg["tied_heads"]:
        set_module(model, name, TiedQuantHead(model.get_input_embeddings()))
    # Reshaped (pruned) linears: the attention modules must compute with their new head counts.
    for layer in architectures.decoder_layers(model):
        architectures.sync_attention(layer)
    return model


def load_quantized(folder: Path, meta: dict[str, Any]) -> LoadedModel:
    """Loader of the ``pqflow-quant`` model format (registered as :mod:`pqflow.formats.packed`)."""
    folder = Path(folder)
    cfg = json.loads((folder / QUANT_CONFIG).read_text())
    if cfg.get("version") != FORMAT_VERSION:
        raise ValueError(f"{folder / QUANT_CONFIG}: unsupported version {cfg.get('version')}")
    compute = _dtype(folder, cfg["compute_dtype"])
    model = build_skeleton(folder, cfg)
    tensors = load_file(str(folder / WEIGHTS))
    state = {}
    expected = model.state_dict()
    for k, t in tensors.items():
        if k not in expected:
            raise ValueError(f"{folder / WEIGHTS}: unexpected tensor '{k}'")
        ref = expected[k]
        state[k] = t.to(compute) if t.is_floating_point() and ref.dtype == compute else t
    missing = [k for k in expected if k not in state]
    tied_ok = is_tied(model) and all(k.endswith("lm_head.weight") for k in missing)
    if missing and not tied_ok:
        raise ValueError(f"{folder / WEIGHTS}: missing tensors {missing[:5]}")
    model.load_state_dict(state, strict=False, assign=True)
    if missing:
        model.tie_weights()
    return LoadedModel(model.eval(), load_tokenizer(folder), str(folder))
