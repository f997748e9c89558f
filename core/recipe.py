"""The recipe: one YAML file that says what to compress, how, and where results go.

It is validated completely (schema, then every method's own ``params``) before any model is
loaded, and every error names the dotted path of the offending field.
"""

from __future__ import annotations

import difflib
import importlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pqflow.errors import RecipeError

STAGE_ORDER = ("calibrate", "importance", "prune", "bit_search", "quantize", "finetune", "evaluate")

# Stage -> module holding its method family's REGISTRY (stages without methods are absent).
METHOD_FAMILIES = {
    "importance": "pqflow.methods.importance",
    "prune": "pqflow.methods.prune",
    "bit_search": "pqflow.methods.bitsearch",
    "quantize": "pqflow.methods.quant",
    "finetune": "pqflow.methods.tuning",
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Resources(Strict):
    """Kubernetes resources of a stage's container (used by the KFP pipeline only)."""

    cpu: str = Field("2", description="CPU request, Kubernetes quantity")
    memory: str = Field("8G", description="memory request and limit, Kubernetes quantity")
    gpu: int = Field(0, ge=0, description="GPUs (nvidia.com/gpu) per stage container")
    gpu_type: str | None = Field(None, description="accelerator node label value, e.g. nvidia-tesla-a100")
    node_selector: dict[str, str] = Field(default_factory=dict, description="extra node selector labels")


class ModelRef(Strict):
    source: str = Field(description="smollm2-135m | tiny-llama | hf:<id or local path>")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the model is loaded and computed in")
    name: str | None = Field(None, description="registered model name; defaults to the recipe name")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        if v in ("smollm2-135m", "tiny-llama") or v.startswith("hf:"):
            return v
        raise ValueError("must be 'smollm2-135m', 'tiny-llama' or 'hf:<id or local path>'")


class DataRef(Strict):
    source: str = Field("wikitext2", description="wikitext2 | text:<path> | jsonl:<path>")
    field: str = Field("text", description="field holding the text, for jsonl sources")

    @field_validator("source")
    @classmethod
    def _known_data(cls, v: str) -> str:
        if v == "wikitext2" or v.startswith(("text:", "jsonl:")):
            return v
        raise ValueError("must be 'wikitext2', 'text:<path>' or 'jsonl:<path>'")


class StageBase(Strict):
    enabled: bool = Field(True, description="a disabled stage is skipped and produces nothing")
    resources: Resources = Field(default_factory=Resources)


class MethodStage(StageBase):
    method: str
    params: dict[str, Any] = Field(default_factory=dict, description="the method's own settings (see Methods)")


class CalibrateStage(StageBase):
    data: DataRef = Field(default_factory=DataRef)
    n_windows: int = Field(128, ge=1, description="random calibration windows drawn from the train split")
    seqlen: int = Field(512, ge=8, description="tokens per calibration window")
    seed: int = Field(0, description="seed of the window draw")
    collect_xtx: bool = Field(False, description="accumulate X^T X per linear (GPTQ, reformation)")
    batch_size: int = Field(4, ge=1, description="windows per forward pass")


class ImportanceStage(MethodStage):
    enabled: bool = Field(False, description="a disabled stage is skipped and produces nothing")
    method: str = Field("taylor", description="importance method")


class PruneStage(MethodStage):
    enabled: bool = Field(False, description="a disabled stage is skipped and produces nothing")
    method: str = Field("width", description="pruning method")
    ratio: float = Field(0.2, gt=0.0, lt=1.0, description="fraction of non-embedding parameters removed")


class BitSearchStage(MethodStage):
    enabled: bool = Field(False, description="a disabled stage is skipped and produces nothing")
    method: str = Field("nevergrad", description="bit-search method")
    avg_bits: float | None = Field(None, gt=1.0, le=16.0, description="budget as average bits incl. overhead")
    budget_bytes: int | None = Field(None, gt=0, description="budget as total bytes of the quantized linears")
    granularity: Literal["layer", "linear"] = Field("linear", description="one precision per decoder layer or per linear")
    choices: list[str] = Field(
        default_factory=lambda: ["2g64", "3g64", "3g128", "4g64", "4g128", "8g128"],
        description="precisions to choose from: '<bits>g<group>', '<bits>pc' (per row) or '16' (keep in fp16)")
    symmetric: bool = Field(False, description="symmetric grids (no zero points), as the quantize stage will use")
    objective: Literal["kl", "nll"] = Field("kl", description="measured on held-out tokens: KL to the full model's logits, or NLL")
    heldout_windows: int = Field(8, ge=1, description="held-out windows the objective is measured on")
    heldout_seqlen: int = Field(256, ge=8, description="tokens per held-out window")
    seed: int = Field(0, description="seed of the search (and of the mutual-information clustering)")
    cache_mb: int = Field(2000, ge=0, description="memory for cached quantized codes of every (module, choice) tried (MiB)")

    @field_validator("choices")
    @classmethod
    def _valid_choices(cls, v: list[str]) -> list[str]:
        from pqflow.methods.bitsearch.space import parse_choice

        if not v:
            raise ValueError("at least one bit choice is needed")
        for c in v:
            try:
                parse_choice(c)
            except Exception as e:  # noqa: BLE001 - reported as this field's validation error
                raise ValueError(str(e)) from None
        return v


class QuantizeStage(MethodStage):
    enabled: bool = Field(False, description="a disabled stage is skipped and produces nothing")
    method: str = Field("rtn", description="quantization method")
    bits: Literal[2, 3, 4, 8] = Field(4, description="default bits of every quantized linear")
    group_size: int | None = Field(64, description="input columns per scale; null = per output channel")
    symmetric: bool = Field(False, description="symmetric codes (no zero point)")
    embedding_bits: Literal[2, 3, 4, 8] | None = Field(
        None, description="bits of the input embedding (round-to-nearest); null = kept in fp16")
    lm_head_bits: Literal[2, 3, 4, 8] | None = Field(
        None, description="bits of the output head; a tied head always follows embedding_bits")


class FinetuneStage(MethodStage):
    enabled: bool = Field(False, description="a disabled stage is skipped and produces nothing")
    method: str = Field("lora", description="recovery fine-tuning method")
    data: DataRef = Field(default_factory=DataRef, description="train split for training, heldout split for validation")
    verify_reload: bool = Field(True, description="reload the written artifact and compare its logits with the tuned model's")
    reload_tolerance: float = Field(1e-3, ge=0, description="largest allowed absolute logit difference on reload")


class EvaluateStage(StageBase):
    data: DataRef = Field(default_factory=DataRef)
    seqlen: int = Field(512, ge=8, description="tokens per evaluation window")
    max_windows: int | None = Field(40, ge=1, description="cap on evaluated windows; null = all")
    batch_size: int = Field(4, ge=1, description="windows per forward pass")


class Stages(Strict):
    calibrate: CalibrateStage = Field(default_factory=CalibrateStage)
    importance: ImportanceStage = Field(default_factory=ImportanceStage)
    prune: PruneStage = Field(default_factory=PruneStage)
    bit_search: BitSearchStage = Field(default_factory=BitSearchStage)
    quantize: QuantizeStage = Field(default_factory=QuantizeStage)
    finetune: FinetuneStage = Field(default_factory=FinetuneStage)
    evaluate: EvaluateStage = Field(default_factory=EvaluateStage)


class Storage(Strict):
    root: str = Field("file://./pqflow-artifacts", description="file:// path or s3://bucket/prefix")


class QualityGate(Strict):
    max_ppl_increase: float | None = Field(None, ge=0, description="allowed ppl rise over the baseline, fraction")
    max_bytes: int | None = Field(None, gt=0, description="largest allowed model weight bytes on disk")


class Tracking(Strict):
    mlflow_uri: str | None = Field(None, description="tracking server; null = embedded server")
    experiment: str = Field("pqflow", description="MLflow experiment name")
    gate: QualityGate = Field(default_factory=QualityGate)


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", description="run name; artifacts go under storage.root/<name>/")
    description: str = Field("", description="free text, logged with the run")
    model: ModelRef
    stages: Stages = Field(default_factory=Stages)
    storage: Storage = Field(default_factory=Storage)
    tracking: Tracking = Field(default_factory=Tracking)

    @model_validator(mode="after")
    def _disjoint_data(self) -> Recipe:
        cal, ev = self.stages.calibrate.data.source, self.stages.evaluate.data.source
        if cal == ev and cal != "wikitext2" and self.stages.calibrate.enabled:
            raise ValueError(
                f"calibration and evaluation both read '{cal}': a local file has no test split of its "
                "own, so use different files to keep evaluation data unseen"
            )
        return self

    def stage(self, name: str) -> StageBase:
        return getattr(self.stages, name)

    def enabled_stages(self) -> list[str]:
        return [s for s in STAGE_ORDER if self.stage(s).enabled]

    def method_params(self, stage: str) -> BaseModel:
        """The validated ``params`` of ``stage``'s method."""
        cfg = self.stage(stage)
        assert isinstance(cfg, MethodStage)
        return method_registry(stage).params(cfg.method, cfg.params)


def method_registry(stage: str):
    from pqflow.registry import MethodRegistry

    try:
        mod = importlib.import_module(METHOD_FAMILIES[stage])
    except ModuleNotFoundError as e:
        raise RecipeError(f"stages.{stage}: this pqflow build has no {stage} methods yet ({e})") from e
    reg = mod.REGISTRY
    assert isinstance(reg, MethodRegistry)
    return reg


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(str(p) for p in loc) or "<root>"


def _describe(err: dict[str, Any], known: dict[str, list[str]]) -> str:
    path = _loc(err["loc"])
    if err["type"] == "extra_forbidden":
        parent = _loc(err["loc"][:-1])
        key = str(err["loc"][-1])
        close = difflib.get_close_matches(key, known.get(parent, []), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{path}: unknown key '{key}'{hint}"
    return f"{path}: {err['msg']}"


def _known_keys(model: type[BaseModel], prefix: str, out: dict[str, list[str]]) -> None:
    out[prefix or "<root>"] = list(model.model_fields)
    for name, f in model.model_fields.items():
        ann = f.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            _known_keys(ann, f"{prefix}.{name}" if prefix else name, out)


def _format(e: ValidationError, model: type[BaseModel], prefix: str = "") -> list[str]:
    known: dict[str, list[str]] = {}
    _known_keys(model, "", known)
    lines = []
    for err in e.errors():
        err = dict(err)
        if prefix:
            err["loc"] = tuple(prefix.split(".")) + tuple(err["loc"])
            known = {f"{prefix}.{k}" if k != "<root>" else prefix: v for k, v in known.items()}
        lines.append(_describe(err, known))
    return lines


def parse_recipe(data: dict[str, Any], origin: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping, including every enabled stage's method params."""
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(f"{origin}: invalid recipe\n  " + "\n  ".join(_format(e, Recipe))) from None
    problems: list[str] = []
    for stage in METHOD_FAMILIES:
        cfg = recipe.stage(stage)
        if not cfg.enabled:
            continue
        try:
            reg = method_registry(stage)
            mod = reg.module(cfg.method)
            params_model = getattr(mod, "Params", None)
            if params_model is not None:
                params_model.model_validate(cfg.params)
            elif cfg.params:
                problems.append(f"stages.{stage}.params: method '{cfg.method}' takes no params")
        except RecipeError as e:
            problems.append(f"stages.{stage}.method: {e}")
        except ValidationError as e:
            problems.extend(_format(e, params_model, f"stages.{stage}.params"))
    if problems:
        raise RecipeError(f"{origin}: invalid recipe\n  " + "\n  ".join(problems))
    return recipe


def load_recipe(path: str | Path) -> Recipe:
    p = Path(path)
    if not p.is_file():
        raise RecipeError(f"recipe file not found: {p}")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise RecipeError(f"{p}: not valid YAML: {e}") from None
    return parse_recipe(data, str(p))
