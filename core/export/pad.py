"""Zero-padding of a model pruned to uneven widths, so that a standard config (one width for every
layer) holds it: the path for engines without per-layer widths (``ExportOptions.uneven = "pad"``).

Every layer is padded up to the widest layer's KV heads, query heads per KV head and MLP channels.
Padded query, key and value rows (and their biases) are zero, and so are the matching input columns
of the attention's output projection and the MLP's down projection: a padded query head attends
somewhere, but its output is multiplied by zero columns, and ``silu(0) * 0 = 0`` in the MLP, so the
padded model computes exactly what the pruned one did. The roles are found by the architecture
adapter (:mod:`pqflow.architectures`); families whose projections are fused or whose MLP is a
mixture of experts are not exported, so not padded either.
Quantized layers are padded in their codes: a padded weight is the code equal to its group's zero
point, which dequantizes to exactly 0, and the packed bytes stay small. The cost is compute: the
padded heads and channels are multiplied again.

Query heads sit grouped by KV head (``surgery.cut_layer``), so a layer with fewer query heads per
KV head gets zero heads inserted inside each group, not only at the end; in a grouped layer the
inserted columns must start and end on group boundaries (true whenever the group size divides the
head dim), else the layer is refused by name.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from pqflow import architectures as arch
from pqflow.export import ExportError
from pqflow.export.dense import LayerWidths, is_lora, layer_widths, set_module
from pqflow.quant.grid import group_index, n_groups
from pqflow.quant.linear import QuantLinear

PAD = -1  # an index map's entry for a padded row or column


@dataclass(frozen=True)
class Target:
    n_kv_heads: int
    heads_per_kv: int
    intermediate: int

    @property
    def widths(self) -> LayerWidths:
        return LayerWidths(self.n_kv_heads * self.heads_per_kv, self.n_kv_heads, self.intermediate)


def target_widths(widths: list[LayerWidths]) -> Target:
    return Target(max(w.n_kv_heads for w in widths), max(w.n_heads // w.n_kv_heads for w in widths),
                  max(w.intermediate for w in widths))


def head_map(w: LayerWidths, t: Target, head_dim: int) -> torch.Tensor:
    """New query row -> old query row (or PAD): KV group k keeps its heads first, then zero heads."""
    per = w.n_heads // w.n_kv_heads
    heads = [k * per + j if k < w.n_kv_heads and j < per else PAD
             for k in range(t.n_kv_heads) for j in range(t.heads_per_kv)]
    return _expand(heads, head_dim)


def kv_map(w: LayerWidths, t: Target, head_dim: int) -> torch.Tensor:
    return _expand([k if k < w.n_kv_heads else PAD for k in range(t.n_kv_heads)], head_dim)


def tail_map(old: int, new: int) -> torch.Tensor:
    return torch.cat([torch.arange(old), torch.full((new - old,), PAD)])


def _expand(blocks: list[int], size: int) -> torch.Tensor:
    return torch.cat([torch.arange(b * size, (b + 1) * size) if b != PAD else torch.full((size,), PAD)
                      for b in blocks])


def _take(x: torch.Tensor, index: torch.Tensor, dim: int, fill: torch.Tensor | float = 0.0) -> torch.Tensor:
    """``x`` gathered along ``dim`` by ``index``; PAD entries get ``fill``."""
    real = index != PAD
    out = x.index_select(dim, index.clamp(min=0))
    mask = real.view([-1 if d == dim % x.dim() else 1 for d in range(x.dim())])
    return torch.where(mask, out, torch.as_tensor(fill, dtype=x.dtype).expand_as(out) if isinstance(fill, float)
                       else fill.to(x.dtype))


def pad_dense(lin: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Linear:
    w = lin.weight.detach()
    w = _take(w, rows, 0) if rows is not None else w
    w = _take(w, cols, 1) if cols is not None else w
    new = nn.Linear(w.shape[1], w.shape[0], bias=lin.bias is not None, device=w.device, dtype=w.dtype)
    new.weight = nn.Parameter(w.contiguous(), requires_grad=False)
    if lin.bias is not None:
        b = lin.bias.detach()
        new.bias = nn.Parameter((_take(b, rows, 0) if rows is not None else b).contiguous(), requires_grad=False)
    return new


def _group_sources(name: str, q: QuantLinear, cols: torch.Tensor) -> torch.Tensor:
    """Old group of each new group (or PAD): a new group may hold real columns of one old group only."""
    new_groups = n_groups(len(cols), q.group_size)
    new_gidx = group_index(len(cols), q.group_size)
    old_gidx = group_index(q.in_features, q.group_size)
    src = torch.full((new_groups,), PAD)
    real = cols != PAD
    for g in range(new_groups):
        olds = old_gidx[cols[(new_gidx == g) & real]].unique()
        if len(olds) > 1:
            raise ExportError(f"{name}: padding inserts zero columns inside its {q.group_size}-wide quantization "
                              "groups (the group size does not divide the head dim); export with uneven 'error' "
                              "after pruning with allocation 'uniform'")
        if len(olds) == 1:
            src[g] = olds[0]
    return src


def pad_quant(name: str, q: QuantLinear, rows: torch.Tensor | None, cols: torch.Tensor | None) -> QuantLinear:
    """The packed layer padded in its codes: a padded weight is its group's zero point (exactly 0)."""
    codes, scales, zeros = q.codes(), q.scales.detach(), q.zero_points(torch.float32)
    one = torch.ones((), dtype=scales.dtype)
    if rows is not None:  # a padded row: scale 1, zero point at the symmetric middle or 0, codes = zero point
        pad_zero = float(2 ** (q.bits - 1)) if q.symmetric else 0.0
        codes = _take(codes, rows, 0, torch.tensor(int(pad_zero), dtype=codes.dtype))
        scales, zeros = _take(scales, rows, 0, one), _take(zeros, rows, 0, pad_zero)
    if cols is not None:
        src = _group_sources(name, q, cols)
        scales, zeros = _take(scales, src, 1, one), _take(zeros, src, 1, 0.0)
        if q.symmetric:
            zeros = torch.full_like(zeros, float(2 ** (q.bits - 1)))
        new_gidx = group_index(len(cols), q.group_size)
        codes = torch.where((cols != PAD)[None, :], codes.index_select(1, cols.clamp(min=0)),
                            zeros[:, new_gidx].round().to(codes.dtype))
    out = QuantLinear(codes.shape[1], codes.shape[0], q.bits, q.group_size, q.symmetric, q.bias is not None,
                      q.scales.dtype)
    out.set_quantized(codes, scales.float(), zeros)
    if q.bias is not None:
        out.bias.data.copy_(_take(q.bias.detach(), rows, 0) if rows is not None else q.bias.detach())
    out.scales.requires_grad_(False)
    return out


def pad_module(name: str, mod: nn.Module, rows: torch.Tensor | None, cols: torch.Tensor | None) -> nn.Module:
    if is_lora(mod):
        raise ExportError(f"{name}: LoRA adapters are not padded; export a model whose adapters are merged "
                          "(finetune with merge) or pruned with allocation 'uniform'")
    if isinstance(mod, QuantLinear):
        return pad_quant(name, mod, rows, cols)
    if type(mod) is nn.Linear:
        return pad_dense(mod, rows, cols)
    raise ExportError(f"{name}: {type(mod).__name__} layers cannot be padded")


@torch.no_grad()
def pad_uniform(model: nn.Module) -> dict | None:
    """Pad every decoder layer to the widest (in place). None when the widths are already uniform;
    else a summary: the padded widths and how many weights were added."""
    arch.require(model, arch.EXPORT)  # fused projections and MoE experts are not padded
    widths = layer_widths(model)
    if not widths or all(w == widths[0] for w in widths):
        return None
    t = target_widths(widths)
    prefix = arch.layers_prefix(model)
    added, padded_layers = 0, []
    for i, (layer, w) in enumerate(zip(arch.decoder_layers(model), widths, strict=True)):
        if w == t.widths:
            continue
        hd = arch.head_dim(layer)
        q_rows, kv_rows = head_map(w, t, hd), kv_map(w, t, hd)
        ff = tail_map(w.intermediate, t.intermediate)
        # (rows, columns) each role is padded along: q/k/v/gate/up gain output rows, o and down
        # the matching input columns
        maps = {"q": (q_rows, None), "k": (kv_rows, None), "v": (kv_rows, None), "o": (None, q_rows),
                "gate": (ff, None), "up": (ff, None), "down": (None, ff)}
        projs = arch.projections(layer)
        for role, (rows, cols) in maps.items():
            p = projs[role]
            new = pad_module(f"{prefix}.{i}.{p.name}", p.module, rows, cols)
            added += _weights(new) - _weights(p.module)
            set_module(layer, p.name, new)
        arch.sync_attention(layer, t.widths.n_heads, t.n_kv_heads)
        padded_layers.append(i)
    return {"to": {"n_heads": t.widths.n_heads, "n_kv_heads": t.n_kv_heads, "intermediate": t.intermediate},
            "layers": padded_layers, "padded_weights": added}


def _weights(mod: nn.Module) -> int:
    return mod.in_features * mod.out_features
