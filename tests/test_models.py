import subprocess
import sys
from pathlib import Path

import pytest
import torch

from pqflow.errors import SourceError
from pqflow.models import load_model_artifact, load_source, save_model, weight_bytes


def test_tiny_llama_is_seeded_and_gqa(tiny):
    model, _ = tiny
    again, _ = load_source("tiny-llama").model, None
    for a, b in zip(model.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert model.config.num_key_value_heads < model.config.num_attention_heads


def test_save_reload_in_fresh_process(tiny, tmp_path: Path):
    model, tok = tiny
    save_model(model, tok, tmp_path / "m")
    assert weight_bytes(tmp_path / "m") > 0
    ids = torch.arange(20)[None]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    torch.save(ref, tmp_path / "ref.pt")
    code = (
        "import torch,sys; from pqflow.models import load_model_artifact;"
        "m=load_model_artifact(sys.argv[1]).model; ref=torch.load(sys.argv[2], weights_only=True);"
        "out=m(input_ids=torch.arange(20)[None]).logits; assert torch.equal(out, ref), (out-ref).abs().max()"
    )
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "m"), str(tmp_path / "ref.pt")], check=True)
    assert load_model_artifact(tmp_path / "m").model.config.hidden_size == model.config.hidden_size


def test_unknown_sources_fail_clearly(tmp_path: Path):
    with pytest.raises(SourceError):
        load_model_artifact(tmp_path)
    with pytest.raises(SourceError, match="cannot load model"):
        load_source(f"hf:{tmp_path}/nothing-here")


@pytest.mark.slow
def test_smollm2_perplexity_reference():
    """The reference number of DESIGN.md: 29.19 on 40 x 512 WikiText-2 test windows."""
    from pqflow.data import eval_windows, load_text, tokenize
    from pqflow.perplexity import perplexity

    lm = load_source("smollm2-135m")
    assert lm.model.config.num_hidden_layers == 30
    windows = eval_windows(tokenize(lm.tokenizer, load_text("wikitext2", "test")), 512, 40)
    ppl = perplexity(lm.model, windows).ppl
    assert abs(ppl - 29.19) / 29.19 < 0.01
