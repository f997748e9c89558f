"""``compressed-tensors``: the ``pack-quantized`` Hugging Face folder that transformers (with the
``compressed-tensors`` package) and vLLM read.

Every packed ``QuantLinear`` keeps its codes: pqflow's ``(code - zero) * scale`` is written in the
library's convention ``(q - zp) * scale`` with signed codes ``q = code - 2**(bits-1)`` and signed
zero points ``zp = zero - 2**(bits-1)``, so the difference, and with it the dequantized weight, is
the same number. Codes are packed by the library's own ``pack_to_int32`` (``weight_packed``, int32
``[out, ceil(in*bits/32)]``), asymmetric zero points along the output dim (``weight_zero_point``,
int32 ``[ceil(out*bits/32), n_groups]``), scales as ``weight_scale`` ``[out, n_groups]`` and the
shape as ``weight_shape``. Each distinct (bits, group size, symmetric) is one ``config_groups``
entry naming its modules; the config is built with the library's pydantic models and written by its
``ModelCompressor.update_config``. Float layers (and LoRA-merged ones) go to ``ignore``.

Quantized embeddings and a tied quantized head are written dequantized in ``options.dtype``:
transformers ties ``lm_head`` to ``embed_tokens`` by parameter, which a packed embedding does not
have, and vLLM's compressed-tensors path quantizes linears only. That is exact in float32; in
fp16 the product ``(code - zero) * scale`` is rounded once (the scales themselves are fp16).
"""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from pqflow.export import ExportError, ExportOptions
from pqflow.export.dense import densify, is_lora, load_for_export, standard_config
from pqflow.models import DTYPES
from pqflow.quant.linear import QuantEmbedding, QuantLinear

DESCRIPTION = "compressed-tensors pack-quantized folder (transformers + compressed-tensors, vLLM)"
ENGINES = ("transformers", "vllm")

# Pinned: the int32 packing of bit widths that do not divide 32 (3-bit) changed in 0.18.0 from
# 32 // bits values per word (10 x 3-bit, 2 bits wasted) to dense packing across word boundaries;
# a reader with another packing unpacks 3-bit weights into garbage without any error. The version
# goes into config.json so that readers can tell, and the export refuses any other installed one.
CT_VERSION = "0.20.1"
FORMAT = "pack-quantized"
WEIGHTS = "model.safetensors"

Scheme = tuple[int, int | None, bool]  # (bits, group size or None = per output channel, symmetric)


def _library() -> Any:
    try:
        import compressed_tensors
    except ImportError:
        raise ExportError(f"format compressed-tensors needs the compressed-tensors package: "
                          f"pip install compressed-tensors=={CT_VERSION}") from None
    if compressed_tensors.__version__ != CT_VERSION:
        raise ExportError(f"format compressed-tensors is pinned to compressed-tensors=={CT_VERSION} (its 3-bit "
                          f"packing differs between releases); installed: {compressed_tensors.__version__}")
    return compressed_tensors


def ct_group_size(name: str, q: QuantLinear, fallback: str) -> int | None:
    """The group size the format stores ``q`` with. A ragged last group (``in % group != 0``) has
    no place in compressed-tensors (every group has ``group_size`` columns); with ``widen`` it is
    written exactly with groups of ``gcd(in, group)``, each repeating its pqflow group's scale."""
    g = q.group_size
    if g is None or q.in_features % g == 0:
        return g
    if fallback != "widen":
        raise ExportError(f"{name}: in_features {q.in_features} is not a multiple of group_size {g} (a ragged "
                          f"last group), which compressed-tensors cannot hold; use fallback 'widen' to write it "
                          f"with group_size {math.gcd(q.in_features, g)} and repeated scales")
    return math.gcd(q.in_features, g)


def _scales(q: QuantLinear, group: int | None, dtype: torch.dtype) -> torch.Tensor:
    s = q.scales.detach()
    if group is not None and group != q.group_size:  # widened ragged layer: repeat each group's scale
        s = s[:, q.gidx[::group]]
    # The export's float dtype when that holds the stored scales exactly, else their own dtype.
    return s.to(dtype) if torch.equal(s.to(dtype).to(s.dtype), s) else s


def _zero_points(q: QuantLinear, group: int | None) -> torch.Tensor:
    z = q.zeros
    if group is not None and group != q.group_size:
        z = z[:, q.gidx[::group]]
    return z


def pack_module(q: QuantLinear, group: int | None, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The compressed-tensors tensors of one packed linear (names without the module prefix)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    offset = 1 << (q.bits - 1)  # the library stores signed codes and adds this back when packing
    codes = (q.codes().to(torch.int16) - offset).to(torch.int8)
    out = {"weight_packed": pack_to_int32(codes, q.bits),
           "weight_scale": _scales(q, group, dtype).contiguous(),
           "weight_shape": torch.tensor([q.out_features, q.in_features])}
    if not q.symmetric:  # symmetric pqflow codes sit on zero = 2**(bits-1): signed zero point 0, not stored
        zp = (_zero_points(q, group).to(torch.int16) - offset).to(torch.int8)
        out["weight_zero_point"] = pack_to_int32(zp, q.bits, packed_dim=0)
    if q.bias is not None:
        out["bias"] = q.bias.detach().to(dtype)
    return out


def scheme_of(q: QuantLinear, group: int | None) -> Any:
    """The library's ``QuantizationArgs`` for a packed linear (int weights, static, no activations)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationStrategy

    strategy = QuantizationStrategy.CHANNEL if group is None else QuantizationStrategy.GROUP
    return QuantizationArgs(num_bits=q.bits, type="int", symmetric=q.symmetric, strategy=strategy,
                            group_size=group, dynamic=False)


def build_config(groups: dict[Scheme, list[str]], args: dict[Scheme, Any], ignore: list[str]) -> Any:
    from compressed_tensors.quantization import QuantizationConfig, QuantizationScheme

    schemes = {f"group_{i}": QuantizationScheme(targets=sorted(names), weights=args[key], format=FORMAT)
               for i, (key, names) in enumerate(sorted(groups.items(), key=lambda kv: _order(kv[0])))}
    return QuantizationConfig(config_groups=schemes, format=FORMAT, quantization_status="compressed",
                              ignore=sorted(ignore))


def _order(key: Scheme) -> tuple[int, int, bool]:
    return key[0], key[1] or 0, key[2]


def _check_supported(model: nn.Module) -> None:
    for name, mod in model.named_modules():
        if type(mod).__module__.startswith("bitsandbytes"):
            raise ExportError(f"{name}: a bitsandbytes layer; compressed-tensors export takes pqflow's packed "
                              "(rtn/gptq/...) models, use hf-dense for bitsandbytes")


def _packed_linears(model: nn.Module) -> tuple[dict[str, QuantLinear], list[str]]:
    """Packed linears to keep packed, and the names of LoRA-wrapped layers (merged into float)."""
    lora = [n for n, m in model.named_modules() if is_lora(m) and n]
    inside = tuple(f"{n}." for n in lora)
    packed = {n: m for n, m in model.named_modules()
              if isinstance(m, QuantLinear) and not isinstance(m, QuantEmbedding) and not n.startswith(inside)}
    return packed, lora


def _float_tensors(model: nn.Module, skip: set[str], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every saved tensor of the densified model but the packed linears' weights, in ``dtype``;
    a tied head is left out (transformers and vLLM tie it to the embedding on load)."""
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    head = model.get_output_embeddings()
    head_key = next((f"{n}.weight" for n, m in model.named_modules() if m is head), None)
    out = {}
    for key, t in model.state_dict().items():
        if key in skip or (tied and key == head_key):
            continue
        out[key] = (t.to(dtype) if t.is_floating_point() else t).contiguous()
    return out


def export(src: Path, out: Path, options: ExportOptions) -> dict[str, Any]:
    _library()
    from compressed_tensors.compressors import ModelCompressor

    dtype = DTYPES[options.dtype]
    loaded, padded = load_for_export(src, "compressed-tensors", options)
    model = loaded.model
    _check_supported(model)
    standard_config(model, "compressed-tensors")
    packed, lora = _packed_linears(model)
    tensors: dict[str, torch.Tensor] = {}
    groups: dict[Scheme, list[str]] = defaultdict(list)
    args: dict[Scheme, Any] = {}
    for name, q in packed.items():
        g = ct_group_size(name, q, options.fallback)
        key = (q.bits, g, q.symmetric)
        groups[key].append(name)
        args.setdefault(key, scheme_of(q, g))
        tensors.update({f"{name}.{k}": v for k, v in pack_module(q, g, dtype).items()})
    fp16_fallbacks = [n for n, m in model.named_modules() if isinstance(m, QuantEmbedding)] + lora
    tied_head = bool(getattr(model.config, "tie_word_embeddings", False)) and bool(fp16_fallbacks)
    densify(model)  # embeddings, tied head, LoRA merges and float layers as plain float modules
    skip = {f"{n}.{k}" for n in packed for k in ("weight", "bias")}
    tensors.update(_float_tensors(model, skip, dtype))
    ignore = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in packed]
    qconfig = build_config(groups, args, ignore)

    model.config.dtype = dtype
    model.config.save_pretrained(out)
    ModelCompressor(quantization_config=qconfig).update_config(str(out))  # writes `version` = CT_VERSION
    loader_hint = _transformers_hint(out, groups)
    save_file(tensors, str(out / WEIGHTS), metadata={"format": "pt"})
    loaded.tokenizer.save_pretrained(out)
    return {
        "compressed_tensors": CT_VERSION,
        "config_groups": len(groups),
        "schemes": {scheme_name(k): len(v) for k, v in sorted(groups.items(), key=lambda kv: _order(kv[0]))},
        "float_fallbacks": fp16_fallbacks + (["lm_head (tied)"] if tied_head else []),
        "ignored_float_linears": len(ignore),
        "dtype": options.dtype,
        "transformers_loader": loader_hint,
        **({"padded": padded} if padded else {}),
    }


def _transformers_hint(out: Path, groups: dict[Scheme, list[str]]) -> str:
    """transformers (5.24) with compressed-tensors (0.20.1) cannot load asymmetric pack-quantized
    weights lazily: the model it builds holds unpacked zero points while the checkpoint (as the library
    compresses it, and as vLLM reads it) holds them packed, so loading stops on a size mismatch. Its
    load-time ``dequantize`` route reads them right but decompresses every module with the first
    config group's scheme. With one asymmetric group that route is exact, so it is asked for in the
    config (vLLM and the library ignore the key); several groups with zero points need an upstream fix."""
    if all(sym for _, _, sym in groups):
        return "from_pretrained"
    if len(groups) == 1:
        path = out / "config.json"
        cfg = json.loads(path.read_text())
        cfg["quantization_config"]["dequantize"] = True
        path.write_text(json.dumps(cfg, indent=2, sort_keys=True))
        return "from_pretrained (dequantize at load)"
    return "blocked upstream: asymmetric zero points in several config groups"


def scheme_name(key: Scheme) -> str:
    bits, group, sym = key
    return f"w{bits}{'g' + str(group) if group else 'pc'}{'s' if sym else 'a'}"
