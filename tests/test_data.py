import json
from pathlib import Path

import pytest
import torch

from pqflow.data import eval_windows, load_text, sample_windows, tokenize, wikitext2_rows
from pqflow.errors import SourceError
from pqflow.tiny import byte_tokenizer


def test_wikitext_rows_follow_hub_convention():
    rows = wikitext2_rows("test")
    assert len(rows) == 4358
    assert rows[0] == "" and rows[1] == " = Robert Boulter = \n"
    assert sum(1 for r in rows if r) == 2891


def test_splits_are_disjoint_and_test_is_separate():
    train, held, test = (load_text("wikitext2", s) for s in ("train", "heldout", "test"))
    assert train and held and test
    assert train[-2000:] not in held and held[:2000] not in train
    assert test[:5000] not in train and test[:5000] not in held
    assert " = Homarus gammarus = \n" in train[:50]


def test_sample_windows_is_seeded():
    ids = torch.arange(10_000)
    a, b = sample_windows(ids, 8, 64, seed=3), sample_windows(ids, 8, 64, seed=3)
    assert torch.equal(a, b) and a.shape == (8, 64)
    assert not torch.equal(a, sample_windows(ids, 8, 64, seed=4))
    assert torch.equal(a[:, 1:] - a[:, :-1], torch.ones(8, 63, dtype=a.dtype))  # contiguous windows


def test_eval_windows_drop_tail_and_cap():
    ids = torch.arange(1000)
    w = eval_windows(ids, 128)
    assert w.shape == (7, 128) and torch.equal(w.flatten(), ids[:896])
    assert eval_windows(ids, 128, max_windows=3).shape == (3, 128)
    with pytest.raises(SourceError):
        eval_windows(ids[:10], 128)


def test_text_and_jsonl_sources(tmp_path: Path):
    txt = tmp_path / "a.txt"
    txt.write_text("".join(f"line {i}\n" for i in range(100)))
    assert load_text(f"text:{txt}", "test").count("line") == 100
    assert load_text(f"text:{txt}", "train").count("line") == 90
    assert load_text(f"text:{txt}", "heldout").count("line") == 10
    js = tmp_path / "a.jsonl"
    js.write_text("\n".join(json.dumps({"body": f"doc {i}"}) for i in range(20)))
    assert load_text(f"jsonl:{js}", "test", field="body").count("doc") == 20
    with pytest.raises(SourceError, match="no field 'text'"):
        load_text(f"jsonl:{js}", "test")
    with pytest.raises(SourceError, match="not found"):
        load_text(f"text:{tmp_path / 'missing.txt'}", "test")


def test_byte_tokenizer_round_trip():
    tok = byte_tokenizer()
    text = " = Robert Boulter = \nnaïve café"
    ids = tokenize(tok, text)
    assert ids.max() < 256
    assert tok.decode(ids) == text
