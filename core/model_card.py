"""What a registered model version says about itself: tags a platform team filters and promotes by,
and a markdown model card (a file of the version, ``artifacts/MODEL_CARD.md``, and its description in
the MLflow UI).

Tags (plain names are numbers a query can compare; ``pqflow.*`` name where it came from):

* ``ppl``, ``baseline_ppl``, ``ppl_increase`` (fraction over the baseline), ``model_bytes`` (weight
  files on disk), ``artifact_bytes`` (the whole model artifact), ``params``, ``bits_per_param``
  (8 x model_bytes / params), ``avg_bits`` (quantized linears incl. scales and zeros; only when
  ``quantize`` ran);
* ``pqflow.methods`` (``prune=width,quantize=gptq,...``) and ``pqflow.method.<stage>`` per stage,
  ``pqflow.source_model``, ``pqflow.recipe_digest``, ``pqflow.version``, ``pqflow.task``,
  ``pqflow.chat_template`` (``tokenizer`` or ``default`` = ChatML), ``pqflow.export_formats``
  (``none`` without exports; the per-format tags are :mod:`pqflow.model_exports`').
"""

from __future__ import annotations

from typing import Any

from pqflow import __version__
from pqflow.artifacts import canonical_digest, join, read_manifest
from pqflow.recipe import MethodStage, Recipe
from pqflow.stages import get_stage

CARD_FILE = "MODEL_CARD.md"
TASK = "llm/v1/chat"
# Settings of each stage worth a line in the card (besides its method).
STAGE_SETTINGS = {
    "calibrate": ("n_windows", "seqlen", "collect_xtx"),
    "importance": (),
    "prune": ("ratio",),
    "bit_search": ("avg_bits", "target", "choices", "granularity"),
    "quantize": ("bits", "group_size", "symmetric", "embedding_bits"),
    "finetune": (),
    "export": ("formats", "fallback", "uneven"),
    "evaluate": ("seqlen", "max_windows"),
}
# Results of each step worth showing (from its manifest's summary), in this order.
RESULT_KEYS = ("ratio_removed", "params_after", "layers_dropped", "avg_bits", "quantized_linears",
               "model_bytes", "best_ppl", "steps_done", "trainable_params", "formats", "ppl")


def _fmt(v: Any) -> str:
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def step_manifests(recipe: Recipe, root: str) -> dict[str, dict[str, Any]]:
    """Step name -> manifest of every step of the recipe's plan that has an artifact under ``root``."""
    from pqflow.plan import plan

    out = {}
    for step in plan(recipe):
        m = read_manifest(join(root, recipe.name, step.name))
        if m is not None:
            out[step.name] = m
    return out


def stage_methods(recipe: Recipe) -> dict[str, str]:
    """Stage key -> method of every active stage that has methods."""
    return {k: cfg.method for k in recipe.enabled_stages() if isinstance(cfg := recipe.stage(k), MethodStage)}


def recipe_digest(recipe: Recipe) -> str:
    return canonical_digest(recipe.model_dump(mode="json"))


def version_tags(recipe: Recipe, final: dict[str, Any], baseline: dict[str, Any] | None,
                 manifests: dict[str, dict[str, Any]], chat_template: str) -> dict[str, str]:
    tags: dict[str, str] = {"pqflow.version": __version__, "pqflow.recipe_digest": recipe_digest(recipe),
                            "pqflow.source_model": recipe.model.source, "pqflow.task": TASK,
                            "pqflow.chat_template": chat_template}
    for key in ("ppl", "model_bytes", "artifact_bytes", "params"):
        if final.get(key) is not None:
            tags[key] = str(final[key])
    if final.get("model_bytes") and final.get("params"):
        tags["bits_per_param"] = f"{8 * final['model_bytes'] / final['params']:.4f}"
    if baseline and baseline.get("ppl") is not None:
        tags["baseline_ppl"] = str(baseline["ppl"])
        if final.get("ppl") is not None:
            tags["ppl_increase"] = f"{final['ppl'] / baseline['ppl'] - 1.0:.6f}"
    q = manifests.get("quantize", {}).get("summary", {})
    if q.get("avg_bits") is not None:
        tags["avg_bits"] = f"{q['avg_bits']:.4f}"
    methods = stage_methods(recipe)
    tags["pqflow.methods"] = ",".join(f"{k}={m}" for k, m in methods.items()) or "none"
    tags.update({f"pqflow.method.{k}": m for k, m in methods.items()})
    tags["pqflow.export_formats"] = ",".join(recipe.stages.export.formats) if recipe.stages.export.active else "none"
    return tags


def _settings(recipe: Recipe, key: str) -> str:
    cfg = recipe.stage(key)
    parts = [f"`{cfg.method}`"] if isinstance(cfg, MethodStage) else []
    for f in STAGE_SETTINGS.get(key, ()):
        v = getattr(cfg, f, None)
        if v is not None and v != []:
            parts.append(f"{f} {', '.join(map(str, v)) if isinstance(v, list) else _fmt(v)}")
    if isinstance(cfg, MethodStage) and cfg.params:
        parts.append("params " + ", ".join(f"{k}={_fmt(v)}" for k, v in sorted(cfg.params.items())))
    return "; ".join(parts) or "defaults"


def _results(summary: dict[str, Any]) -> str:
    return "; ".join(f"{k} {_fmt(summary[k])}" for k in RESULT_KEYS if k in summary) or "–"


def _eval_rows(final: dict[str, Any], baseline: dict[str, Any] | None, recipe: Recipe | None = None) -> list[str]:
    rows = ["| metric | baseline (uncompressed) | this model | change |", "|---|---|---|---|"]
    datasets = recipe.stages.evaluate.datasets if recipe is not None else []
    domains = tuple((f"ppl_{d.name}", f"perplexity on `{d.source}` ({d.name})") for d in datasets)
    for key, label in (("ppl", "perplexity"), *domains, ("model_bytes", "weight bytes on disk"), ("params", "parameters"),
                       ("tokens_per_s", "forward tokens/s"), ("peak_rss_mb", "peak RSS MiB")):
        b = (baseline or {}).get(key)
        v = final.get(key)
        if v is None and b is None:
            continue
        change = f"{v / b - 1.0:+.1%}" if isinstance(v, int | float) and isinstance(b, int | float) and b else "–"
        rows.append(f"| {label} | {_fmt(b) if b is not None else '–'} | {_fmt(v) if v is not None else '–'} | {change} |")
    return rows


def model_card(recipe: Recipe, name: str, final: dict[str, Any], baseline: dict[str, Any] | None,
               manifests: dict[str, dict[str, Any]], decision: dict[str, Any], chat_template: str,
               export_tags: dict[str, str] | None = None) -> str:
    """The markdown card of a registered version."""
    from pqflow.plan import plan

    ev = recipe.stages.evaluate
    lines = [f"# {name}", ""]
    if recipe.description:
        lines += [recipe.description, ""]
    lines += [
        f"Compressed by pqflow {__version__} from **`{recipe.model.source}`** ({recipe.model.dtype}) with recipe "
        f"`{recipe.name}` (digest `{recipe_digest(recipe)[:16]}`). Task: `{TASK}` (chat and completion requests; "
        f"chat template: {'the tokenizer' + chr(39) + 's own' if chat_template == 'tokenizer' else 'ChatML (pqflow default: the tokenizer has none)'}).",
        "", "## What each stage did", "", "| step | settings | result |", "|---|---|---|",
    ]
    for step in plan(recipe):
        if step.name == "evaluate-baseline":
            continue
        summary = manifests.get(step.name, {}).get("summary", {})
        lines.append(f"| {step.name} | {_settings(recipe, get_stage(step.stage).key)} | {_results(summary)} |")
    lines += ["", "## Evaluation", "",
              f"Perplexity on `{ev.data.source}` test{''.join(f', `{d.source}` ({d.name})' for d in ev.datasets)}, non-overlapping windows of {ev.seqlen} tokens"
              f"{f', the first {ev.max_windows}' if ev.max_windows else ''} (GPTQ / LLM-Pruner protocol), "
              "the baseline measured in the same run on the same windows.", ""]
    lines += _eval_rows(final, baseline if baseline else None, recipe)
    lines += ["", f"Quality gate: **{'passed' if decision.get('champion') else 'not passed'}** – {decision.get('reason', '')}"]
    if export_tags:
        lines += ["", "## Exports", "", "| format | files in this version | artifact | bytes |", "|---|---|---|---|"]
        for fmt in export_tags.get("pqflow.export_formats", "").split(","):
            if fmt:
                lines.append(f"| {fmt} | `{export_tags.get(f'pqflow.export.{fmt}.path', '')}` | "
                             f"`{export_tags.get(f'pqflow.export.{fmt}.uri', '')}` | "
                             f"{_fmt(int(export_tags.get(f'pqflow.export.{fmt}.bytes') or 0))} |")
    lines += [
        "", "## Load and serve", "",
        "```python",
        "import mlflow",
        f'm = mlflow.pyfunc.load_model("models:/{name}@champion")   # or models:/{name}/<version>',
        'm.predict({"messages": [{"role": "user", "content": "Hello!"}], "max_tokens": 64, "temperature": 0})',
        f'm.predict({{"prompt": text}}, params={{"mode": "perplexity", "seqlen": {ev.seqlen}}})  # the logged ppl',
        "```", "",
        "```bash",
        f"mlflow models serve -m models:/{name}@champion --env-manager local -h 127.0.0.1 -p 5001",
        "curl -s http://127.0.0.1:5001/invocations -H 'Content-Type: application/json' \\",
        "  -d '{\"messages\": [{\"role\": \"user\", \"content\": \"Hello!\"}], \"max_tokens\": 64}'",
        "```", "",
        "The pyfunc loads pqflow's own model artifact (`artifacts/model/`, verified against its manifest), "
        "so it needs `pqflow` installed; exports (when listed above) are served by vLLM (compressed-tensors) "
        "and llama.cpp (gguf): see pqflow's docs/serving.md.",
    ]
    return "\n".join(lines) + "\n"
