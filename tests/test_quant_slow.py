"""The real SmolLM2-135M: RTN reproduces the reference numbers; bytes on disk shrink (slow)."""

from pathlib import Path

import pytest
import torch

from pqflow.data import eval_windows, load_text, tokenize
from pqflow.methods.quant import rtn
from pqflow.methods.quant.plan import resolve_plan
from pqflow.models import load_model_artifact, load_source, save_model
from pqflow.perplexity import perplexity
from pqflow.quant.model import FORMAT, save_quantized
from pqflow.quant.report import folder_tensor_sizes, module_bytes

pytestmark = pytest.mark.slow


def test_rtn_4bit_g64_on_smollm2(tmp_path: Path):
    src = load_source("smollm2-135m")
    model, tok = src.model, src.tokenizer
    plan = resolve_plan(model, 4, 64, False)
    fp16_bytes = sum(model.get_submodule(n).weight.numel() * 2 for n in plan)
    rtn.quantize(model, None, plan, rtn.Params())
    out = save_model(model, tok, tmp_path / "q", fmt=FORMAT, saver=save_quantized)
    q_bytes = module_bytes(folder_tensor_sizes(out), list(plan))
    assert q_bytes <= 0.32 * fp16_bytes
    windows = eval_windows(tokenize(tok, load_text("wikitext2", "test")), 512, 40)
    res = perplexity(model, windows, 4)
    assert abs(res.ppl - 38.80) < 0.1, res.ppl
    again = load_model_artifact(out).model
    with torch.no_grad():
        assert torch.equal(again(input_ids=windows[:1]).logits, model(input_ids=windows[:1]).logits)
