"""``gguf``: one ``model.gguf`` for llama.cpp, tokenizer and metadata inside.

The llama.cpp architecture is the family's (:data:`pqflow.architectures.GGUF_ARCHS`: Llama and
Mistral as ``llama``, Qwen2 as ``qwen2`` with its q/k/v biases, Qwen3 as ``qwen3`` with its per-head
q/k norms); other families are refused by name before anything is loaded. The tensors are found by
the architecture adapter (roles and norms of each block) and named by gguf-py's own name map
(``gguf.get_tensor_name_map``), as llama.cpp's converter names them.

pqflow's codes are written as GGUF blocks directly, never re-rounded: a block of 32 weights takes
its group's scale (and zero point), so any group size that is a multiple of 32 (or one scale per
row) maps block by block:

- 4-bit asymmetric -> ``Q4_1``: ``w = d*q + m`` with ``d = scale`` and ``m = -scale*zero``. ``d``
  is exact (scales are fp16); ``m`` is rounded once to fp16, so each weight is off by at most
  half an fp16 ulp of ``scale*zero`` (relative 2**-11). That is the only loss in this format.
- 4-bit symmetric -> ``Q4_0``: ``w = (q - 8)*d``, and pqflow's symmetric zero point is 8: exact.
- 8-bit symmetric -> ``Q8_0``: ``w = int8*d`` with ``int8 = code - 128``: exact.

Anything else (2/3-bit, asymmetric 8-bit, groups not a multiple of 32) raises
:class:`ExportError` naming the layer, unless ``options.fallback`` is ``widen`` (a larger type that
holds the codes without loss: ``Q4_0`` for symmetric <= 4 bits, else ``Q8_0`` when
``code - zero`` fits an int8, else F16 when the weight is exactly an fp16, else F32) or
``requant`` (gguf-py quantizes the dequantized weight to the nearest type it can write: ``Q4_0``/
``Q4_1``/``Q5_0``/``Q5_1``/``Q8_0``; lossy, the summary lists the layers and their weight error;
gguf-py cannot quantize k-quants). Norms are F32, other float tensors ``options.dtype``.

In arch ``llama`` the q/k rows are permuted as llama.cpp's converter does (its rope pairs
dimensions differently from transformers; the ``qwen2``/``qwen3`` archs use transformers' pairing
and take the rows as they are). The permutation moves whole rows, so it commutes with per-row
groups: codes, scales and zeros are permuted together. A pruned model with the same width in every
layer is a plain model of its arch with the shrunk sizes; uneven widths fail with the first
differing layer, or are padded, or (arch ``llama`` only) written as arch ``deci``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import tempfile
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QT
from torch import nn

from pqflow import architectures as arch
from pqflow.export import ExportError, ExportOptions
from pqflow.export.dense import (
    LayerWidths,
    is_lora,
    layer_widths,
    load_for_export,
    source_config,
    uniform_widths,
)
from pqflow.quant.linear import QuantLinear, TiedQuantHead

DESCRIPTION = "GGUF for llama.cpp: 4/8-bit codes as Q4_1/Q4_0/Q8_0 blocks, tokenizer and metadata in the file"
ENGINES = ("llama.cpp",)
GGUF_NAME = "model.gguf"
QK = 32  # weights per block of Q4_0 / Q4_1 / Q8_0

log = logging.getLogger(__name__)

_FLOAT_TYPES = {"float16": QT.F16, "bfloat16": QT.BF16, "float32": QT.F32}
_FILE_TYPES = {QT.F32: gguf.LlamaFileType.ALL_F32, QT.F16: gguf.LlamaFileType.MOSTLY_F16,
               QT.BF16: gguf.LlamaFileType.MOSTLY_BF16, QT.Q4_0: gguf.LlamaFileType.MOSTLY_Q4_0,
               QT.Q4_1: gguf.LlamaFileType.MOSTLY_Q4_1, QT.Q5_0: gguf.LlamaFileType.MOSTLY_Q5_0,
               QT.Q5_1: gguf.LlamaFileType.MOSTLY_Q5_1, QT.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}
# llama.cpp archs whose converter permutes the q/k rows (rope on pairs (2i, 2i+1), transformers'
# rotate_half pairs (i, i + d/2)); the others compute rope as transformers does
_PERMUTED_ROPE = {"llama", "deci"}
# the roles whose bias each llama.cpp arch reads (any other bias would be refused by its loader)
_BIASES = {"llama": ("q", "k", "v", "o"), "deci": ("q", "k", "v", "o"), "qwen2": ("q", "k", "v"), "qwen3": ()}


@dataclass(frozen=True)
class HParams:
    n_layers: int
    hidden: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    context: int
    rope_theta: float
    rms_eps: float
    # per-layer (query heads, KV heads, MLP width) when the layers differ: written as arch ``deci``
    per_layer: tuple[LayerWidths, ...] | None = None
    base: str = "llama"  # the family's llama.cpp arch (when the widths are one per model)

    @property
    def arch(self) -> str:
        return self.base if self.per_layer is None else "deci"

    def widths(self, layer: int) -> LayerWidths:
        if self.per_layer is not None:
            return self.per_layer[layer]
        return LayerWidths(self.n_heads, self.n_kv_heads, self.intermediate)


@dataclass
class Encoded:
    """A tensor as the writer takes it: ``data`` in ``qtype`` (uint8 bytes for block types)."""
    data: np.ndarray
    qtype: QT


@dataclass
class Report:
    types: Counter = field(default_factory=Counter)
    linear_types: Counter = field(default_factory=Counter)
    widened: dict[str, str] = field(default_factory=dict)
    requantized: dict[str, dict[str, Any]] = field(default_factory=dict)
    # the weights llama.cpp will compute with for each re-quantized layer, to measure what they cost
    requant_weights: dict[str, np.ndarray] = field(default_factory=dict)


class _Writer(gguf.GGUFWriter):
    """gguf-py refuses empty arrays, but a byte-level BPE without merges (the tiny tokenizer) has
    exactly that, and llama.cpp's gpt2 vocab requires the merges key to exist."""

    def _pack_val(self, val: Any, vtype: gguf.GGUFValueType, add_vtype: bool,
                  sub_type: gguf.GGUFValueType | None = None) -> bytes:
        if vtype == gguf.GGUFValueType.ARRAY and isinstance(val, Sequence) and len(val) == 0:
            head = self._pack("I", vtype) if add_vtype else b""
            return head + self._pack("I", sub_type or gguf.GGUFValueType.STRING) + self._pack("Q", 0)
        return super()._pack_val(val, vtype, add_vtype, sub_type)


# -- model shape ------------------------------------------------------------------------------

def _unwrap(model: nn.Module) -> nn.Module:
    # a LoRA artifact loads as a PeftModel; its base model holds the (LoRA-wrapped) layers
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def _rope_theta(cfg: Any) -> float:
    rope = getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in (None, "default"):
        raise ExportError(f"config: rope type '{kind}' is not written by this exporter (only default rope)")
    theta = rope.get("rope_theta", getattr(cfg, "rope_theta", None))
    return float(theta if theta is not None else 10000.0)


def _vocab_rows(emb: nn.Module) -> int:
    return emb.out_features if isinstance(emb, QuantLinear) else emb.weight.shape[0]  # QuantEmbedding: [vocab, dim]


def target_arch(obj: Any) -> str:
    """The llama.cpp arch a model (or its config, or config dict) is written as; the adapter's
    export refusal, or one line naming the family that has no GGUF arch here."""
    arch.require(obj, arch.EXPORT)
    base = arch.gguf_arch(obj)
    if base is None:
        known = ", ".join(sorted(arch.GGUF_ARCHS))
        raise ExportError(f"gguf export is not supported for {arch.family_of(obj).name}: pqflow writes GGUF for "
                          f"{known} only; export it as hf-dense or compressed-tensors")
    return base


def _check_biases(model: nn.Module, base: str) -> None:
    prefix = arch.layers_prefix(model)
    for i, layer in enumerate(arch.decoder_layers(model)):
        for role, p in arch.projections(layer).items():
            if role not in _BIASES[base] and _bias(p.module) is not None:
                raise ExportError(f"{prefix}.{i}.{p.name}: its bias has no place in llama.cpp's {base} arch")


def _context(cfg: Any) -> int:
    """The trained context; capped at the sliding window when layers slide (the llama.cpp archs
    written here attend to the whole context, so they agree with the model up to the window)."""
    ctx = int(cfg.max_position_embeddings)
    window = getattr(cfg, "sliding_window", None)
    kinds = getattr(cfg, "layer_types", None) or ()
    if window and (not kinds or "sliding_attention" in kinds):
        return min(ctx, int(window))
    return ctx


def hparams(model: nn.Module, per_layer_widths: bool = False) -> HParams:
    """llama.cpp's hyper-parameters, read off the layers (pruned sizes included). Uneven widths
    need ``per_layer_widths`` (arch ``deci``, which reads head counts and MLP widths per layer;
    written for arch ``llama`` only)."""
    cfg = model.config
    base = target_arch(model)
    _check_biases(model, base)
    width, first_uneven = uniform_widths(model)
    per_layer = None
    if first_uneven is not None:
        if not per_layer_widths or base != "llama":
            prefix = arch.layers_prefix(model)
            native = "--uneven native (arch deci) or pad" if base == "llama" else "--uneven pad"
            raise ExportError(
                f"{prefix}.{first_uneven} has another width than {prefix}.0 (pruned unevenly); llama.cpp's "
                f"{base} arch holds one width for every layer: export with {native}")
        per_layer = tuple(layer_widths(model))
        width = per_layer[0]
    layers = arch.decoder_layers(model)
    return HParams(
        n_layers=len(layers), hidden=arch.projections(layers[0])["q"].in_features, n_heads=width.n_heads,
        n_kv_heads=width.n_kv_heads, head_dim=arch.head_dim(layers[0]), intermediate=width.intermediate,
        vocab=_vocab_rows(model.get_input_embeddings()),
        context=_context(cfg), rope_theta=_rope_theta(cfg), rms_eps=float(cfg.rms_norm_eps),
        per_layer=per_layer, base=base)


def rope_permutation(rows: int, n_head: int) -> np.ndarray:
    """Row order of llama.cpp's converter (``LlamaModel.permute``): within each head, the two
    rope halves are interleaved. ``permuted[i] = original[perm[i]]``."""
    idx = np.arange(rows)
    return idx.reshape(n_head, 2, rows // n_head // 2).swapaxes(1, 2).reshape(rows)


# -- weights ----------------------------------------------------------------------------------

def _quant_parts(mod: QuantLinear, perm: np.ndarray | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes uint8 [out, in], scales float32 [out, groups], zero points float32 [out, groups])."""
    codes = mod.codes().cpu().numpy()
    scales = mod.scales.detach().float().cpu().numpy()
    zeros = mod.zero_points(torch.float32).cpu().numpy()
    if perm is not None:
        codes, scales, zeros = codes[perm], scales[perm], zeros[perm]
    return codes, scales, zeros


def _block_params(scales: np.ndarray, zeros: np.ndarray, in_features: int,
                  group_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Each 32-block's (scale, zero) ``[out, in/32]``: the group of its first column (blocks never
    straddle groups when the group size is a multiple of 32)."""
    first_cols = np.arange(in_features // QK) * QK
    g = first_cols // group_size if group_size is not None else np.zeros_like(first_cols)
    return scales[:, g], zeros[:, g]


def _fp16_bytes(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)[..., None].view(np.uint8)  # [..., 2], little-endian like the file


def _nibbles(q: np.ndarray) -> np.ndarray:
    """ggml's 4-bit layout: byte j of a block holds weight j (low) and weight j+16 (high)."""
    return q[..., : QK // 2] | (q[..., QK // 2:] << np.uint8(4))


def _blocks(codes: np.ndarray) -> np.ndarray:
    return codes.reshape(codes.shape[0], -1, QK)


def pack_q4_1(codes: np.ndarray, d: np.ndarray, zero: np.ndarray) -> np.ndarray:
    # d*z is exact in float32 (11-bit scale times a zero point below 2**8), so m is rounded once
    m = -(d.astype(np.float32) * zero.astype(np.float32))
    out = np.concatenate([_fp16_bytes(d), _fp16_bytes(m), _nibbles(_blocks(codes))], axis=-1)
    return out.reshape(codes.shape[0], -1)


def pack_q4_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``q`` already offset so that the weight is ``(q - 8) * d``."""
    out = np.concatenate([_fp16_bytes(d), _nibbles(_blocks(q))], axis=-1)
    return out.reshape(q.shape[0], -1)


def pack_q8_0(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """``q`` int8 with the weight ``q * d``."""
    out = np.concatenate([_fp16_bytes(d), _blocks(q.astype(np.int8)).view(np.uint8)], axis=-1)
    return out.reshape(q.shape[0], -1)


def _block_aligned(mod: QuantLinear) -> str | None:
    """Why the layer's groups cannot map onto 32-blocks, or None when they can."""
    if mod.in_features % QK:
        return f"{mod.in_features} input features are not a multiple of {QK}"
    if mod.group_size is not None and mod.group_size % QK:
        return f"group size {mod.group_size} is not a multiple of {QK}"
    return None


def exact_type(mod: QuantLinear) -> tuple[QT | None, str]:
    """The GGUF type that holds the layer's codes as they are, or (None, the reason)."""
    why = _block_aligned(mod)
    if why is not None:
        return None, why
    if mod.bits == 4:
        return (QT.Q4_0, "") if mod.symmetric else (QT.Q4_1, "")
    if mod.bits == 8 and mod.symmetric:
        return QT.Q8_0, ""
    kind = "symmetric" if mod.symmetric else "asymmetric"
    return None, (f"{mod.bits}-bit {kind} codes have no exact GGUF type (exact: 4-bit asymmetric -> Q4_1, "
                  "4-bit symmetric -> Q4_0, 8-bit symmetric -> Q8_0)")


def encode_exact(mod: QuantLinear, qtype: QT, perm: np.ndarray | None) -> Encoded:
    codes, scales, zeros = _quant_parts(mod, perm)
    d, z = _block_params(scales, zeros, mod.in_features, mod.group_size)
    if qtype == QT.Q4_1:
        return Encoded(pack_q4_1(codes, d, z), qtype)
    if qtype == QT.Q4_0:  # pqflow's symmetric zero point is 8 at 4 bits, ggml's offset too
        return Encoded(pack_q4_0(codes, d), qtype)
    # Q8_0: symmetric zero point 128, so code - 128 is the int8 ggml stores
    return Encoded(pack_q8_0(codes.astype(np.int16) - 128, d), qtype)


def _dequantized(mod: QuantLinear, perm: np.ndarray | None) -> np.ndarray:
    w = mod.dequantize(torch.float32).detach().cpu().numpy()
    return w[perm] if perm is not None else w


def encode_widened(mod: QuantLinear, perm: np.ndarray | None) -> Encoded:
    """The smallest type that holds the codes without any loss."""
    if _block_aligned(mod) is None:
        codes, scales, zeros = _quant_parts(mod, perm)
        d, z = _block_params(scales, zeros, mod.in_features, mod.group_size)
        zcol = np.repeat(z, QK, axis=1)
        diff = codes.astype(np.int16) - zcol.astype(np.int16)
        if mod.symmetric and mod.bits <= 4:  # (code - zero) in [-8, 7]: Q4_0's range
            return Encoded(pack_q4_0((diff + 8).astype(np.uint8), d), QT.Q4_0)
        if diff.min() >= -128 and diff.max() <= 127:
            return Encoded(pack_q8_0(diff, d), QT.Q8_0)
    w = _dequantized(mod, perm)
    if np.array_equal(w.astype(np.float16).astype(np.float32), w):
        return Encoded(w.astype(np.float16), QT.F16)
    return Encoded(w.astype(np.float32), QT.F32)


def requant_type(mod: QuantLinear) -> QT:
    if mod.in_features % QK:
        return QT.F16
    if mod.bits <= 4:
        return QT.Q4_0 if mod.symmetric else QT.Q4_1
    if mod.bits == 5:
        return QT.Q5_0 if mod.symmetric else QT.Q5_1
    return QT.Q8_0


def encode_requant(mod: QuantLinear, perm: np.ndarray | None) -> tuple[Encoded, float, np.ndarray]:
    """gguf-py's quantizer on the dequantized weight; returns the relative weight error and the
    weight it dequantizes to (in the model's row order) too."""
    w = _dequantized(mod, perm)
    qtype = requant_type(mod)
    data = gguf.quants.quantize(w, qtype)
    back = gguf.quants.dequantize(data, qtype).reshape(w.shape).astype(np.float32)
    err = float(np.linalg.norm(back.astype(np.float64) - w) / max(np.linalg.norm(w), 1e-30))
    if perm is not None:
        back = back[np.argsort(perm)]
    return Encoded(data, qtype), err, back


def encode_float(w: torch.Tensor, dtype: str, perm: np.ndarray | None = None) -> Encoded:
    arr = w.detach().float().cpu().numpy()
    if perm is not None:
        arr = arr[perm]
    qtype = _FLOAT_TYPES[dtype]
    if qtype == QT.BF16:
        return Encoded(gguf.quants.quantize(arr, QT.BF16), qtype)
    return Encoded(arr.astype(np.float16 if qtype == QT.F16 else np.float32), qtype)


def _lora_weight(mod: nn.Module) -> torch.Tensor | None:
    """A LoRA-wrapped linear's folded float weight (``W + B A * scaling``), None for others."""
    if not is_lora(mod):
        return None
    base = mod.get_base_layer()
    w = base.dequantize(torch.float32) if isinstance(base, QuantLinear) else base.weight.detach().float()
    for adapter in mod.active_adapters:
        if adapter in mod.lora_A:
            w = w + mod.get_delta_weight(adapter).float()
    return w


def encode_module(name: str, mod: nn.Module, perm: np.ndarray | None, options: ExportOptions,
                  report: Report) -> Encoded:
    """One linear or embedding weight: packed codes mapped exactly, or the user's fallback."""
    folded = _lora_weight(mod)
    if folded is not None:
        return encode_float(folded, options.dtype, perm)
    if not isinstance(mod, QuantLinear):
        return encode_float(mod.weight, options.dtype, perm)
    qtype, why = exact_type(mod)
    if qtype is not None:
        return encode_exact(mod, qtype, perm)
    if options.fallback == "widen":
        enc = encode_widened(mod, perm)
        report.widened[name] = enc.qtype.name
        return enc
    if options.fallback == "requant":
        enc, err, back = encode_requant(mod, perm)
        report.requantized[name] = {"type": enc.qtype.name, "rel_weight_error": err,
                                    "from": f"{mod.bits}-bit g{mod.group_size or 'channel'}"}
        report.requant_weights[name] = back
        log.warning("%s: re-quantized to %s (lossy, relative weight error %.2e)", name, enc.qtype.name, err)
        return enc
    raise ExportError(f"{name}: {why}; pass the fallback 'widen' (lossless, larger) or 'requant' (lossy)")


def _bias(mod: nn.Module) -> torch.Tensor | None:
    base = mod.get_base_layer() if hasattr(mod, "get_base_layer") else mod
    return getattr(base, "bias", None)


def _is_tied(model: nn.Module) -> bool:
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    if head is None or isinstance(head, TiedQuantHead):
        return True
    w = getattr(head, "weight", None)
    return w is not None and hasattr(emb, "weight") and w.data_ptr() == emb.weight.data_ptr()


class TensorNames:
    """GGUF tensor names from gguf-py's name map for the arch (what llama.cpp's converter uses)."""

    def __init__(self, gguf_arch: str, n_blocks: int) -> None:
        by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        self.arch = gguf_arch
        self.map = gguf.get_tensor_name_map(by_name[gguf_arch], n_blocks)

    def __call__(self, module_name: str, kind: str = "weight") -> str:
        name = self.map.get_name(f"{module_name}.{kind}", try_suffixes=(".weight", ".bias"))
        if name is None:
            raise ExportError(f"{module_name}: gguf-py's name map for arch {self.arch} has no tensor for it")
        return name


def _module_name(model: nn.Module, mod: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is mod)


def _block_tensors(layer: nn.Module, fam: arch.Family) -> list[tuple[str, nn.Module, str | None]]:
    """(path in the block, module, role or None for a norm), in llama.cpp's converter order: the
    attention's input norm, q, k, v (their per-head norms), o, the MLP's input norm, gate, up, down."""
    p = arch.projections(layer, fam)
    out: list[tuple[str, nn.Module, str | None]] = []
    norms = [fam.attn_in_norm] if fam.attn_in_norm else []
    out += [(n, layer.get_submodule(n), None) for n in norms]
    out += [(p[r].name, p[r].module, r) for r in ("q", "k", "v")]
    if fam.qk_norm:
        out += [(n, layer.get_submodule(n), None) for n in (fam.q_norm, fam.k_norm)]
    out.append((p["o"].name, p["o"].module, "o"))
    if fam.mlp_in_norm:
        out.append((fam.mlp_in_norm, layer.get_submodule(fam.mlp_in_norm), None))
    out += [(p[r].name, p[r].module, r) for r in ("gate", "up", "down")]
    return out


def collect_tensors(model: nn.Module, hp: HParams, options: ExportOptions,
                    report: Report) -> list[tuple[str, Encoded]]:
    """Every tensor llama.cpp's arch reads, named and ordered as its converter writes them."""
    out: list[tuple[str, Encoded]] = []
    names = TensorNames(hp.arch, hp.n_layers)
    emb = model.get_input_embeddings()
    emb_name = _module_name(model, emb)
    out.append((names(emb_name), encode_module(emb_name, emb, None, options, report)))
    prefix, fam = arch.layers_prefix(model), arch.family_of(model)
    for i, layer in enumerate(arch.decoder_layers(model)):
        w = hp.widths(i)
        perms = {}
        if hp.arch in _PERMUTED_ROPE:
            perms = {"q": rope_permutation(w.n_heads * hp.head_dim, w.n_heads),
                     "k": rope_permutation(w.n_kv_heads * hp.head_dim, w.n_kv_heads)}
        for path, mod, role in _block_tensors(layer, fam):
            full = f"{prefix}.{i}.{path}"
            if role is None:  # a norm
                out.append((names(full), Encoded(mod.weight.detach().float().numpy(), QT.F32)))
                continue
            perm = perms.get(role)
            enc = encode_module(full, mod, perm, options, report)
            report.linear_types[enc.qtype.name] += 1
            out.append((names(full), enc))
            bias = _bias(mod)
            if bias is not None:
                b = bias.detach().float().numpy()
                out.append((names(full, "bias"), Encoded(b[perm] if perm is not None else b, QT.F32)))
    norm = arch.final_norm(model)
    out.append((names(_module_name(model, norm)), Encoded(norm.weight.detach().float().numpy(), QT.F32)))
    if not _is_tied(model):
        head = model.get_output_embeddings()
        head_name = _module_name(model, head)
        enc = encode_module(head_name, head, None, options, report)
        report.linear_types[enc.qtype.name] += 1
        out.append((names(head_name), enc))
    for _, enc in out:
        report.types[enc.qtype.name] += 1
    return out


# -- the cost of a lossy fallback ---------------------------------------------------------------

REQUANT_WINDOWS, REQUANT_SEQLEN = 8, 512  # WikiText-2 test, the evaluate stage's protocol, fewer windows


def requant_ppl_change(model: nn.Module, tokenizer: Any, weights: dict[str, np.ndarray],
                       context: int) -> dict[str, Any]:
    """Perplexity of the model as pqflow computes it and with the re-quantized layers swapped in
    (the weights llama.cpp reads), on the first WikiText-2 test windows. The model is densified in
    place. Without the text (offline, no data folder) the change is reported as not measured."""
    import torch

    from pqflow.data import eval_windows, load_text, tokenize
    from pqflow.errors import PqflowError
    from pqflow.export.dense import densify
    from pqflow.perplexity import perplexity

    seqlen = min(REQUANT_SEQLEN, context)
    try:
        windows = eval_windows(tokenize(tokenizer, load_text("wikitext2", "test")), seqlen, REQUANT_WINDOWS)
    except (PqflowError, OSError) as e:
        return {"measured": False, "why": str(e).splitlines()[0]}
    densify(model)
    before = perplexity(model, windows, progress=False).ppl
    with torch.no_grad():
        for name, w in weights.items():
            model.get_submodule(name).weight.copy_(torch.from_numpy(w))
    after = perplexity(model, windows, progress=False).ppl
    return {"measured": True, "text": "wikitext2 test", "windows": len(windows), "seqlen": seqlen,
            "ppl": before, "ppl_requant": after, "change_pct": 100 * (after - before) / before}


# -- metadata and tokenizer -------------------------------------------------------------------

def write_metadata(writer: gguf.GGUFWriter, hp: HParams, name: str, file_type: QT) -> None:
    writer.add_name(name)
    writer.add_context_length(hp.context)
    writer.add_embedding_length(hp.hidden)
    writer.add_block_count(hp.n_layers)
    if hp.per_layer is None:
        writer.add_feed_forward_length(hp.intermediate)
        writer.add_head_count(hp.n_heads)
        writer.add_head_count_kv(hp.n_kv_heads)
    else:  # arch deci: one entry per layer
        writer.add_feed_forward_length([w.intermediate for w in hp.per_layer])
        writer.add_head_count([w.n_heads for w in hp.per_layer])
        writer.add_head_count_kv([w.n_kv_heads for w in hp.per_layer])
    # explicit: after head pruning head_dim != hidden / heads, llama.cpp's default
    writer.add_key_length(hp.head_dim)
    writer.add_value_length(hp.head_dim)
    writer.add_rope_dimension_count(hp.head_dim)
    writer.add_rope_freq_base(hp.rope_theta)
    writer.add_layer_norm_rms_eps(hp.rms_eps)
    writer.add_vocab_size(hp.vocab)
    writer.add_file_type(_FILE_TYPES[file_type])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


# A byte-level BPE's split regex -> llama.cpp's pre-tokenizer with that regex
_SPLIT_PRE = {
    # Qwen2 and Qwen3 (LLAMA_VOCAB_PRE_TYPE_QWEN2)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+": "qwen2",
    # Llama 3 (LLAMA_VOCAB_PRE_TYPE_LLAMA3): numbers in runs of up to three digits
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": "llama-bpe",
}


def pre_tokenizer_name(pre: dict[str, Any] | None) -> str:
    """llama.cpp's name for a byte-level pre-tokenizer, read off tokenizer.json's structure
    (convert_hf_to_gguf hashes a probe text instead, which needs its table of known hashes)."""
    parts = (pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]) if pre else []
    kinds = [p.get("type") for p in parts]
    digits = any(p.get("type") == "Digits" and p.get("individual_digits") for p in parts)
    if "ByteLevel" not in kinds:
        raise ExportError(f"tokenizer: pre-tokenizer {kinds or 'none'} is not byte-level; only gpt2-style "
                          "byte-level BPE tokenizers are written")
    if digits and kinds == ["Digits", "ByteLevel"]:
        return "smollm"  # digits one by one, then gpt2's regex: llama.cpp's LLAMA_VOCAB_PRE_TYPE_SMOLLM
    if kinds == ["ByteLevel"]:
        return "gpt-2"  # without merges (the tiny tokenizer) every split gives the same byte tokens
    if kinds == ["Split", "ByteLevel"] and parts[1].get("use_regex") is False and not parts[0].get("invert") \
            and parts[0].get("behavior") == "Isolated":
        name = _SPLIT_PRE.get((parts[0].get("pattern") or {}).get("Regex"))
        if name:
            return name
    raise ExportError(f"tokenizer: pre-tokenizer sequence {kinds} has no known llama.cpp name")


def write_tokenizer(writer: gguf.GGUFWriter, tokenizer: Any, n_vocab: int) -> dict[str, Any]:
    """tokenizer.ggml.* as convert_hf_to_gguf's gpt2 vocab: tokens, types, merges, special ids."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ExportError("tokenizer: not a fast (tokenizers) tokenizer; gguf needs its tokenizer.json")
    spec = json.loads(backend.to_str())
    if spec.get("model", {}).get("type") != "BPE":
        raise ExportError(f"tokenizer: model {spec.get('model', {}).get('type')} is not BPE")
    pre = pre_tokenizer_name(spec.get("pre_tokenizer"))
    vocab = tokenizer.get_vocab()
    if max(vocab.values()) >= n_vocab:
        raise ExportError(f"tokenizer: token id {max(vocab.values())} is past the embedding's {n_vocab} rows")
    reverse = {i: t for t, i in vocab.items()}
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in reverse:  # embedding rows past the tokenizer: padding, as the converter names them
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        tok = reverse[i]
        tokens.append(tok)
        if tok in added:
            types.append(gguf.TokenType.CONTROL if decoder[i].special else gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        special = gguf.SpecialVocab(tmp, load_merges=True, n_vocab=n_vocab)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if not special.merges:
        # the key must exist for llama.cpp's gpt2 vocab; add_token_merges skips empty lists
        writer.add_key_value(gguf.Keys.Tokenizer.MERGES, [], gguf.GGUFValueType.ARRAY,
                             sub_type=gguf.GGUFValueType.STRING)
        special.load_merges = False  # nothing to add, and no "no merges found" warning
    special.add_to_gguf(writer, quiet=True)
    return {"tokenizer_pre": pre, "merges": len(special.merges), "special_ids": special.special_token_ids}


# -- the format -------------------------------------------------------------------------------

def export(src: Path, out: Path, options: ExportOptions) -> dict[str, Any]:
    cfg = source_config(src)
    if cfg is None:
        raise ExportError(f"{src}: no config.json; the gguf export reads the model's family from it")
    base = target_arch(cfg)  # before the model loads: a family without a GGUF arch fails by name
    loaded, padded = load_for_export(src, f"gguf (arch {base})", options, per_layer_widths=base == "llama")
    model = _unwrap(loaded.model)
    hp = hparams(model, per_layer_widths=options.uneven == "native")
    report = Report()
    # every tensor is encoded (and every error raised) before the file is opened
    tensors = collect_tensors(model, hp, options, report)
    file_type = QT[report.linear_types.most_common(1)[0][0]]
    path = out / GGUF_NAME
    writer = _Writer(path, hp.arch)
    write_metadata(writer, hp, Path(src).name or "pqflow", file_type)
    tok = write_tokenizer(writer, loaded.tokenizer, hp.vocab)
    for name, enc in tensors:
        writer.add_tensor(name, enc.data, raw_dtype=enc.qtype if enc.data.dtype == np.uint8 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    cost = None
    if report.requant_weights:
        cost = requant_ppl_change(model, loaded.tokenizer, report.requant_weights, hp.context)
        if cost["measured"]:
            log.warning("re-quantized %d layers: ppl %.4f -> %.4f (%+.3f%%) on %d WikiText-2 test windows of %d",
                        len(report.requantized), cost["ppl"], cost["ppl_requant"], cost["change_pct"],
                        cost["windows"], cost["seqlen"])
        else:
            log.warning("re-quantized %d layers; the ppl change is not measured: %s", len(report.requantized),
                        cost["why"])
    return {
        "file": GGUF_NAME, "arch": hp.arch, "file_type": file_type.name, "gguf_bytes": path.stat().st_size,
        "tensor_types": dict(sorted(report.types.items())), "linear_types": dict(sorted(report.linear_types.items())),
        "fallback": options.fallback, "widened": report.widened, "requantized": report.requantized,
        "lossless": not report.requantized, **({"requant_ppl": cost} if cost else {}), "n_layers": hp.n_layers, "n_heads": hp.n_heads,
        "n_kv_heads": hp.n_kv_heads, "intermediate": hp.intermediate, **tok,
        **({"per_layer_widths": [list(dataclasses.astuple(w)) for w in hp.per_layer]} if hp.per_layer else {}),
        **({"padded": padded} if padded else {}),
    }
