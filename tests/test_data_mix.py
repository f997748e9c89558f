"""Data mixtures, the built-in corpora and the raw layout of text files (issue 22)."""

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml

from pqflow import corpora
from pqflow.data import (
    check_recipe_data,
    eval_windows,
    interleave,
    load_text,
    mixture_eval_windows,
    mixture_windows,
    sample_windows,
    split_counts,
    tokenize,
)
from pqflow.errors import RecipeError, SourceError
from pqflow.recipe import DataPart, DataRef, parse_recipe
from pqflow.tiny import byte_tokenizer

from .conftest import RECIPES


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


@pytest.fixture
def two_files(tmp_path: Path) -> tuple[Path, Path]:
    """Two texts told apart by their characters: letters only, digits only."""
    letters, digits = tmp_path / "letters.txt", tmp_path / "digits.txt"
    letters.write_text("".join(f"abc def ghi line {'x' * (i % 7)}\n" for i in range(600)))
    digits.write_text("".join(f"0123 4567 89 {i % 10}\n" for i in range(600)))
    return letters, digits


def _mix(*parts: tuple[Path | str, float]) -> DataRef:
    return DataRef(mix=[DataPart(source=s if isinstance(s, str) else f"text:{s}", weight=w) for s, w in parts])


def _is_digits(tok, window: torch.Tensor) -> bool:
    text = tok.decode(window)
    return any(c.isdigit() for c in text) and not any(c in "abcdefghilnx" for c in text)


def _tiny() -> dict:
    return yaml.safe_load((RECIPES / "tiny.yaml").read_text())


# -- counts and order ---------------------------------------------------------------------------


def test_split_counts_largest_remainder():
    assert split_counts([1, 1], 7) == [4, 3]
    assert split_counts([3, 1], 40) == [30, 10]
    assert split_counts([0.2, 0.3, 0.5], 9) == [2, 3, 4]
    assert sum(split_counts([1] * 16, 5)) == 5


def test_interleave_prefixes_follow_the_counts():
    counts = [30, 7, 3]
    for seed in (None, 0, 5):
        order = interleave(counts, seed)
        assert [order.count(i) for i in range(3)] == counts
        for k in range(1, len(order) + 1):
            for i, c in enumerate(counts):
                assert abs(order[:k].count(i) - k * c / 40) < 1


def test_mixture_respects_weights_in_every_prefix(tok, two_files):
    letters, digits = two_files
    w = mixture_windows(tok, _mix((letters, 3), (digits, 1)), "train", 40, 16, seed=0)
    assert w.shape == (40, 16)
    kinds = [_is_digits(tok, row) for row in w]
    assert sum(kinds) == 10
    for k in range(1, 41):
        assert abs(sum(kinds[:k]) - k / 4) < 2


def test_mixture_is_seeded(tok, two_files):
    ref = _mix((two_files[0], 1), (two_files[1], 1))
    a, b = (mixture_windows(tok, ref, "train", 12, 16, seed=3) for _ in range(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, mixture_windows(tok, ref, "train", 12, 16, seed=4))


def test_single_source_is_todays_draw(tok, two_files):
    letters = two_files[0]
    ids = tokenize(tok, load_text(f"text:{letters}", "train"))
    ref = DataRef(source=f"text:{letters}")
    assert torch.equal(mixture_windows(tok, ref, "train", 9, 32, seed=5), sample_windows(ids, 9, 32, seed=5))
    held = tokenize(tok, load_text(f"text:{letters}", "heldout"))
    assert torch.equal(mixture_eval_windows(tok, ref, "heldout", 32, 4), eval_windows(held, 32, 4))
    assert torch.equal(mixture_eval_windows(tok, ref, "heldout", 32, None), eval_windows(held, 32))
    wiki = DataRef()
    wids = tokenize(tok, load_text("wikitext2", "train"))
    assert torch.equal(mixture_windows(tok, wiki, "train", 4, 64, seed=0), sample_windows(wids, 4, 64, seed=0))


def test_eval_mixture_windows_from_the_start_by_weight(tok, two_files):
    letters, digits = two_files
    w = mixture_eval_windows(tok, _mix((letters, 1), (digits, 1)), "test", 16, 10)
    kinds = [_is_digits(tok, row) for row in w]
    assert w.shape == (10, 16) and sum(kinds) == 5 and kinds[:2] in ([False, True], [True, False])
    letter_ids = tokenize(tok, letters.read_text())
    assert torch.equal(w[[i for i, k in enumerate(kinds) if not k]], eval_windows(letter_ids, 16, 5))
    # a part that runs out caps the total so that the weights still hold
    short = letters.parent / "short.txt"
    short.write_text("0123456789" * 8)  # 80 tokens: 5 windows of 16
    w = mixture_eval_windows(tok, _mix((letters, 1), (short, 1)), "test", 16, None)
    assert len(w) == 10 and sum(_is_digits(tok, r) for r in w) == 5


def test_a_too_short_part_is_named(tok, two_files, tmp_path: Path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("0123\n" * 20)
    with pytest.raises(SourceError, match=f"text:{tiny}"):
        mixture_windows(tok, _mix((two_files[0], 1), (tiny, 1)), "train", 8, 256, seed=0)


# -- layout of text files -----------------------------------------------------------------------


def test_raw_and_lines_layouts(tmp_path: Path):
    p = tmp_path / "doc.txt"
    text = "".join(f"para {i} line one\nline two\n\n" for i in range(50)) + "last line without newline"
    p.write_text(text)
    src = f"text:{p}"
    raw = {s: load_text(src, s) for s in ("train", "heldout", "test")}
    assert raw["test"] == text  # the file unchanged
    assert raw["train"] + raw["heldout"] == text  # cut at a line boundary, line breaks kept
    assert "\n\n" in raw["train"] and raw["train"].endswith("\n")
    n_lines = text.count("\n") + 1
    assert raw["train"].count("\n") == int(n_lines * 0.9)
    lines = load_text(src, "test", layout="lines")
    # the former layout, kept as `lines`: rows as the hub gives WikiText (a line keeps its "\n", a
    # blank line is ""), joined by blank lines
    assert lines.startswith("para 0 line one\n\n\nline two\n\n\n\n\npara 1 line one\n")
    assert load_text(src, "train", layout="lines").count("line two") == 45
    assert load_text(src, "test", layout="raw") == text


# -- recipes ------------------------------------------------------------------------------------


def test_recipe_mix_keys(tmp_path: Path):
    data = _tiny()
    data["stages"]["calibrate"]["data"] = {"mix": [{"source": "wikitext2", "weight": 2},
                                                   {"source": "python-docstrings"}]}
    r = parse_recipe(data)
    ref = r.stages.calibrate.data
    assert ref.label == "wikitext2:0.667+python-docstrings:0.333"
    assert [p.source for p in ref.parts()] == ["wikitext2", "python-docstrings"]
    assert DataRef().label == "wikitext2" and DataRef().parts() == [DataPart(source="wikitext2")]


@pytest.mark.parametrize("data, match", [
    ({"source": "text:/tmp/x.txt", "mix": [{"source": "wikitext2"}]}, "not both"),
    ({"layout": "lines", "mix": [{"source": "wikitext2"}]}, "not both"),
    ({"mix": [{"source": "wikitext2", "weight": 0}]}, r"mix\.0\.weight"),
    ({"mix": [{"source": "wikitext2", "weight": -1}]}, r"mix\.0\.weight"),
    ({"mix": [{"source": "wikitext2"}, {"source": "c4"}]}, r"mix\.1\.source.*python-docstrings"),
    ({"mix": [{"source": "wikitext2"}] * 17}, "at most 16"),
    ({"source": "c4"}, r"data\.source: .*must be 'wikitext2'"),
])
def test_recipe_data_errors(data: dict, match: str):
    recipe = _tiny()
    recipe["stages"]["calibrate"]["data"] = data
    with pytest.raises(RecipeError, match=match) as e:
        parse_recipe(recipe)
    assert "stages.calibrate.data" in str(e.value)


def test_infinite_weight_refused():
    recipe = _tiny()
    recipe["stages"]["calibrate"]["data"] = {"mix": [{"source": "wikitext2", "weight": float("inf")}]}
    with pytest.raises(RecipeError, match="finite"):
        parse_recipe(recipe)


def test_mixture_part_that_is_the_evaluation_file_is_refused(two_files, tmp_path: Path):
    letters, digits = two_files
    copy = tmp_path / "copy.txt"
    shutil.copyfile(letters, copy)
    data = _tiny()
    data["stages"]["calibrate"]["data"] = {"mix": [{"source": f"text:{digits}"}, {"source": f"jsonl:{copy}"}]}
    data["stages"]["evaluate"]["data"] = {"source": f"text:{letters}"}
    with pytest.raises(RecipeError, match="stages.calibrate.data.mix.1.source") as e:
        parse_recipe(data)
    assert "stages.evaluate.data.source" in str(e.value) and "different files" in str(e.value)
    data["stages"]["calibrate"]["data"] = {"mix": [{"source": f"text:{digits}"}]}
    data["stages"]["finetune"] = {"enabled": True, "data": {"source": f"text:{copy}"}}
    with pytest.raises(RecipeError, match="stages.finetune.data.source"):
        parse_recipe(data)


def test_python_reference_in_calibration_and_evaluation_is_refused():
    data = _tiny()
    data["stages"]["calibrate"]["data"] = {"mix": [{"source": "wikitext2"}, {"source": "python-reference"}]}
    data["stages"]["evaluate"]["data"] = {"source": "python-reference"}
    with pytest.raises(RecipeError, match="stages.calibrate.data.mix.1.source 'python-reference'"):
        parse_recipe(data)
    # the docstrings are disjoint from the reference: a valid pair
    data["stages"]["calibrate"]["data"] = {"mix": [{"source": "wikitext2"}, {"source": "python-docstrings"}]}
    recipe = parse_recipe(data)
    check_recipe_data(recipe)


def test_leak_found_again_at_load_time(two_files, tmp_path: Path):
    from pqflow.stages import calibrate

    letters, digits = two_files
    later = tmp_path / "later.txt"
    data = _tiny()
    data["stages"]["calibrate"]["data"] = {"mix": [{"source": f"text:{digits}"}, {"source": f"text:{later}"}]}
    data["stages"]["evaluate"]["data"] = {"source": f"text:{letters}"}
    recipe = parse_recipe(data)  # later.txt absent: valid
    shutil.copyfile(letters, later)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SourceError, match="mix.1.source") as e:
        calibrate.run(recipe, {}, out)
    assert str(later) in str(e.value) and "\n" not in str(e.value)


# -- built-in corpora ---------------------------------------------------------------------------


def test_builtin_corpora_are_deterministic_and_disjoint():
    ref, docs = corpora.python_reference(), corpora.python_docstrings()
    assert len(ref) > 100_000 and len(docs) > 100_000
    corpora.python_reference.cache_clear()
    corpora.python_docstrings.cache_clear()
    corpora.corpus_paragraphs.cache_clear()
    assert corpora.python_reference() == ref and corpora.python_docstrings() == docs
    paras = corpora.paragraphs(docs)
    assert len(paras) > 1000
    assert not [p for p in paras if p in ref]  # no docstring paragraph occurs in the reference text
    normal_ref = " ".join(ref.split())
    assert not [p for p in paras[::50] if " ".join(p.split()) in normal_ref]  # nor re-indented


def test_builtin_corpus_splits():
    for name in corpora.CORPORA:
        train, held, test = (load_text(name, s) for s in ("train", "heldout", "test"))
        assert test == corpora.corpus_text(name)
        assert train and held and held not in train
        assert 0.8 < len(train) / (len(train) + len(held)) < 0.97


# -- stages -------------------------------------------------------------------------------------


def test_calibrate_stage_on_a_two_part_mixture(tiny_recipe, tmp_path: Path, capsys):
    from pqflow.stages import bit_search, calibrate

    tiny_recipe.stages.calibrate.data = DataRef(mix=[DataPart(source="wikitext2", weight=3),
                                                     DataPart(source="python-docstrings", weight=1)])
    out = tmp_path / "cal"
    out.mkdir()
    summary = calibrate.run(tiny_recipe, {}, out)
    meta = json.loads((out / "calib.json").read_text())
    assert meta["source"] == "wikitext2:0.75+python-docstrings:0.25"
    assert [(p["source"], p["weight"], p["windows"]) for p in meta["mixture"]] == [
        ("wikitext2", 3, 6), ("python-docstrings", 1, 2)]
    assert all(p["split_tokens"] > 10_000 for p in meta["mixture"])
    assert summary["calib_split_tokens"] == meta["split_tokens"] == sum(p["split_tokens"] for p in meta["mixture"])
    assert "wikitext2:0.75+python-docstrings:0.25" in capsys.readouterr().err
    tok = byte_tokenizer()
    expected = mixture_windows(tok, tiny_recipe.stages.calibrate.data, "train", 8, 64, 0)
    from safetensors.torch import load_file

    assert torch.equal(load_file(out / "windows.safetensors")["input_ids"], expected)
    held = bit_search.heldout_windows(tiny_recipe, tok)
    assert held.shape == (8, 256)
    assert torch.equal(held, mixture_eval_windows(tok, tiny_recipe.stages.calibrate.data, "heldout", 256, 8))


def test_quantize_without_calib_draws_from_the_mixture(tiny_recipe, capsys):
    from pqflow.stages import quantize

    tiny_recipe.stages.calibrate.data = DataRef(mix=[DataPart(source="wikitext2"),
                                                     DataPart(source="python-docstrings")])
    tok = byte_tokenizer()
    w = quantize.calibration_windows(tiny_recipe, {}, tok)
    assert torch.equal(w, mixture_windows(tok, tiny_recipe.stages.calibrate.data, "train", 8, 64, 0))
    assert "wikitext2:0.5+python-docstrings:0.5" in capsys.readouterr().err


def test_leaks_checked_against_further_evaluation_datasets(tiny_recipe):
    """`stages.evaluate.datasets` (each with source/field/layout) counts as evaluation data too."""
    from types import SimpleNamespace

    from pqflow.data import check_recipe_unseen, evaluation_data, find_leaks

    tiny_recipe.stages.calibrate.data = DataRef(mix=[DataPart(source="wikitext2"),
                                                     DataPart(source="python-reference")])
    check_recipe_unseen(tiny_recipe)  # evaluated on wikitext2 only: fine
    extra = [SimpleNamespace(source="python-docstrings", field="text", layout="raw"),
             SimpleNamespace(source="python-reference", field="text", layout="raw")]
    ev = SimpleNamespace(data=tiny_recipe.stages.evaluate.data, datasets=extra)
    fake = SimpleNamespace(stages=SimpleNamespace(evaluate=ev, calibrate=tiny_recipe.stages.calibrate,
                                                  finetune=tiny_recipe.stages.finetune),
                           stage=lambda name: getattr(fake.stages, name))
    assert [k for k, _ in evaluation_data(fake)] == ["stages.evaluate.data", "stages.evaluate.datasets.0",
                                                      "stages.evaluate.datasets.1"]
    leaks = find_leaks("stages.calibrate.data", tiny_recipe.stages.calibrate.data, evaluation_data(fake))
    assert [(x.train_key, x.eval_key) for x in leaks] == [("stages.calibrate.data.mix.1.source",
                                                           "stages.evaluate.datasets.1.source")]
    with pytest.raises(SourceError, match="stages.evaluate.datasets.1.source 'python-reference'"):
        check_recipe_unseen(fake)
