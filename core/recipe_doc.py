"""The recipe reference (docs/recipe.md), generated from the schema so it cannot drift."""

from __future__ import annotations

import types
import typing
from typing import Any

import annotated_types as at
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

from pqflow.recipe import MAX_DEPTH, MAX_RECIPE_BYTES, MAX_VALUES, METHOD_FAMILIES, Recipe, method_registry


def _type_name(ann: Any) -> str:
    origin = typing.get_origin(ann)
    if origin is typing.Literal:
        return " \\| ".join(repr(a) for a in typing.get_args(ann))
    if origin in (typing.Union, types.UnionType):
        return " \\| ".join(_type_name(a) for a in typing.get_args(ann))
    if origin is not None:
        args = ", ".join(_type_name(a) for a in typing.get_args(ann))
        return f"{getattr(origin, '__name__', str(origin))}[{args}]"
    if ann is type(None):
        return "null"
    return getattr(ann, "__name__", str(ann))


def _default(field: Any) -> str:
    if field.default is PydanticUndefined:
        return "*required*" if field.default_factory is None else f"`{field.default_factory()!r}`"
    return f"`{field.default!r}`" if field.default is not None else "`null`"


def _num(v: Any) -> str:
    if isinstance(v, float) and v.is_integer() and abs(v) >= 1000:
        v = int(v)
    return f"{v:,}" if isinstance(v, int) else repr(v)


def _bounds(field: Any) -> str:
    """The field's limits as text, e.g. "1 ≤ x ≤ 65536", from its ``ge``/``le``/``max_length``."""
    lower = upper = ""
    parts = []
    for m in field.metadata:
        if isinstance(m, at.Ge):
            lower = f"{_num(m.ge)} ≤ "
        elif isinstance(m, at.Gt):
            lower = f"{_num(m.gt)} < "
        elif isinstance(m, at.Le):
            upper = f" ≤ {_num(m.le)}"
        elif isinstance(m, at.Lt):
            upper = f" < {_num(m.lt)}"
        elif isinstance(m, at.MaxLen):
            parts.append(f"at most {_num(m.max_length)} {'characters' if field.annotation in (str, str | None) else 'items'}")
    if lower or upper:
        parts.insert(0, f"{lower}x{upper}")
    return f" ({'; '.join(parts)})" if parts else ""


def _rows(model: type[BaseModel], prefix: str, out: list[str], nested: list[tuple[str, type[BaseModel]]]) -> None:
    for name, f in model.model_fields.items():
        path = f"{prefix}.{name}" if prefix else name
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            nested.append((path, ann))
            changed = f.default_factory().model_dump(exclude_defaults=True) if f.default_factory else {}
            if changed:  # the parent's default differs from the nested model's own defaults
                out.append(f"| `{path}` | {ann.__name__} | `{changed!r}`, the rest as below | {f.description or ''} |")
            continue
        meaning = (f.description or "").replace("|", chr(92) + "|") + _bounds(f)
        out.append(f"| `{path}` | {_type_name(ann)} | {_default(f)} | {meaning.strip()} |")


def render_reference() -> str:
    lines = [
        "# Recipe reference",
        "",
        "Generated from `core/recipe.py` by `pqflow recipe-doc`; a test keeps this file in sync.",
        "Unknown keys are errors. Every stage has `enabled` and `resources` (cpu, memory, gpu,",
        "gpu_type, node_selector: used by the KFP pipeline).",
        "",
        f"Limits: a recipe file is at most {MAX_RECIPE_BYTES:,} bytes of UTF-8, nested at most {MAX_DEPTH} levels,",
        f"and holds at most {MAX_VALUES:,} values once YAML aliases are expanded; numbers are finite (no",
        "`.nan`/`.inf`). Counts and sizes are bounded as listed, and so is every stage's, enabled or not.",
        "Calibration and fine-tuning data must not be the evaluation data: the same path (after `..` and",
        "symlinks), a hard link or a byte-identical copy is refused, `text:` and `jsonl:` of one file alike;",
        "the check runs in `validate` for files that exist and again before every stage runs.",
        "",
    ]
    queue: list[tuple[str, type[BaseModel]]] = [("", Recipe)]
    while queue:
        prefix, model = queue.pop(0)
        if model.__name__ == "Resources" and prefix != "stages.calibrate.resources":
            continue
        rows: list[str] = []
        nested: list[tuple[str, type[BaseModel]]] = []
        _rows(model, prefix, rows, nested)
        if rows:
            lines += [f"## `{prefix or '(top level)'}`", "", "| key | type | default | meaning |",
                      "|---|---|---|---|", *rows, ""]
        queue = nested + queue
    lines += ["## Methods", "", "`params` of a method stage are checked against the method's own schema.", ""]
    for stage in METHOD_FAMILIES:
        try:
            names = method_registry(stage).names()
        except Exception:  # noqa: BLE001 - a family not built yet is listed as such
            names = []
        lines.append(f"- `stages.{stage}.method`: {', '.join(f'`{n}`' for n in names) or '(none yet)'}")
    lines.append("")
    for stage in METHOD_FAMILIES:
        registry = method_registry(stage)
        for name in registry.names():
            params = getattr(registry.module(name), "Params", None)
            if params is not None:
                lines += _params_section(f"stages.{stage}.params", f"{stage}: `{name}`", params)
    return "\n".join(lines) + "\n"


def _params_section(prefix: str, title: str, model: type[BaseModel]) -> list[str]:
    """One method's ``params`` table, its nested settings (e.g. MREM's GPTQ initialiser) after it."""
    out: list[str] = []
    queue: list[tuple[str, type[BaseModel]]] = [(prefix, model)]
    while queue:
        path, m = queue.pop(0)
        rows: list[str] = []
        nested: list[tuple[str, type[BaseModel]]] = []
        _rows(m, path, rows, nested)
        if rows:
            head = title if path == prefix else f"{title}, `{path}`"
            out += [f"### {head}", "", "| key | type | default | meaning |", "|---|---|---|---|", *rows, ""]
        queue = nested + queue
    return out
