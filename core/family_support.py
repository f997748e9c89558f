"""Whether a recipe's stages can apply to its model's family, decided before any model loads.

The family comes from the recipe's ``model.source`` without reading weights: a tiny model names
it, ``smollm2-135m`` is a Llama, and a local ``hf:`` folder has a ``config.json`` whose
``model_type`` says it. A hub id is looked at when its config is reachable; otherwise the check
happens when the model loads (every method calls :func:`pqflow.architectures.require` as well).

A method states the capabilities its params need through an optional ``needs(params)`` function
in its module (for example width pruning with ``head_mode: query`` needs head pruning); exports
need :data:`~pqflow.architectures.EXPORT`.
"""

from __future__ import annotations

import json
from pathlib import Path

from pqflow.architectures import (
    CHANNEL_PRUNING,
    EXPORT,
    FAMILIES,
    HEAD_PRUNING,
    LAYER_DROPPING,
    Family,
    family_of,
    gguf_arch,
    refusal,
)
from pqflow.errors import RecipeError
from pqflow.recipe import MethodStage, Recipe, method_registry


def source_family(source: str) -> Family | None:
    """The family of a recipe ``model.source``, or None when it cannot be known without loading."""
    if source.startswith("tiny-"):
        return FAMILIES.get(source.removeprefix("tiny-"))
    if source == "smollm2-135m":
        return FAMILIES["llama"]
    if source.startswith("hf:"):
        cfg = Path(source[3:]).expanduser() / "config.json"
        if not cfg.is_file():
            return None  # a hub id, or a folder that the loader will refuse with its own message
        try:
            raw = json.loads(cfg.read_text())
        except (OSError, json.JSONDecodeError):
            return None  # the loader names what is wrong with the file
        return family_of(raw)
    return None


def needs(recipe: Recipe, stage: str) -> set[str]:
    cfg = recipe.stage(stage)
    if not isinstance(cfg, MethodStage):
        return set()
    fn = getattr(method_registry(stage).module(cfg.method), "needs", None)
    return set(fn(recipe.method_params(stage))) if fn else set()


def check_family_support(recipe: Recipe) -> Family | None:
    """Refuse, naming the family and the method, a recipe whose active stages ask what its model's
    family cannot take. Returns the family when it is known."""
    family = source_family(recipe.model.source)
    if family is None:
        return None
    for stage in recipe.enabled_stages():
        cfg = recipe.stage(stage)
        asked = needs(recipe, stage)
        if stage == "export":
            asked.add(EXPORT)
            for fmt in recipe.stages.export.formats:
                why = format_refusal(family, fmt)
                if why:
                    raise RecipeError(f"stages.export: format '{fmt}' cannot run on {recipe.model.source}: {why}")
        for cap in sorted(asked):
            why = refusal(family, cap)
            if why:
                method = f" method '{cfg.method}'" if isinstance(cfg, MethodStage) else ""
                raise RecipeError(f"stages.{stage}:{method} cannot run on {recipe.model.source}: {why}")
    return family


def format_refusal(family: Family, fmt: str) -> str | None:
    """Why export format ``fmt`` cannot hold this family, or None when it can."""
    why = refusal(family, EXPORT)
    if why:
        return why
    if fmt == "gguf" and gguf_arch(family) is None:
        return f"gguf export is not supported for {family.name}: llama.cpp computes it with a converter pqflow does not have"
    return None


def _exports(family: Family) -> str:
    from pqflow.export import FORMATS

    ok = [f for f in FORMATS if format_refusal(family, f) is None]
    return ", ".join(ok) if ok else "no"


def _cell(family: Family, *caps: str) -> str:
    missing = [c for c in caps if c in family.refuses]
    return "yes" if not missing else "no"


def support_table() -> str:
    """Family x stage, as a markdown table (README; ``pqflow families``). Every row is what the
    family matrix test (tests/test_families.py) runs on that family's tiny model."""
    head = ["family", "model_type", "calibrate", "importance", "prune: heads", "prune: MLP channels",
            "prune: layers", "bit-search", "quantize", "finetune", "evaluate", "export", "notes"]
    rows = []
    for f in FAMILIES.values():
        width = [_cell(f, HEAD_PRUNING), _cell(f, CHANNEL_PRUNING), _cell(f, LAYER_DROPPING)]
        refused = "; ".join(f"{c}: {why}" for c, why in f.refuses.items())
        notes = "; ".join(f.notes) + (f". Not supported: {refused}" if refused else "")
        rows.append([f.name, ", ".join(f.model_types), "yes", "yes", *width, "yes", "yes", "yes", "yes",
                     _exports(f), notes])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"
