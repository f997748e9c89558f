"""The recipe: one YAML file that says what to compress, how, and where results go.

It is validated completely (schema, then every method's own ``params``) before any model is
loaded, and every error names the dotted path of the offending field.
"""

from __future__ import annotations

import difflib
import importlib
import math
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pqflow.errors import RecipeError

STAGE_ORDER = ("calibrate", "importance", "prune", "bit_search", "quantize", "finetune", "export", "evaluate")

# Stage -> module holding its method family's REGISTRY (stages without methods are absent).
METHOD_FAMILIES = {
    "importance": "pqflow.methods.importance",
    "prune": "pqflow.methods.prune",
    "bit_search": "pqflow.methods.bitsearch",
    "quantize": "pqflow.methods.quant",
    "finetune": "pqflow.methods.tuning",
}


# Limits. Every count and size a recipe can set is bounded, so absurd values fail in `validate`
# instead of allocating memory first; real use (70B models, 4096-token windows, a few thousand
# windows) stays well inside them. Method ``Params`` use the same constants.
MAX_RECIPE_BYTES = 1 << 20  # a recipe file; real ones are a few KiB
MAX_DEPTH = 32  # nesting levels of the recipe document; real ones use about 6
MAX_VALUES = 100_000  # scalars + containers after YAML alias expansion; real recipes hold a few hundred
MAX_WINDOWS = 65_536  # token windows of any kind (calibration, held-out, validation)
MAX_SEQLEN = 131_072  # tokens per window (128k-context models)
MAX_TOKENS = 1 << 25  # windows x seqlen held in memory at once: 256 MiB of int64 ids
MAX_BATCH = 4_096  # windows per forward pass
MAX_GROUP = 65_536  # input columns per quantization group
MAX_STEPS = 10_000_000  # optimizer steps
MAX_TRIALS = 100_000  # measured allocations of a bit search
MAX_LAYERS = 1_024  # decoder layers
MAX_RANK = 8_192  # adapter rank (at most the hidden size)
MAX_WORKERS = 256  # parallel processes
MAX_THREADS = 1_024  # torch threads
MAX_SEED = 2**32 - 1  # numpy's seed range
MAX_NAME = 128  # characters of names that become folders, MLflow names or labels
MAX_PATH = 4_096  # characters of a path or URI


def check_tokens(windows: int, seqlen: int, what: str) -> None:
    """Bound ``windows x seqlen`` (tokens held at once); a model validator's ValueError."""
    if windows * seqlen > MAX_TOKENS:
        raise ValueError(f"{what} = {windows * seqlen} tokens, more than the {MAX_TOKENS} allowed")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class Resources(Strict):
    """Kubernetes resources of a stage's container (used by the KFP pipeline only)."""

    cpu: str = Field("2", max_length=MAX_NAME, description="CPU request, Kubernetes quantity")
    memory: str = Field("8G", max_length=MAX_NAME, description="memory request and limit, Kubernetes quantity")
    gpu: int = Field(0, ge=0, le=64, description="GPUs (nvidia.com/gpu) per stage container")
    gpu_type: str | None = Field(None, max_length=MAX_NAME, description="accelerator node label value, e.g. nvidia-tesla-a100")
    node_selector: dict[str, str] = Field(default_factory=dict, max_length=64, description="extra node selector labels")


class ModelRef(Strict):
    source: str = Field(max_length=MAX_PATH, description="smollm2-135m | tiny-<family> (tiny-llama, tiny-qwen3, ...) | hf:<id or local path>")
    dtype: Literal["float32", "bfloat16", "float16"] = Field("float32", description="dtype the model is loaded and computed in")
    name: str | None = Field(None, max_length=MAX_NAME, description="registered model name; defaults to the recipe name")

    @field_validator("source")
    @classmethod
    def _known_source(cls, v: str) -> str:
        from pqflow.architectures import FAMILIES  # every supported family has a tiny model

        if v == "smollm2-135m" or v.startswith("hf:") or v.removeprefix("tiny-") in FAMILIES:
            return v
        raise ValueError(f"must be 'smollm2-135m', 'hf:<id or local path>' or a tiny model "
                         f"({', '.join('tiny-' + f for f in FAMILIES)})")


DATA_SOURCES = "wikitext2 | python-docstrings | python-reference | text:<path> | jsonl:<path>"
MAX_PARTS = 16  # sources of one data mixture
LAYOUT_HELP = ("text: files: raw = the file as it reads (train/heldout cut at a line), lines = blank lines "
               "dropped and lines separated by blank lines")


def _check_data_source(v: str) -> str:
    from pqflow.corpora import CORPORA  # light: the corpora are built only when read

    if v == "wikitext2" or v in CORPORA or v.startswith(("text:", "jsonl:")):
        return v
    raise ValueError("must be 'wikitext2', 'python-docstrings', 'python-reference', 'text:<path>' or 'jsonl:<path>'")


class DataPart(Strict):
    """One weighted source of a data mixture."""

    source: str = Field(max_length=MAX_PATH, description=DATA_SOURCES)
    field: str = Field("text", max_length=MAX_NAME, description="field holding the text, for jsonl sources")
    layout: Literal["raw", "lines"] = Field("raw", description=LAYOUT_HELP)
    weight: float = Field(1.0, gt=0, le=1e6, description="share of the windows, relative to the other parts")

    @field_validator("source")
    @classmethod
    def _known_data(cls, v: str) -> str:
        return _check_data_source(v)


class DataRef(Strict):
    source: str = Field("wikitext2", max_length=MAX_PATH, description=DATA_SOURCES)
    field: str = Field("text", max_length=MAX_NAME, description="field holding the text, for jsonl sources")
    layout: Literal["raw", "lines"] = Field("raw", description=LAYOUT_HELP)
    mix: list[DataPart] = Field(default_factory=list, max_length=MAX_PARTS, description=(
        "a weighted mixture replacing source/field/layout: a list of {source, field, layout, weight}, weight "
        "relative, > 0 (default 1); windows are split between the parts by weight"))

    @field_validator("source")
    @classmethod
    def _known_data(cls, v: str) -> str:
        return _check_data_source(v)

    @model_validator(mode="after")
    def _mix_or_source(self) -> DataRef:
        defaults = type(self).model_fields
        set_too = [k for k in ("source", "field", "layout") if getattr(self, k) != defaults[k].default]
        if self.mix and set_too:
            raise ValueError(f"give either source/field/layout or mix, not both ({', '.join(set_too)} set beside "
                             "mix); each mix part has its own source, field, layout and weight")
        return self

    def parts(self) -> list[DataPart]:
        """The mixture's parts; a single source is one part of weight 1."""
        return list(self.mix) or [DataPart(source=self.source, field=self.field, layout=self.layout)]

    @property
    def label(self) -> str:
        """'wikitext2', or the parts with their shares: 'wikitext2:0.5+python-docstrings:0.5'."""
        if not self.mix:
            return self.source
        total = math.fsum(p.weight for p in self.mix)
        return "+".join(f"{p.source}:{p.weight / total:.3g}" for p in self.mix)


DEVICE_PATTERN = r"^(auto|cpu|cuda(:[0-9]{1,2})?)$"


class StageBase(Strict):
    enabled: bool = Field(True, description="a disabled stage is skipped and produces nothing")
    resources: Resources = Field(default_factory=Resources)
    device: str = Field("auto", pattern=DEVICE_PATTERN, description="where the stage computes: auto (CUDA when "
                        "present), cpu or cuda[:n]; on Kubeflow a CUDA device needs resources.gpu")
    dtype: Literal["float32", "bfloat16", "float16"] | None = Field(
        None, description="compute dtype of the stage; null = the model's (model.dtype)")

    @model_validator(mode="after")
    def _device_matches_resources(self) -> StageBase:
        # The pod must request the GPU the stage computes on, and not hold one it never uses.
        if self.device.startswith("cuda") and self.resources.gpu == 0:
            raise ValueError(f"device '{self.device}' needs resources.gpu >= 1 (the stage's container must "
                             f"request the GPU it runs on)")
        if self.device == "cpu" and self.resources.gpu > 0:
            raise ValueError(f"device 'cpu' with resources.gpu = {self.resources.gpu}: the stage would hold "
                             f"GPUs it never uses (use device: auto or cuda)")
        return self

    @property
    def active(self) -> bool:
        """Whether the stage is in the plan (stages with nothing to do override this)."""
        return self.enabled


class MethodStage(StageBase):
    method: str
    params: dict[str, Any] = Field(default_factory=dict, description="the method's own settings (see Methods)")


class CalibrateStage(StageBase):
    data: DataRef = Field(default_factory=DataRef)
    n_windows: int = Field(128, ge=1, le=MAX_WINDOWS, description="random calibration windows drawn from the "
                           f"train split; n_windows × seqlen at most {MAX_TOKENS:,} tokens")
    seqlen: int = Field(512, ge=8, le=MAX_SEQLEN, description="tokens per calibration window")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the window draw")
    collect_xtx: bool = Field(False, description="accumulate X^T X per linear (GPTQ, reformation)")
    batch_size: int = Field(4, ge=1, le=MAX_BATCH, description="windows per forward pass")

    @model_validator(mode="after")
    def _token_budget(self) -> CalibrateStage:
        check_tokens(self.n_windows, self.seqlen, "n_windows x seqlen")
        return self


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
    budget_bytes: int | None = Field(None, gt=0, le=1 << 50, description="budget as total bytes of the quantized linears")
    granularity: Literal["layer", "linear"] = Field("linear", description="one precision per decoder layer or per linear")
    choices: list[str] = Field(
        default_factory=lambda: ["2g64", "3g64", "3g128", "4g64", "4g128", "8g128"],
        max_length=64,
        description="precisions to choose from: '<bits>g<group>', '<bits>pc' (per row) or '16' (keep in fp16)")
    symmetric: bool = Field(False, description="symmetric grids (no zero points), as the quantize stage will use")
    target: Literal["any", "vllm", "llama.cpp"] = Field(
        "any", description="the engine that will serve the model: only the choices its kernels take are searched "
        "and the linears it fuses (vllm: q/k/v, gate/up) share one scheme, so the allocation always exports")
    objective: Literal["kl", "nll"] = Field("kl", description="measured on held-out tokens: KL to the full model's logits, or NLL")
    heldout_windows: int = Field(8, ge=1, le=MAX_WINDOWS, description="held-out windows the objective is measured "
                                 f"on; heldout_windows × heldout_seqlen at most {MAX_TOKENS:,} tokens")
    heldout_seqlen: int = Field(256, ge=8, le=MAX_SEQLEN, description="tokens per held-out window")
    seed: int = Field(0, ge=0, le=MAX_SEED, description="seed of the search (and of the mutual-information clustering)")
    cache_mb: int = Field(2000, ge=0, le=1 << 20,
                          description="memory for cached quantized codes of every (module, choice) tried (MiB)")

    @model_validator(mode="after")
    def _token_budget(self) -> BitSearchStage:
        check_tokens(self.heldout_windows, self.heldout_seqlen, "heldout_windows x heldout_seqlen")
        return self

    @model_validator(mode="after")
    def _target_runs_a_choice(self) -> BitSearchStage:
        from pqflow.methods.bitsearch.space import parse_choice
        from pqflow.methods.bitsearch.targets import TARGETS

        allowed, refused = TARGETS[self.target].allowed([parse_choice(c) for c in self.choices], self.symmetric)
        if not allowed:
            why = "; ".join(f"{c}: {w}" for c, w in refused.items())
            raise ValueError(_short(f"target {self.target} runs none of the choices ({why})", 400))
        return self

    @field_validator("choices")
    @classmethod
    def _valid_choices(cls, v: list[str]) -> list[str]:
        from pqflow.methods.bitsearch.space import parse_choice

        if not v:
            raise ValueError("at least one bit choice is needed")
        for c in v:
            try:
                choice = parse_choice(c)
            except Exception as e:  # noqa: BLE001 - reported as this field's validation error
                raise ValueError(_short(str(e), 200)) from None
            if choice.group_size is not None and choice.group_size > MAX_GROUP:
                raise ValueError(f"bit choice '{_short(c)}': group size above {MAX_GROUP}")
        return v


class QuantizeStage(MethodStage):
    enabled: bool = Field(False, description="a disabled stage is skipped and produces nothing")
    method: str = Field("rtn", description="quantization method")
    bits: Literal[2, 3, 4, 8] = Field(4, description="default bits of every quantized linear")
    group_size: int | None = Field(64, ge=1, le=MAX_GROUP, description="input columns per scale; null = per output channel")
    symmetric: bool = Field(False, description="symmetric codes (no zero point)")
    embedding_bits: Literal[2, 3, 4, 8] | None = Field(
        None, description="bits of the input embedding (round-to-nearest); null = kept in fp16")
    lm_head_bits: Literal[2, 3, 4, 8] | None = Field(
        None, description="bits of the output head; a tied head always follows embedding_bits")


class FinetuneStage(MethodStage):
    enabled: bool = Field(False, description="a disabled stage is skipped and produces nothing")
    method: str = Field("lora", description="recovery fine-tuning method")
    data: DataRef = Field(default_factory=DataRef, description="train split for training, heldout split for validation")

    @field_validator("data")
    @classmethod
    def _one_source(cls, v: DataRef) -> DataRef:
        # The training loop samples windows from one token stream; weighted sampling across
        # parts is not written yet, and silently tuning on `source` alone would be wrong.
        if v.mix:
            raise ValueError("fine-tuning on a mixture is not supported yet: give data.source (one text)")
        return v
    verify_reload: bool = Field(True, description="reload the written artifact and compare its logits with the tuned model's")
    reload_tolerance: float = Field(1e-3, ge=0, le=1e6, description="largest allowed absolute logit difference on reload")


class ExportStage(StageBase):
    """Exports of the final model (the one ``evaluate`` registers) in formats other engines load."""

    enabled: bool = Field(True, description="export runs when enabled and `formats` is not empty")
    formats: list[str] = Field(default_factory=list, max_length=16,
                               description="export formats (see `pqflow export --help`); empty = no export")
    fallback: Literal["error", "widen", "requant"] = Field(
        "error", description="a layer the format cannot hold exactly: fail, widen it losslessly, or requantize (lossy)")
    dtype: Literal["float16", "bfloat16", "float32"] = Field("float16", description="dtype of the float tensors")
    uneven: Literal["error", "pad", "native"] = Field(
        "error", description="layers pruned to different widths: fail, zero-pad to the widest layer (pad), or "
        "native: a per-layer-width architecture where the format has one (gguf: deci), padding elsewhere")

    @property
    def active(self) -> bool:
        return self.enabled and bool(self.formats)

    @field_validator("formats")
    @classmethod
    def _known_formats(cls, v: list[str]) -> list[str]:
        from pqflow.export import FORMATS  # the registry of export formats; importing it loads no format

        unknown = [f for f in v if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown export format '{_short(unknown[0])}' (known: {', '.join(sorted(FORMATS))})")
        dupes = sorted({f for f in v if v.count(f) > 1})
        if dupes:
            raise ValueError(f"export format '{_short(dupes[0])}' is listed twice")
        return v


class EvalDataset(Strict):
    """A further test text: its perplexity is reported as ``ppl_<name>`` beside the primary ``ppl``."""

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_]{0,39}$", description="metric suffix: ppl_<name> (lowercase, digits, _)")
    source: str = Field(max_length=MAX_PATH, description=DATA_SOURCES)
    field: str = Field("text", max_length=MAX_NAME, description="field holding the text, for jsonl sources")
    layout: Literal["raw", "lines"] = Field("raw", description=LAYOUT_HELP)

    @field_validator("source")
    @classmethod
    def _known_data(cls, v: str) -> str:
        return _check_data_source(v)

    def parts(self) -> list[DataPart]:
        return [DataPart(source=self.source, field=self.field, layout=self.layout)]


class EvaluateStage(StageBase):
    data: DataRef = Field(default_factory=DataRef, description="the primary test text: metric ppl (and the gate's "
                          "max_ppl_increase)")
    datasets: list[EvalDataset] = Field(default_factory=list, max_length=8, description=(
        "further test texts of other domains, scored with the same protocol: a list of {name, source, field, "
        "layout}; each reports ppl_<name>"))
    seqlen: int = Field(512, ge=8, le=MAX_SEQLEN, description="tokens per evaluation window")
    max_windows: int | None = Field(40, ge=1, le=1_000_000, description="cap on evaluated windows; null = all")
    batch_size: int = Field(4, ge=1, le=MAX_BATCH, description="windows per forward pass")

    @field_validator("data")
    @classmethod
    def _one_text(cls, v: DataRef) -> DataRef:
        if v.mix:
            raise ValueError("evaluation scores one text per dataset, not a mixture: give data.source, and the "
                             "other texts as datasets (each reports its own ppl_<name>)")
        return v

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, v: list[EvalDataset]) -> list[EvalDataset]:
        names = [d.name for d in v]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"dataset name '{dupes[0]}' is used twice")
        return v


class Stages(Strict):
    calibrate: CalibrateStage = Field(default_factory=CalibrateStage)
    importance: ImportanceStage = Field(default_factory=ImportanceStage)
    prune: PruneStage = Field(default_factory=PruneStage)
    bit_search: BitSearchStage = Field(default_factory=BitSearchStage)
    quantize: QuantizeStage = Field(default_factory=QuantizeStage)
    finetune: FinetuneStage = Field(default_factory=FinetuneStage)
    export: ExportStage = Field(default_factory=ExportStage)
    evaluate: EvaluateStage = Field(default_factory=EvaluateStage)


class Storage(Strict):
    root: str = Field("file://./pqflow-artifacts", max_length=MAX_PATH, description="file:// path or s3://bucket/prefix")


class DatasetLimit(Strict):
    max_ppl_increase: float = Field(ge=0, le=1e6, description="allowed ppl_<name> rise over the baseline's, fraction")


class QualityGate(Strict):
    max_ppl_increase: float | None = Field(None, ge=0, le=1e6, description="allowed ppl rise over the baseline, fraction")
    max_bytes: int | None = Field(None, gt=0, le=1 << 50, description="largest allowed model weight bytes on disk")
    datasets: dict[str, DatasetLimit] = Field(default_factory=dict, max_length=8, description=(
        "limits per further test text, by its name in stages.evaluate.datasets: {name: {max_ppl_increase}}"))


class Tracking(Strict):
    mlflow_uri: str | None = Field(None, max_length=MAX_PATH, description="tracking server; null = embedded server")
    experiment: str = Field("pqflow", max_length=MAX_NAME, description="MLflow experiment name")
    gate: QualityGate = Field(default_factory=QualityGate)


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$", max_length=MAX_NAME, description="run name; artifacts go under storage.root/<name>/")
    description: str = Field("", max_length=10_000, description="free text, logged with the run")
    model: ModelRef
    stages: Stages = Field(default_factory=Stages)
    storage: Storage = Field(default_factory=Storage)
    tracking: Tracking = Field(default_factory=Tracking)

    @model_validator(mode="after")
    def _gate_datasets_exist(self) -> Recipe:
        known = {d.name for d in self.stages.evaluate.datasets}
        for name in self.tracking.gate.datasets:
            if name not in known:
                raise ValueError(f"tracking.gate.datasets: '{_short(name)}' is not a dataset of stages.evaluate.datasets "
                                 f"({', '.join(sorted(known)) or 'none defined'})")
        return self

    def stage(self, name: str) -> StageBase:
        return getattr(self.stages, name)

    def enabled_stages(self) -> list[str]:
        return [s for s in STAGE_ORDER if self.stage(s).active]

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


MAX_PROBLEMS = 20  # problems listed in one error; the rest are counted


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 3] + "..."


def _loc(loc: tuple[Any, ...]) -> str:
    return ".".join(_short(str(p)) for p in loc) or "<root>"


def _describe(err: dict[str, Any], known: dict[str, list[str]]) -> str:
    path = _loc(err["loc"])
    if err["type"] == "extra_forbidden":
        parent = _loc(err["loc"][:-1])
        key = str(err["loc"][-1])
        close = difflib.get_close_matches(key, known.get(parent, []), n=1) if len(key) <= 100 else []
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{path}: unknown key '{_short(key)}'{hint}"
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
    if prefix:
        known = {f"{prefix}.{k}" if k != "<root>" else prefix: v for k, v in known.items()}
    lines = []
    for err in e.errors():
        err = dict(err)
        if prefix:
            err["loc"] = tuple(prefix.split(".")) + tuple(err["loc"])
        lines.append(_describe(err, known))
    return lines


def _invalid(origin: str, problems: list[str]) -> RecipeError:
    """One problem is one line (what the CLI prints); several are listed one per line. The list
    itself is kept as the error's ``problems``, for callers that sort them."""
    if len(problems) == 1:
        err = RecipeError(f"{origin}: invalid recipe: {problems[0]}")
    else:
        shown = problems[:MAX_PROBLEMS]
        more = [f"... and {len(problems) - len(shown)} more"] if len(problems) > len(shown) else []
        err = RecipeError(f"{origin}: invalid recipe\n  " + "\n  ".join(shown + more))
    err.problems = list(problems)
    return err


def _check_shape(data: Any, origin: str) -> None:
    """Bound the size and depth of an already parsed recipe and refuse NaN/infinity anywhere.

    Iterative and counting visits, so a mapping full of shared references (a YAML alias bomb
    loaded by another route, or a cycle) is refused after MAX_VALUES steps, never expanded.
    """
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    seen = 0
    while stack:
        value, path, depth = stack.pop()
        seen += 1
        if seen > MAX_VALUES:
            raise RecipeError(f"{origin}: the recipe has more than {MAX_VALUES} values (repeated YAML aliases "
                              "or a cyclic structure?)")
        if depth > MAX_DEPTH:
            raise RecipeError(f"{origin}: {path or '<root>'}: nested more than {MAX_DEPTH} levels deep")
        if isinstance(value, float) and not math.isfinite(value):
            raise _invalid(origin, [f"{path or '<root>'}: must be a finite number, got {value}"])
        if isinstance(value, dict):
            stack.extend((v, f"{path}.{_short(str(k))}" if path else _short(str(k)), depth + 1)
                         for k, v in value.items())
        elif isinstance(value, list | tuple):
            stack.extend((v, f"{path}.{i}", depth + 1) for i, v in enumerate(value))


def _method_problems(recipe: Recipe, stage: str) -> list[str]:
    """Problems of ``stage``'s method and params. A disabled stage is checked too (its params may
    still be serialised and logged), except that its default method with no params needs no import."""
    cfg = recipe.stage(stage)
    assert isinstance(cfg, MethodStage)
    default = type(cfg).model_fields["method"].default
    if not cfg.enabled and not cfg.params and cfg.method == default:
        return []
    params_model = None
    try:
        reg = method_registry(stage)
        mod = reg.module(cfg.method)
        params_model = getattr(mod, "Params", None)
        if params_model is not None:
            params_model.model_validate(cfg.params)
        elif cfg.params:
            return [f"stages.{stage}.params: method '{cfg.method}' takes no params"]
    except RecipeError as e:
        return [f"stages.{stage}.method: {e}"]
    except ValidationError as e:
        return _format(e, params_model, f"stages.{stage}.params")
    return []


def _leak_problems(recipe: Recipe) -> list[str]:
    """Training data (calibration, fine-tuning) that is the evaluation data, any part of one against
    any part of the other (``evaluate.data`` and ``evaluate.datasets``): same resolved path, same
    inode, identical bytes, or one built-in corpus. Files that do not exist yet are checked again
    when loaded."""
    from pqflow.data import evaluation_data, find_leaks

    readers = {
        "calibrate": any(recipe.stage(s).enabled for s in ("calibrate", "bit_search", "quantize")),
        "finetune": recipe.stages.finetune.enabled,
    }
    evaluation = evaluation_data(recipe)
    problems = []
    for stage, used in readers.items():
        if used:
            problems += [leak.message() for leak in find_leaks(f"stages.{stage}.data", recipe.stage(stage).data, evaluation)]
    return problems


def parse_recipe(data: dict[str, Any], origin: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping, including every stage's method params and the data sources'
    separation from the evaluation data."""
    _check_shape(data, origin)
    if not isinstance(data, dict):
        raise RecipeError(f"{origin}: a recipe is a YAML mapping, got {type(data).__name__}")
    try:
        recipe = Recipe.model_validate(data)
    except ValidationError as e:
        raise _invalid(origin, _format(e, Recipe)) from None
    problems: list[str] = []
    for stage in METHOD_FAMILIES:
        problems += _method_problems(recipe, stage)
    problems += _leak_problems(recipe)
    if problems:
        raise _invalid(origin, problems)
    return recipe


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that stops composing past MAX_DEPTH levels: PyYAML's composer recurses once per
    level, so a deeply nested document would otherwise end in a RecursionError."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise yaml.MarkedYAMLError(problem=f"nested more than {MAX_DEPTH} levels deep",
                                           problem_mark=self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _expanded_size(root: yaml.Node) -> int:
    """Values the document holds once every alias is expanded to a copy (what serialising it
    produces), computed per node once, so an alias bomb costs its size in the file, not 10^9."""
    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node: yaml.Node, depth: int) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in active:
            raise RecipeError("a YAML alias refers to a node that contains it (a cycle)")
        if depth > MAX_DEPTH:
            raise RecipeError(f"YAML aliases nest the recipe more than {MAX_DEPTH} levels deep")
        active.add(key)
        children = node.value if isinstance(node, yaml.SequenceNode) else (
            [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else [])
        total = 1
        for child in children:
            total += size(child, depth + 1)
            if total > MAX_VALUES:
                raise RecipeError(f"YAML aliases expand the recipe to more than {MAX_VALUES} values")
        active.discard(key)
        sizes[key] = total
        return total

    return size(root, 0)


def _yaml_message(e: yaml.YAMLError) -> str:
    if isinstance(e, yaml.MarkedYAMLError):
        mark = e.problem_mark or e.context_mark
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        return "; ".join(_short(x, 200) for x in (e.context, e.problem) if x) + where
    return _short(" ".join(str(e).split()), 300)


def _read_recipe_text(p: Path) -> str:
    if p.is_dir():
        raise RecipeError(f"recipe path is a directory, not a file: {p}")
    if not p.is_file():
        raise RecipeError(f"recipe file not found: {p}")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"cannot read recipe {p}: {e.strerror or e}") from None
    if len(raw) > MAX_RECIPE_BYTES:
        raise RecipeError(f"{p}: recipe file larger than {MAX_RECIPE_BYTES} bytes")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise RecipeError(f"{p}: not UTF-8 text (byte 0x{raw[e.start]:02x} at offset {e.start})") from None


def load_yaml(text: str, origin: str) -> Any:
    """Parse recipe YAML safely: bounded nesting, bounded alias expansion, no Python objects."""
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node)
        return loader.construct_document(node)
    except yaml.YAMLError as e:
        raise RecipeError(f"{origin}: not valid YAML: {_yaml_message(e)}") from None
    except RecipeError as e:
        raise RecipeError(f"{origin}: {e}") from None
    except ValueError as e:  # e.g. an integer literal past Python's digit limit
        raise RecipeError(f"{origin}: not valid YAML: {_short(str(e), 200)}") from None
    finally:
        loader.dispose()


def read_recipe_data(path: str | Path) -> Any:
    """The recipe file's YAML document, read and parsed within the limits (not yet validated)."""
    p = Path(path)
    return load_yaml(_read_recipe_text(p), str(p))


def load_recipe(path: str | Path) -> Recipe:
    return parse_recipe(read_recipe_data(path), str(path))
