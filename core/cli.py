"""The ``pqflow`` command."""

from __future__ import annotations

import argparse
import errno
import json
import os
import signal
import sys
import threading
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
    from pqflow.data import check_recipe_data
    from pqflow.family_support import check_family_support
    from pqflow.plan import plan
    from pqflow.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    check_recipe_data(recipe, missing_ok=True)
    family = check_family_support(recipe)
    steps = plan(recipe)
    on = f" ({family.name} family)" if family else ""
    print(f"{args.recipe}: valid{on}; steps: {' -> '.join(s.name for s in steps)}")
    return 0


def cmd_stage(args: argparse.Namespace) -> int:
    from pqflow.recipe import load_recipe
    from pqflow.runner import run_stage

    recipe = load_recipe(args.recipe)
    outcome = run_stage(args.name, recipe, _kv(args.inputs or []), args.out, force=args.force)
    print(json.dumps({"stage": outcome.stage, "uri": outcome.uri, "skipped": outcome.skipped,
                      "summary": outcome.summary}, indent=2))
    return 0


def _endpoints(args: argparse.Namespace, recipe) -> tuple[str, str | None, bool, bool]:
    """(artifact root, mlflow uri or None, need embedded S3, need embedded MLflow)."""
    root = args.root or recipe.storage.root
    if args.s3_endpoint:
        os.environ["AWS_ENDPOINT_URL"] = args.s3_endpoint
    endpoint_given = bool(os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3"))
    # credentials without an endpoint: the user's real AWS account holds the s3:// root
    s3_given = endpoint_given or bool(os.environ.get("AWS_ACCESS_KEY_ID") or os.environ.get("AWS_PROFILE"))
    mlflow_uri = None
    if args.no_tracking:
        os.environ.pop("MLFLOW_TRACKING_URI", None)  # the components would fall back to it
    else:
        mlflow_uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or recipe.tracking.mlflow_uri
    need_mlflow = not args.no_tracking and not mlflow_uri
    # the embedded MLflow keeps its artifacts in the embedded S3 unless an S3 endpoint is named
    need_s3 = (root.startswith("s3://") and not s3_given) or (need_mlflow and not endpoint_given)
    return root, mlflow_uri, need_s3, need_mlflow


def cmd_run(args: argparse.Namespace) -> int:
    from pqflow import services
    from pqflow.data import check_recipe_data
    from pqflow.family_support import check_family_support
    from pqflow.local_run import check_buildable, run_plan
    from pqflow.recipe import load_recipe

    recipe = load_recipe(args.recipe)
    check_buildable(recipe)
    check_recipe_data(recipe)  # before any service starts: bad data is one line, and nothing runs
    check_family_support(recipe)  # likewise a method the model's family cannot take
    root, mlflow_uri, need_s3, need_mlflow = _endpoints(args, recipe)
    if mlflow_uri:
        from pqflow.tracking import check_scheme

        check_scheme(mlflow_uri)  # before any service starts
    svc = None
    if need_s3 or need_mlflow:
        svc = services.running(args.state_dir)
        if svc is not None:
            print(f"[pqflow] using the services of 'pqflow up' ({svc.state}): MLflow {svc.mlflow_url}, "
                  f"S3 {svc.s3_url}", file=sys.stderr)
        else:
            print(f"[pqflow] starting embedded {'S3 + ' if need_s3 else ''}{'MLflow' if need_mlflow else ''} "
                  f"(state in {services.state_dir(args.state_dir)})", file=sys.stderr)
            svc = services.start(args.state_dir, s3=need_s3, mlflow=need_mlflow,
                                 s3_url=None if need_s3 else os.environ.get("AWS_ENDPOINT_URL"))
            if not svc.owned:  # another run on this state dir started them while we waited for the lock
                print(f"[pqflow] using the services another pqflow process started on {svc.state}: "
                      f"MLflow {svc.mlflow_url}, S3 {svc.s3_url}", file=sys.stderr)
        env = svc.env()
        if not need_s3:  # the user's S3: keep their credentials
            env = {k: v for k, v in env.items() if not k.startswith("AWS_")}
        os.environ.update(env)
        mlflow_uri = mlflow_uri or svc.mlflow_url
    try:
        result = run_plan(recipe, root, force=args.force, mlflow_uri=mlflow_uri)
    finally:
        if svc is not None:
            if svc.owned:
                print("[pqflow] stopping the embedded services (S3 contents kept in the state dir)", file=sys.stderr)
            svc.stop()  # a user of another process's services only leaves them
    reused = sum(o.skipped for o in result.outcomes.values())
    print(f"\nrun finished in {result.seconds:.1f}s ({reused}/{len(result.outcomes)} steps reused); "
          f"artifacts under {result.root.rstrip('/')}/{recipe.name}")
    for name, o in result.outcomes.items():
        s = o.summary
        extra = f"ppl {s['ppl']:.3f}, {s['model_bytes'] / 2**20:.1f} MiB" if "ppl" in s else ""
        extra += "".join(f", {k} {v:.3f}" for k, v in sorted(s.items()) if k.startswith("ppl_"))
        print(f"  {name:<18} {'reused' if o.skipped else 'ran':<6} {o.uri}  {extra}")
    if result.mlflow_uri:
        print(f"metrics: MLflow {result.run_url or result.mlflow_uri} (experiment '{recipe.tracking.experiment}', "
              f"parent run {result.parent_run_id}; one child run per step)")
        reg = result.registry
        if reg:
            print(f"model:   models:/{reg['registered_model']}@candidate (version {reg['model_version']}) in the "
                  f"registry of {result.mlflow_uri}; champion: {'yes' if reg.get('champion') else 'no'} - "
                  f"{reg.get('gate_reason', '')}")
        if svc is not None and svc.owned:
            print(f"         (embedded services are stopped; `pqflow up --state-dir {svc.state}` serves them again)")
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    import signal
    import time

    from pqflow import services

    svc = services.running(args.state_dir)
    if svc is not None:
        print(f"already running: MLflow UI {svc.mlflow_url}  S3 {svc.s3_url}  (state {svc.state})")
        return 0
    svc = services.start(args.state_dir, s3_port=args.s3_port, mlflow_port=args.mlflow_port)
    if not svc.owned:  # another process started them while we waited for the state dir's lock
        print(f"already running: MLflow UI {svc.mlflow_url}  S3 {svc.s3_url}  (state {svc.state})")
        svc.stop()
        return 0
    print(f"MLflow UI:   {svc.mlflow_url}")
    print(f"S3 endpoint: {svc.s3_url}  (access key {services.DUMMY_CREDS['AWS_ACCESS_KEY_ID']})")
    print(f"state:       {svc.state}")
    print("`pqflow run` uses these while they run. For other clients:")
    for k, v in svc.env().items():
        print(f"  export {k}={v}")
    print("Ctrl-C stops them (S3 contents are kept in the state dir).", flush=True)
    stop = []
    signal.signal(signal.SIGTERM, lambda *a: stop.append(1))
    try:
        while not stop and svc.alive():  # not a health poll: a busy machine answers slowly
            time.sleep(1.0)
        if not svc.alive():
            print("pqflow up: a service exited; see the logs in the state dir", file=sys.stderr)
    except KeyboardInterrupt:
        pass
    finally:
        svc.stop()
    return 0


def _cluster_opts(args: argparse.Namespace):
    from pqflow.pipelines.compression import ClusterOptions

    return ClusterOptions(registry=args.registry, version=args.image_version, root=args.root,
                          mlflow_uri=args.mlflow_uri, s3_secret=args.s3_secret,
                          env=_kv_env(args.env or []), image_pull_secrets=args.image_pull_secret or [])


def _kv_env(items: Sequence[str]) -> dict[str, str]:
    out = {}
    for item in items:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise PqflowError(f"--env expects NAME=VALUE, got '{item}'")
        out[k] = v
    return out


def _warn_cluster_root(recipe, args: argparse.Namespace) -> None:
    root = args.root or recipe.storage.root
    if not root.startswith("s3://"):
        print(f"[pqflow] warning: artifact root {root} is not s3://; pods on a cluster do not share it "
              "(use --root s3://bucket/prefix)", file=sys.stderr)


def cmd_compile(args: argparse.Namespace) -> int:
    from pqflow.family_support import check_family_support
    from pqflow.pipelines.compression import compile_pipeline, load_for_compile
    from pqflow.plan import plan

    recipe = load_for_compile(args.recipe)
    check_family_support(recipe)
    _warn_cluster_root(recipe, args)
    out = compile_pipeline(recipe, args.output, _cluster_opts(args))
    print(f"{out}: {len(plan(recipe))} tasks ({' -> '.join(s.name for s in plan(recipe))})")
    return 0


def cmd_submit(args: argparse.Namespace) -> int:
    from pqflow.family_support import check_family_support
    from pqflow.pipelines.compression import load_for_compile
    from pqflow.pipelines.remote import submit

    recipe = load_for_compile(args.recipe)
    check_family_support(recipe)
    _warn_cluster_root(recipe, args)
    res = submit(recipe, args.host, opts=_cluster_opts(args), experiment=args.experiment,
                 run_name=args.run_name, namespace=args.namespace, token=args.token)
    print(f"submitted run {res['run_id']}: {res['url']}")
    return 0


def cmd_schedule(args: argparse.Namespace) -> int:
    from pqflow.family_support import check_family_support
    from pqflow.pipelines.compression import load_for_compile
    from pqflow.pipelines.remote import schedule

    recipe = load_for_compile(args.recipe)
    check_family_support(recipe)
    _warn_cluster_root(recipe, args)
    res = schedule(recipe, args.host, args.cron, opts=_cluster_opts(args), experiment=args.experiment,
                   job_name=args.name, namespace=args.namespace, token=args.token)
    print(f"recurring run {res['recurring_run_id']} created (cron '{args.cron}', experiment {res['experiment_id']})")
    return 0


def _cluster_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--registry", help="image registry prefix (default: $PQFLOW_REGISTRY or ghcr.io/pqflow)")
    s.add_argument("--image-version", help="image tag (default: the pqflow version)")
    s.add_argument("--root", help="artifact root URI, s3://bucket/prefix (default: the recipe's storage.root)")
    s.add_argument("--mlflow-uri", help="MLflow tracking URI the stages log to (default: recipe.tracking.mlflow_uri)")
    s.add_argument("--s3-secret", help="Kubernetes secret with AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, "
                   "AWS_ENDPOINT_URL, AWS_DEFAULT_REGION, exposed as env to every stage")
    s.add_argument("--env", action="append", metavar="NAME=VALUE", help="extra env var for every stage")
    s.add_argument("--image-pull-secret", action="append", metavar="NAME")


def _remote_args(s: argparse.ArgumentParser) -> None:
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://localhost:8080")
    s.add_argument("--experiment", help="KFP experiment (default: recipe.tracking.experiment)")
    s.add_argument("--namespace", help="Kubeflow namespace (multi-user clusters)")
    s.add_argument("--token", help="bearer token for the KFP API")


def cmd_export(args: argparse.Namespace) -> int:
    from pqflow.export import ExportOptions, export_artifact

    res = export_artifact(args.model, args.format, args.out, ExportOptions(fallback=args.fallback, dtype=args.dtype,
                                                                       uneven=args.uneven),
                          force=args.force)
    print(json.dumps(res, indent=2))
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from pqflow import services
    from pqflow.tracking import configure, promote, talking_to

    uri = args.mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        svc = services.running(args.state_dir)
        if svc is None:
            raise PqflowError("no MLflow to promote in: pass --mlflow-uri, set MLFLOW_TRACKING_URI or run `pqflow up`")
        os.environ.update(svc.env())
        uri = svc.mlflow_url
    client = configure(uri)
    with talking_to(uri, f"promoting {args.name} version {args.version}"):
        d = promote(client, args.name, args.version, args.alias)
    print(f"models:/{args.name}@{args.alias} -> version {d['version']}: {d['reason'].split(':')[0]}")
    for c in d["checks"]:
        print(f"  {c['check']}: {c['value']:.4g} <= {c['limit']:.4g}")
    return 0


def cmd_recipe_doc(args: argparse.Namespace) -> int:
    from pqflow.recipe_doc import render_reference

    print(render_reference(), end="")
    return 0


def cmd_families(args: argparse.Namespace) -> int:
    from pqflow.family_support import support_table

    print(support_table(), end="")
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
    s.add_argument("name", help="calibrate | importance | prune | bit-search | quantize | finetune | export | evaluate")
    s.add_argument("--recipe", required=True)
    s.add_argument("--in", dest="inputs", action="append", metavar="NAME=URI", help="an input artifact")
    s.add_argument("--out", required=True, metavar="URI", help="file:// path or s3://bucket/prefix")
    s.add_argument("--force", action="store_true", help="run even if the output is up to date")
    s.set_defaults(fn=cmd_stage)

    s = sub.add_parser("run", help="run the whole pipeline on this machine (embedded S3 + MLflow by default)")
    s.add_argument("recipe")
    s.add_argument("--root", help="artifact root URI (default: the recipe's storage.root)")
    s.add_argument("--force", action="store_true", help="run every stage even if up to date")
    s.add_argument("--mlflow-uri", help="use this MLflow server (default: $MLFLOW_TRACKING_URI, "
                   "recipe.tracking.mlflow_uri, else an embedded one)")
    s.add_argument("--s3-endpoint", help="use this S3 endpoint (default: $AWS_ENDPOINT_URL, else embedded when needed)")
    s.add_argument("--no-tracking", action="store_true", help="no MLflow (and no embedded services for it)")
    s.add_argument("--state-dir", help="embedded services' state (default: $PQFLOW_STATE_DIR or ./pqflow-runs/services)")
    s.set_defaults(fn=cmd_run)

    from pqflow.export import FORMATS

    s = sub.add_parser("export", help="write a model artifact in a format another engine loads "
                       "(a verified artifact of its own)")
    s.add_argument("model", metavar="MODEL_URI", help="a pqflow model artifact (file:// path or s3://)")
    s.add_argument("--format", required=True, choices=sorted(FORMATS))
    s.add_argument("--out", required=True, metavar="URI", help="file:// path or s3://bucket/prefix")
    s.add_argument("--fallback", choices=["error", "widen", "requant"], default="error",
                   help="a layer the format cannot hold exactly: fail (default), widen it into a larger "
                   "type without loss, or re-quantize it to the format's nearest type (lossy, reported)")
    s.add_argument("--dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="dtype of float tensors")
    s.add_argument("--uneven", choices=["error", "pad", "native"], default="error",
                   help="a model pruned to other widths in different layers: fail (default), zero-pad every "
                   "layer to the widest (pad: exact and small on disk; the padded heads and channels are computed), "
                   "or native: an architecture with per-layer widths where the format has one (gguf: deci), "
                   "padding elsewhere")
    s.add_argument("--force", action="store_true", help="export even if the output is up to date")
    s.set_defaults(fn=cmd_export)

    s = sub.add_parser("up", help="start the embedded S3 + MLflow and keep them running (prints the MLflow UI URL)")
    s.add_argument("--state-dir", help="state folder (default: $PQFLOW_STATE_DIR or ./pqflow-runs/services)")
    s.add_argument("--mlflow-port", type=int)
    s.add_argument("--s3-port", type=int)
    s.set_defaults(fn=cmd_up)

    s = sub.add_parser("compile", help="compile a recipe's pipeline to KFP IR YAML")
    s.add_argument("recipe")
    s.add_argument("-o", "--output", default="pipeline.yaml")
    _cluster_args(s)
    s.set_defaults(fn=cmd_compile)

    s = sub.add_parser("submit", help="run a recipe's pipeline once on a Kubeflow Pipelines cluster")
    s.add_argument("recipe")
    s.add_argument("--run-name")
    _remote_args(s)
    _cluster_args(s)
    s.set_defaults(fn=cmd_submit)

    s = sub.add_parser("schedule", help="create a recurring run of a recipe's pipeline on a KFP cluster")
    s.add_argument("recipe")
    s.add_argument("--cron", required=True, help='e.g. "0 3 * * *" (5 fields, or 6 with seconds first)')
    s.add_argument("--name", help="recurring run name")
    _remote_args(s)
    _cluster_args(s)
    s.set_defaults(fn=cmd_schedule)

    s = sub.add_parser("promote", help="move an alias (champion) to a registered version after re-checking "
                       "its quality gate from the version's logged metrics")
    s.add_argument("name", help="registered model name")
    s.add_argument("--version", required=True, help="model version number")
    s.add_argument("--alias", default="champion", help="alias to move (default: champion)")
    s.add_argument("--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else the services "
                   "of `pqflow up`)")
    s.add_argument("--state-dir", help="state folder of `pqflow up` (default: $PQFLOW_STATE_DIR or ./pqflow-runs/services)")
    s.set_defaults(fn=cmd_promote)

    s = sub.add_parser("recipe-doc", help="print the recipe reference (docs/recipe.md)")
    s.set_defaults(fn=cmd_recipe_doc)

    s = sub.add_parser("families", help="print the model families pqflow supports, and what each stage does on them")
    s.set_defaults(fn=cmd_families)
    return p


class Terminated(BaseException):
    """SIGTERM, raised in the main thread so that ``finally`` blocks stop services and remove staging."""


def _on_sigterm(signum: int, frame: object) -> None:
    raise Terminated()


def describe(e: BaseException) -> str:
    """One line for the user: the message of pqflow's own errors, a plain account of the others."""
    if isinstance(e, PqflowError):
        return str(e)
    if isinstance(e, OSError):
        where = f" ({e.filename})" if e.filename else ""
        if e.errno == errno.ENOSPC:
            return f"no space left on device while writing{where}; free some space and run again (finished steps are kept)"
        return f"{e.strerror or type(e).__name__}{where}"
    if isinstance(e, MemoryError):
        return "out of memory; use a smaller model, fewer windows or a bigger machine"
    first = (str(e).strip().splitlines() or [""])[0][:300]
    return f"unexpected {type(e).__name__}: {first} (run with --debug for the traceback)"


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    debug = args.debug or bool(os.environ.get("PQFLOW_DEBUG"))
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("pqflow: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("pqflow: terminated", file=sys.stderr)
        return 143
    except Exception as e:  # noqa: BLE001 - every failure is one line; --debug shows the traceback
        if debug:
            raise
        print(f"pqflow: error: {describe(e)}", file=sys.stderr)
        return 2 if isinstance(e, PqflowError | OSError | MemoryError) else 1


if __name__ == "__main__":
    sys.exit(main())
