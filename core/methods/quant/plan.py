"""Which linear gets which grid: recipe defaults overridden per module by a bit allocation."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from torch import nn

from pqflow.calibration import decoder_linears
from pqflow.errors import PqflowError
from pqflow.quant.packing import SUPPORTED_BITS

ALLOCATION_FILE = "allocation.json"
KEEP_BITS = 16  # an allocation entry with 16 bits keeps the module in floating point


@dataclass(frozen=True)
class LinearSpec:
    bits: int
    group_size: int | None
    symmetric: bool

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


Plan = dict[str, LinearSpec]


def read_allocation(folder: Path) -> dict[str, Any]:
    path = Path(folder) / ALLOCATION_FILE
    if not path.is_file():
        raise PqflowError(f"allocation artifact {folder} has no {ALLOCATION_FILE}")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise PqflowError(f"{path}: not valid JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("modules"), dict):
        raise PqflowError(f"{path}: expected an object with a 'modules' mapping")
    return data


def resolve_plan(model: nn.Module, bits: int, group_size: int | None, symmetric: bool,
                 allocation: dict[str, Any] | None = None, where: str = ALLOCATION_FILE) -> Plan:
    """Every decoder linear with its spec; allocation entries override the defaults per module
    (``bits``, ``group_size``, ``symmetric``); ``bits: 16`` leaves a module unquantized."""
    linears = decoder_linears(model)
    plan = {name: LinearSpec(bits, group_size, symmetric) for name in linears}
    for name, entry in ((allocation or {}).get("modules") or {}).items():
        if name not in linears:
            raise PqflowError(f"{where}: modules.{name}: no such decoder linear in the model")
        if not isinstance(entry, dict):
            raise PqflowError(f"{where}: modules.{name}: expected an object with 'bits'")
        b = entry.get("bits", bits)
        if b == KEEP_BITS:
            del plan[name]
            continue
        if b not in SUPPORTED_BITS:
            raise PqflowError(f"{where}: modules.{name}.bits: {b} not in {SUPPORTED_BITS + (KEEP_BITS,)}")
        g = entry.get("group_size", group_size)
        if g is not None and (not isinstance(g, int) or g <= 0):
            raise PqflowError(f"{where}: modules.{name}.group_size: must be a positive integer or null")
        plan[name] = LinearSpec(b, g, bool(entry.get("symmetric", symmetric)))
    return plan
