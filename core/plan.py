"""How the enabled stages of a recipe connect: which artifact feeds which input.

Both the in-process runner and the KFP pipeline build their graph from :func:`plan`, so the two
cannot disagree.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from pqflow.artifacts import join
from pqflow.errors import RecipeError
from pqflow.recipe import STAGE_ORDER, Recipe
from pqflow.stages import BY_KEY

MODEL_MAKERS = ("prune", "quantize", "finetune")
COMPRESSORS = ("prune", "quantize", "finetune")


@dataclass
class Step:
    name: str  # unique step name, also the artifact folder
    stage: str  # stage command-line name
    inputs: dict[str, str] = field(default_factory=dict)  # input name -> producing step name

    def uri(self, root: str, recipe: Recipe) -> str:
        return join(root, recipe.name, self.name)


def plan(recipe: Recipe) -> list[Step]:
    steps: list[Step] = []
    latest: dict[str, str] = {}  # artifact kind -> step that produced it last
    for key in STAGE_ORDER:
        if not recipe.stage(key).active:
            continue
        spec = BY_KEY[key]
        if key == "evaluate" and any(recipe.stage(k).enabled for k in COMPRESSORS) and "model" in latest:
            # The uncompressed model, same data and protocol, side by side with the result.
            steps.append(Step("evaluate-baseline", "evaluate", {}))
        wanted = spec.inputs + spec.optional
        inputs = {name: latest[name] for name in wanted if name in latest}
        missing = [i for i in spec.inputs if i not in inputs]
        if missing:
            raise RecipeError(f"stages.{key}: needs {missing}; enable the stage that produces it")
        step = Step(spec.name, spec.name, inputs)
        steps.append(step)
        latest[spec.output] = step.name
    return steps
