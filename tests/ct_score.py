"""Scores compressed-tensors exports in a clean venv (torch, transformers, compressed-tensors only).

Run as ``python ct_score.py JOB.json``; JOB holds ``{"ids": "<windows.json>", "exports": {name: folder}}``.
Prints one JSON object: per export its perplexity (pqflow's protocol: each window's mean next-token
NLL, exp of their mean) and the loader that read it. Never imports pqflow (checked at the end).

Loader: ``AutoModelForCausalLM.from_pretrained(folder)``, nothing else. Only when that raises (the
known transformers/compressed-tensors bug with asymmetric pack-quantized zero points when several
config groups are present, see the exporter's docstring), the model is built from its config and
every packed module is decompressed by compressed-tensors' own ``PackedQuantizationCompressor``
with the scheme its config group names: the library's decompression, without transformers' loader.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoModelForCausalLM


def load_plain(folder: str) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


def load_library(folder: str) -> torch.nn.Module:
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationConfig
    from compressed_tensors.utils.match import match_named_modules
    from safetensors.torch import load_file

    raw = json.loads((Path(folder) / "config.json").read_text())
    qcfg = QuantizationConfig.model_validate(raw.pop("quantization_config"))
    config = AutoConfig.for_model(**raw)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    tensors = load_file(str(Path(folder) / "model.safetensors"))
    state = {}
    for scheme in qcfg.config_groups.values():
        compressor = BaseCompressor.get_value_from_registry(scheme.format or qcfg.format)
        for name, _ in match_named_modules(model, scheme.targets, qcfg.ignore):
            local = {k.removeprefix(name + "."): tensors.pop(k) for k in list(tensors) if k.startswith(name + ".")}
            local["weight_scale"] = local["weight_scale"].float()
            for k, v in compressor.decompress(local, scheme).items():
                if k in ("weight", "bias"):
                    state[f"{name}.{k}"] = v
    state.update(tensors)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("lm_head.weight") for k in missing), (missing, unexpected)
    model.tie_weights()
    return model


@torch.no_grad()
def ppl(model: torch.nn.Module, windows: torch.Tensor) -> float:
    logits = model(input_ids=windows, use_cache=False).logits[:, :-1].float()
    nll = F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(dim=1)
    return math.exp(float(nll.mean()))


def main() -> None:
    job = json.loads(Path(sys.argv[1]).read_text())
    windows = torch.tensor(json.loads(Path(job["ids"]).read_text()))
    out = {}
    for name, folder in job["exports"].items():
        try:
            model, loader, error = load_plain(folder), "from_pretrained", None
        except Exception as e:  # the upstream loader bug: fall back to the library's own decompression
            model, loader, error = load_library(folder), "compressed-tensors", str(e).splitlines()[0][:300]
        out[name] = {"ppl": ppl(model.eval(), windows), "loader": loader, "error": error}
    assert not any(m == "pqflow" or m.startswith("pqflow.") for m in sys.modules), "pqflow was imported"
    import compressed_tensors
    import transformers

    out["_versions"] = {"torch": torch.__version__, "transformers": transformers.__version__,
                        "compressed_tensors": compressed_tensors.__version__}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
