"""Hostile model folders: loaders read only safetensors + JSON, never run a model's code, verify
pqflow artifacts reached through ``hf:`` and refuse absurd configs before allocating."""

from __future__ import annotations

import json
import os
import pty
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pqflow.artifacts import build_manifest, open_artifact, publish, staging_dir
from pqflow.errors import ArtifactError, SourceError
from pqflow.models import load_model_artifact, load_source, save_model, weight_bytes

HUGE = {"hidden_size": 10**6, "intermediate_size": 10**6, "num_hidden_layers": 1000,
        "num_attention_heads": 1000, "num_key_value_heads": 1000, "head_dim": 1000}
# Fits in memory (~100 M params) but not in the ~2 MB of weights the tiny model stores.
INFLATED = {"hidden_size": 1024, "intermediate_size": 4096, "num_hidden_layers": 8,
            "num_attention_heads": 8, "num_key_value_heads": 8, "head_dim": 128}


def _publish(work: Path, dest: Path) -> Path:
    publish(work, str(dest), build_manifest(work, stage="test", params={}, inputs={}, fingerprint="fp"))
    return dest


def _artifact(tiny, tmp_path: Path, edit=None, name: str = "art", **save_kw) -> Path:
    model, tok = tiny
    dest = tmp_path / name
    work = staging_dir(str(dest))
    save_model(model, tok, work, **save_kw)
    if edit is not None:
        edit(work)
    return _publish(work, dest)


def _plain(tiny, folder: Path) -> Path:
    model, tok = tiny
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def _to_pickle(folder: Path) -> None:
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    torch.save(state, folder / "pytorch_model.bin")


def _edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    cfg.update(changes)
    (folder / "config.json").write_text(json.dumps(cfg))


def _pruned(tiny):
    """The tiny model with layer 1's MLP cut to 192 channels: uneven layers, format pqflow-pruned."""
    from pqflow.methods.prune.surgery import sync_config

    model, tok = tiny
    mlp = model.model.layers[1].mlp
    for nm in ("gate_proj", "up_proj"):
        new = nn.Linear(128, 192, bias=False)
        new.weight.data = getattr(mlp, nm).weight.data[:192].clone()
        setattr(mlp, nm, new)
    down = nn.Linear(192, 128, bias=False)
    down.weight.data = mlp.down_proj.weight.data[:, :192].clone()
    mlp.down_proj = down
    assert not sync_config(model)
    return model, tok


# -- pickle ------------------------------------------------------------------------------------

def test_pickle_only_artifact_is_rejected(tiny, tmp_path: Path):
    """Attack: a verified artifact whose only weights are a pickle pytorch_model.bin."""
    art = _artifact(tiny, tmp_path, _to_pickle)
    with pytest.raises(SourceError, match=r"pytorch_model\.bin.*safetensors"):
        load_model_artifact(open_artifact(str(art)).path)
    with pytest.raises(SourceError, match=r"pytorch_model\.bin.*safetensors"):
        load_source(f"hf:{art}")


def test_pickle_only_hf_folder_is_rejected(tiny, tmp_path: Path):
    """Attack: a plain hf: folder whose only weights are a pickle pytorch_model.bin."""
    folder = _plain(tiny, tmp_path / "plain")
    _to_pickle(folder)
    with pytest.raises(SourceError, match=r"pytorch_model\.bin.*safetensors"):
        load_source(f"hf:{folder}")


# -- remote code -------------------------------------------------------------------------------

_EVIL_CONFIG = """\
import os, pathlib
pathlib.Path(os.environ["PQFLOW_EVIL_MARK"]).write_text("custom code ran")
from transformers import LlamaConfig


class EvilConfig(LlamaConfig):
    model_type = "pqflow-evil"
"""
_EVIL_MODEL = """\
import os, pathlib
pathlib.Path(os.environ["PQFLOW_EVIL_MARK"]).write_text("custom code ran")
from transformers import LlamaForCausalLM
from .configuration_evil import EvilConfig


class EvilForCausalLM(LlamaForCausalLM):
    config_class = EvilConfig
"""


def _make_evil(folder: Path) -> None:
    (folder / "configuration_evil.py").write_text(_EVIL_CONFIG)
    (folder / "modeling_evil.py").write_text(_EVIL_MODEL)
    _edit_config(folder, model_type="pqflow-evil", architectures=["EvilForCausalLM"],
                 auto_map={"AutoConfig": "configuration_evil.EvilConfig",
                           "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"})


_EVIL_TOKENIZER = """\
import os, pathlib
pathlib.Path(os.environ["PQFLOW_EVIL_MARK"]).write_text("custom code ran")
from transformers import PreTrainedTokenizerFast


class EvilTokenizer(PreTrainedTokenizerFast):
    pass
"""


def _make_evil_tokenizer(folder: Path) -> None:
    (folder / "tokenization_evil.py").write_text(_EVIL_TOKENIZER)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.update(tokenizer_class="EvilTokenizer", auto_map={"AutoTokenizer": [None, "tokenization_evil.EvilTokenizer"]})
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))


def _evil_env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1",
            "PQFLOW_EVIL_MARK": str(tmp_path / "mark")}


@pytest.mark.parametrize("where,stdin", [("config", "pipe-yes"), ("config", "tty-yes"), ("config", "closed"),
                                         ("tokenizer", "pipe-yes")])
def test_remote_code_is_refused_without_prompting(tiny, tmp_path: Path, where: str, stdin: str):
    """Attack: a hf: folder whose config.json (or tokenizer_config.json) has auto_map to its own code, 'y' typed."""
    folder = _plain(tiny, tmp_path / "evil")
    (_make_evil if where == "config" else _make_evil_tokenizer)(folder)
    code = "import sys; from pqflow.models import load_source; load_source('hf:' + sys.argv[1])"
    cmd = [sys.executable, "-c", code, str(folder)]
    env = _evil_env(tmp_path)
    if stdin == "tty-yes":
        master, slave = pty.openpty()
        os.write(master, b"y\n")
        proc = subprocess.Popen(cmd, stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        os.close(slave)
        try:
            out, err = proc.communicate(timeout=120)
        finally:
            os.close(master)
        rc = proc.returncode
    else:
        r = subprocess.run(cmd, input="y\n" if stdin == "pipe-yes" else None,
                           stdin=subprocess.DEVNULL if stdin == "closed" else None,
                           capture_output=True, text=True, env=env, timeout=120)
        out, err, rc = r.stdout, r.stderr, r.returncode
    assert not (tmp_path / "mark").exists(), "the model's custom code was executed"
    assert rc != 0
    assert "Do you wish to run" not in out + err
    assert "SourceError" in err and "custom code" in err


def test_remote_code_in_artifact_is_refused(tiny, tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Attack: a verified hf-format artifact whose config.json asks for its own modeling code."""
    monkeypatch.setenv("PQFLOW_EVIL_MARK", str(tmp_path / "mark"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    art = _artifact(tiny, tmp_path, _make_evil)
    with pytest.raises(SourceError, match="custom code"):
        load_model_artifact(open_artifact(str(art)).path)
    assert not (tmp_path / "mark").exists()


# -- hf: on pqflow artifact folders --------------------------------------------------------------

def test_hf_source_on_tampered_artifact_is_rejected(tiny, tmp_path: Path):
    """Attack: hf:<pqflow artifact> whose listed weights were changed after publishing."""
    art = _artifact(tiny, tmp_path)
    weights = art / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"model\.safetensors is corrupted"):
        load_source(f"hf:{art}")


def test_hf_source_on_artifact_without_manifest_is_rejected(tiny, tmp_path: Path):
    """Attack: hf:<folder with pqflow_model.json but no manifest.json> skipping verification."""
    model, tok = tiny
    folder = save_model(model, tok, tmp_path / "m")
    with pytest.raises(SourceError, match="not a verified pqflow artifact"):
        load_source(f"hf:{folder}")


def test_hf_source_on_verified_artifact_and_plain_folder_still_load(tiny, tmp_path: Path):
    """Attack: none (the defences must keep verified artifacts and plain safetensors folders loading)."""
    model, _ = tiny
    ids = torch.arange(12)[None]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    for src in (_artifact(tiny, tmp_path), _plain(tiny, tmp_path / "plain")):
        with torch.no_grad():
            assert torch.equal(load_source(f"hf:{src}").model(input_ids=ids).logits, ref)


# -- absurd configs ------------------------------------------------------------------------------

def _save_quant(model, tok, out):
    from pqflow.quant.model import save_quantized

    return save_quantized(model, tok, out)


def _huge_target(kind: str, tiny, tmp_path: Path, dims: dict):
    """(callable that loads it) for a folder of the given kind whose config.json carries ``dims``."""
    if kind == "plain":
        folder = _plain(tiny, tmp_path / "plain")
        _edit_config(folder, **dims)
        return lambda: load_source(f"hf:{folder}")
    if kind == "pqflow-pruned":
        tiny = _pruned(tiny)
        kw = {"fmt": "pqflow-pruned"}
    elif kind == "pqflow-quant":
        kw = {"fmt": "pqflow-quant", "saver": _save_quant}
    else:
        kw = {}
    art = _artifact(tiny, tmp_path, lambda w: _edit_config(w, **dims), **kw)
    return lambda: load_source(f"hf:{art}")


@pytest.mark.parametrize("kind", ["plain", "hf", "pqflow-pruned", "pqflow-quant"])
def test_huge_dims_config_is_rejected_before_allocating(tiny, tmp_path: Path, kind: str):
    """Attack: config.json claiming hidden_size 10**6 x 1000 layers (petabytes) to exhaust memory."""
    load = _huge_target(kind, tiny, tmp_path, HUGE)
    rss = psutil.Process().memory_info().rss
    t0 = time.monotonic()
    with pytest.raises(SourceError, match=r"hidden_size=1000000.*num_hidden_layers=1000.*memory"):
        load()
    assert time.monotonic() - t0 < 60
    assert psutil.Process().memory_info().rss - rss < 2**30


@pytest.mark.parametrize("kind", ["hf", "pqflow-pruned", "pqflow-quant"])
def test_config_inconsistent_with_weight_bytes_is_rejected(tiny, tmp_path: Path, kind: str):
    """Attack: artifact config.json claiming ~100 M params beside ~2 MB of weights (memory that fits)."""
    load = _huge_target(kind, tiny, tmp_path, INFLATED)
    with pytest.raises(SourceError, match=r"hidden_size=1024.*weight files"):
        load()


@pytest.mark.parametrize("field,value", [("hidden_size", -128), ("hidden_size", 2**21),
                                         ("num_hidden_layers", 0), ("vocab_size", "320")])
def test_absurd_dims_are_rejected(tiny, tmp_path: Path, field: str, value):
    """Attack: config.json with non-positive, non-integer or absurd dimensions."""
    folder = _plain(tiny, tmp_path / "plain")
    _edit_config(folder, **{field: value})
    with pytest.raises(SourceError, match=field):
        load_source(f"hf:{folder}")


# -- unlisted files ----------------------------------------------------------------------------

def test_unlisted_safetensors_is_not_read_by_pruned_loader(tiny, tmp_path: Path):
    """Attack: an extra unlisted *.safetensors dropped into a published pruned artifact to override weights."""
    from pqflow.methods.prune.format import load_pruned_folder

    model, tok = _pruned(tiny)
    art = _artifact((model, tok), tmp_path, fmt="pqflow-pruned")
    listed = weight_bytes(art)
    ref = model.model.embed_tokens.weight.detach().clone()
    save_file({"model.embed_tokens.weight": torch.zeros_like(ref)}, str(art / "zz-override.safetensors"))
    loaded = load_pruned_folder(art, json.loads((art / "pqflow_model.json").read_text()))
    assert torch.equal(loaded.model.model.embed_tokens.weight, ref)
    assert weight_bytes(art) == listed


# -- LoRA adapters -----------------------------------------------------------------------------

def _lora_artifact(tiny, tmp_path: Path, adapter: str, pickle_adapter: bool = False) -> Path:
    from peft import LoraConfig, get_peft_model

    from pqflow.methods.tuning.format import save_adapter

    model, tok = tiny
    base_meta = {"format": "hf"}

    def saver(m, t, out):
        m.save_pretrained(out)
        t.save_pretrained(out)
        peft_model = get_peft_model(m, LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights=False))
        where = out / adapter
        save_adapter(peft_model, where)
        if pickle_adapter:
            f = where / "adapter_model.safetensors"
            torch.save(load_file(f), where / "adapter_model.bin")
            f.unlink()
        return {"base": base_meta, "adapter": adapter, "merged": False}

    dest = tmp_path / "lora"
    work = staging_dir(str(dest))
    save_model(model, tok, work, fmt="pqflow-lora", saver=saver)
    return _publish(work, dest)


def test_lora_adapter_path_escaping_the_artifact_is_rejected(tiny, tmp_path: Path):
    """Attack: pqflow_model.json's 'adapter' pointing outside the verified folder (../)."""
    art = _lora_artifact(tiny, tmp_path, "adapter")
    outside = tmp_path / "outside"
    (art / "adapter").rename(outside)  # an unverified adapter beside the artifact
    meta = json.loads((art / "pqflow_model.json").read_text())
    meta["adapter"] = "../outside"
    from pqflow.methods.tuning.format import load_lora_folder

    with pytest.raises(SourceError, match="adapter"):
        load_lora_folder(art, meta)


def test_pickle_lora_adapter_is_rejected(tiny, tmp_path: Path):
    """Attack: a LoRA artifact whose adapter weights are a pickle adapter_model.bin."""
    art = _lora_artifact(tiny, tmp_path, "adapter", pickle_adapter=True)
    with pytest.raises(SourceError, match=r"adapter_model\.safetensors"):
        load_model_artifact(open_artifact(str(art)).path)
