"""The ``pqflow`` command."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from pqflow import __version__
from pqflow.errors import PqflowError


def _kv(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        name, sep, uri = item.partition("=")
        if not sep or not name or not uri:
            raise PqflowError(f"--in expects NAME=URI, got '{item}'")
        out[name] = uri
    return out


def cmd_validate(args: argparse.Namespace) -> int:
    from pqflow.plan import plan
    from pqflow.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    steps = plan(recipe)
    print(f"{args.recipe}: valid; steps: {' -> '.join(s.name for s in steps)}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from pqflow.recipe import load_recipe
    from pqflow.runner import run_stage

    recipe = load_recipe(args.recipe)
    outcome = run_stage(args.name, recipe, _kv(args.inputs or []), args.out, force=args.force)
    print(json.dumps({"stage": outcome.stage, "uri": outcome.uri, "skipped": outcome.skipped,
                      "summary": outcome.summary}, indent=2))
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from pqflow.local_run import run_plan
    from pqflow.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    result = run_plan(recipe, args.root, force=args.force)
    print(f"\nrun finished in {result.seconds:.0f}s; artifacts under {result.root}/{recipe.name}")
    for name, o in result.outcomes.items():
        s = o.summary
        extra = f"ppl {s['ppl']:.3f}, {s['model_bytes'] / 2**20:.1f} MiB" if "ppl" in s else ""
        print(f"  {name:<18} {'reused' if o.skipped else 'ran':<6} {o.uri}  {extra}")
    return 0


def cmd_recipe_doc(args: argparse.Namespace) -> int:
    from pqflow.recipe_doc import render_reference

    print(render_reference(), end="")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pqflow", description="Compress LLMs: prune, quantize, tune, evaluate.")
    p.add_argument("--version", action="version", version=f"pqflow {__version__}")
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    s = sub.add_parser("validate", help="validate a recipe (no model is loaded)")
    s.add_argument("recipe")
    s.set_defaults(fn=cmd_validate)

    s = sub.add_parser("stage", help="run one stage (what each pipeline container runs)")
    s.add_argument("name", help="calibrate | importance | prune | bit-search | quantize | finetune | evaluate")
    s.add_argument("--recipe", required=True)
    s.add_argument("--in", dest="inputs", action="append", metavar="NAME=URI", help="an input artifact")
    s.add_argument("--out", required=True, metavar="URI", help="file:// path or s3://bucket/prefix")
    s.add_argument("--force", action="store_true", help="run even if the output is up to date")
    s.set_defaults(fn=cmd_stage)

    s = sub.add_parser("run", help="run every enabled stage of a recipe on this machine")
    s.add_argument("recipe")
    s.add_argument("--root", help="artifact root URI (default: the recipe's storage.root)")
    s.add_argument("--force", action="store_true", help="run every stage even if up to date")
    s.set_defaults(fn=cmd_run)
    s = sub.add_parser("recipe-doc", help="print the recipe reference (docs/recipe.md)")
    s.set_defaults(fn=cmd_recipe_doc)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except PqflowError as e:
        if args.debug or os.environ.get("PQFLOW_DEBUG"):
            raise
        print(f"pqflow: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("pqflow: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
