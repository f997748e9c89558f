"""Every unit at one precision: the baseline the searched allocations are measured against."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from pqflow.methods.bitsearch.context import SearchContext
from pqflow.methods.bitsearch.space import parse_choice
from pqflow.methods.bitsearch.trials import Trial


class Params(BaseModel):
    model_config = ConfigDict(extra="forbid")
    choice: str | None = Field(None, max_length=32, description="the precision, e.g. '4g64'; null = the largest bit choice that fits the budget")


def search(ctx: SearchContext, params: Params) -> Trial:
    space = ctx.space
    if params.choice is not None:
        c = parse_choice(params.choice)
        if c not in space.choices:
            raise ValueError(f"uniform choice '{params.choice}' is not among the bit choices "
                             f"{[x.label for x in space.choices]}")
        alloc = space.uniform(c)
        if space.bytes_of(alloc) > ctx.budget:
            raise ValueError(f"uniform '{params.choice}' needs {space.bytes_of(alloc)} B, over the budget {ctx.budget} B")
    else:
        fits = [space.uniform(c) for c in space.choices if space.bytes_of(space.uniform(c)) <= ctx.budget]
        alloc = max(fits, key=space.bytes_of)
    return ctx.evaluate(alloc, f"uniform:{space.choices[alloc[0]].label}")
