"""calibrate -> evaluate through the stage runner and the CLI, locally and on S3."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pqflow.artifacts import open_artifact
from pqflow.calibration import Calibration, collect_stats
from pqflow.cli import main
from pqflow.perplexity import perplexity
from pqflow.runner import run_stage

from .conftest import RECIPES


def test_calibration_stats_match_manual(tiny):
    model, _ = tiny
    windows = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    stats, aliases = collect_stats(model, windows, batch_size=2, xtx=True, progress=False)
    # q/k/v and gate/up read the same tensor: one set of statistics each.
    assert aliases["model.layers.0.self_attn.k_proj"] == "model.layers.0.self_attn.q_proj"
    assert aliases["model.layers.0.mlp.up_proj"] == "model.layers.0.mlp.gate_proj"
    assert "model.layers.1.self_attn.q_proj" not in aliases
    seen = []
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    with torch.no_grad():
        model(input_ids=windows)
    h.remove()
    x = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    name = "model.layers.1.mlp.down_proj"
    torch.testing.assert_close(stats[f"{name}.sqnorm"], (x * x).sum(0), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(stats[f"{name}.xtx"], x.T @ x / x.shape[0], rtol=1e-4, atol=1e-5)


def test_perplexity_matches_direct_loss(tiny):
    model, _ = tiny
    windows = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(1))
    res = perplexity(model, windows, batch_size=2, progress=False)
    with torch.no_grad():
        losses = [model(input_ids=w[None], labels=w[None]).loss for w in windows]
    assert math.isclose(res.ppl, math.exp(float(torch.stack(losses).mean())), rel_tol=1e-5)


def test_calibrate_then_evaluate_local(tiny_recipe, tmp_path: Path):
    cal = run_stage("calibrate", tiny_recipe, {}, f"file://{tmp_path}/cal")
    art = open_artifact(cal.uri)
    c = Calibration(art.path, json.loads((art.path / "calib.json").read_text()))
    assert c.windows.shape == (8, 64)
    assert c.act_norm("model.layers.0.self_attn.v_proj").shape == (128,)
    assert cal.manifest["stage"] == "calibrate" and "windows.safetensors" in cal.manifest["files"]

    ev = run_stage("evaluate", tiny_recipe, {}, str(tmp_path / "eval"))
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["ppl"] > 1 and m["eval_windows"] == 8 and m["model_bytes"] > 0
    assert ev.summary["ppl"] == m["ppl"]

    again = run_stage("calibrate", tiny_recipe, {}, f"file://{tmp_path}/cal")
    assert again.skipped
    tiny_recipe.stages.calibrate.seed = 7
    changed = run_stage("calibrate", tiny_recipe, {}, f"file://{tmp_path}/cal")
    assert not changed.skipped
    assert not torch.equal(load_file(tmp_path / "cal" / "windows.safetensors")["input_ids"], c.windows)


def test_failed_stage_leaves_nothing(tiny_recipe, tmp_path: Path, monkeypatch):
    import pqflow.stages.evaluate as ev

    def boom(*a, **k):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr(ev, "perplexity", boom)
    with pytest.raises(RuntimeError):
        run_stage("evaluate", tiny_recipe, {}, str(tmp_path / "eval"))
    assert list(tmp_path.iterdir()) == []


def test_evaluate_model_artifact_input(tiny_recipe, tmp_path: Path, tiny):
    from pqflow.artifacts import build_manifest, publish, staging_dir
    from pqflow.models import save_model

    model, tok = tiny
    uri = str(tmp_path / "model")
    work = staging_dir(uri)
    save_model(model, tok, work)
    publish(work, uri, build_manifest(work, stage="test", params={}, inputs={}, fingerprint="x"))
    out = run_stage("evaluate", tiny_recipe, {"model": uri}, str(tmp_path / "eval"))
    direct = run_stage("evaluate", tiny_recipe, {}, str(tmp_path / "eval2"))
    assert math.isclose(out.summary["ppl"], direct.summary["ppl"], rel_tol=1e-5)
    assert out.manifest["inputs"]["model"]["uri"] == uri


def test_cli_stage_chain_on_s3(s3_env, capsys):
    import boto3

    boto3.client("s3").create_bucket(Bucket="pq-stages")
    recipe = str(RECIPES / "tiny.yaml")
    assert main(["stage", "calibrate", "--recipe", recipe, "--out", "s3://pq-stages/t/cal"]) == 0
    assert main(["stage", "evaluate", "--recipe", recipe, "--out", "s3://pq-stages/t/eval"]) == 0
    out = capsys.readouterr().out
    assert '"ppl"' in out
    art = open_artifact("s3://pq-stages/t/eval")
    assert json.loads((art.path / "metrics.json").read_text())["eval_tokens"] == 8 * 64
    assert main(["stage", "evaluate", "--recipe", recipe, "--in", "calib=s3://pq-stages/t/nothing",
                 "--out", "s3://pq-stages/t/e2"]) != 0
    assert "unknown" in capsys.readouterr().err


def test_cli_missing_input_artifact(tmp_path: Path, capsys):
    rc = main(["stage", "evaluate", "--recipe", str(RECIPES / "tiny.yaml"),
               "--in", f"model={tmp_path}/absent", "--out", str(tmp_path / "e")])
    assert rc != 0
    err = capsys.readouterr().err
    assert "absent" in err and "manifest.json" in err
    assert not (tmp_path / "e").exists()
