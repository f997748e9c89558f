"""`gguf` export: pqflow's codes written as Q4_1/Q4_0/Q8_0 blocks read back bit for bit with
gguf-py, the fallbacks, the width checks, and (when llama-cpp-python is installed) the exported
file scored in llama.cpp on the same windows as pqflow."""

from __future__ import annotations

import importlib.util
import math
import re
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pqflow.artifacts import build_manifest, open_artifact, publish, staging_dir
from pqflow.data import eval_windows, load_text, tokenize
from pqflow.export import FORMATS, ExportError, ExportOptions, export_artifact
from pqflow.export import gguf as gx
from pqflow.methods.prune.surgery import SHAPES_KEY
from pqflow.methods.quant import rtn
from pqflow.methods.quant.plan import LinearSpec, resolve_plan
from pqflow.models import load_model_artifact, save_model
from pqflow.perplexity import perplexity
from pqflow.quant.linear import QuantLinear
from pqflow.quant.model import FORMAT, quantize_embeddings, save_quantized
from pqflow.tiny import tiny_llama

from .test_export import BLOCKS, linear_name

# layers given a scheme the format cannot hold exactly, and why each is interesting
ODD = {
    linear_name(0, "q"): LinearSpec(3, 32, False),  # 3-bit asym: widen -> Q8_0
    linear_name(0, "up"): LinearSpec(2, None, False),  # 2-bit per channel: widen -> Q8_0
    linear_name(1, "v"): LinearSpec(3, 64, True),  # 3-bit sym: widen -> Q4_0
    linear_name(1, "o"): LinearSpec(4, 16, False),  # groups of 16: no 32-blocks
    linear_name(2, "down"): LinearSpec(8, None, False),  # 8-bit asym: code - zero past int8
}
# exact schemes beside the default 4-bit g64 asymmetric (Q4_1)
EXACT = {
    linear_name(1, "q"): LinearSpec(4, 32, True),  # Q4_0
    linear_name(0, "k"): LinearSpec(4, None, False),  # per channel -> Q4_1
    linear_name(2, "up"): LinearSpec(8, 32, True),  # Q8_0
    linear_name(3, "down"): LinearSpec(8, None, True),  # per channel -> Q8_0
}


def test_gguf_is_registered():
    assert FORMATS["gguf"] == "gguf"


def _publish(model, tok, uri: Path, **save_kw) -> Path:
    work = staging_dir(str(uri))
    save_model(model, tok, work, **save_kw)
    publish(work, str(uri), build_manifest(work, stage="quantize", params={}, inputs={}, fingerprint="t"))
    return uri


def _quantized(tiny, tmp_path: Path, group_size: int = 64, overrides: dict | None = None,
               embed_bits: int | None = None) -> Path:
    model, tok = tiny
    plan = resolve_plan(model, 4, group_size, False)
    plan.update(overrides or {})
    rtn.quantize(model, None, plan, rtn.Params())
    if embed_bits:
        quantize_embeddings(model, embed_bits, None, 64, False)
    return _publish(model, tok, tmp_path / "quant", fmt=FORMAT, saver=save_quantized)


def _export(src: Path, tmp_path: Path, fallback: str = "error", dtype: str = "float16",
            name: str = "gguf", uneven: str = "error") -> tuple[Path, dict]:
    out = tmp_path / name
    summary = export_artifact(str(src), "gguf", str(out), ExportOptions(fallback=fallback, dtype=dtype,
                                                                         uneven=uneven))
    return out / gx.GGUF_NAME, summary


def _gguf_name(hf_name: str) -> str:
    # gguf-py's own name map, as llama.cpp's converter names the tensors (4 blocks: the tiny model)
    return gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 4).get_name(f"{hf_name}.weight", try_suffixes=(".weight",))


def _perm(hf_name: str, hp: gx.HParams) -> np.ndarray | None:
    role = {linear_name(i, r): r for i in range(hp.n_layers) for r in ("q", "k")}.get(hf_name)
    if role == "q":
        return gx.rope_permutation(hp.n_heads * hp.head_dim, hp.n_heads)
    if role == "k":
        return gx.rope_permutation(hp.n_kv_heads * hp.head_dim, hp.n_kv_heads)
    return None


def _compare_all(src: Path, path: Path) -> dict[str, tuple[str, float]]:
    """Every packed layer of the artifact against the GGUF tensor gguf-py dequantizes from the
    file: Q4_0/Q8_0/widened types must be equal, Q4_1 within half an fp16 ulp of scale*zero."""
    model = load_model_artifact(src).model
    hp = gx.hparams(model)
    tensors = {t.name: t for t in gguf.GGUFReader(path).tensors}
    seen = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, QuantLinear):
            continue
        t = tensors[_gguf_name(name)]
        ours = mod.dequantize(torch.float32).detach().numpy()
        perm = _perm(name, hp)
        if perm is not None:
            ours = ours[perm]
        theirs = gguf.quants.dequantize(t.data, t.tensor_type).reshape(ours.shape)
        diff = np.abs(theirs.astype(np.float64) - ours)
        if t.tensor_type == gguf.GGMLQuantizationType.Q4_1:
            s = mod.scales.detach().float()[:, mod.gidx] * mod.zero_points()[:, mod.gidx]
            s = s.numpy()[perm] if perm is not None else s.numpy()
            # fp16 round-to-nearest of m = -scale*zero: half an ulp, 2**-11 relative (2**-25 absolute
            # in fp16's subnormal range); d*q and the sum are exact in float32
            bound = np.maximum(np.abs(s) * 2.0**-11, 2.0**-25)
            assert (diff <= bound).all(), (name, float((diff - bound).max()))
        else:
            assert np.array_equal(theirs, ours), (name, t.tensor_type.name, float(diff.max()))
        seen[name] = (t.tensor_type.name, float(diff.max()))
    return seen


def test_codes_are_written_as_exact_blocks(tiny, tmp_path):
    src = _quantized(tiny, tmp_path, overrides=EXACT, embed_bits=4)
    path, summary = _export(src, tmp_path)
    art = open_artifact(str(tmp_path / "gguf"))
    assert art.manifest["stage"] == "export" and summary["engines"] == ["llama.cpp"]
    seen = _compare_all(src, path)
    assert len(seen) == 4 * 7 + 1  # every decoder linear and the quantized embedding
    want = {n: {4: {True: "Q4_0", False: "Q4_1"}, 8: {True: "Q8_0"}}[s.bits][s.symmetric] for n, s in EXACT.items()}
    assert {n: seen[n][0] for n in EXACT} == want
    assert seen["model.embed_tokens"][0] == "Q4_1" and seen[linear_name(3, "up")][0] == "Q4_1"
    # Q4_1's only loss is the fp16 minimum: visible, but tiny
    assert 0 < max(d for t, d in seen.values() if t == "Q4_1") < 1e-3
    assert summary["lossless"] and summary["file_type"] == "Q4_1" and summary["widened"] == {}
    assert summary["gguf_bytes"] == path.stat().st_size
    # tied embeddings: llama.cpp reuses token_embd for the output, so no output.weight
    names = {t.name for t in gguf.GGUFReader(path).tensors}
    assert "output.weight" not in names and "blk.3.ffn_down.weight" in names and len(names) == 1 + 4 * 9 + 1


def test_metadata_and_tokenizer_are_in_the_file(tiny, tmp_path):
    src = _quantized(tiny, tmp_path)
    path, summary = _export(src, tmp_path)
    r = gguf.GGUFReader(path)

    def val(key):
        return r.fields[key].contents()

    assert val("general.architecture") == "llama"
    want = {"llama.context_length": 1024, "llama.embedding_length": 128, "llama.block_count": 4,
            "llama.feed_forward_length": 384, "llama.attention.head_count": 4, "llama.attention.head_count_kv": 2,
            "llama.attention.key_length": 32, "llama.rope.dimension_count": 32, "llama.vocab_size": 320,
            "llama.rope.freq_base": 10000.0, "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q4_1),
            "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt-2", "tokenizer.ggml.bos_token_id": 256,
            "tokenizer.ggml.eos_token_id": 257, "tokenizer.ggml.padding_token_id": 258}
    assert {k: val(k) for k in want} == want
    assert math.isclose(val("llama.attention.layer_norm_rms_epsilon"), 1e-5, rel_tol=1e-6)
    tokens, types = val("tokenizer.ggml.tokens"), val("tokenizer.ggml.token_type")
    _, tok = tiny
    assert len(tokens) == 320 and tokens[:256] == sorted(tokens[:256]) and tokens[256:259] == ["<s>", "</s>", "<pad>"]
    assert tokens[:259] == tok.convert_ids_to_tokens(list(range(259)))
    assert types[0] == gguf.TokenType.NORMAL and types[256] == gguf.TokenType.CONTROL
    assert types[300] == gguf.TokenType.UNUSED and tokens[300] == "[PAD300]"
    assert val("tokenizer.ggml.merges") == []  # present (llama.cpp requires the key), empty
    assert summary["tokenizer_pre"] == "gpt-2"


def test_smollm_style_pre_tokenizer_is_named():
    seq = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                 {"type": "ByteLevel", "use_regex": True}]}
    assert gx.pre_tokenizer_name(seq) == "smollm"
    assert gx.pre_tokenizer_name({"type": "ByteLevel", "use_regex": True}) == "gpt-2"
    with pytest.raises(ExportError, match="not byte-level"):
        gx.pre_tokenizer_name({"type": "Metaspace"})


def test_qwen2_split_pre_tokenizer_is_named():
    # the regex transformers' Qwen2 tokenizer splits with (Qwen3's too): llama.cpp's "qwen2"
    import json

    from tokenizers import Regex, pre_tokenizers
    from transformers.models.qwen2.tokenization_qwen2 import PRETOKENIZE_REGEX

    pre = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated"),
                                   pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    assert gx.pre_tokenizer_name(json.loads(pre.__getstate__())) == "qwen2"
    with pytest.raises(ExportError, match="no known llama.cpp name"):
        gx.pre_tokenizer_name(json.loads(pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(r"\s+"), behavior="isolated"),
            pre_tokenizers.ByteLevel(use_regex=False)]).__getstate__()))


def test_inexact_schemes_fail_naming_the_layer_and_write_nothing(tiny, tmp_path):
    src = _quantized(tiny, tmp_path, overrides=ODD)
    with pytest.raises(ExportError) as err:
        _export(src, tmp_path)
    msg = str(err.value)
    assert msg.startswith(f"{linear_name(0, 'q')}: 3-bit asymmetric") and "widen" in msg
    assert len(msg.splitlines()) == 1
    assert not (tmp_path / "gguf").exists() and not list(tmp_path.glob(".gguf.partial-*"))
    only_g16 = _quantized(tiny_llama(seed=0), tmp_path / "g16", overrides={linear_name(1, "o"): LinearSpec(4, 16, False)})
    with pytest.raises(ExportError, match=rf"^{re.escape(linear_name(1, 'o'))}: group size 16 is not a multiple of 32"):
        _export(only_g16, tmp_path)


def test_widen_is_lossless(tiny, tmp_path):
    src = _quantized(tiny, tmp_path, overrides=ODD)
    path, summary = _export(src, tmp_path, fallback="widen")
    seen = _compare_all(src, path)  # widened tensors must match exactly
    assert set(summary["widened"]) == set(ODD) and summary["lossless"]
    assert summary["widened"][linear_name(0, "q")] == "Q8_0"
    assert summary["widened"][linear_name(0, "up")] == "Q8_0"
    assert summary["widened"][linear_name(1, "v")] == "Q4_0"
    assert summary["widened"][linear_name(1, "o")] in ("F16", "F32")
    assert summary["widened"][linear_name(2, "down")] in ("Q8_0", "F16", "F32")
    assert all(seen[n][0] == summary["widened"][n] for n in ODD)


def test_requant_is_lossy_and_listed(tiny, tmp_path):
    src = _quantized(tiny, tmp_path, overrides=ODD)
    path, summary = _export(src, tmp_path, fallback="requant")
    req = summary["requantized"]
    assert set(req) == set(ODD) and not summary["lossless"]
    assert req[linear_name(0, "q")]["type"] == "Q4_1"
    assert req[linear_name(1, "v")]["type"] == "Q4_0"
    assert req[linear_name(2, "down")]["type"] == "Q8_0"
    assert all(0 < r["rel_weight_error"] < 0.2 for r in req.values()), req
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(path).tensors}
    assert types["blk.1.attn_output.weight"] == "Q4_1" and types["blk.0.ffn_up.weight"] == "Q4_1"
    # the ppl change is measured with the weights the file holds, beside pqflow's own ppl
    cost = summary["requant_ppl"]
    assert cost["measured"] and cost["windows"] > 0 and cost["ppl_requant"] != cost["ppl"]
    ours = perplexity(load_model_artifact(src).model, eval_windows(
        tokenize(load_model_artifact(src).tokenizer, load_text("wikitext2", "test")), cost["seqlen"], cost["windows"]),
        progress=False).ppl
    assert abs(cost["ppl"] - ours) / ours < 1e-5
    assert cost["change_pct"] == pytest.approx(100 * (cost["ppl_requant"] - ours) / ours, rel=1e-3)


def test_requant_cost_is_reported_as_unmeasured_without_the_text(tiny, tmp_path, monkeypatch):
    from pqflow import data
    from pqflow.errors import PqflowError

    def offline(*a, **k):
        raise PqflowError("wikitext2: no local copy and the hub is unreachable")

    monkeypatch.setattr(data, "load_text", offline)
    src = _quantized(tiny, tmp_path, overrides=ODD)
    _, summary = _export(src, tmp_path, fallback="requant")
    assert summary["requant_ppl"] == {"measured": False, "why": "wikitext2: no local copy and the hub is unreachable"}


def _prune(model, shapes: list[tuple[int, int, int]]) -> None:
    """Keep the first heads / KV heads / MLP channels of each layer (a stand-in for real pruning,
    through the adapter's surgery)."""
    from pqflow import architectures as arch

    for layer, (nh, nkv, inter) in zip(arch.decoder_layers(model), shapes, strict=True):
        arch.cut_heads(layer, list(range(nh)), list(range(nkv)))
        arch.cut_channels(layer, list(range(inter)))
    setattr(model.config, SHAPES_KEY, [list(s) for s in shapes])


def _pruned(tiny, tmp_path: Path, shapes) -> Path:
    from pqflow.methods.prune.format import FORMAT as PRUNED

    model, tok = tiny
    _prune(model, shapes)
    return _publish(model, tok, tmp_path / "pruned", fmt=PRUNED)


def test_uneven_widths_fail_naming_the_layer(tiny, tmp_path):
    src = _pruned(tiny, tmp_path, [(4, 2, 384), (4, 2, 256), (4, 2, 384), (4, 2, 384)])
    with pytest.raises(ExportError, match=rf"^{re.escape(BLOCKS)}\.1 has another width .*--uneven pad"):
        _export(src, tmp_path)
    assert not (tmp_path / "gguf").exists()


def test_uniform_widths_are_plain_llama(tiny, tmp_path):
    src = _pruned(tiny, tmp_path, [(2, 1, 256)] * 4)
    path, summary = _export(src, tmp_path)
    r = gguf.GGUFReader(path)
    assert r.fields["llama.attention.head_count"].contents() == 2
    assert r.fields["llama.attention.head_count_kv"].contents() == 1
    assert r.fields["llama.feed_forward_length"].contents() == 256
    assert r.fields["llama.attention.key_length"].contents() == 32  # not hidden / heads = 64
    shapes = {t.name: list(t.shape) for t in r.tensors}
    assert shapes["blk.0.attn_q.weight"] == [128, 64] and shapes["blk.0.ffn_down.weight"] == [256, 128]
    assert summary["tensor_types"] == {"F16": 1 + 4 * 7, "F32": 4 * 2 + 1}


# -- llama.cpp --------------------------------------------------------------------------------

SEQLEN, N_WINDOWS = 128, 4


def _llama_cpp():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed (bench/llama_cpp_wheel.sh VENV builds it)")


def _engine_ppl(path: Path, windows: torch.Tensor) -> float:
    """pqflow's protocol in llama.cpp (tests/llama_score.py, also the bench's)."""
    from .llama_score import llama_ppl

    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=windows.shape[1], n_batch=windows.shape[1],
                          logits_all=True, verbose=False, n_threads=2)
    try:
        return llama_ppl(llm, windows.tolist())
    finally:
        llm.close()


def _pqflow_ppl(src: Path) -> tuple[float, torch.Tensor]:
    loaded = load_model_artifact(src)
    windows = eval_windows(tokenize(loaded.tokenizer, load_text("wikitext2", "test")), SEQLEN, N_WINDOWS)
    return perplexity(loaded.model, windows, progress=False).ppl, windows


@pytest.mark.parametrize("group_size", [32, 64])
def test_llama_cpp_scores_the_export_like_pqflow(tiny, tmp_path, group_size):
    _llama_cpp()
    src = _quantized(tiny, tmp_path, group_size=group_size, embed_bits=4)
    path, _ = _export(src, tmp_path)
    ours, windows = _pqflow_ppl(src)
    theirs = _engine_ppl(path, windows)
    print(f"4-bit g{group_size} asym: pqflow ppl {ours:.4f}, llama.cpp ppl {theirs:.4f}")
    assert abs(theirs - ours) / ours < 0.005, (theirs, ours)


def test_llama_cpp_loads_a_pruned_float_export(tiny, tmp_path):
    # heads pruned: head_dim != hidden / heads, and q/k permuted with 2 heads / 1 KV head. In float32
    # the logits themselves must agree, which a wrong q/k permutation (rope pairs) would break.
    llama_cpp = _llama_cpp()
    src = _pruned(tiny, tmp_path, [(2, 1, 256)] * 4)
    path, _ = _export(src, tmp_path, dtype="float32")
    ours, windows = _pqflow_ppl(src)
    theirs = _engine_ppl(path, windows)
    print(f"pruned float32: pqflow ppl {ours:.4f}, llama.cpp ppl {theirs:.4f}")
    assert abs(theirs - ours) / ours < 0.005, (theirs, ours)
    ids = windows[0].tolist()
    with torch.no_grad():
        ref = load_model_artifact(src).model(input_ids=windows[:1]).logits[0].numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids), n_batch=len(ids), logits_all=True,
                          verbose=False, n_threads=2)
    llm.eval(ids)
    got = np.asarray(llm.scores[: len(ids)])
    llm.close()
    # measured 1.2e-3 of the logits' spread (llama.cpp keeps its KV cache in fp16)
    assert np.abs(got - ref).max() < 0.01 * ref.std(), (np.abs(got - ref).max(), ref.std())


@pytest.mark.parametrize("uneven", ["pad", "native"])
def test_llama_cpp_scores_an_uneven_export_like_pqflow(tiny, tmp_path, uneven):
    # widths pruned unevenly (GQA groups, query heads per group, MLP): padded to the widest layer as
    # arch llama, or written as they are as arch deci (per-layer head counts and MLP widths)
    from pqflow.methods.prune.plan import PrunePlan
    from pqflow.methods.prune.surgery import apply_plan

    from .test_export_pad import UNEVEN

    _llama_cpp()
    model, tok = tiny
    apply_plan(model, PrunePlan(keep=UNEVEN))
    src = _quantized((model, tok), tmp_path, group_size=32)
    path, summary = _export(src, tmp_path, uneven=uneven)
    assert summary["linear_types"] == {"Q4_1": 28}
    if uneven == "pad":
        assert summary["arch"] == "llama" and summary["padded"]["layers"] == [1, 2, 3]
    else:
        assert summary["arch"] == "deci" and "padded" not in summary
        r = gguf.GGUFReader(path)
        assert list(r.fields["deci.attention.head_count"].contents()) == [4, 2, 2, 4]
        assert list(r.fields["deci.attention.head_count_kv"].contents()) == [2, 1, 2, 2]
        assert list(r.fields["deci.feed_forward_length"].contents()) == [384, 256, 320, 192]
        _, padded = _export(src, tmp_path, uneven="pad", name="padded")
        assert summary["gguf_bytes"] < padded["gguf_bytes"]  # no padding: fewer bytes
    ours, windows = _pqflow_ppl(src)
    theirs = _engine_ppl(path, windows)
    print(f"uneven widths ({uneven}), 4-bit g32 asym: pqflow ppl {ours:.4f}, llama.cpp ppl {theirs:.4f}")
    assert abs(theirs - ours) / ours < 0.005, (theirs, ours)


# -- families ---------------------------------------------------------------------------------

# family -> the llama.cpp arch it is written as; 80 tokens of ids
FAMILY_IDS = [[(7 * i + 3) % 256 for i in range(80)]]
GGUF_FAMILIES = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def _family_artifact(family: str, tmp_path: Path, **config) -> tuple[Path, torch.nn.Module]:
    from pqflow.architectures import prepare
    from pqflow.tiny import tiny_model

    model, tok = tiny_model(family)
    prepare(model)
    for key, value in config.items():
        setattr(model.config, key, value)
    return _publish(model, tok, tmp_path / family), model


def _engine_logits(path: Path, ids: list[int]) -> np.ndarray:
    llama_cpp = _llama_cpp()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=len(ids), n_batch=len(ids), logits_all=True,
                          verbose=False, n_threads=2)
    try:
        llm.eval(ids)
        return np.asarray(llm.scores[: len(ids)])
    finally:
        llm.close()


def test_tensor_names_are_gguf_pys_for_each_arch(tmp_path):
    for family, arch in GGUF_FAMILIES.items():
        src, model = _family_artifact(family, tmp_path)
        path, summary = _export(src, tmp_path, name=f"{family}-gguf")
        assert summary["arch"] == arch
        names = gguf.get_tensor_name_map(next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch), 4)
        expected = {names.get_name(k, try_suffixes=(".weight", ".bias")) for k in model.state_dict()
                    if k != "lm_head.weight"}  # tied: llama.cpp reuses token_embd
        assert {t.name for t in gguf.GGUFReader(path).tensors} == expected, family
        assert None not in expected


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_a_family_without_a_gguf_arch_is_refused_by_name_before_writing(family, tmp_path):
    src, _ = _family_artifact(family, tmp_path)
    with pytest.raises(ExportError, match=rf"^gguf export is not supported for {family}: .*hf-dense or compressed"):
        _export(src, tmp_path)
    assert not (tmp_path / "gguf").exists()


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3"])
def test_llama_cpp_computes_each_family_like_pqflow(family, tmp_path):
    # float32 weights: only the layout (tensor names, q/k row order, biases, q/k norms) can differ
    _llama_cpp()
    extra = {"sliding_window": 512} if family == "mistral" else {}
    src, _ = _family_artifact(family, tmp_path, **extra)
    path, _ = _export(src, tmp_path, dtype="float32")
    if family == "mistral":  # llama.cpp's llama arch has no sliding window: the context stops at it
        assert gguf.GGUFReader(path).fields["llama.context_length"].contents() == 512
    ids = torch.tensor(FAMILY_IDS)
    with torch.no_grad():
        ref = load_model_artifact(src).model(input_ids=ids).logits[0].numpy()
    got = _engine_logits(path, FAMILY_IDS[0])
    assert np.abs(got - ref).max() < 0.01 * ref.std(), (np.abs(got - ref).max(), ref.std())


def test_uneven_native_pads_an_arch_without_per_layer_widths(tmp_path):
    # arch deci holds per-layer widths for Llama only; a Qwen3 pruned unevenly is padded to its own arch
    from pqflow.architectures import prepare
    from pqflow.methods.prune.format import FORMAT as PRUNED
    from pqflow.methods.prune.plan import PrunePlan
    from pqflow.methods.prune.surgery import apply_plan
    from pqflow.tiny import tiny_model

    from .test_export_pad import UNEVEN

    model, tok = tiny_model("qwen3")
    prepare(model)
    apply_plan(model, PrunePlan(keep=UNEVEN))
    src = _publish(model, tok, tmp_path / "pruned", fmt=PRUNED)
    with pytest.raises(ExportError, match=rf"^{re.escape(BLOCKS)}\.1 has another width .*--uneven pad"):
        _export(src, tmp_path)
    path, summary = _export(src, tmp_path, uneven="native", dtype="float32")
    assert summary["arch"] == "qwen3" and summary["padded"]["layers"] == [1, 2, 3]
    if importlib.util.find_spec("llama_cpp") is None:
        return
    with torch.no_grad():
        ref = load_model_artifact(src).model(input_ids=torch.tensor(FAMILY_IDS)).logits[0].numpy()
    got = _engine_logits(path, FAMILY_IDS[0])
    assert np.abs(got - ref).max() < 0.01 * ref.std(), (np.abs(got - ref).max(), ref.std())
