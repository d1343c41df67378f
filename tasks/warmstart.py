"""Warm starts: a student that begins from earlier weights (``train.init_from``) instead of the teacher's layers.

    python -m pytest tests/unit/test_students.py -k init_from

The weights come from a local directory, either a float32 student export (``train/student``: Hugging Face
layout, safetensors) or an int8 model as the registry holds it (``tasks.quantize`` layout: ``quantization.json``),
which is dequantized to float32 (the champion as it is served). They must have the architecture the student
config builds (:func:`check_architecture` names the first differing field). Pickle weight files are refused.
Resolving a registry URI to such a directory is ``workflows/continual.py``'s job (MLflow lives there).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PreTrainedModel

from raydistill.tasks.config import ConfigError
from raydistill.tasks.guard import refuse_pickle

ARCH_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads",
               "num_key_value_heads", "vocab_size", "tie_word_embeddings")
"""Config fields two models must share for one's weights to start the other."""


def weights_digest(path: str | Path) -> str:
    """sha256 over a model directory's ``*.safetensors`` files (names and bytes): the identity of its weights."""
    from raydistill.tasks.teacher import file_sha256

    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ConfigError(f"train.init_from {str(path)!r}: no *.safetensors weights there (pickle weight files are "
                          "never loaded); point it at a student directory such as <run_dir>/train/student")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()


def _float_tensor(module: torch.nn.Module, attr: str) -> torch.Tensor | None:
    """``module.<attr>`` as a float tensor, whatever quantized layer holds it: raydistill's integer layers
    (``weight_float``; an embedding's ``weight`` is already dequantized), the old torch.ao packed layers
    (``weight()``/``bias()`` methods returning quantized tensors) and torchao's tensor subclasses (``dequantize``)."""
    from raydistill.tasks.quantize.qlinear import QuantLinear

    if isinstance(module, QuantLinear) and attr == "weight":
        return module.weight_float()
    value = getattr(module, attr)
    if callable(value):
        value = value()
    if value is not None and (getattr(value, "is_quantized", False)
                              or (type(value) not in (torch.Tensor, torch.nn.Parameter) and hasattr(value, "dequantize"))):
        value = value.dequantize()
    return value


def _dequantized(model_dir: Path) -> PreTrainedModel:
    """A float32 model holding the dequantized weights of a quantized model directory (``tasks.quantize``, any
    method: every parameter of the float architecture is read from the module that holds it in the quantized
    model)."""
    from raydistill.tasks.quantize import load_quantized

    q = load_quantized(model_dir)
    fp = AutoModelForCausalLM.from_config(q.config, dtype=torch.float32)
    state = {}
    for name in fp.state_dict():
        owner, _, attr = name.rpartition(".")
        state[name] = _float_tensor(q.get_submodule(owner), attr)
    fp.load_state_dict({k: v.detach().to(torch.float32).contiguous() for k, v in state.items()})
    return fp.eval()


def load_init_weights(path: str | Path) -> PreTrainedModel:
    """The float32 model in ``path``: a student export, or an int8 model directory (dequantized)."""
    path = Path(path).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(f"train.init_from {str(path)!r} is not a model directory (no config.json); use champion, "
                          "models:/NAME@ALIAS, models:/NAME/VERSION or a student directory")
    weights_digest(path)  # refuses a directory without safetensors
    refuse_pickle(path)  # and one with a pickle file beside them (``use_safetensors`` alone would skip it silently)
    if (path / "quantization.json").is_file():
        return _dequantized(path)
    meta = json.loads((path / "student.json").read_text()) if (path / "student.json").is_file() else {}
    if meta.get("adapter"):
        raise ConfigError(f"train.init_from {str(path)!r} holds a {meta.get('peft')} adapter beside the base weights; "
                          "start from a full, LoRA or IA3 student (their adapters are merged on export)")
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, use_safetensors=True).eval()


def check_architecture(built: PreTrainedModel, loaded: PreTrainedModel, where: str) -> None:
    """:class:`ConfigError` naming the first of :data:`ARCH_FIELDS` where ``loaded`` differs from ``built``."""
    a, b = built.config.to_dict(), loaded.config.to_dict()
    for name in ARCH_FIELDS:
        if a.get(name) != b.get(name):
            raise ConfigError(f"train.init_from {where}: {name} is {b.get(name)!r} there but {a.get(name)!r} in the "
                              "student this config builds (student.init, student.layers, student.overrides); use "
                              "the student config that trained it, or unset train.init_from")
