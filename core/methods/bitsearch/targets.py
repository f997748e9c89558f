"""Serving targets of a bit allocation: which schemes an engine's kernels take and which linears it
fuses into one matrix (so they must share one scheme). A search for a target only sees choices the
target can run, and its tied linears move together, so the allocation it returns always exports.

- ``vllm``: the compressed-tensors W4A16/W8A16 path (``CompressedTensorsWNA16``). Its scalar types
  are 4 and 8 bits (``uint4b8``/``uint8b128`` symmetric, ``uint4``/``uint8`` with zero points), and
  its Marlin kernels take group sizes -1 (per channel), 32, 64 and 128
  (``MARLIN_SUPPORTED_GROUP_SIZES`` in vLLM's ``quantization/utils/marlin_utils.py``). vLLM loads
  q/k/v as one ``QKVParallelLinear`` and gate/up as one ``MergedColumnParallelLinear``, each with
  one scheme.
- ``llama.cpp``: the GGUF types pqflow's codes map to exactly (``pqflow.export.gguf``): 4-bit
  symmetric ``Q4_0``, 4-bit asymmetric ``Q4_1``, 8-bit symmetric ``Q8_0``; blocks of 32 weights,
  so groups must be a multiple of 32 (or per channel). llama.cpp's llama arch keeps q, k, v, gate
  and up as separate tensors, each with its own type: nothing is tied.
- ``any``: every scheme pqflow stores; nothing tied (pqflow's own format and the exports' fallbacks).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


@dataclass(frozen=True)
class Target:
    name: str
    refuses: Rule
    fused: tuple[tuple[str, ...], ...] = ()  # linear names (last component) an engine runs as one matrix

    def allowed(self, choices: list[Choice], symmetric: bool) -> tuple[list[Choice], dict[str, str]]:
        """(the choices the target runs, {refused choice: why})."""
        refused = {c.label: why for c in choices if (why := self.refuses(c, symmetric))}
        return [c for c in choices if c.label not in refused], refused

    def tie_key(self, module: str) -> str:
        """Modules with the same key share one scheme: the layer's fused group, else the module."""
        prefix, _, leaf = module.rpartition(".")
        for group in self.fused:
            if leaf in group:
                return f"{prefix}.{'+'.join(group)}"
        return module


TARGETS: dict[str, Target] = {
    "any": Target("any", _any),
    "vllm": Target("vllm", _vllm, fused=(("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))),
    "llama.cpp": Target("llama.cpp", _llama_cpp),
}
