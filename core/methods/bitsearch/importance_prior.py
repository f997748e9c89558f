"""QPruner's importance-derived allocation: more bits to the units whose damage costs most."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from pqflow.methods.bitsearch.context import SearchContext
from pqflow.methods.bitsearch.trials import Trial

Prior = Literal["mi", "importance", "sensitivity", "error"]
SeedPrior = Literal["auto", "mi", "importance", "sensitivity", "error"]


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prior: Prior = Field("sensitivity", description="layer importance: mi (mutual information with next-token "
                         "targets), importance (the importance stage's scores), sensitivity (measured loss "
                         "increase of each layer alone at the probe choice), error (none: rounding error only)")
    probe: str | None = Field(None, max_length=32, description="choice used by sensitivity probes, e.g. '2g64'; null = the cheapest")


def search(ctx: SearchContext, params: Params) -> Trial:
    ctx.prior_settings.probe = params.probe
    alloc = ctx.prior_allocation(params.prior)
    ctx.info["prior"] = params.prior
    return ctx.evaluate(alloc, f"prior:{params.prior}")
