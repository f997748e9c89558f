"""One thin KFP v2 component per pqflow stage.

Each ``components/<stage>.py`` holds one plain function whose body only calls
:func:`pqflow.components._base.run_component` (which calls :func:`pqflow.runner.run_stage`).
:func:`component` turns it into a lightweight KFP component whose ``base_image`` is the stage's own
image (``<registry>/pqflow-<stage>:<version>``), built from ``docker/``, so that on a cluster each
task runs in its stage's image with nothing installed at start-up.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from pqflow import __version__

DEFAULT_REGISTRY = "ghcr.io/pqflow"
REGISTRY_ENV = "PQFLOW_REGISTRY"


@dataclass(frozen=True)
class ComponentSpec:
    stage: str  # stage command-line name
    module: str  # module under pqflow.components
    output: str  # name of the component's output artifact


COMPONENTS: dict[str, ComponentSpec] = {
    c.stage: c
    for c in (
        ComponentSpec("calibrate", "calibrate", "calib"),
        ComponentSpec("importance", "importance", "importance"),
        ComponentSpec("prune", "prune", "pruned"),
        ComponentSpec("bit-search", "bit_search", "allocation"),
        ComponentSpec("quantize", "quantize", "quantized"),
        ComponentSpec("finetune", "finetune", "finetuned"),
        ComponentSpec("export", "export", "exported"),
        ComponentSpec("evaluate", "evaluate", "metrics"),
    )
}


def image_for(stage: str, registry: str | None = None, version: str | None = None) -> str:
    """The stage's own image, e.g. ``ghcr.io/pqflow/pqflow-calibrate:0.1.0``."""
    registry = (registry or os.environ.get(REGISTRY_ENV) or DEFAULT_REGISTRY).rstrip("/")
    return f"{registry}/pqflow-{stage}:{version or __version__}"


def function(stage: str):
    """The plain Python function of ``stage``'s component (what the container executes)."""
    spec = COMPONENTS[stage]
    return getattr(importlib.import_module(f"pqflow.components.{spec.module}"), spec.module)


def component(stage: str, image: str | None = None):
    """``stage``'s KFP component, running in ``image`` (default: :func:`image_for`)."""
    from kfp import dsl

    return dsl.component(function(stage), base_image=image or image_for(stage), install_kfp_package=False)
