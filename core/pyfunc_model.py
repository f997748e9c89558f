"""The registered model as an MLflow "models from code" pyfunc (no pickle) that generates text.

MLflow copies this file into the logged model; the weights travel beside it as the ``model``
artifact (a pqflow model folder: safetensors, config, tokenizer, verified against its manifest
when loaded). ``predict`` follows MLflow's LLM conventions (task ``llm/v1/chat``, OpenAI-style
request and response shapes, :mod:`pqflow.generate` doing the work):

* chat: ``{"messages": [{"role": "user", "content": "..."}], "max_tokens": 64, "temperature": 0}``
  returns ``{"object": "chat.completion", "choices": [{"message": {"role": "assistant",
  "content": ...}, "finish_reason": ...}], "usage": {...}, ...}``;
* completion: ``{"prompt": "...", "max_tokens": 64}`` returns ``{"object": "text_completion",
  "choices": [{"text": ..., ...}], ...}``.

Optional fields: ``temperature`` (default 1.0; 0 = greedy), ``max_tokens`` (default 128),
``top_p``, ``stop``, ``seed``. A request the model cannot answer is an ``MlflowException`` with
``INVALID_PARAMETER_VALUE`` (HTTP 400 from ``mlflow models serve``).

``params``:

* ``mode``: ``"generate"`` (default), ``"perplexity"`` (each ``prompt`` scored under pqflow's
  evaluation protocol: non-overlapping windows of ``seqlen`` tokens, the first ``max_windows``
  (0 = all), returns rows of ``ppl``, ``nll``, ``windows``, ``tokens``; the defaults are the
  ``evaluate`` step's settings, so it reproduces the logged ppl), or ``"logits"`` (the
  last-position logits of each prompt);
* ``return_token_ids``: add the prompt and completion token ids under ``custom_outputs``.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

MODES = ("generate", "perplexity", "logits")


def _bad_request(message: str):
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

    return MlflowException(message, error_code=INVALID_PARAMETER_VALUE)


def _plain(v: Any) -> Any:
    """numpy / pandas values of a DataFrame cell as plain Python (None for missing)."""
    if hasattr(v, "tolist") and not isinstance(v, str):
        v = v.tolist()
    if isinstance(v, list):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, float) and v != v:  # NaN: a column another row of the frame had
        return None
    return v


def _requests(model_input: Any) -> list[dict[str, Any]]:
    import pandas as pd

    if isinstance(model_input, str):
        return [{"prompt": model_input}]
    if isinstance(model_input, dict):
        return [model_input]
    if isinstance(model_input, pd.DataFrame):
        return [{k: v for k, v in ((k, _plain(v)) for k, v in row.items()) if v is not None}
                for row in model_input.to_dict(orient="records")]
    if isinstance(model_input, list) and all(isinstance(r, dict) for r in model_input):
        return list(model_input)
    raise _bad_request(f"expected a chat request (messages) or a completion request (prompt), "
                       f"got {type(model_input).__name__}")


class PqflowCausalLM(PythonModel):
    def load_context(self, context):
        from pqflow.artifacts import MANIFEST, open_artifact
        from pqflow.models import load_model_artifact

        folder = Path(context.artifacts["model"])
        if (folder / MANIFEST).is_file():  # a pipeline artifact: check every file before loading
            folder = open_artifact(str(folder.absolute())).path
        self.loaded = load_model_artifact(folder)
        self.name = (context.model_config or {}).get("model_name", "pqflow")

    def predict(self, context, model_input, params=None):
        params = dict(params or {})
        mode = params.get("mode") or "generate"
        if mode not in MODES:
            raise _bad_request(f"params.mode must be one of {', '.join(MODES)}, got {mode!r}"[:200])
        requests = _requests(model_input)
        if not requests:
            raise _bad_request("the request holds no rows")
        if mode == "perplexity":
            return self._perplexity(requests, params)
        if mode == "logits":
            return self._logits(requests)
        out = [self._generate(r, bool(params.get("return_token_ids"))) for r in requests]
        return out[0] if len(out) == 1 else out

    # -- generation -------------------------------------------------------------------------------

    def _generate(self, req: dict[str, Any], with_ids: bool) -> dict[str, Any]:
        from pqflow import generate as g

        opts = {k: req.get(k) for k in ("max_tokens", "temperature", "top_p", "stop", "seed")}
        model, tok = self.loaded.model, self.loaded.tokenizer
        has_messages, has_prompt = req.get("messages") is not None, req.get("prompt") is not None
        try:
            if has_messages and has_prompt:
                raise g.RequestError("send either messages (chat) or prompt (completion), not both")
            if has_messages:
                res = g.chat(model, tok, req["messages"], **opts)
            elif has_prompt:
                res = g.complete(model, tok, req["prompt"], **opts)
            else:
                raise g.RequestError("the request needs messages (chat) or prompt (completion)")
        except g.RequestError as e:
            raise _bad_request(str(e)) from None
        usage = {"prompt_tokens": res.prompt_tokens, "completion_tokens": res.completion_tokens,
                 "total_tokens": res.prompt_tokens + res.completion_tokens}
        if has_messages:
            body = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion",
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": res.text},
                                 "finish_reason": res.finish_reason}]}
        else:
            body = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                    "choices": [{"index": 0, "text": res.text, "finish_reason": res.finish_reason}]}
        body.update(created=int(time.time()), model=self.name, usage=usage)
        if with_ids:
            body["custom_outputs"] = {"prompt_token_ids": res.prompt_ids, "completion_token_ids": res.token_ids,
                                      **({"chat_template": res.template} if res.template else {})}
        return body

    # -- scoring ----------------------------------------------------------------------------------

    @staticmethod
    def _texts(requests: list[dict[str, Any]]) -> list[str]:
        texts = [r.get("prompt", r.get("text")) for r in requests]
        if not all(isinstance(t, str) and t for t in texts):
            raise _bad_request("params.mode perplexity/logits scores the text in prompt: send a non-empty string")
        return texts

    def _perplexity(self, requests: list[dict[str, Any]], params: dict[str, Any]):
        import pandas as pd

        from pqflow.data import eval_windows, tokenize
        from pqflow.perplexity import perplexity

        seqlen = int(params.get("seqlen") or 512)
        max_windows = int(params.get("max_windows") or 0) or None
        batch_size = int(params.get("batch_size") or 4)
        rows = []
        for text in self._texts(requests):
            windows = eval_windows(tokenize(self.loaded.tokenizer, text), seqlen, max_windows)
            if len(windows) == 0:
                raise _bad_request(f"the text is shorter than one window of seqlen {seqlen} tokens")
            r = perplexity(self.loaded.model, windows, batch_size, progress=False)
            rows.append({"ppl": r.ppl, "nll": r.nll, "windows": float(r.windows), "tokens": float(r.tokens)})
        return pd.DataFrame(rows)

    def _logits(self, requests: list[dict[str, Any]]):
        import pandas as pd
        import torch

        from pqflow.data import tokenize

        rows = []
        with torch.no_grad():
            for text in self._texts(requests):
                ids = tokenize(self.loaded.tokenizer, text)[None, :]
                rows.append({"logits": self.loaded.model(input_ids=ids, use_cache=False).logits[0, -1].float().tolist()})
        return pd.DataFrame(rows)


mlflow.models.set_model(PqflowCausalLM())
