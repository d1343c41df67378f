"""Post-training quantization of a causal LM, saved as safetensors (never pickle) and loaded back exactly.

    from raydistill.tasks.quantize import quantize_dynamic_int8, save_quantized, load_quantized
    q = quantize_dynamic_int8(model)                       # a new model; ``model`` is left untouched
    save_quantized(q, tokenizer, "run/quantize/int8", recipe={"source": "run/train/student"})
    q2 = load_quantized("run/quantize/int8")               # same logits, bit for bit

``dynamic_int8``: every ``nn.Linear`` (attention, MLP and ``lm_head``) gets int8 weights quantized per output
channel (symmetric, torch.ao); activations are quantized on the fly at each matmul, so no calibration data is
needed. Embeddings, norms and biases stay float32.

Tied embeddings (SmolLM2, Llama-3.2 …): the input embedding and ``lm_head`` share one matrix, which is most of
a small model's bytes. Storing it twice (float32 embedding + int8 ``lm_head``) would make the "quantized"
model barely smaller, so the embedding becomes the *dequantized* int8 ``lm_head`` weight: one int8 copy on disk,
and the in-memory model is built the same way so that saved and unsaved models agree exactly.

On-disk layout of ``out_dir``: ``model.safetensors`` (for each quantized layer ``<name>.weight.int8``,
``.weight.scale`` (float64), ``.weight.zero_point`` (int64), optional ``.bias``; every other tensor float32),
``config.json``, ``quantization.json`` (method, scheme, layers, tied embedding, torch version, recipe) and the
tokenizer files. Other methods (weight-only int8/int4 group-wise) would add a ``method`` branch in
``_quantize``/``_build_layer`` and their own tensor names; ``quantization.json`` says which one a directory holds.
"""

from __future__ import annotations

import copy
import json
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raydistill.tasks.fileio import replace_dir

FORMAT_VERSION = 1
METHODS = ("dynamic_int8",)
WEIGHTS_FILE = "model.safetensors"
META_FILE = "quantization.json"


def _qlinear_cls():
    from torch.ao.nn.quantized.dynamic import Linear as DynamicQuantizedLinear

    return DynamicQuantizedLinear


def quantized_layers(model: nn.Module) -> list[str]:
    """Names of the dynamically quantized linear layers of ``model`` (in module order)."""
    cls = _qlinear_cls()
    return [name for name, m in model.named_modules() if isinstance(m, cls)]


def _tied(model: nn.Module) -> bool:
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    return (emb is not None and out is not None and isinstance(out, nn.Linear)
            and out.weight.data_ptr() == emb.weight.data_ptr())


def _embedding_name(model: nn.Module) -> str:
    emb = model.get_input_embeddings()
    return next(f"{name}.weight" for name, m in model.named_modules() if m is emb)


def quantize_dynamic_int8(model: nn.Module) -> nn.Module:
    """A dynamically int8-quantized copy of ``model`` (all ``nn.Linear`` incl. ``lm_head``; see module doc).

    The copy is float32, in eval mode, on CPU; ``model`` itself is not modified. A PEFT model is merged first.
    """
    from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic

    if hasattr(model, "peft_config"):  # PEFT: fold LoRA/IA3 adapters into the base weights (on a copy)
        if not hasattr(model, "merge_and_unload"):
            raise ValueError("quantize_dynamic_int8: prefix/prompt-tuning adapters cannot be merged into the "
                             "weights; quantize a full, LoRA or IA3 student")
        model = copy.deepcopy(model).merge_and_unload()
    tied = _tied(model)
    fp32 = copy.deepcopy(model).to(device="cpu", dtype=torch.float32).eval()
    if not any(isinstance(m, nn.Linear) for m in fp32.modules()):
        raise ValueError("quantize_dynamic_int8: the model has no nn.Linear layers to quantize")
    with warnings.catch_warnings():  # torch.ao prints deprecation notices on every call
        warnings.simplefilter("ignore")
        q = quantize_dynamic(fp32, {nn.Linear: per_channel_dynamic_qconfig}, dtype=torch.qint8, inplace=True)
    q._raydistill_tied_embedding = _embedding_name(q) if tied else None
    if tied:
        _tie_to_quantized_head(q)
    return q


def _tie_to_quantized_head(model: nn.Module) -> None:
    """Input embedding := dequantized int8 ``lm_head`` weight (one int8 matrix serves both)."""
    head = model.get_output_embeddings()
    emb = model.get_input_embeddings()
    with torch.no_grad():
        emb.weight = nn.Parameter(head.weight().dequantize().to(torch.float32).contiguous(),
                                  requires_grad=False)


# -------------------------------------------------------------------------------------------------------
# save / load
# -------------------------------------------------------------------------------------------------------

def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike, recipe: dict | None = None) -> Path:
    """Write a quantized model (from :func:`quantize_dynamic_int8`) and its tokenizer to ``out_dir``.

    The directory appears complete or not at all (written beside it, then renamed); an existing one is
    replaced only after the new one is fully written.
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("save_quantized: the model has no quantized layers; call quantize_dynamic_int8 first")
    tied = getattr(model, "_raydistill_tied_embedding", None)
    tensors = {}
    for name in layers:
        w = model.get_submodule(name).weight()
        if w.qscheme() != torch.per_channel_affine:
            raise ValueError(f"save_quantized: {name} is {w.qscheme()}, expected per-channel affine")
        tensors[f"{name}.weight.int8"] = w.int_repr().contiguous()
        tensors[f"{name}.weight.scale"] = w.q_per_channel_scales().contiguous()
        tensors[f"{name}.weight.zero_point"] = w.q_per_channel_zero_points().contiguous()
        bias = model.get_submodule(name).bias()
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    prefixes = tuple(n + "." for n in layers)
    for key, value in model.state_dict().items():
        if key.startswith(prefixes) or key == tied:
            continue
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"save_quantized: unexpected non-tensor state {key!r}")
        tensors[key] = value.detach().to(torch.float32).contiguous() if value.is_floating_point() \
            else value.detach().contiguous()
    meta = {
        "format_version": FORMAT_VERSION,
        "method": "dynamic_int8",
        "weight_dtype": "int8",
        "scheme": "per_channel_affine",
        "axis": 0,
        "activations": "dynamic per-tensor (quantized at runtime)",
        "layers": layers,
        "tied_embedding": tied,
        "torch_version": torch.__version__,
        "quantized_engine": torch.backends.quantized.engine,
        "recipe": recipe or {},
    }
    out = Path(out_dir)
    with replace_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE), metadata={"format": "pt", "raydistill": "dynamic_int8"})
        model.config.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def read_quantization_info(model_dir: str | os.PathLike) -> dict:
    """``quantization.json`` of a quantized model directory, checked for a method this code can load."""
    path = Path(model_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} is not a quantized model directory (no {META_FILE})")
    meta = json.loads(path.read_text())
    if meta.get("method") not in METHODS:
        raise ValueError(f"{path}: unsupported quantization method {meta.get('method')!r}; known: {METHODS}")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    return meta


def load_quantized(model_dir: str | os.PathLike) -> nn.Module:
    """Rebuild the architecture from ``config.json``, put in the stored int8 layers and float32 tensors."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    meta = read_quantization_info(model_dir)
    tensors = load_file(str(model_dir / WEIGHTS_FILE))
    config = AutoConfig.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for name in meta["layers"]:
        _replace_module(model, name, _build_layer(model.get_submodule(name), name, tensors))
    expected = {k for k in model.state_dict() if not k.startswith(tuple(n + "." for n in meta["layers"]))}
    expected.discard(meta["tied_embedding"])
    stored = {k for k in tensors if not k.startswith(tuple(n + "." for n in meta["layers"]))}
    if expected != stored:
        raise ValueError(f"{model_dir / WEIGHTS_FILE} does not match the architecture in config.json: "
                         f"missing {sorted(expected - stored)[:5]}, unexpected {sorted(stored - expected)[:5]}")
    _copy_tensors(model, {k: tensors[k] for k in stored})
    model._raydistill_tied_embedding = meta["tied_embedding"]
    if meta["tied_embedding"]:
        _tie_to_quantized_head(model)
    return model


def _copy_tensors(model: nn.Module, tensors: dict) -> None:
    """Copy float tensors into the parameters/buffers they name (``load_state_dict`` would also want the
    quantized layers' own state entries)."""
    with torch.no_grad():
        for key, value in tensors.items():
            owner, _, attr = key.rpartition(".")
            target = getattr(model.get_submodule(owner) if owner else model, attr)
            if target.shape != value.shape:
                raise ValueError(f"{key}: stored shape {tuple(value.shape)} != model shape {tuple(target.shape)}")
            target.copy_(value)


def _build_layer(fp_layer: nn.Module, name: str, tensors: dict) -> nn.Module:
    """A dynamic int8 linear layer holding exactly the stored integers, scales and zero points."""
    try:
        int8 = tensors[f"{name}.weight.int8"]
        scale = tensors[f"{name}.weight.scale"]
        zero_point = tensors[f"{name}.weight.zero_point"]
    except KeyError as e:
        raise ValueError(f"quantized weights of {name!r} are missing: {e}") from None
    if not isinstance(fp_layer, nn.Linear) or tuple(int8.shape) != (fp_layer.out_features, fp_layer.in_features):
        raise ValueError(f"{name}: stored int8 weight {tuple(int8.shape)} does not fit {fp_layer}")
    bias = tensors.get(f"{name}.bias")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        qweight = torch._make_per_channel_quantized_tensor(int8, scale, zero_point, 0)
        layer = _qlinear_cls()(fp_layer.in_features, fp_layer.out_features, bias_=bias is not None,
                               dtype=torch.qint8)
        layer.set_weight_bias(qweight, bias)
    return layer


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def model_file_size(model_dir: str | os.PathLike) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``, ``*.pt``) in ``model_dir`` (not the tokenizer)."""
    model_dir = Path(model_dir)
    files = [p for p in model_dir.iterdir() if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file()]
    if not files:
        raise FileNotFoundError(f"no weight files in {model_dir}")
    return sum(p.stat().st_size for p in files)
