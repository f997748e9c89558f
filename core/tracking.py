"""MLflow tracking: one parent run per pipeline run, one child run per step, and the registry.

* The parent run is created by whoever starts the pipeline (``pqflow run``) or, on a cluster, by the
  first stage that finds none for its KFP run (tag ``pqflow.run_key``).
* Every step logs a child run: the stage's params, the numeric summary as metrics, the artifact's
  manifest and the plots and tables it wrote (``*.png``, ``*.json``), and whether it was reused.
* The final ``evaluate`` step logs its model as an MLflow "models from code" pyfunc
  (:mod:`pqflow.pyfunc_model`, weights as safetensors artifacts, no pickle), registers it under
  ``recipe.model.name`` (default ``recipe.name``) with alias ``candidate``, and moves alias
  ``champion`` to it only when the recipe's quality gate holds against ``evaluate-baseline`` of the
  same run. The decision is logged (``gate_decision.json``, tags, metric ``gate_passed``). With an
  ``export`` step, its formats become files and tags of the version (:mod:`pqflow.model_exports`).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pqflow import __version__
from pqflow.artifacts import canonical_digest, is_s3, join, local_path, read_manifest
from pqflow.errors import PqflowError
from pqflow.recipe import QualityGate, Recipe
from pqflow.runner import StageOutcome
from pqflow.stages import get_stage
from pqflow.watchdog import scratch_dir

LOGGED_SUFFIXES = (".png", ".json", ".csv", ".md", ".html")
MAX_LOGGED_FILE = 20 * 2**20
BASELINE_STEP = "evaluate-baseline"
FINAL_STEP = "evaluate"
PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")

# MLflow's client retries an unreachable server for minutes by default; fail within a minute: a
# server that accepts connections but never answers costs 2 attempts x 25 s + ~2 s of backoff per
# request, one that refuses them a few seconds. Environment variables set by the user win.
_HTTP_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "1", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                  "MLFLOW_HTTP_REQUEST_BACKOFF_JITTER": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "25",
                  "MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT": "true"}
# Tracking store schemes of MLflow 3 (a plain path is a file store); "+driver" suffixes of the
# database schemes (postgresql+psycopg2://) are SQLAlchemy's.
TRACKING_SCHEMES = ("http", "https", "file", "sqlite", "postgresql", "mysql", "mssql", "databricks",
                    "databricks-uc", "uc")


def model_name(recipe: Recipe) -> str:
    return recipe.model.name or recipe.name


def check_scheme(uri: str) -> None:
    """One error naming ``uri`` and the schemes MLflow accepts, for a URI no tracking store takes."""
    scheme = urllib.parse.urlparse(uri).scheme.lower()
    if scheme == "" or scheme.split("+", 1)[0] in TRACKING_SCHEMES:
        return
    try:  # a scheme an installed MLflow plugin registers
        from mlflow.tracking._tracking_service.utils import _tracking_store_registry

        _tracking_store_registry.get_store_builder(uri)
        return
    except Exception:  # noqa: BLE001 - no plugin (or no mlflow): the URI is refused below
        pass
    raise PqflowError(f"unsupported MLflow tracking URI {uri!r}: scheme '{scheme}' is none of "
                      f"{', '.join(TRACKING_SCHEMES)} (or a local path)")


def check_reachable(uri: str, timeout: float = 5.0, attempts: int = 3) -> None:
    """Fail fast with a message naming ``uri`` when its scheme is not one MLflow accepts or the
    tracking server does not answer."""
    check_scheme(uri)
    if not uri.startswith(("http://", "https://")):
        return  # file: / sqlite: stores need no server
    last: Exception | None = None
    for i in range(attempts):
        try:
            with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as r:
                if r.status == 200:
                    return
                last = PqflowError(f"HTTP {r.status}")
        except urllib.error.HTTPError as e:
            if e.code == 404:  # servers behind a proxy may not expose /health: try the REST API
                try:
                    urllib.request.urlopen(f"{uri.rstrip('/')}/api/2.0/mlflow/experiments/search?max_results=1",
                                           timeout=timeout).close()
                    return
                except Exception as e2:  # noqa: BLE001
                    last = e2
            else:
                last = e
        except (OSError, ValueError) as e:
            last = e
        if i + 1 < attempts:
            time.sleep(1.0)
    raise PqflowError(f"MLflow tracking server {uri} unreachable: {getattr(last, 'reason', last)}")


def _service_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean the tracking server (or the artifact store behind it) failed us."""
    errors: list[type[BaseException]] = [OSError]
    with contextlib.suppress(ImportError):
        from mlflow.exceptions import MlflowException

        errors.append(MlflowException)
    with contextlib.suppress(ImportError):
        import requests

        errors.append(requests.RequestException)
    with contextlib.suppress(ImportError):
        import urllib3

        errors.append(urllib3.exceptions.HTTPError)
    with contextlib.suppress(ImportError):
        from boto3.exceptions import Boto3Error
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [Boto3Error, BotoCoreError, ClientError]
    return tuple(errors)


_TRANSPORT = re.compile(r"failed with (timeout )?exception|Max retries exceeded|Connection (refused|reset|aborted)|"
                        r"timed out|RemoteDisconnected|Failed to establish", re.IGNORECASE)


def _one_line(text: str, limit: int = 300) -> str:
    return " ".join(text.split())[:limit]


def describe_failure(uri: str, doing: str, e: BaseException) -> str:
    """One line: the server stopped answering (transport failures) or what it answered."""
    import requests

    msg = str(e)
    if isinstance(e, requests.ConnectionError | requests.Timeout | ConnectionError | TimeoutError) or \
            _TRANSPORT.search(msg):
        errno = re.search(r"\[Errno -?\d+\] ([^\"')]+)", msg)
        why = errno.group(1) if errno else ("timed out" if "time" in msg.lower() else _one_line(msg, 160))
        return f"MLflow tracking server {uri} stopped answering while {doing} ({why.strip()})"
    return f"MLflow tracking server {uri} failed while {doing}: {_one_line(msg)}"


@contextlib.contextmanager
def talking_to(uri: str, doing: str, after: str = "") -> Iterator[None]:
    """Turn failures of the tracking server during ``doing`` into one PqflowError naming ``uri``."""
    try:
        yield
    except PqflowError:
        raise
    except _service_errors() as e:
        raise PqflowError(describe_failure(uri, doing, e) + after) from e


def _uri(client: Any) -> str:
    return str(getattr(client, "tracking_uri", None) or os.environ.get("MLFLOW_TRACKING_URI", "?"))


def configure(uri: str) -> Any:
    """Point mlflow at ``uri`` and return an ``MlflowClient``."""
    check_scheme(uri)
    for k, v in _HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_tracking_uri(uri)
    mlflow.set_registry_uri(uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _experiment_id(client: Any, name: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        if exp.lifecycle_stage == "deleted":
            client.restore_experiment(exp.experiment_id)
        return exp.experiment_id
    try:
        return client.create_experiment(name)
    except Exception:  # noqa: BLE001 - created concurrently by another stage
        return client.get_experiment_by_name(name).experiment_id


def _flat(obj: Any, prefix: str = "") -> dict[str, str]:
    out: dict[str, str] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
    else:
        out[prefix] = json.dumps(obj) if isinstance(obj, list | tuple) else str(obj)
    return out


def _numeric(summary: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in summary.items() if isinstance(v, int | float) and not isinstance(v, bool)}


def start_parent(client: Any, recipe: Recipe, run_key: str, *, root: str, steps: list[str],
                 source: str = "local") -> str:
    """Create the pipeline run's parent run; returns its id."""
    with talking_to(_uri(client), "creating the parent run"):
        return _start_parent(client, recipe, run_key, root=root, steps=steps, source=source)


def experiment_of(client: Any, run_id: str) -> str:
    with talking_to(_uri(client), "reading the parent run"):
        return client.get_run(run_id).info.experiment_id


def _start_parent(client: Any, recipe: Recipe, run_key: str, *, root: str, steps: list[str],
                  source: str) -> str:
    exp = _experiment_id(client, recipe.tracking.experiment)
    run = client.create_run(exp, run_name=f"{recipe.name}-{run_key[:8]}", tags={
        "pqflow.run_key": run_key, "pqflow.recipe": recipe.name, "pqflow.root": root,
        "pqflow.steps": ",".join(steps), "pqflow.orchestrator": source, "pqflow.version": __version__,
    })
    rid = run.info.run_id
    params = {"model.source": recipe.model.source, "model.dtype": recipe.model.dtype,
              "model.name": model_name(recipe), "stages.enabled": ",".join(recipe.enabled_stages()),
              "storage.root": root}
    params.update(gate_params(recipe.tracking.gate))
    client.log_batch(rid, params=_params(params))
    client.log_text(rid, json.dumps(recipe.model_dump(mode="json"), indent=2, sort_keys=True), "recipe.json")
    return rid


def find_or_create_parent(client: Any, recipe: Recipe, run_key: str, root: str) -> str:
    """The parent run of KFP run ``run_key`` (used on a cluster, where no client creates it)."""
    exp = _experiment_id(client, recipe.tracking.experiment)
    flt = f"tags.`pqflow.run_key` = '{run_key}' and tags.`pqflow.recipe` = '{recipe.name}'"
    found = client.search_runs([exp], flt, order_by=["attributes.start_time ASC"], max_results=5)
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    if parents:
        return parents[0].info.run_id
    from pqflow.plan import plan

    mine = _start_parent(client, recipe, run_key, root=root, steps=[s.name for s in plan(recipe)], source="kfp")
    # Stages that start together (calibrate, evaluate-baseline) may both have created one: all of
    # them settle on the earliest, and the others delete their own.
    found = client.search_runs([exp], flt, max_results=20)
    parents = sorted((r for r in found if "mlflow.parentRunId" not in r.data.tags),
                     key=lambda r: (r.info.start_time, r.info.run_id))
    first = parents[0].info.run_id if parents else mine
    if first != mine:
        client.delete_run(mine)
    return first


def end_parent(client: Any, run_id: str, ok: bool, metrics: dict[str, float] | None = None) -> None:
    with talking_to(_uri(client), "closing the parent run"):
        if metrics:
            client.log_batch(run_id, metrics=_metrics(metrics))
        client.set_terminated(run_id, "FINISHED" if ok else "FAILED")


def _params(d: dict[str, str]):
    from mlflow.entities import Param

    return [Param(k[:250], str(v)[:6000]) for k, v in d.items()]


def _metrics(d: dict[str, float]):
    from mlflow.entities import Metric

    ts = int(time.time() * 1000)
    return [Metric(k, v, ts, 0) for k, v in d.items()]


def _artifact_files(uri: str, manifest: dict[str, Any], dest: Path) -> list[Path]:
    """The small human-readable files of an artifact (plots, tables, JSON), as local paths."""
    wanted = [rel for rel, info in manifest.get("files", {}).items()
              if rel.endswith(LOGGED_SUFFIXES) and info.get("bytes", 0) <= MAX_LOGGED_FILE]
    if not is_s3(uri):
        base = local_path(uri)
        return [base / rel for rel in wanted if (base / rel).is_file()]
    from pqflow.artifacts import _s3, _split_s3  # the artifact store's own client and endpoint

    bucket, prefix = _split_s3(uri)
    s3 = _s3()
    out = []
    for rel in wanted:
        p = dest / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        s3.download_file(bucket, f"{prefix}/{rel}", str(p))
        out.append(p)
    return out


class StageTracker:
    """``on_done`` hook for :func:`pqflow.runner.run_stage`: logs the step's child run, and for the
    final ``evaluate`` step registers the model and applies the quality gate."""

    def __init__(self, mlflow_uri: str, recipe: Recipe, root: str, step: str, *, parent_run: str = "",
                 run_key: str = "") -> None:
        self.uri, self.recipe, self.root, self.step = mlflow_uri, recipe, root, step
        self.parent_run, self.run_key = parent_run, run_key
        self.result: dict[str, Any] = {}

    def __call__(self, outcome: StageOutcome) -> None:
        # The stage's artifact is published before this runs: a tracking failure fails the run, and
        # the next run reuses the artifact and logs the step again.
        kept = f"; the artifact of step {self.step} is kept at {outcome.uri}: run again to resume"
        client = configure(self.uri)
        if not self.parent_run:
            with talking_to(self.uri, "finding the parent run", kept):
                key = self.run_key or canonical_digest({"recipe": self.recipe.model_dump(mode="json")})
                self.parent_run = find_or_create_parent(client, self.recipe, key, self.root)
        with talking_to(self.uri, f"logging step {self.step}", kept):
            child = log_step(client, self.parent_run, self.recipe, self.step, outcome)
        self.result["mlflow_run_id"] = child
        if self.step == FINAL_STEP and outcome.stage == "evaluate":
            with talking_to(self.uri, "registering the model", kept):
                self.result.update(register(client, self.parent_run, child, self.recipe, self.root, outcome))


def log_step(client: Any, parent_id: str, recipe: Recipe, step: str, outcome: StageOutcome) -> str:
    parent = client.get_run(parent_id)
    spec = get_stage(outcome.stage)
    run = client.create_run(parent.info.experiment_id, run_name=step, tags={
        "mlflow.parentRunId": parent_id, "pqflow.step": step, "pqflow.stage": outcome.stage,
        "pqflow.uri": outcome.uri, "pqflow.digest": outcome.manifest.get("digest", ""),
        "pqflow.fingerprint": outcome.manifest.get("fingerprint", ""),
        "pqflow.reused": str(outcome.skipped).lower(),
    })
    rid = run.info.run_id
    cfg = recipe.stage(spec.key).model_dump(mode="json", exclude={"resources", "enabled"})
    params = _flat(cfg)
    params.update({f"input.{k}": a.uri for k, a in outcome.inputs.items()})
    metrics = _numeric(outcome.summary)
    metrics["stage_seconds"] = float(outcome.seconds)
    metrics["reused"] = float(outcome.skipped)
    metrics["artifact_bytes_out"] = float(outcome.manifest.get("bytes", 0))
    client.log_batch(rid, metrics=_metrics(metrics), params=_params(params))
    with scratch_dir("track") as tmp:
        client.log_text(rid, json.dumps(outcome.manifest, indent=2, sort_keys=True), "manifest.json")
        for f in _artifact_files(outcome.uri, outcome.manifest, Path(tmp)):
            client.log_artifact(rid, str(f), "outputs")
    client.set_terminated(rid, "FINISHED")
    return rid


# -- registry -----------------------------------------------------------------------------------------

def gate_params(gate: QualityGate) -> dict[str, str]:
    """The gate as the pipeline run's MLflow params (``gate.<key>``; per-dataset limits as JSON)."""
    return {f"gate.{k}": json.dumps(v, sort_keys=True) if isinstance(v, dict) else str(v)
            for k, v in gate.model_dump().items()}


def gate_from_params(params: dict[str, str]) -> QualityGate:
    """The gate a run was started with, from its ``gate.<key>`` params (runs logged before a key
    existed get its default)."""
    logged = {k.split(".", 1)[1]: v for k, v in params.items() if k.startswith("gate.")}
    return QualityGate(**{k: (None if v == "None" else json.loads(v) if k == "datasets" else v)
                          for k, v in logged.items() if k in QualityGate.model_fields})


def gate_decision(recipe: Recipe | QualityGate, final: dict[str, Any], baseline: dict[str, Any] | None) -> dict[str, Any]:
    """Does ``final`` (evaluate summary) pass the recipe's quality gate (or ``gate``) against ``baseline``?"""
    gate = recipe.tracking.gate if isinstance(recipe, Recipe) else recipe
    checks: list[dict[str, Any]] = []
    if gate.max_ppl_increase is not None:
        if baseline is None or "ppl" not in baseline:
            checks.append({"check": "max_ppl_increase", "held": False,
                           "why": f"no {BASELINE_STEP} step in this run to compare with"})
        else:
            rise = final["ppl"] / baseline["ppl"] - 1.0
            checks.append({"check": "max_ppl_increase", "held": rise <= gate.max_ppl_increase,
                           "value": rise, "limit": gate.max_ppl_increase,
                           "baseline_ppl": baseline["ppl"], "ppl": final["ppl"]})
    for name, limit in gate.datasets.items():
        key = f"ppl_{name}"
        if baseline is None or key not in baseline or key not in final:
            where = "this model" if key not in final else f"the {BASELINE_STEP} step"
            checks.append({"check": f"max_ppl_increase[{name}]", "held": False,
                           "why": f"{where} reports no {key}"})
        else:
            rise = final[key] / baseline[key] - 1.0
            checks.append({"check": f"max_ppl_increase[{name}]", "held": rise <= limit.max_ppl_increase,
                           "value": rise, "limit": limit.max_ppl_increase,
                           "baseline_ppl": baseline[key], "ppl": final[key]})
    if gate.max_bytes is not None:
        b = final.get("model_bytes")
        checks.append({"check": "max_bytes", "held": b is not None and b <= gate.max_bytes,
                       "value": b, "limit": gate.max_bytes})
    held = bool(checks) and all(c["held"] for c in checks)
    if not checks:
        why = "the recipe sets no quality gate (tracking.gate): champion is left unchanged"
    elif held:
        why = "every gate check holds: champion moves to this version"
    else:
        fails = []
        for c in checks:
            if not c["held"]:
                fails.append(f"{c['check']} fails ({c['why']})" if "why" in c
                             else f"{c['check']} fails ({c['value']:.4g} > {c['limit']:.4g})")
        why = "; ".join(fails) + ": champion is left unchanged"
    return {"champion": held, "checks": checks, "reason": why,
            "baseline_ppl": (baseline or {}).get("ppl"), "ppl": final.get("ppl"),
            "model_bytes": final.get("model_bytes")}


def logged_gate(client: Any, name: str, version: str) -> tuple[QualityGate, dict[str, Any], dict[str, Any] | None, Any]:
    """(gate, final metrics, baseline metrics or None, model version) as the registry and the tracking
    server hold them for version ``version`` of ``name``: the metrics its ``evaluate`` run logged, the
    ``evaluate-baseline`` run of the same pipeline run, and the gate that run was started with."""
    from mlflow.exceptions import MlflowException

    try:
        mv = client.get_model_version(name, str(version))
    except MlflowException as e:
        raise PqflowError(f"model {name!r} has no version {version!r} in the registry "
                          f"({_one_line(getattr(e, 'message', str(e)), 120)})") from None
    run_id = mv.tags.get("pqflow.mlflow_run") or mv.run_id
    if not run_id:
        raise PqflowError(f"models:/{name}/{version} names no evaluate run (tag pqflow.mlflow_run): "
                          "it was not registered by pqflow")
    run = client.get_run(run_id)
    final = dict(run.data.metrics)
    if "ppl" not in final:
        raise PqflowError(f"models:/{name}/{version}: its run {run_id} logged no ppl metric")
    parent_id = run.data.tags.get("mlflow.parentRunId")
    if not parent_id:
        raise PqflowError(f"models:/{name}/{version}: its run {run_id} has no parent pipeline run")
    parent = client.get_run(parent_id)
    gate = gate_from_params(parent.data.params)
    siblings = client.search_runs([parent.info.experiment_id],
                                  f"tags.mlflow.parentRunId = '{parent_id}' and tags.`pqflow.step` = '{BASELINE_STEP}'",
                                  max_results=1)
    baseline = dict(siblings[0].data.metrics) if siblings else None
    return gate, final, baseline, mv


def promote(client: Any, name: str, version: str, alias: str = "champion") -> dict[str, Any]:
    """Move ``alias`` to version ``version`` of ``name`` only when the quality gate, re-checked from the
    version's logged metrics, holds; otherwise raise a PqflowError with the reason (nothing moves)."""
    gate, final, baseline, mv = logged_gate(client, name, version)
    decision = gate_decision(gate, final, baseline)
    if not decision["champion"]:
        reason = decision["reason"].replace(": champion is left unchanged", "")
        raise PqflowError(f"refusing to move {name}@{alias} to version {mv.version}: {reason}")
    version = str(mv.version)
    client.set_registered_model_alias(name, alias, version)
    client.set_model_version_tag(name, version, "pqflow.gate", "passed")
    decision.update(model=name, version=version, alias=alias)
    return decision


def _model_key(recipe: Recipe, outcome: StageOutcome) -> str:
    from pqflow.model_exports import model_key

    if "model" in outcome.inputs:
        weights = outcome.inputs["model"].digest
    else:
        weights = canonical_digest({"source": recipe.model.source, "dtype": recipe.model.dtype, "pqflow": __version__})
    return model_key(weights, outcome.inputs.get("export"))


def _model_folder(recipe: Recipe, outcome: StageOutcome, tmp: Path) -> Path:
    """The evaluated model as a folder of safetensors + config + tokenizer files."""
    if "model" in outcome.inputs:
        return outcome.inputs["model"].path
    from pqflow.models import load_source, save_model

    loaded = load_source(recipe.model.source, recipe.model.dtype)
    return save_model(loaded.model, loaded.tokenizer, tmp / "model")


def chat_template_source(folder: Path) -> str:
    """"tokenizer" when the model folder's tokenizer has a chat template, else "default" (the ChatML
    template :mod:`pqflow.generate` falls back to)."""
    if any(folder.rglob("chat_template.jinja")):
        return "tokenizer"
    for cfg in folder.rglob("tokenizer_config.json"):
        with contextlib.suppress(OSError, ValueError):
            if json.loads(cfg.read_text()).get("chat_template"):
                return "tokenizer"
    return "default"


def register(client: Any, parent_id: str, child_id: str, recipe: Recipe, root: str,
             outcome: StageOutcome) -> dict[str, Any]:
    """Log + register the evaluated model (reusing a version with the same weights), set aliases."""

    name = model_name(recipe)
    final = outcome.summary
    base_manifest = read_manifest(join(root, recipe.name, BASELINE_STEP))
    baseline = base_manifest.get("summary") if base_manifest else None
    key = _model_key(recipe, outcome)
    version = None
    try:
        for mv in client.search_model_versions(f"name = '{name}'"):
            if mv.tags.get("pqflow.model_key") == key and mv.status == "READY":
                version = mv.version
                break
    except Exception:  # noqa: BLE001 - no such registered model yet
        version = None
    reused = version is not None
    decision = gate_decision(recipe, final, baseline)
    if not reused:
        from pqflow.model_card import CARD_FILE, model_card, step_manifests
        from pqflow.model_card import version_tags as describe

        ev = recipe.stages.evaluate
        export = outcome.inputs.get("export")
        export_tags: dict[str, str] = {}
        if export is not None:
            from pqflow.model_exports import version_tags

            export_tags = version_tags(export)
        manifests = step_manifests(recipe, root)
        with scratch_dir("model") as tmp:
            folder = _model_folder(recipe, outcome, Path(tmp))
            template = chat_template_source(folder)
            card = model_card(recipe, name, final, baseline, manifests, decision, template, export_tags)
            card_file = Path(tmp) / "card" / CARD_FILE
            card_file.parent.mkdir(parents=True)
            card_file.write_text(card)
            exports = None
            if export is not None:
                from pqflow.model_exports import stage_files

                exports = stage_files(export, Path(tmp))
            info = _log_pyfunc(child_id, folder, name, ev.seqlen, ev.max_windows or 0, ev.batch_size,
                               ev.data.source, ev.data.field, exports, card_file)
        version = str(info.registered_model_version)
        tags = {"pqflow.model_key": key, "pqflow.run_key": client.get_run(parent_id).data.tags.get(
                "pqflow.run_key", ""), "pqflow.mlflow_run": child_id, "pqflow.recipe": recipe.name,
                **describe(recipe, final, baseline, manifests, template), **export_tags}
        for k, v in tags.items():
            client.set_model_version_tag(name, version, k, v)
        client.update_model_version(name, version, description=card)
    client.set_registered_model_alias(name, "candidate", version)
    decision.update(model=name, version=version, reused_version=reused)
    if decision["champion"]:
        client.set_registered_model_alias(name, "champion", version)
    client.set_model_version_tag(name, version, "pqflow.gate", "passed" if decision["champion"] else "failed")
    for rid in (parent_id, child_id):
        client.log_dict(rid, decision, "gate_decision.json")
        client.set_tag(rid, "pqflow.gate", "passed" if decision["champion"] else "failed")
        client.set_tag(rid, "pqflow.registered", f"models:/{name}/{version}")
        client.log_metric(rid, "gate_passed", float(decision["champion"]))
    print(f"[pqflow] registry: {name} version {version} ({'reused' if reused else 'new'}) -> @candidate; "
          f"gate: {decision['reason']}", file=sys.stderr)
    return {"registered_model": name, "model_version": version, "champion": decision["champion"],
            "gate_reason": decision["reason"], "parent_run_id": parent_id}


def serving_signature(seqlen: int = 512, max_windows: int = 0, batch_size: int = 4):
    """The registered model's signature: an OpenAI-style chat (``messages``) or completion
    (``prompt``) request in, MLflow's chat completion response out (a completion request gets the
    ``text_completion`` shape, see :mod:`pqflow.pyfunc_model`); ``params`` select the mode
    (``generate`` | ``perplexity`` | ``logits``) and the perplexity protocol."""
    from mlflow.models import ModelSignature
    from mlflow.types.llm import CHAT_MODEL_OUTPUT_SCHEMA
    from mlflow.types.schema import Array, ColSpec, DataType, Object, ParamSchema, ParamSpec, Property, Schema

    message = Object([Property("role", DataType.string), Property("content", DataType.string)])
    inputs = Schema([
        ColSpec(Array(message), "messages", required=False),
        ColSpec(DataType.string, "prompt", required=False),
        ColSpec(DataType.double, "temperature", required=False),
        ColSpec(DataType.long, "max_tokens", required=False),
        ColSpec(DataType.double, "top_p", required=False),
        ColSpec(Array(DataType.string), "stop", required=False),
        ColSpec(DataType.long, "seed", required=False),
    ])
    params = ParamSchema([
        ParamSpec("mode", DataType.string, "generate"),
        ParamSpec("return_token_ids", DataType.boolean, False),
        ParamSpec("seqlen", DataType.long, seqlen),
        ParamSpec("max_windows", DataType.long, max_windows),
        ParamSpec("batch_size", DataType.long, batch_size),
    ])
    return ModelSignature(inputs=inputs, outputs=CHAT_MODEL_OUTPUT_SCHEMA, params=params)


INPUT_EXAMPLE = {"messages": [{"role": "user", "content": "What is the capital of France?"}],
                 "max_tokens": 16, "temperature": 0.0}
TASK = "llm/v1/chat"


def _log_pyfunc(run_id: str, folder: Path, name: str, seqlen: int, max_windows: int, batch_size: int,
                data: str, field: str, exports: Path | None = None, card: Path | None = None):
    import mlflow

    sig = serving_signature(seqlen, max_windows, batch_size)
    active = mlflow.active_run()
    if active is not None and active.info.run_id != run_id:
        raise PqflowError("an unrelated MLflow run is active in this process")
    extra = {"exports": str(exports)} if exports else {}
    if card is not None:
        extra["model_card"] = str(card)
    with mlflow.start_run(run_id=run_id, nested=False), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # type-hint hints
        return mlflow.pyfunc.log_model(
            name="model",
            python_model=str(PYFUNC_FILE),
            # exports ride along as files of the version (artifacts/exports/<format>/); predict ignores
            # them; the model card as artifacts/model_card/README.md
            artifacts={"model": str(folder), **extra},
            signature=sig,
            input_example=INPUT_EXAMPLE,
            model_config={"model_name": name},
            registered_model_name=name,
            metadata={"task": TASK, "tasks": [TASK, "llm/v1/completions"], "pqflow_version": __version__,
                      "eval_data": data, "eval_field": field},
            pip_requirements=[f"pqflow=={__version__}", "torch", "transformers", "safetensors", "pandas"],
        )
