"""The architecture adapter: the one module that knows model families.

Every stage and method asks this module where a model's decoder blocks are, which linear plays
which role (q, k, v, o, gate, up, down), which norm feeds which linears, and what the attention
geometry is. Nothing else in pqflow names a family's attributes (``self_attn``, ``q_proj``,
``model.layers``, ...). Adding a family is one :class:`Family` entry in :data:`FAMILIES` (plus a
tiny random model in :mod:`pqflow.tiny` for the tests).

Shapes the families differ in, and how they are described:

- fused projections (Phi-3's ``qkv_proj`` and ``gate_up_proj``): a role is a row slice of one
  linear (:class:`Proj`);
- norms: pre-norms feeding attention and MLP (Llama), sandwich norms that also normalise each
  sublayer's output before the residual add (Gemma 2/3), or post-norms only (OLMo 2);
- q/k norms per head (Qwen3, Gemma 3) or over the whole projection (OLMo 2);
- MoE experts (Qwen3-MoE): transformers stores them as 3D parameters; :func:`prepare` replaces
  them by one ``nn.Linear`` per expert projection, so quantizers, LoRA and the packed format see
  ordinary linears. The router stays as it is (small, kept in float).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from pqflow.errors import PqflowError

ROLES = ("q", "k", "v", "o", "gate", "up", "down")

# What a method may ask of a family; a family lists the ones it refuses, with the reason.
HEAD_PRUNING = "head pruning"
CHANNEL_PRUNING = "MLP channel pruning"
LAYER_DROPPING = "layer dropping"
EXPORT = "export"


class UnsupportedArchitecture(PqflowError):
    """A model family pqflow has no adapter entry for, or a method a family cannot take."""


@dataclass(frozen=True)
class Family:
    """Where one family keeps its parts, as attribute paths inside a decoder block."""

    name: str
    model_types: tuple[str, ...]
    q: str = "self_attn.q_proj"
    k: str = "self_attn.k_proj"
    v: str = "self_attn.v_proj"
    o: str = "self_attn.o_proj"
    gate: str = "mlp.gate_proj"
    up: str = "mlp.up_proj"
    down: str = "mlp.down_proj"
    qkv: str | None = None  # fused q/k/v rows, in that order
    gate_up: str | None = None  # fused gate/up rows, in that order
    attention: str = "self_attn"
    mlp: str = "mlp"
    attn_in_norm: str | None = "input_layernorm"  # the norm whose output q/k/v read (None: the residual itself)
    mlp_in_norm: str | None = "post_attention_layernorm"
    attn_out_norm: str | None = None  # applied to the attention output before the residual add
    mlp_out_norm: str | None = None
    qk_norm: str | None = None  # "head": one norm of head_dim shared by heads; "full": over all heads
    q_norm: str = "self_attn.q_norm"
    k_norm: str = "self_attn.k_norm"
    experts: str | None = None  # MoE: the experts module (unfused by prepare) ...
    router: str | None = None  # ... and its router
    residual_multiplier: str | None = None  # config field scaling each sublayer output (Granite)
    notes: tuple[str, ...] = ()  # per-family details worth a line in the support table
    refuses: dict[str, str] = field(default_factory=dict)

    @property
    def is_moe(self) -> bool:
        return self.experts is not None


_GEMMA_NOTES = ("sandwich norms", "embedding scaled by sqrt(hidden)", "(1 + w) RMSNorm")

FAMILIES: dict[str, Family] = {f.name: f for f in (
    Family("llama", ("llama",)),
    Family("mistral", ("mistral",)),
    Family("qwen2", ("qwen2",), notes=("q/k/v biases",)),
    Family("qwen3", ("qwen3",), qk_norm="head", notes=("q/k norms per head",)),
    Family("gemma2", ("gemma2",), attn_out_norm="post_attention_layernorm", mlp_in_norm="pre_feedforward_layernorm",
           mlp_out_norm="post_feedforward_layernorm", notes=(*_GEMMA_NOTES, "attention and final logit soft-capping")),
    Family("gemma3", ("gemma3_text",), attn_out_norm="post_attention_layernorm",
           mlp_in_norm="pre_feedforward_layernorm", mlp_out_norm="post_feedforward_layernorm", qk_norm="head",
           notes=(*_GEMMA_NOTES, "q/k norms per head", "sliding and global layers with their own rotary")),
    Family("phi3", ("phi3",), qkv="self_attn.qkv_proj", gate_up="mlp.gate_up_proj",
           notes=("fused qkv_proj and gate_up_proj",),
           refuses={HEAD_PRUNING: "its q/k/v are one fused qkv_proj whose head layout pqflow does not cut",
                    EXPORT: "fused qkv_proj/gate_up_proj are not written by pqflow's exporters yet"}),
    Family("olmo2", ("olmo2",), attn_in_norm=None, mlp_in_norm=None, attn_out_norm="post_attention_layernorm",
           mlp_out_norm="post_feedforward_layernorm", qk_norm="full",
           notes=("post-norms only", "q/k norms over all heads"),
           refuses={HEAD_PRUNING: "its q/k norms normalise over all heads together, so removing a head "
                                  "changes every other head's output",
                    EXPORT: "post-norm blocks are not written by pqflow's exporters yet"}),
    Family("granite", ("granite",), residual_multiplier="residual_multiplier",
           notes=("residual, embedding, attention and logit multipliers",),
           refuses={EXPORT: "Granite's multipliers are not written by pqflow's exporters yet"}),
    Family("qwen3_moe", ("qwen3_moe",), qk_norm="head", experts="mlp.experts", router="mlp.gate",
           mlp="mlp", notes=("MoE: experts unfused into linears, router kept in float", "q/k norms per head"),
           refuses={CHANNEL_PRUNING: "an expert-channel pruning rule for MoE blocks is not written yet",
                    EXPORT: "MoE experts are not written by pqflow's exporters yet"}),
)}

_BY_TYPE = {t: f for f in FAMILIES.values() for t in f.model_types}


# -- which family -------------------------------------------------------------------------------

def _config(obj: Any) -> Any:
    cfg = getattr(obj, "config", obj)
    get = getattr(cfg, "get_text_config", None)
    return get() if callable(get) else cfg


def model_type(obj: Any) -> str:
    cfg = _config(obj)
    return (cfg.get("model_type") if isinstance(cfg, dict) else getattr(cfg, "model_type", None)) or "?"


def family_of(obj: Any) -> Family:
    """The family of a model, a config or a config dict, or one error naming the model type."""
    if isinstance(obj, Family):
        return obj
    mt = model_type(obj)
    fam = _BY_TYPE.get(mt)
    if fam is None:
        known = ", ".join(sorted(_BY_TYPE))
        raise UnsupportedArchitecture(f"model type '{mt}' has no pqflow architecture adapter (supported: {known})")
    return fam


def refusal(obj: Any, capability: str) -> str | None:
    """Why ``capability`` cannot apply to this model's family, or None when it can."""
    fam = family_of(obj)
    why = fam.refuses.get(capability)
    return f"{capability} is not supported for {fam.name}: {why}" if why else None


def require(obj: Any, capability: str) -> None:
    why = refusal(obj, capability)
    if why:
        raise UnsupportedArchitecture(why)


# -- blocks -------------------------------------------------------------------------------------

def _backbone(model: nn.Module) -> nn.Module:
    # PEFT wraps the causal LM; the causal LM wraps the backbone that holds the blocks.
    m = model
    for _ in range(4):
        if isinstance(getattr(m, "layers", None), nn.ModuleList):
            return m
        inner = getattr(m, "model", None)
        if inner is None:
            inner = getattr(m, "base_model", None)
        if inner is None:
            break
        m = inner
    raise UnsupportedArchitecture(f"{type(model).__name__}: no decoder blocks found (expected a transformers "
                                  f"causal LM with model.layers)")


def backbone(model: nn.Module) -> nn.Module:
    """The module holding the embeddings, the blocks and the final norm (``model.model``)."""
    return _backbone(model)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return _backbone(model).layers


def set_decoder_layers(model: nn.Module, layers: list[nn.Module]) -> None:
    _backbone(model).layers = nn.ModuleList(layers)


def layers_prefix(model: nn.Module) -> str:
    """The module-name prefix of the blocks inside ``model`` (``model.layers`` for a causal LM)."""
    target = decoder_layers(model)
    for name, mod in model.named_modules():
        if mod is target:
            return name
    raise UnsupportedArchitecture(f"{type(model).__name__}: decoder blocks are not a submodule")


def block_names(model: nn.Module) -> list[str]:
    p = layers_prefix(model)
    return [f"{p}.{i}" for i in range(len(decoder_layers(model)))]


def layer_index(name: str, model: nn.Module | None = None) -> int | None:
    """The block index of a module name (``model.layers.3.mlp.up_proj`` -> 3), None outside blocks."""
    prefix = layers_prefix(model) if model is not None else None
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            if prefix is None or ".".join(parts[: i + 1]).endswith(prefix.split(".", 1)[-1]):
                return int(parts[i + 1])
    return None


def is_block_module(name: str) -> bool:
    return layer_index(name) is not None


def final_norm(model: nn.Module) -> nn.Module:
    return _backbone(model).norm


def rotary(model: nn.Module) -> nn.Module | None:
    return getattr(_backbone(model), "rotary_emb", None)


# -- roles --------------------------------------------------------------------------------------

@dataclass
class Proj:
    """One role's weight: a linear, or a row slice of a fused one."""

    name: str  # path inside the block
    module: nn.Linear
    rows: slice | None = None

    @property
    def weight(self) -> torch.Tensor:
        w = self.module.weight
        return w if self.rows is None else w[self.rows]

    @property
    def grad(self) -> torch.Tensor | None:
        g = self.module.weight.grad
        return g if g is None or self.rows is None else g[self.rows]

    @property
    def bias(self) -> torch.Tensor | None:
        b = self.module.bias
        return b if b is None or self.rows is None else b[self.rows]

    @property
    def out_features(self) -> int:
        # From the module's sizes, not its weight: packed (quantized) linears have no ``weight``.
        n = self.module.out_features
        return n if self.rows is None else len(range(*self.rows.indices(n)))

    @property
    def in_features(self) -> int:
        return self.module.in_features


def _get(layer: nn.Module, path: str) -> Any:
    return layer.get_submodule(path)


def _has(layer: nn.Module, path: str | None) -> bool:
    if path is None:
        return False
    try:
        layer.get_submodule(path)
    except AttributeError:
        return False
    return True


def head_dim(layer: nn.Module) -> int:
    fam_attn = _attention_of(layer)
    hd = getattr(fam_attn, "head_dim", None)
    if hd is None:
        raise UnsupportedArchitecture(f"{type(fam_attn).__name__} has no head_dim")
    return int(hd)


def _attention_of(layer: nn.Module) -> nn.Module:
    attn = getattr(layer, "self_attn", None)  # every supported family names it so
    if attn is None:
        raise UnsupportedArchitecture(f"{type(layer).__name__}: no attention module")
    return attn


def _family_of_layer(layer: nn.Module) -> Family:
    fam = getattr(layer, "_pqflow_family", None)
    if fam is not None:
        return FAMILIES[fam]
    attn = _attention_of(layer)
    cfg = getattr(attn, "config", None)
    if cfg is None:
        raise UnsupportedArchitecture(f"{type(layer).__name__}: cannot tell its family (no config)")
    return family_of(cfg)


def projections(layer: nn.Module, family: Family | None = None) -> dict[str, Proj]:
    """Each role of a decoder block (the MLP roles are absent for an MoE block)."""
    fam = family or _family_of_layer(layer)
    out: dict[str, Proj] = {}
    if fam.qkv:
        lin = _get(layer, fam.qkv)
        hd = head_dim(layer)
        n_kv = _attention_of(layer).config.num_key_value_heads if not hasattr(lin, "_pqflow_split") else None
        nq, nk = _fused_qkv_split(lin, hd, n_kv)
        out["q"] = Proj(fam.qkv, lin, slice(0, nq))
        out["k"] = Proj(fam.qkv, lin, slice(nq, nq + nk))
        out["v"] = Proj(fam.qkv, lin, slice(nq + nk, nq + 2 * nk))
    else:
        out.update({r: Proj(getattr(fam, r), _get(layer, getattr(fam, r))) for r in ("q", "k", "v")})
    out["o"] = Proj(fam.o, _get(layer, fam.o))
    if fam.is_moe:
        return out
    if fam.gate_up:
        lin = _get(layer, fam.gate_up)
        inter = lin.out_features // 2
        out["gate"] = Proj(fam.gate_up, lin, slice(0, inter))
        out["up"] = Proj(fam.gate_up, lin, slice(inter, 2 * inter))
    else:
        out["gate"] = Proj(fam.gate, _get(layer, fam.gate))
        out["up"] = Proj(fam.up, _get(layer, fam.up))
    out["down"] = Proj(fam.down, _get(layer, fam.down))
    return out


def _fused_qkv_split(lin: nn.Linear, hd: int, n_kv: int | None) -> tuple[int, int]:
    # q rows = o's input width; the rest is k and v in equal parts.
    total = lin.out_features
    if n_kv is None:
        n_kv = lin._pqflow_split
    nk = n_kv * hd
    return total - 2 * nk, nk


def linear_roles(layer: nn.Module, family: Family | None = None) -> dict[str, str]:
    """Path inside the block -> role(s) of every linear (``q,k,v`` for a fused projection;
    ``expert.E.gate`` etc. for MoE experts, ``router`` for the router when it is a linear)."""
    fam = family or _family_of_layer(layer)
    roles: dict[str, list[str]] = {}
    for role, p in projections(layer, fam).items():
        roles.setdefault(p.name, []).append(role)
    for e, parts in enumerate(experts(layer, fam)):
        for role, (path, _lin) in parts.items():
            roles[path] = [f"expert.{e}.{role}"]
    return {k: ",".join(v) for k, v in roles.items()}


def experts(layer: nn.Module, family: Family | None = None) -> list[dict[str, tuple[str, nn.Linear]]]:
    """An MoE block's experts after :func:`prepare`: per expert, role -> (path, linear)."""
    fam = family or _family_of_layer(layer)
    if not fam.is_moe:
        return []
    mod = _get(layer, fam.experts)
    if not isinstance(mod, LinearExperts):
        raise UnsupportedArchitecture(f"{fam.name}: experts are not prepared (call pqflow.architectures.prepare)")
    return [{r: (f"{fam.experts}.experts.{e}.{r}_proj", getattr(ex, f"{r}_proj")) for r in ("gate", "up", "down")}
            for e, ex in enumerate(mod.experts)]


def router(layer: nn.Module, family: Family | None = None) -> nn.Module | None:
    fam = family or _family_of_layer(layer)
    return _get(layer, fam.router) if fam.router else None


@dataclass(frozen=True)
class InputGroup:
    """Linears that read the very same tensor, and the norm that produced it (None: no norm, or
    the input is an inner activation such as o's and down's)."""

    norm: str | None
    linears: tuple[str, ...]


def input_groups(layer: nn.Module, family: Family | None = None) -> list[InputGroup]:
    fam = family or _family_of_layer(layer)
    p = projections(layer, fam)
    qkv = tuple(dict.fromkeys(p[r].name for r in ("q", "k", "v")))
    groups = [InputGroup(fam.attn_in_norm, qkv), InputGroup(None, (p["o"].name,))]
    if fam.is_moe:
        ex = experts(layer, fam)
        groups.append(InputGroup(fam.mlp_in_norm, tuple(x[r][0] for x in ex for r in ("gate", "up"))))
        groups.extend(InputGroup(None, (x["down"][0],)) for x in ex)
    else:
        gu = tuple(dict.fromkeys(p[r].name for r in ("gate", "up")))
        groups += [InputGroup(fam.mlp_in_norm, gu), InputGroup(None, (p["down"].name,))]
    return groups


# -- geometry -----------------------------------------------------------------------------------

@dataclass
class LayerGeometry:
    """Sizes of one decoder layer, read from its modules (not the config: layers may differ)."""

    hidden: int
    head_dim: int
    n_heads: int
    n_kv: int
    inter: int
    gated: bool = True
    n_experts: int = 0

    @property
    def group(self) -> int:
        return self.n_heads // self.n_kv

    @property
    def attn_params(self) -> int:
        return 2 * self.hidden * self.head_dim * (self.n_heads + self.n_kv)

    @property
    def mlp_params(self) -> int:
        return (3 if self.gated else 2) * self.hidden * self.inter * max(1, self.n_experts)

    @property
    def params(self) -> int:
        return self.attn_params + self.mlp_params + 2 * self.hidden  # two norm weights

    def head_of(self, kv: int) -> range:
        return range(kv * self.group, (kv + 1) * self.group)


def geometry(layer: nn.Module) -> LayerGeometry:
    fam = _family_of_layer(layer)
    p = projections(layer, fam)
    hd = head_dim(layer)
    if fam.is_moe:
        ex = experts(layer, fam)
        inter, n_exp = ex[0]["gate"][1].out_features, len(ex)
    else:
        inter, n_exp = p["gate"].out_features, 0
    return LayerGeometry(hidden=p["q"].in_features, head_dim=hd, n_heads=p["q"].out_features // hd,
                         n_kv=p["k"].out_features // hd, inter=inter, n_experts=n_exp)


def geometries(model: nn.Module) -> list[LayerGeometry]:
    return [geometry(layer) for layer in decoder_layers(model)]


# -- the block's computation, for methods that rebuild it piece by piece ------------------------

def _norm(layer: nn.Module, path: str | None, x: torch.Tensor) -> torch.Tensor:
    return _get(layer, path)(x) if path else x


def _residual_scale(layer: nn.Module, fam: Family) -> float:
    if not fam.residual_multiplier:
        return 1.0
    return float(getattr(_attention_of(layer).config, fam.residual_multiplier, 1.0))


def attn_input(layer: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """What q/k/v read, given the block's input ``h``."""
    return _norm(layer, _family_of_layer(layer).attn_in_norm, h)


def mlp_input(layer: nn.Module, h_mid: torch.Tensor) -> torch.Tensor:
    """What gate/up (or the router) read, given the residual stream after attention."""
    return _norm(layer, _family_of_layer(layer).mlp_in_norm, h_mid)


def attn_residual(layer: nn.Module, h: torch.Tensor, o_out: torch.Tensor) -> torch.Tensor:
    """The residual stream after attention, from the block input and o's output."""
    fam = _family_of_layer(layer)
    return h + _norm(layer, fam.attn_out_norm, o_out) * _residual_scale(layer, fam)


def mlp_residual(layer: nn.Module, h_mid: torch.Tensor, down_out: torch.Tensor) -> torch.Tensor:
    fam = _family_of_layer(layer)
    return h_mid + _norm(layer, fam.mlp_out_norm, down_out) * _residual_scale(layer, fam)


def run_attention(layer: nn.Module, x: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The attention module on an already normalised input (o's output)."""
    out = _attention_of(layer)(hidden_states=x, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def run_mlp(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = _get(layer, _family_of_layer(layer).mlp)(x)
    return out[0] if isinstance(out, tuple) else out


def down_input_hook(layer: nn.Module) -> nn.Module:
    """The module whose input is the MLP's inner activation (down), for hooks."""
    return projections(layer)["down"].module


def o_input_hook(layer: nn.Module) -> nn.Module:
    return projections(layer)["o"].module


# -- surgery ------------------------------------------------------------------------------------

def _cut(lin: nn.Linear, rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> nn.Linear:
    w = lin.weight.data
    if rows is not None:
        w = w.index_select(0, rows.to(w.device))
    if cols is not None:
        w = w.index_select(1, cols.to(w.device))
    b = lin.bias.data if lin.bias is not None else None
    if b is not None and rows is not None:
        b = b.index_select(0, rows.to(b.device))
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta", dtype=w.dtype)
    new.weight = nn.Parameter(w.contiguous(), requires_grad=lin.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b.contiguous(), requires_grad=lin.bias.requires_grad)
    return new


def _set(layer: nn.Module, path: str, mod: nn.Module) -> None:
    parent, _, leaf = path.rpartition(".")
    setattr(layer.get_submodule(parent) if parent else layer, leaf, mod)


def _rows(units: list[int], width: int) -> torch.Tensor:
    return torch.cat([torch.arange(u * width, (u + 1) * width) for u in units]) if units else torch.zeros(0, dtype=torch.long)


def cut_heads(layer: nn.Module, heads: list[int], kv: list[int]) -> None:
    """Keep query heads ``heads`` (ordered by KV group) and KV heads ``kv`` of a block."""
    fam = _family_of_layer(layer)
    require(fam, HEAD_PRUNING)
    hd = head_dim(layer)
    q_rows, kv_rows = _rows(heads, hd), _rows(kv, hd)
    for role, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
        path = getattr(fam, role)
        _set(layer, path, _cut(_get(layer, path), rows=rows))
    _set(layer, fam.o, _cut(_get(layer, fam.o), cols=q_rows))
    sync_attention(layer)


def cut_channels(layer: nn.Module, channels: list[int]) -> None:
    """Keep MLP channels ``channels`` (rows of gate/up, columns of down)."""
    fam = _family_of_layer(layer)
    require(fam, CHANNEL_PRUNING)
    ch = torch.tensor(sorted(channels), dtype=torch.long)
    if fam.gate_up:
        lin = _get(layer, fam.gate_up)
        inter = lin.out_features // 2
        _set(layer, fam.gate_up, _cut(lin, rows=torch.cat([ch, ch + inter])))
    else:
        _set(layer, fam.gate, _cut(_get(layer, fam.gate), rows=ch))
        _set(layer, fam.up, _cut(_get(layer, fam.up), rows=ch))
    _set(layer, fam.down, _cut(_get(layer, fam.down), cols=ch))
    mlp = _get(layer, fam.mlp)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = len(ch)


def shape_layer(layer: nn.Module, n_heads: int, n_kv: int, inter: int) -> None:
    """Give a freshly built block the shape (heads, KV heads, MLP width) of a pruned one; weights
    are left empty (meta) for a loader to assign."""
    fam = _family_of_layer(layer)
    hd = head_dim(layer)

    def resize(path: str, d_in: int, d_out: int) -> None:
        lin = _get(layer, path)
        _set(layer, path, nn.Linear(d_in, d_out, bias=lin.bias is not None, dtype=lin.weight.dtype, device="meta"))

    hidden = projections(layer, fam)["q"].in_features
    if fam.qkv:
        resize(fam.qkv, hidden, (n_heads + 2 * n_kv) * hd)
    else:
        resize(fam.q, hidden, n_heads * hd)
        resize(fam.k, hidden, n_kv * hd)
        resize(fam.v, hidden, n_kv * hd)
    resize(fam.o, n_heads * hd, hidden)
    if not fam.is_moe:
        if fam.gate_up:
            resize(fam.gate_up, hidden, 2 * inter)
        else:
            resize(fam.gate, hidden, inter)
            resize(fam.up, hidden, inter)
        resize(fam.down, inter, hidden)
        mlp = _get(layer, fam.mlp)
        if hasattr(mlp, "intermediate_size"):
            mlp.intermediate_size = inter
    sync_attention(layer, n_heads, n_kv)


def sync_attention(layer: nn.Module, n_heads: int | None = None, n_kv: int | None = None) -> None:
    """Make the attention module's head counts agree with its (possibly cut or swapped) weights:
    the eager kernels repeat KV heads by ``num_key_value_groups``."""
    fam = _family_of_layer(layer)
    attn = _attention_of(layer)
    if n_heads is None or n_kv is None:
        hd = head_dim(layer)
        o = _get(layer, fam.o)
        n_heads = o.in_features // hd
        if fam.qkv:
            n_kv = (_get(layer, fam.qkv).out_features // hd - n_heads) // 2
        else:
            n_kv = _get(layer, fam.k).out_features // hd
    attn.num_key_value_groups = n_heads // n_kv
    for attr, val in (("num_heads", n_heads), ("num_key_value_heads", n_kv)):
        if hasattr(attn, attr):
            setattr(attn, attr, val)
    if fam.qkv:
        _get(layer, fam.qkv)._pqflow_split = n_kv


def drop_layers(model: nn.Module, drop: list[int]) -> None:
    """Remove blocks ``drop`` and renumber the rest (the KV cache is indexed by layer_idx)."""
    gone = set(drop)
    kept = [layer for i, layer in enumerate(decoder_layers(model)) if i not in gone]
    set_decoder_layers(model, kept)
    for j, layer in enumerate(kept):
        _attention_of(layer).layer_idx = j
        if hasattr(layer, "layer_idx"):
            layer.layer_idx = j
    cfg = model.config
    if getattr(cfg, "layer_types", None):
        cfg.layer_types = [t for i, t in enumerate(cfg.layer_types) if i not in gone]
    cfg.num_hidden_layers = len(kept)


def set_config_shape(model: nn.Module, n_heads: int, n_kv: int, inter: int) -> None:
    cfg = model.config
    cfg.num_attention_heads, cfg.num_key_value_heads = n_heads, n_kv
    cfg.intermediate_size = inter


# -- MoE experts as linears ---------------------------------------------------------------------

class _Expert(nn.Module):
    def __init__(self, hidden: int, inter: int, dtype: torch.dtype, device: Any) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.up_proj = nn.Linear(hidden, inter, bias=False, dtype=dtype, device=device)
        self.down_proj = nn.Linear(inter, hidden, bias=False, dtype=dtype, device=device)


class LinearExperts(nn.Module):
    """Drop-in for transformers' fused 3D expert tensors: one ``nn.Linear`` per expert projection,
    the same routing arithmetic (``forward(hidden, top_k_index, top_k_weights)``)."""

    def __init__(self, fused: nn.Module) -> None:
        super().__init__()
        gu, down = fused.gate_up_proj, fused.down_proj
        n, two_inter, hidden = gu.shape
        inter = two_inter // 2
        self.num_experts = n
        self.act_fn = fused.act_fn
        self.experts = nn.ModuleList(_Expert(hidden, inter, gu.dtype, gu.device) for _ in range(n))
        if gu.device.type != "meta":
            with torch.no_grad():
                for e, ex in enumerate(self.experts):
                    ex.gate_proj.weight.copy_(gu[e, :inter])
                    ex.up_proj.weight.copy_(gu[e, inter:])
                    ex.down_proj.weight.copy_(down[e])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, ex in enumerate(self.experts):
            token, slot = torch.where(top_k_index == e)
            if token.numel() == 0:
                continue
            x = hidden_states[token]
            y = ex.down_proj(self.act_fn(ex.gate_proj(x)) * ex.up_proj(x))
            out.index_add_(0, token, (y * top_k_weights[token, slot, None]).to(out.dtype))
        return out


def prepare(model: nn.Module) -> nn.Module:
    """Bring a freshly built or loaded model into the shape pqflow works on (in place): MoE
    experts become linears. Idempotent; every loader calls it."""
    fam = family_of(model)
    for layer in decoder_layers(model):
        layer._pqflow_family = fam.name
        if fam.is_moe:
            mod = _get(layer, fam.experts)
            if not isinstance(mod, LinearExperts):
                _set(layer, fam.experts, LinearExperts(mod))
    return model


def named_block_linears(model: nn.Module) -> Iterator[tuple[str, nn.Linear]]:
    """Every ``nn.Linear`` inside the decoder blocks, with its full module name."""
    prefix = layers_prefix(model)
    for i, layer in enumerate(decoder_layers(model)):
        for n, m in layer.named_modules():
            if isinstance(m, nn.Linear):
                yield f"{prefix}.{i}.{n}", m


def block_linears(block: nn.Module, prefix: str) -> dict[str, nn.Linear]:
    return {f"{prefix}.{n}": m for n, m in block.named_modules() if type(m) is nn.Linear}


def support_table() -> list[dict[str, str]]:
    """Family x capability, for the README and ``pqflow families``."""
    caps = (HEAD_PRUNING, CHANNEL_PRUNING, LAYER_DROPPING, EXPORT)
    return [{"family": f.name, "model_type": ", ".join(f.model_types),
             **{c: ("no: " + f.refuses[c]) if c in f.refuses else "yes" for c in caps},
             "notes": "; ".join(f.notes)} for f in FAMILIES.values()]


Hook = Callable[..., Any]


# -- H1 (importance and pruning): residual targets for reformation ------------------------------

def _out_norm(fam: Family, part: str) -> str | None:
    return fam.attn_out_norm if part == "attn" else fam.mlp_out_norm


def linear_residual(layer: nn.Module, part: str) -> bool:
    """Whether the residual add after sublayer ``part`` ("attn" or "mlp") is linear in that
    sublayer's output (no norm on it), so a wanted residual stream gives a wanted output."""
    return _out_norm(_family_of_layer(layer), part) is None


def residual_delta(layer: nn.Module, part: str, h: torch.Tensor, h_next: torch.Tensor) -> torch.Tensor | None:
    """The output of sublayer ``part`` (o's or down's) that takes the residual stream from ``h``
    to ``h_next``; None when a norm on that output makes this no linear solve."""
    fam = _family_of_layer(layer)
    if _out_norm(fam, part) is not None:
        return None
    scale = _residual_scale(layer, fam)
    return h_next - h if scale == 1.0 else (h_next - h) / scale


# -- H2: calibration, quantization, formats, bit search, fine-tuning -----------------------------

def block_of(name: str) -> str | None:
    """The module name of the decoder block holding module ``name`` (``model.layers.3`` for any
    module inside block 3), None outside the blocks."""
    parts = name.split(".")
    for i, part in enumerate(parts[:-1]):
        if part == "layers" and parts[i + 1].isdigit():
            return ".".join(parts[: i + 2])
    return None


def block_linear_roles(model: nn.Module) -> dict[str, str]:
    """Full module name -> role(s) of every role-carrying linear of the decoder blocks, as
    :func:`linear_roles` writes them (``q,k,v`` for a fused projection, ``expert.E.gate``, ...)."""
    return {f"{block}.{path}": roles for block, layer in zip(block_names(model), decoder_layers(model), strict=True)
            for path, roles in linear_roles(layer).items()}


def role_set(roles: str) -> set[str]:
    """The plain roles of a :func:`linear_roles` entry: ``q,k,v`` -> {q, k, v}; an expert's
    ``expert.3.gate`` -> {gate}."""
    return {r.rsplit(".", 1)[-1] for r in roles.split(",")}


def router_modules(model: nn.Module) -> set[int]:
    """ids of the MoE routers of the blocks (kept in floating point, never quantized or adapted)."""
    return {id(r) for layer in decoder_layers(model) if (r := router(layer)) is not None}


def output_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """The logits the causal LM computes from its last block's output: the final norm, the output
    head and the family's transforms of the logits (a config's ``logits_scaling`` divides them,
    its ``final_logit_softcapping`` soft-caps them)."""
    logits = model.get_output_embeddings()(final_norm(model)(hidden))
    cfg = _config(model)
    scaling = getattr(cfg, "logits_scaling", None)
    if scaling:
        logits = logits / scaling
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


# -- H4: exports ----------------------------------------------------------------------------------

# llama.cpp's architecture (gguf-py's ``MODEL_ARCH_NAMES`` value) for each family whose blocks it
# computes as transformers does and whose tensors it names as gguf-py's name map does; a family
# absent here has no GGUF export (Gemma's (1 + w) norms, soft-capping and sliding layers need a
# converter of their own).
GGUF_ARCHS: dict[str, str] = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def gguf_arch(obj: Any) -> str | None:
    """The llama.cpp architecture a model, config or config dict is written as; None: not written."""
    return GGUF_ARCHS.get(family_of(obj).name)


def config_layers_prefix(obj: Any) -> str:
    """:func:`layers_prefix` of the causal LM a config (or config dict) builds, without building
    it: every family in :data:`FAMILIES` keeps its blocks in the backbone ``model`` of the LM."""
    family_of(obj)  # an unknown model type fails here, by name
    return "model.layers"
