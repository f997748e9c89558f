"""Submit or schedule the compiled pipeline on a Kubeflow Pipelines cluster through ``kfp.Client``."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from pqflow.errors import PqflowError
from pqflow.pipelines.compression import ClusterOptions, compile_pipeline, pipeline_name
from pqflow.recipe import Recipe


def kfp_cron(expr: str) -> str:
    """KFP wants six cron fields (seconds first); accept the usual five too."""
    fields = expr.split()
    if len(fields) == 5:
        return "0 " + expr.strip()
    if len(fields) == 6:
        return expr.strip()
    raise PqflowError(f"--cron '{expr}': expected 5 fields (min hour day month weekday) or 6 (with seconds)")


def client(host: str, namespace: str | None = None, existing_token: str | None = None):
    import warnings

    import kfp

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "only works with KFP >= 2.0.0-beta.2"
            return kfp.Client(host=host, namespace=namespace, existing_token=existing_token)
    except Exception as e:  # noqa: BLE001 - kfp raises many kinds; one line naming the host
        raise PqflowError(f"KFP API at {host} unreachable or refused the connection: {e}") from None


def _experiment(c: Any, name: str, namespace: str | None) -> str:
    try:
        return c.create_experiment(name=name, namespace=namespace).experiment_id
    except Exception as e:  # noqa: BLE001
        raise PqflowError(f"KFP API: cannot get or create experiment '{name}': {e}") from None


def submit(recipe: Recipe, host: str, *, opts: ClusterOptions | None = None, experiment: str | None = None,
           run_name: str | None = None, namespace: str | None = None, token: str | None = None,
           params: dict[str, Any] | None = None) -> dict[str, str]:
    """Compile ``recipe`` and start one run; returns ids and the run's URL."""
    c = client(host, namespace, token)
    with tempfile.TemporaryDirectory(prefix="pqflow-kfp-") as tmp:
        pkg = compile_pipeline(recipe, Path(tmp) / "pipeline.yaml", opts)
        try:
            res = c.create_run_from_pipeline_package(
                str(pkg), arguments=params or {}, run_name=run_name or f"{pipeline_name(recipe)}",
                experiment_name=experiment or recipe.tracking.experiment, namespace=namespace,
                enable_caching=False)
        except Exception as e:  # noqa: BLE001
            raise PqflowError(f"KFP API at {host} refused the run: {e}") from None
    return {"run_id": res.run_id, "url": f"{host.rstrip('/')}/#/runs/details/{res.run_id}"}


def schedule(recipe: Recipe, host: str, cron: str, *, opts: ClusterOptions | None = None,
             experiment: str | None = None, job_name: str | None = None, namespace: str | None = None,
             token: str | None = None, max_concurrency: int = 1, params: dict[str, Any] | None = None
             ) -> dict[str, str]:
    """Compile ``recipe`` and create a recurring run on ``cron``; returns its id."""
    cron6 = kfp_cron(cron)  # a bad expression fails before any request
    c = client(host, namespace, token)
    exp_id = _experiment(c, experiment or recipe.tracking.experiment, namespace)
    with tempfile.TemporaryDirectory(prefix="pqflow-kfp-") as tmp:
        pkg = compile_pipeline(recipe, Path(tmp) / "pipeline.yaml", opts)
        try:
            job = c.create_recurring_run(
                experiment_id=exp_id, job_name=job_name or f"{pipeline_name(recipe)}-scheduled",
                description=f"pqflow recipe {recipe.name}, cron {cron}", cron_expression=cron6,
                max_concurrency=max_concurrency, no_catchup=True, params=params or {},
                pipeline_package_path=str(pkg), enable_caching=False, enabled=True)
        except Exception as e:  # noqa: BLE001
            raise PqflowError(f"KFP API at {host} refused the recurring run: {e}") from None
    return {"recurring_run_id": job.recurring_run_id, "experiment_id": exp_id}
