"""MLflow "models from code" definition of a registered raydistill student (no pickled Python objects).

``workflows.register`` logs this file as the model's code, the quantized student directory (safetensors) as the
artifact ``model`` and ``raydistill.tasks`` as code path. Anyone with MLflow can then use the registered model:

    import mlflow
    m = mlflow.pyfunc.load_model("models:/tiny-student@champion")
    m.predict(["ROMEO.\\nBut soft"], params={"max_tokens": 16, "temperature": 0.0})   # → list of completions

``predict`` takes a list of prompts (or a DataFrame with a ``prompt`` column) and returns one dict per prompt as
``tasks.generate.complete`` does (text, tokens, token_logprobs, top_logprobs, finish_reason, usage).
raydistill's own Serve app does not go through pyfunc: it loads the same directory with
``tasks.quantize.load_quantized`` (``workflows.register.load_registered``).
"""

from __future__ import annotations

import mlflow
from mlflow.pyfunc import PythonModel

PARAM_DEFAULTS = {"max_tokens": 16, "temperature": 0.0, "logprobs": 0, "seed": 0}


class QuantizedStudent(PythonModel):
    # predict has no type hints on purpose: MLflow would infer a signature from them and drop the params
    # schema (register.py logs an explicit signature). This flag stops MLflow's per-import reminder about it.
    _skip_type_hint_validation = True

    def load_context(self, context):
        from transformers import AutoTokenizer

        from raydistill.tasks.quantize import load_quantized

        from raydistill.tasks.guard import refuse_pickle

        model_dir = refuse_pickle(context.artifacts["model"])  # safetensors only: a pickle file is refused
        self.model = load_quantized(model_dir)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)

    def predict(self, context, model_input, params=None):
        from raydistill.tasks.generate import complete

        if hasattr(model_input, "columns"):  # pandas DataFrame
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[column]]
        elif isinstance(model_input, str):
            prompts = [model_input]
        else:
            prompts = [str(p) for p in model_input]
        p = {**PARAM_DEFAULTS, **(params or {})}
        return complete(self.model, self.tokenizer, prompts, max_tokens=int(p["max_tokens"]),
                        temperature=float(p["temperature"]), logprobs=int(p["logprobs"]) or None,
                        seed=int(p["seed"]))


mlflow.models.set_model(QuantizedStudent())
