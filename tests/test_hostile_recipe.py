"""Hostile recipes and data files (issue 18): each input fails fast as one user-facing error line."""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest
import yaml

from pqflow.cli import main
from pqflow.errors import RecipeError, SourceError
from pqflow.recipe import load_recipe, parse_recipe

from .conftest import RECIPES

ALIAS_BOMB = """\
a: &a [x, x, x, x, x, x, x, x, x, x]
b: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]
c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]
d: &d [*c, *c, *c, *c, *c, *c, *c, *c, *c, *c]
e: &e [*d, *d, *d, *d, *d, *d, *d, *d, *d, *d]
f: &f [*e, *e, *e, *e, *e, *e, *e, *e, *e, *e]
g: &g [*f, *f, *f, *f, *f, *f, *f, *f, *f, *f]
h: &h [*g, *g, *g, *g, *g, *g, *g, *g, *g, *g]
i: &i [*h, *h, *h, *h, *h, *h, *h, *h, *h, *h]
"""


def _tiny() -> dict:
    return yaml.safe_load((RECIPES / "tiny.yaml").read_text())


def _write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    p = tmp_path / name
    p.write_text(yaml.safe_dump(data))
    return p


def _one_line_cli_error(capsys, argv: list[str], progress: bool = False) -> str:
    """The error line of a failed CLI call; ``progress``: other ``[pqflow]`` lines may come first."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    if progress:
        lines = [ln for ln in lines if not ln.startswith("[pqflow] ")]
    assert len(lines) == 1, err
    assert lines[0].startswith("pqflow: error: ")
    return lines[0]


def _bomb_recipe(tmp_path: Path) -> Path:
    """tiny.yaml with a billion-laughs alias bomb in the (disabled) prune stage's params."""
    body = (RECIPES / "tiny.yaml").read_text()
    bomb = "\n".join("      " + ln for ln in ALIAS_BOMB.splitlines())
    body = body.replace("stages:\n", f"stages:\n  prune:\n    enabled: false\n    params:\n{bomb}\n", 1)
    p = tmp_path / "bomb.yaml"
    p.write_text(body)
    return p


# -- A. unbounded input ------------------------------------------------------------------------


def test_alias_bomb_in_disabled_stage_rejected_at_load(tmp_path: Path):
    """Attack: YAML alias bomb (billion laughs) inside a disabled stage's params."""
    p = _bomb_recipe(tmp_path)
    t0 = time.perf_counter()
    with pytest.raises(RecipeError, match="alias") as e:
        load_recipe(p)
    assert time.perf_counter() - t0 < 30
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_alias_bomb_cli_is_one_line(tmp_path: Path, capsys):
    """Attack: alias bomb given to `pqflow validate`."""
    line = _one_line_cli_error(capsys, ["validate", str(_bomb_recipe(tmp_path))])
    assert "alias" in line


def test_recursive_alias_rejected(tmp_path: Path):
    """Attack: a self-referencing YAML alias (a cyclic recipe that cannot be serialised)."""
    p = tmp_path / "cycle.yaml"
    body = (RECIPES / "tiny.yaml").read_text()
    p.write_text(body.replace("stages:\n", "stages:\n  prune:\n    params:\n      x: &d [*d]\n", 1))
    with pytest.raises(RecipeError, match="alias"):
        load_recipe(p)


def test_deeply_nested_yaml_is_one_recipe_error(tmp_path: Path):
    """Attack: YAML nested 100k levels deep (RecursionError in the YAML composer)."""
    p = tmp_path / "deep.yaml"
    p.write_text("name: x\ndescription: " + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(RecipeError, match="deep"):
        load_recipe(p)


def test_oversized_recipe_file_rejected(tmp_path: Path):
    """Attack: a multi-megabyte recipe file."""
    p = tmp_path / "big.yaml"
    p.write_text((RECIPES / "tiny.yaml").read_text() + "description: '" + "x" * (3 << 20) + "'\n")
    with pytest.raises(RecipeError, match="larger than"):
        load_recipe(p)


def test_non_utf8_recipe_and_directory_recipe(tmp_path: Path, capsys):
    """Attack: a recipe that is binary, and a recipe path that is a directory."""
    p = tmp_path / "bin.yaml"
    p.write_bytes(b"name: \xff\xfe\n")
    assert "UTF-8" in _one_line_cli_error(capsys, ["validate", str(p)])
    assert "directory" in _one_line_cli_error(capsys, ["validate", str(tmp_path)])


def test_huge_integer_literal_is_a_recipe_error(tmp_path: Path):
    """Attack: an integer literal with 10k digits (Python refuses to convert it)."""
    data = (RECIPES / "tiny.yaml").read_text().replace("n_windows: 8", "n_windows: " + "9" * 10_000)
    p = tmp_path / "digits.yaml"
    p.write_text(data)
    with pytest.raises(RecipeError):
        load_recipe(p)


def test_billion_windows_rejected_at_validate(tmp_path: Path, capsys):
    """Attack: n_windows: 1000000000 (allocated gigabytes before failing)."""
    data = _tiny()
    data["stages"]["calibrate"]["n_windows"] = 1_000_000_000
    with pytest.raises(RecipeError, match="stages.calibrate.n_windows"):
        parse_recipe(data)
    line = _one_line_cli_error(capsys, ["validate", str(_write(tmp_path, data))])
    assert "stages.calibrate.n_windows" in line


def test_window_token_product_is_bounded():
    """Attack: each count within its bound, their product (tokens held in memory) not."""
    data = _tiny()
    data["stages"]["calibrate"].update(n_windows=60_000, seqlen=100_000)
    with pytest.raises(RecipeError, match="stages.calibrate"):
        parse_recipe(data)


@pytest.mark.parametrize("stage,key,value", [
    ("evaluate", "seqlen", 10**12),
    ("evaluate", "batch_size", 10**9),
    ("bit_search", "heldout_windows", 10**9),
    ("bit_search", "cache_mb", 10**12),
    ("calibrate", "seed", -1),
])
def test_stage_counts_are_bounded(stage: str, key: str, value: int):
    """Attack: absurd counts/sizes in stage fields."""
    data = _tiny()
    data["stages"].setdefault(stage, {})[key] = value
    with pytest.raises(RecipeError, match=f"stages.{stage}.{key}"):
        parse_recipe(data)


def test_method_param_counts_are_bounded():
    """Attack: n_windows: 1e9 inside a method's params."""
    data = _tiny()
    data["stages"]["quantize"] = {"enabled": True, "method": "gptq", "params": {"n_windows": 10**9}}
    with pytest.raises(RecipeError, match="stages.quantize.params.n_windows"):
        parse_recipe(data)
    data["stages"]["quantize"] = {"enabled": True, "method": "mrem", "params": {"gptq": {"batch_size": 10**9}}}
    with pytest.raises(RecipeError, match="stages.quantize.params.gptq.batch_size"):
        parse_recipe(data)


def test_group_size_zero_rejected(capsys, tmp_path: Path):
    """Attack: group_size: 0 passed validate and failed later with a traceback."""
    data = _tiny()
    data["stages"]["quantize"] = {"enabled": True, "group_size": 0}
    with pytest.raises(RecipeError, match="stages.quantize.group_size"):
        parse_recipe(data)
    assert "stages.quantize.group_size" in _one_line_cli_error(capsys, ["validate", str(_write(tmp_path, data))])
    data["stages"]["quantize"] = {"group_size": -64}
    with pytest.raises(RecipeError, match="stages.quantize.group_size"):
        parse_recipe(data)
    data["stages"]["quantize"] = {"enabled": False}
    data["stages"]["finetune"] = {"enabled": True, "params": {"init": "loftq", "loftq_group_size": 0}}
    with pytest.raises(RecipeError, match="stages.finetune.params.loftq_group_size"):
        parse_recipe(data)


def test_non_finite_numbers_rejected():
    """Attack: .nan / .inf where a number is expected."""
    data = _tiny()
    data["tracking"] = {"gate": {"max_ppl_increase": float("inf")}}
    with pytest.raises(RecipeError, match="tracking.gate.max_ppl_increase"):
        parse_recipe(data)
    data = _tiny()
    data["stages"]["bit_search"] = {"params": {"alpha_range": [0.0, float("nan")]}, "method": "nevergrad-prior"}
    with pytest.raises(RecipeError, match="stages.bit_search.params.alpha_range"):
        parse_recipe(data)


def test_bad_params_in_disabled_stage_rejected(tmp_path: Path, capsys):
    """Attack: size limits skipped for a disabled stage's params (checked only when enabled)."""
    data = _tiny()
    data["stages"]["prune"] = {"enabled": False, "params": {"correct_windows": 10**9}}
    with pytest.raises(RecipeError, match="stages.prune.params.correct_windows"):
        parse_recipe(data)
    data["stages"]["prune"] = {"enabled": False, "params": {"no_such_knob": 1}}
    with pytest.raises(RecipeError, match="stages.prune.params.no_such_knob"):
        parse_recipe(data)
    data["stages"]["prune"] = {"enabled": False, "method": "no-such-method"}
    with pytest.raises(RecipeError, match="stages.prune.method"):
        parse_recipe(data)
    line = _one_line_cli_error(capsys, ["validate", str(_write(tmp_path, data))])
    assert "stages.prune.method" in line


def test_disabled_stages_with_defaults_still_validate():
    """Regression guard: disabling stages with their default method and params stays valid."""
    data = _tiny()
    for s in ("importance", "prune", "bit_search", "quantize", "finetune"):
        data["stages"][s] = {"enabled": False}
    parse_recipe(data)
    for path in RECIPES.glob("*.yaml"):
        load_recipe(path)


def test_overlong_strings_rejected():
    """Attack: a 100k-character run name (used as a folder name)."""
    data = _tiny()
    data["name"] = "a" * 100_000
    with pytest.raises(RecipeError, match="name"):
        parse_recipe(data)


# -- B. evaluation-leak guard -------------------------------------------------------------------


def _leak_recipe(cal: str, ev: str) -> dict:
    data = _tiny()
    data["stages"]["calibrate"]["data"] = {"source": cal}
    data["stages"]["evaluate"]["data"] = {"source": ev}
    return data


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    d = tmp_path / "d"
    d.mkdir()
    f = d / "f.txt"
    f.write_text("".join(f"line {i} of the evaluation text\n" for i in range(200)))
    return f


def test_leak_guard_dotdot_path(text_file: Path):
    """Attack: calibration on text:d/../d/f.txt while evaluating on text:d/f.txt."""
    dotdot = text_file.parent / ".." / text_file.parent.name / text_file.name
    with pytest.raises(RecipeError, match="evaluation") as e:
        parse_recipe(_leak_recipe(f"text:{dotdot}", f"text:{text_file}"))
    assert str(text_file) in str(e.value)


def test_leak_guard_dotdot_path_of_missing_file(tmp_path: Path):
    """Attack: the `../` spelling when the files do not exist yet (validate before the data is there)."""
    f = tmp_path / "later" / "f.txt"
    with pytest.raises(RecipeError, match="evaluation"):
        parse_recipe(_leak_recipe(f"text:{tmp_path}/later/../later/f.txt", f"text:{f}"))


def test_leak_guard_symlink(text_file: Path):
    """Attack: calibration on a symlink to the evaluation file."""
    link = text_file.parent / "link.txt"
    link.symlink_to(text_file)
    with pytest.raises(RecipeError, match="evaluation"):
        parse_recipe(_leak_recipe(f"text:{link}", f"text:{text_file}"))


def test_leak_guard_hardlink(text_file: Path):
    """Attack: calibration on a hard link to the evaluation file."""
    link = text_file.parent / "hard.txt"
    os.link(text_file, link)
    with pytest.raises(RecipeError, match="evaluation"):
        parse_recipe(_leak_recipe(f"text:{link}", f"text:{text_file}"))


def test_leak_guard_jsonl_vs_text_same_file(text_file: Path):
    """Attack: jsonl: and text: of the same file."""
    with pytest.raises(RecipeError, match="evaluation"):
        parse_recipe(_leak_recipe(f"jsonl:{text_file}", f"text:{text_file}"))


def test_leak_guard_copied_file(text_file: Path, tmp_path: Path):
    """Attack: calibration on a byte-identical copy of the evaluation file."""
    copy = tmp_path / "copy.txt"
    shutil.copyfile(text_file, copy)
    with pytest.raises(RecipeError, match="evaluation") as e:
        parse_recipe(_leak_recipe(f"text:{copy}", f"text:{text_file}"))
    assert str(copy) in str(e.value) and str(text_file) in str(e.value)


def test_leak_guard_wikitext_test_file(data_dir: Path):
    """Attack: calibration on text: of WikiText-2's own test file while evaluating on wikitext2."""
    test_raw = data_dir / "wikitext-2-raw" / "wiki.test.raw"
    with pytest.raises(RecipeError, match="evaluation"):
        parse_recipe(_leak_recipe(f"text:{test_raw}", "wikitext2"))


def test_leak_guard_finetune_data(text_file: Path, tmp_path: Path):
    """Attack: fine-tuning on (a copy of) the evaluation data."""
    copy = tmp_path / "copy.txt"
    shutil.copyfile(text_file, copy)
    data = _tiny()
    data["stages"]["evaluate"]["data"] = {"source": f"text:{text_file}"}
    data["stages"]["finetune"] = {"enabled": True, "data": {"source": f"jsonl:{copy}"}}
    with pytest.raises(RecipeError, match="stages.finetune.data"):
        parse_recipe(data)


def test_leak_guard_cli_is_one_line(text_file: Path, tmp_path: Path, capsys):
    """Attack: the `../` leak through `pqflow validate`."""
    dotdot = text_file.parent / ".." / text_file.parent.name / text_file.name
    line = _one_line_cli_error(capsys, ["validate", str(_write(tmp_path, _leak_recipe(f"text:{dotdot}",
                                                                                       f"text:{text_file}")))])
    assert "evaluation" in line


def test_distinct_files_still_accepted(text_file: Path, tmp_path: Path):
    """Regression guard: different local files for calibration and evaluation stay valid."""
    other = tmp_path / "other.txt"
    other.write_text("something else entirely\n" * 100)
    parse_recipe(_leak_recipe(f"text:{other}", f"text:{text_file}"))
    parse_recipe(_leak_recipe("wikitext2", "wikitext2"))


def test_leak_guard_at_load_time(text_file: Path, tmp_path: Path):
    """Attack: the calibration file is created as a copy of the evaluation file after validation."""
    from pqflow.stages import calibrate

    copy = tmp_path / "later.txt"
    recipe = parse_recipe(_leak_recipe(f"text:{copy}", f"text:{text_file}"))  # copy absent: valid
    shutil.copyfile(text_file, copy)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(SourceError, match="evaluation") as e:
        calibrate.run(recipe, {}, out)
    assert str(copy) in str(e.value) and "\n" not in str(e.value)
    assert list(out.iterdir()) == []


# -- C. data errors -----------------------------------------------------------------------------


def test_non_utf8_data_names_file_and_offset(tmp_path: Path):
    """Attack: a data file that is not UTF-8."""
    from pqflow.data import load_text

    p = tmp_path / "bin.txt"
    p.write_bytes(b"hello world\n" * 10 + b"\xff\xfe rest\n")
    with pytest.raises(SourceError) as e:
        load_text(f"text:{p}", "test")
    msg = str(e.value)
    assert str(p) in msg and "UTF-8" in msg and "120" in msg and "\n" not in msg


def test_directory_as_data_file(tmp_path: Path):
    """Attack: a directory given as a text: file (was reported as 'not found')."""
    from pqflow.data import load_text

    with pytest.raises(SourceError, match="directory") as e:
        load_text(f"jsonl:{tmp_path}", "test")
    assert "not found" not in str(e.value)


def test_device_as_data_file():
    """Attack: a character device (endless /dev/zero) given as a text: file."""
    from pqflow.data import load_text

    with pytest.raises(SourceError, match="regular file"):
        load_text("text:/dev/zero", "test")


def test_unreadable_data_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Attack: a data file without read permission."""
    from pqflow.data import load_text

    p = tmp_path / "secret.txt"
    p.write_text("text\n")
    real_open = open

    def deny(file, *args, **kwargs):
        if str(file) == str(p):
            raise PermissionError(13, "Permission denied", str(p))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr("builtins.open", deny)
    with pytest.raises(SourceError, match="Permission denied") as e:
        load_text(f"text:{p}", "test")
    assert str(p) in str(e.value) and "\n" not in str(e.value)


def test_empty_data_file_and_empty_split(tmp_path: Path):
    """Attack: an empty file, and a file too short to have a train split."""
    from pqflow.data import load_text

    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(SourceError, match="empty"):
        load_text(f"text:{empty}", "test")
    short = tmp_path / "short.txt"
    short.write_text("one line only\n")
    with pytest.raises(SourceError, match="train"):
        load_text(f"text:{short}", "train")


def test_data_errors_through_cli_are_one_line(tmp_path: Path, capsys):
    """Attack: non-UTF-8 calibration data through `pqflow stage calibrate`."""
    bad = tmp_path / "bin.txt"
    bad.write_bytes(b"\xff" * 100)
    data = _tiny()
    data["stages"]["calibrate"]["data"] = {"source": f"text:{bad}"}
    p = _write(tmp_path, data)
    line = _one_line_cli_error(capsys, ["stage", "calibrate", "--recipe", str(p), "--out", str(tmp_path / "o")],
                               progress=True)
    assert str(bad) in line and "UTF-8" in line


def test_deeply_nested_jsonl_line(tmp_path: Path):
    """Attack: a jsonl line nested 100k levels deep (RecursionError in the JSON decoder)."""
    from pqflow.data import load_text

    p = tmp_path / "deep.jsonl"
    p.write_text('{"text": "ok"}\n' + "[" * 100_000 + "]" * 100_000 + "\n")
    with pytest.raises(SourceError, match=r"deep.jsonl:2: not valid JSON"):
        load_text(f"jsonl:{p}", "test")


def test_bit_choice_group_is_bounded():
    """Attack: a bit choice with an absurd group size ('4g99999999999')."""
    data = _tiny()
    data["stages"]["bit_search"] = {"choices": ["4g64", "4g99999999999"]}
    with pytest.raises(RecipeError, match="stages.bit_search.choices"):
        parse_recipe(data)
