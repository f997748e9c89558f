"""Serving targets of a bit allocation: which schemes an engine's kernels take and which linears it
fuses into one matrix (so they must share one scheme). A search for a target only sees choices the
target can run, and its tied linears move together, so the allocation it returns always exports.

Linears are tied by their roles in the block (:func:`pqflow.architectures.linear_roles`), never by
their names, so a family with fused projections or MoE experts ties the same way.

- ``vllm``: the compressed-tensors W4A16/W8A16 path (``CompressedTensorsWNA16``). Its scalar types
  are 4 and 8 bits (``uint4b8``/``uint8b128`` symmetric, ``uint4``/``uint8`` with zero points), and
  its Marlin kernels take group sizes -1 (per channel), 32, 64 and 128
  (``MARLIN_SUPPORTED_GROUP_SIZES`` in vLLM's ``quantization/utils/marlin_utils.py``). vLLM loads
  the attention's q/k/v as one ``QKVParallelLinear`` and the MLP's gate/up as one
  ``MergedColumnParallelLinear``, each with one scheme, and a block's MoE experts as one
  ``FusedMoE`` layer with one scheme.
- ``llama.cpp``: the GGUF types pqflow's codes map to exactly (``pqflow.export.gguf``): 4-bit
  symmetric ``Q4_0``, 4-bit asymmetric ``Q4_1``, 8-bit symmetric ``Q8_0``; blocks of 32 weights,
  so groups must be a multiple of 32 (or per channel). llama.cpp keeps q, k, v, gate and up as
  separate tensors, each with its own type; a block's experts are one tensor per role (all
  experts' gates, ups, downs), each with one type.
- ``any``: every scheme pqflow stores; nothing tied (pqflow's own format and the exports' fallbacks).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from torch import nn

from pqflow import architectures
from pqflow.methods.bitsearch.space import KEEP_BITS, Choice

Rule = Callable[[Choice, bool], str | None]  # (choice, symmetric) -> why the target refuses it, or None


def _any(choice: Choice, symmetric: bool) -> str | None:
    return None


def _vllm(choice: Choice, symmetric: bool) -> str | None:
    if choice.bits == KEEP_BITS:
        return None
    if choice.bits not in (4, 8):
        return "vLLM's compressed-tensors WNA16 kernels take 4 and 8 bits"
    if choice.group_size not in (None, 32, 64, 128):
        return "vLLM's Marlin kernels take groups of 32, 64 or 128 (or per channel)"
    return None


def _llama_cpp(choice: Choice, symmetric: bool) -> str | None:
    if choice.bits == KEEP_BITS:
        return None
    if choice.bits not in (4, 8):
        return "llama.cpp holds pqflow's codes exactly as Q4_0/Q4_1/Q8_0 only (4 and 8 bits)"
    if choice.bits == 8 and not symmetric:
        return "8-bit codes with zero points do not fit Q8_0 (symmetric only)"
    if choice.group_size is not None and choice.group_size % 32:
        return "GGUF blocks hold 32 weights: groups must be a multiple of 32"
    return None


EXPERT = "expert"  # the role token of every MoE expert linear; ``expert.gate`` etc. per role


def role_tokens(roles: str) -> set[str]:
    """What a tie group may name a linear by: its plain roles (``q``, ``gate``, ...), or for an MoE
    expert ``expert`` and ``expert.<role>`` (an expert's gate is not the dense MLP's gate)."""
    plain = architectures.role_set(roles)
    if roles.startswith(f"{EXPERT}."):
        return {EXPERT} | {f"{EXPERT}.{r}" for r in plain}
    return plain


@dataclass(frozen=True)
class Target:
    name: str
    refuses: Rule
    fused: tuple[tuple[str, ...], ...] = ()  # role tokens (see role_tokens) an engine runs as one matrix

    def allowed(self, choices: list[Choice], symmetric: bool) -> tuple[list[Choice], dict[str, str]]:
        """(the choices the target runs, {refused choice: why})."""
        refused = {c.label: why for c in choices if (why := self.refuses(c, symmetric))}
        return [c for c in choices if c.label not in refused], refused

    def group_of(self, roles: str) -> tuple[str, ...] | None:
        tokens = role_tokens(roles)
        return next((g for g in self.fused if tokens & set(g)), None)

    def tie(self, model: nn.Module) -> Callable[[str], str]:
        """Module name -> unit name for ``model``: linears of one fused group in one block share
        the unit ``<block>.<group roles joined by +>``; a group of a single linear (a projection
        the family already fuses) and every other linear keep their own name."""
        units: dict[str, str] = {}
        for name, roles in architectures.block_linear_roles(model).items():
            group = self.group_of(roles)
            if group is not None:
                units[name] = f"{architectures.block_of(name)}.{'+'.join(group)}"
        members = Counter(units.values())
        units = {n: u for n, u in units.items() if members[u] > 1}
        return lambda module: units.get(module, module)


TARGETS: dict[str, Target] = {
    "any": Target("any", _any),
    "vllm": Target("vllm", _vllm, fused=(("q", "k", "v"), ("gate", "up"), (EXPERT,))),
    "llama.cpp": Target("llama.cpp", _llama_cpp, fused=tuple((f"{EXPERT}.{r}",) for r in ("gate", "up", "down"))),
}
