"""The registered model as an MLflow "models from code" pyfunc (no pickle).

MLflow copies this file into the logged model; the weights travel beside it as the ``model``
artifact (a pqflow model folder: safetensors, config, tokenizer). ``predict`` takes a DataFrame
with a ``text`` column and returns, per row, the perplexity under pqflow's evaluation protocol
(non-overlapping windows of ``seqlen`` tokens, first ``max_windows``; 0 = all), so

    m = mlflow.pyfunc.load_model("models:/<name>@candidate")
    m.predict(pd.DataFrame({"text": [wikitext2_test]}))["ppl"][0]

reproduces the ppl that the ``evaluate`` step logged (the params default to that step's settings).
With ``params={"output": "logits"}`` it returns the last-position logits of each text instead.
"""

from __future__ import annotations

from pathlib import Path

import mlflow
from mlflow.pyfunc import PythonModel


class PqflowCausalLM(PythonModel):
    def load_context(self, context):
        from pqflow.artifacts import MANIFEST, open_artifact
        from pqflow.models import load_model_artifact

        folder = Path(context.artifacts["model"])
        if (folder / MANIFEST).is_file():  # a pipeline artifact: check every file before loading
            folder = open_artifact(str(folder.absolute())).path
        self.loaded = load_model_artifact(folder)

    def predict(self, context, model_input, params=None):
        import pandas as pd
        import torch

        from pqflow.data import eval_windows, tokenize
        from pqflow.perplexity import perplexity

        params = params or {}
        texts = [model_input] if isinstance(model_input, str) else list(model_input["text"])
        tok, model = self.loaded.tokenizer, self.loaded.model
        if params.get("output") == "logits":
            rows = []
            with torch.no_grad():
                for text in texts:
                    ids = tokenize(tok, text)[None, :]
                    rows.append({"logits": model(input_ids=ids, use_cache=False).logits[0, -1].float().tolist()})
            return pd.DataFrame(rows)
        seqlen = int(params.get("seqlen", 512))
        max_windows = int(params.get("max_windows", 0)) or None
        batch_size = int(params.get("batch_size", 4))
        rows = []
        for text in texts:
            windows = eval_windows(tokenize(tok, text), seqlen, max_windows)
            r = perplexity(model, windows, batch_size, progress=False)
            rows.append({"ppl": r.ppl, "nll": r.nll, "windows": float(r.windows), "tokens": float(r.tokens)})
        return pd.DataFrame(rows)


mlflow.models.set_model(PqflowCausalLM())
