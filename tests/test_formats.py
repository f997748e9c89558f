"""The model-format registry (pqflow.formats): every format round-trips on the tiny Llama, old
bitsandbytes artifacts labelled pqflow-quant still load, unknown names fail in one line, and the
format layer never imports a method."""

import ast
import json
from pathlib import Path

import pytest
import torch
from torch import nn

from pqflow import architectures as arch
from pqflow import formats
from pqflow.errors import SourceError
from pqflow.models import MODEL_META, load_model_artifact

FORMATS_DIR = Path(formats.__file__).parent
IDS = torch.arange(48).remainder(250).view(2, 24)


def _down_type(model: nn.Module) -> str:
    return type(arch.projections(arch.decoder_layers(model)[0])["down"].module).__name__


def _logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def _hf(tiny, out: Path) -> nn.Module:
    model, tok = tiny
    formats.save_model(model, tok, out, "hf")
    return model


def _packed(tiny, out: Path) -> nn.Module:
    from pqflow.methods.quant import rtn
    from pqflow.methods.quant.plan import resolve_plan

    model, tok = tiny
    rtn.quantize(model, None, resolve_plan(model, 4, 64, False), rtn.Params())
    formats.save_model(model, tok, out, "pqflow-quant", method="rtn")
    return model  # saving rounds the float remainder in memory too: logits stay comparable


def _bnb_model(tiny) -> nn.Module:
    pytest.importorskip("bitsandbytes")
    from pqflow.methods.quant import bnb
    from pqflow.methods.quant.plan import resolve_plan

    model, _ = tiny
    return bnb.convert(model, resolve_plan(model, 8, None, True), "int8")


def _bnb(tiny, out: Path) -> nn.Module:
    model = _bnb_model(tiny)
    formats.save_model(model, tiny[1], out, "pqflow-bnb", method="bnb-int8")
    return model


def _pruned(tiny, out: Path) -> nn.Module:
    from .test_hostile import _pruned as uneven_mlp  # layer 1's MLP cut to 192 channels

    model, tok = uneven_mlp(tiny)
    formats.save_model(model, tok, out, "pqflow-pruned")
    return model


def _lora(tiny, out: Path) -> nn.Module:
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    model, tok = tiny
    formats.get("hf").save(model, tok, out)  # the frozen base first, as the lora method does
    q = arch.projections(arch.decoder_layers(model)[0])["q"].name.rsplit(".", 1)[-1]
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=[q], init_lora_weights=False))
    formats.save_model(peft_model, tok, out, "pqflow-lora", base={"format": "hf"}, method="lora")
    return peft_model


BUILDERS = {"hf": _hf, "pqflow-quant": _packed, "pqflow-bnb": _bnb, "pqflow-pruned": _pruned, "pqflow-lora": _lora}


def test_every_registered_format_has_a_round_trip_test():
    assert sorted(BUILDERS) == formats.names()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_format_round_trip(tiny, tmp_path: Path, name: str):
    out = tmp_path / name
    model = BUILDERS[name](tiny, out)
    meta = json.loads((out / MODEL_META).read_text())
    assert meta["format"] == name == formats.get(name).NAME
    ref = _logits(model)
    again = load_model_artifact(out).model
    assert not again.training
    assert torch.equal(_logits(again), ref)


def test_old_bitsandbytes_artifact_labelled_packed_still_loads(tiny, tmp_path: Path):
    """Before pqflow-bnb existed, bitsandbytes models were saved as pqflow-quant + backend."""
    model = _bnb(tiny, tmp_path / "m")
    meta_path = tmp_path / "m" / MODEL_META
    meta = json.loads(meta_path.read_text())
    meta_path.write_text(json.dumps({**meta, "format": "pqflow-quant", "backend": "bitsandbytes"}))
    again = load_model_artifact(tmp_path / "m").model
    assert _down_type(again) == "Linear8bitLt"
    assert torch.equal(_logits(again), _logits(model))


def test_quantize_stage_writes_the_format_its_method_names(tiny_recipe, tmp_path: Path):
    from pqflow.methods.quant import bnb_int8
    from pqflow.runner import run_stage

    r = tiny_recipe
    r.stages.quantize.enabled = True
    r.stages.quantize.method = "bnb-int8"
    run_stage("quantize", r, {}, f"file://{tmp_path}/q")
    meta = json.loads((tmp_path / "q" / MODEL_META).read_text())
    assert meta["format"] == bnb_int8.FORMAT == "pqflow-bnb" and "backend" not in meta
    assert _down_type(load_model_artifact(tmp_path / "q").model) == "Linear8bitLt"


def test_unknown_format_is_one_line(tiny, tmp_path: Path):
    _hf(tiny, tmp_path / "m")
    (tmp_path / "m" / MODEL_META).write_text(json.dumps({"format": "pqflow-nope"}))
    with pytest.raises(SourceError) as err:
        load_model_artifact(tmp_path / "m")
    msg = str(err.value)
    assert "\n" not in msg and "unknown model format 'pqflow-nope'" in msg
    assert all(n in msg for n in formats.names())
    with pytest.raises(SourceError, match="unknown model format 'nope'"):
        formats.save_model(*tiny, tmp_path / "x", "nope")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("meta", ["[1, 2]", '{"format": 3}'])
def test_malformed_model_meta_is_one_line(tiny, tmp_path: Path, meta: str):
    _hf(tiny, tmp_path / "m")
    (tmp_path / "m" / MODEL_META).write_text(meta)
    with pytest.raises(SourceError):
        load_model_artifact(tmp_path / "m")


def test_lora_without_base_meta_is_refused(tiny, tmp_path: Path):
    _hf(tiny, tmp_path / "m")
    (tmp_path / "m" / MODEL_META).write_text(json.dumps({"format": "pqflow-lora", "merged": True}))
    with pytest.raises(SourceError, match="base"):
        load_model_artifact(tmp_path / "m")


def _imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):  # function-level imports included
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names.update(f"{node.module}.{a.name}" for a in node.names)
    return names


def test_format_layer_never_imports_methods_or_stages():
    files = sorted(FORMATS_DIR.glob("*.py"))
    assert {p.stem for p in files} >= {"__init__", "hf", "packed", "bitsandbytes", "pruned", "lora"}
    upward = {p.name: sorted(n for n in _imports(p) if n.startswith(("pqflow.methods", "pqflow.stages")))
              for p in files}
    assert not any(upward.values()), upward
