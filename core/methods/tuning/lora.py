"""``lora``: peft LoRA adapters on the frozen base (QLoRA / QPruner recovery).

Bases: float (``hf`` / ``pqflow-pruned``), our packed ``pqflow-quant`` layers (through
:class:`~pqflow.quant.lora_layer.QuantLoraLinear`, a peft custom module) and
bitsandbytes NF4 / int8 layers (peft's own bnb LoRA layers). A float base is merged after training
(``merge: true``) and saved in its own format; a packed base is kept byte for byte and the adapter
saved beside it in peft's format (format ``pqflow-lora``).

``init: loftq`` takes a float model and quantizes it here (our grid, ``loftq_bits`` /
``loftq_group_size``) alternating with rank-r fits of the residual, so the packed base plus the
initial adapter start close to the float weights (see :mod:`.loftq`).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import Field
from torch import nn

from pqflow import architectures, formats
from pqflow.formats import hf
from pqflow.formats.lora import save_adapter
from pqflow.methods.tuning.common import (
    ADAPTER_DIR,
    FORMAT,
    Base,
    Tuned,
    copy_base_files,
    trainable_parameters,
)
from pqflow.methods.tuning.train import TrainData, TrainParams, resolve_device, train
from pqflow.models import DTYPES, cast_float
from pqflow.quant import QuantLinear
from pqflow.recipe import MAX_GROUP, MAX_RANK

ALL_ROLES = list(architectures.ROLES)  # q, k, v, o, gate, up, down


class Params(TrainParams):
    r: int = Field(8, ge=1, le=MAX_RANK, description="adapter rank")
    alpha: float = Field(16.0, gt=0, description="lora_alpha; the update is scaled by alpha / r")
    dropout: float = Field(0.05, ge=0, lt=1, description="dropout on the adapter input")
    target_modules: list[str] = Field(
        default_factory=lambda: list(ALL_ROLES), max_length=64,
        description="the linears that get adapters: roles in the decoder block (q, k, v, o, gate, up, down; an "
                    "MoE expert's linears count as gate, up, down; a fused projection is adapted when one of its "
                    "roles is named) or leaf module names")
    init: Literal["default", "gaussian", "loftq"] = Field(
        "default", description="default: A Kaiming, B zero (peft); loftq: quantize here, adapters fit the residual")
    loftq_bits: Literal[2, 3, 4, 8] = Field(4, description="loftq: bits of the packed base")
    loftq_group_size: int | None = Field(64, ge=1, le=MAX_GROUP, description="loftq: input columns per scale; null = per row")
    loftq_symmetric: bool = Field(False, description="loftq: symmetric grid")
    loftq_iter: int = Field(1, ge=1, le=100, description="loftq: alternating quantize / SVD rounds")
    merge: bool = Field(True, description="merge adapters into a float base after training")
    base_dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="cast a float base to this dtype for training (adapters stay float32)")
    cache_dequantized: bool = Field(False, description="packed base: keep dequantized weights between steps (faster, float-model memory)")


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, QuantLinear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt")
               for m in model.modules())


def target_linears(model: nn.Module, targets: list[str]) -> list[str]:
    """Full names of the decoder linears ``targets`` names: by role (see ``Params.target_modules``)
    or by leaf name. Every entry must name at least one linear."""
    roles = architectures.block_linear_roles(model)
    hits: dict[str, list[str]] = {t: [] for t in targets}
    for name, r in roles.items():
        plain, leaf = architectures.role_set(r), name.rsplit(".", 1)[-1]
        for t in targets:
            if t in plain or t == leaf:
                hits[t].append(name)
    missing = [t for t, names in hits.items() if not names]
    if missing:
        raise ValueError(f"params.target_modules: {missing} name no linear of this model (roles: "
                         f"{', '.join(ALL_ROLES)}; leaf names: {', '.join(sorted({n.rsplit('.', 1)[-1] for n in roles}))})")
    return [n for n in roles if any(n in names for names in hits.values())]


def tune(base: Base, data: TrainData, p: Params, out: Path) -> Tuned:
    model, tok = base.model, base.tokenizer
    base_meta = dict(base.meta)
    out.mkdir(parents=True, exist_ok=True)
    if base.fmt == FORMAT:
        if not base.meta.get("merged"):
            raise ValueError("the input already carries an unmerged LoRA adapter; tune its base or merge first")
        base_meta = dict(base.meta["base"])
    quantized = is_quantized(model)
    info: dict[str, Any] = {"base_format": base_meta.get("format", "hf"), "init": p.init}
    if p.base_dtype is not None:
        if quantized:
            raise ValueError("params.base_dtype: the base is quantized; its compute dtype is fixed")
        cast_float(model, DTYPES[p.base_dtype])
    scaling = p.alpha / p.r
    targets = target_linears(model, list(p.target_modules))
    torch.manual_seed(p.seed)
    loftq_init = None
    if p.init == "loftq":
        if quantized:
            raise ValueError("params.init=loftq needs a float (unquantized) input model: LoftQ quantizes it itself")
        from pqflow.formats import packed
        from pqflow.methods.tuning.loftq import loftq_quantize

        loftq_init, stats = loftq_quantize(model, targets, p.r, scaling, p.loftq_bits,
                                           p.loftq_group_size, p.loftq_symmetric, p.loftq_iter)
        info.update(stats)
        # Saving rounds the float remainder to fp16 in memory too, so training sees the saved base.
        extra = packed.save(model, tok, out)
        base_meta = {"format": packed.NAME, "method": "loftq-rtn", **extra}
        quantized = True
    merge = p.merge and not quantized
    if not merge and p.init != "loftq":
        if base.folder is not None and p.base_dtype is None:
            copy_base_files(base.folder, out)  # the frozen base, byte for byte
        else:
            hf.save(model, tok, out)
            base_meta["format"] = base_meta.get("format", hf.NAME)
    for m in model.modules():
        if isinstance(m, QuantLinear):
            m.cache = p.cache_dequantized

    peft_model = _wrap(model, p, targets)
    if loftq_init is not None:
        _set_adapters(peft_model, loftq_init)
    device = resolve_device(p.device)
    peft_model.to(device)
    trainable = trainable_parameters(peft_model)
    n_train = sum(t.numel() for t in trainable.values())
    hist = train(peft_model, trainable, data, p, desc="lora")
    peft_model.to("cpu")
    if merge:
        save_adapter(peft_model, out / ADAPTER_DIR)  # kept for reference; the weights below include it
        merged = peft_model.merge_and_unload()
        hf.save(merged, tok, out)
        formats.write_meta(out, {"format": FORMAT, "base": base_meta, "adapter": ADAPTER_DIR, "merged": True,
                                 "method": "lora"})
        result = merged
    else:
        # The frozen base is in ``out`` already; the LoRA format's saver adds the adapter.
        formats.save_model(peft_model, tok, out, FORMAT, base=base_meta, method="lora")
        result = peft_model.get_base_model()
    info["merged"] = merge
    info["adapted_linears"] = len(targets)
    print(f"[pqflow] lora: r={p.r} on {len(targets)} linears, {n_train:,} trainable params, "
          f"{'merged into the float base' if merge else 'kept beside the frozen base'}", file=sys.stderr)
    return Tuned(result.eval(), hist, n_train, info)


def _wrap(model: nn.Module, p: Params, targets: list[str]) -> nn.Module:
    from peft import get_peft_model

    from pqflow.quant.lora_layer import lora_config, own_layout

    # Full module names: peft shortens a long list to the fewest suffixes that match exactly these.
    cfg = lora_config(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=targets,
                      init_lora_weights="gaussian" if p.init == "gaussian" else True, bias="none")
    with own_layout():  # MoE experts are linears here: peft must not retarget them as 3D parameters
        return get_peft_model(model, cfg)


@torch.no_grad()
def _set_adapters(peft_model: nn.Module, init: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    from peft.tuners.lora.layer import LoraLayer

    done = 0
    for name, m in peft_model.named_modules():
        if not isinstance(m, LoraLayer):
            continue
        key = next((k for k in init if name.endswith("." + k) or name == k), None)
        if key is None:
            continue
        a, b = init[key]
        m.lora_A["default"].weight.copy_(a)
        m.lora_B["default"].weight.copy_(b)
        done += 1
    if done != len(init):
        raise RuntimeError(f"LoftQ: initialised {done} adapters, expected {len(init)}")
