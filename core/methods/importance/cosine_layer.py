"""Layer importance from how much a decoder layer changes its input (COMP's coarse step).

``1 - cos(h_in, h_out)`` averaged over calibration tokens, also known as block influence: a layer
whose output nearly equals its input can be removed at little cost. Scores layers only; width
pruning needs a method that also scores heads and channels.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from pqflow.calibration import Calibration
from pqflow.methods.importance.common import Scores, block_influence, pick_windows
from pqflow.recipe import MAX_BATCH, MAX_WINDOWS


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    n_windows: int | None = Field(32, ge=1, le=MAX_WINDOWS, description="calibration windows; null = all")
    batch_size: int = Field(4, ge=1, le=MAX_BATCH)


def score(model: nn.Module, calib: Calibration, params: Params, progress: bool = True) -> Scores:
    windows = pick_windows(calib.windows, params.n_windows)
    bi, _ = block_influence(model, windows, params.batch_size, grams=False, progress=progress)
    return Scores("cosine-layer", layer=bi, info={"windows": len(windows)})
