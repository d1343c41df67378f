"""Save and load quantized models: one ``model.safetensors`` (no pickle), ``quantization.json``, config, tokenizer.

``quantization.json`` holds the method, the layer table (:func:`methods.apply_plan`: each replaced layer's kind,
bits, group size and shape), the float dtype of everything else, what stays in higher precision, and, for a
prefix/prompt PEFT student or a LoRA student exported QLoRA-style (``adapter_kind: lora``, :mod:`.lora`), the
adapter sub-directory (PEFT's own safetensors). Loading rebuilds the
architecture from ``config.json``, swaps in empty layers of the stored kinds and loads the state dict strictly
(a tied embedding is stored once, as the ``lm_head`` integers). Directories written by the old torch.ao
``dynamic_int8`` code still load (:mod:`.legacy`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from raydistill.tasks.fileio import replace_dir
from raydistill.tasks.guard import PICKLE_SUFFIXES, PickleRefusedError
from raydistill.tasks.quantize import legacy
from raydistill.tasks.quantize import lora as lora_export
from raydistill.tasks.quantize.methods import METHODS, rebuild

FORMAT_VERSION = 2
WEIGHTS_FILE, META_FILE, ADAPTER_DIR = "model.safetensors", "quantization.json", "adapter"


class UnsafeCheckpointError(PickleRefusedError, ValueError):
    """A quantized model directory holds a pickle file (arbitrary code on load): refused (the same refusal as
    :func:`raydistill.tasks.guard.refuse_pickle`, worded for a quantized export)."""


def _tensors(model: nn.Module) -> dict:
    """The state dict with each shared tensor once (a tied embedding is stored as the ``lm_head`` entries)."""
    seen, out = set(), {}
    for k, v in reversed(list(model.state_dict(keep_vars=True).items())):  # lm_head comes last: its names win
        key = id(v) if v.is_meta else v.data_ptr()  # a model built on the meta device has no storage to compare
        if key not in seen:
            seen.add(key)
            out[k] = v.detach().contiguous()
    return dict(reversed(out.items()))


def save_quantized(model: nn.Module, tokenizer, out_dir: str | os.PathLike, recipe: dict | None = None) -> Path:
    """Write a model from :func:`raydistill.tasks.quantize.quantize` (or the legacy torch.ao one) to ``out_dir``,
    atomically (written beside it, then renamed over it)."""
    info = getattr(model, "_raydistill_quant", None)
    if info is None:
        if legacy.quantized_layers(model):
            return legacy.save_quantized(model, tokenizer, out_dir, recipe)
        raise ValueError("save_quantized: the model has no quantized layers; call quantize(model, method) first")
    base, adapter = info["base"], info["adapter"]
    meta = {"format_version": FORMAT_VERSION, **{k: v for k, v in info.items() if k not in ("base", "adapter")},
            "adapter": ADAPTER_DIR if adapter is not None else None, "torch_version": torch.__version__,
            "recipe": recipe or {}}
    tensors = _tensors(base)
    if info.get("adapter_kind") == lora_export.KIND:
        tensors = lora_export.base_tensors(tensors)
    out = Path(out_dir)
    with replace_dir(out) as tmp:
        save_file(tensors, str(tmp / WEIGHTS_FILE),
                  metadata={"format": "pt", "raydistill": info["method"]})
        base.config.save_pretrained(tmp)
        if adapter is not None:
            adapter.save_pretrained(tmp / ADAPTER_DIR, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2))
    return out


def refuse_pickle(model_dir: Path) -> None:
    """Raise :class:`UnsafeCheckpointError` if any file under ``model_dir`` is a pickle format."""
    bad = [p for p in model_dir.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES]
    if bad:
        raise UnsafeCheckpointError(f"{bad[0]} is a pickle file; raydistill loads only safetensors. Remove it "
                                    "and re-export the model with save_quantized")


def read_quantization_info(model_dir: str | os.PathLike) -> dict:
    """``quantization.json`` of a quantized model directory, checked for a method this code can load."""
    path = Path(model_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{model_dir} is not a quantized model directory (no {META_FILE})")
    meta = json.loads(path.read_text())
    known = (*METHODS, *legacy.METHODS)
    if meta.get("method") not in known:
        raise ValueError(f"{path}: unsupported quantization method {meta.get('method')!r}; known: {known}")
    want = legacy.FORMAT_VERSION if meta["method"] in legacy.METHODS else FORMAT_VERSION
    if meta.get("format_version") != want:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} != {want}")
    return meta


def load_quantized(model_dir: str | os.PathLike) -> nn.Module:
    """THE loader of quantized students (Serve, MLflow pyfunc, register): a model directory written by
    :func:`save_quantized` → the model (eval mode, CPU), with its prefix/prompt or LoRA adapter attached if it
    has one."""
    from transformers import AutoConfig, AutoModelForCausalLM

    model_dir = Path(model_dir)
    refuse_pickle(model_dir)
    meta = read_quantization_info(model_dir)
    if meta["method"] in legacy.METHODS:
        return legacy.load_quantized(model_dir)
    dtype = getattr(torch, meta["dtype"])
    with torch.device("meta"):  # no float copy of the weights is ever allocated: the stored tensors are assigned
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir), dtype=dtype).eval()
        rebuild(model, meta["layers"])
    # copies, not views of safetensors' file mapping: a model holding one stored tensor would keep every page of
    # the mapping it ever touched resident (twice, for integers the kernels re-pack), and the mapping's offsets
    # are not aligned for the kernels' AVX-512 loads
    tensors = {k: v.clone() for k, v in load_file(str(model_dir / WEIGHTS_FILE)).items()}
    expected = _tensors(model).keys()
    if set(expected) != set(tensors):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise ValueError(f"{model_dir / WEIGHTS_FILE} does not match the architecture in config.json: "
                         f"missing {missing[:5]}, unexpected {extra[:5]}")
    try:
        model.load_state_dict(tensors, strict=False, assign=True)
    except RuntimeError as e:
        raise ValueError(f"{model_dir / WEIGHTS_FILE} does not fit config.json: {str(e)[:500]}") from None
    _materialize(model)
    model._raydistill_quant = {**meta, "base": model, "adapter": None}
    if meta.get("adapter_kind") == lora_export.KIND:
        peft = lora_export.load(model, model_dir / meta["adapter"])
        peft._raydistill_quant = model._raydistill_quant = {**meta, "base": model, "adapter": peft}
        return peft
    if meta.get("adapter"):
        from peft import PeftModel

        peft = PeftModel.from_pretrained(model, model_dir / meta["adapter"], is_trainable=False).eval()
        peft.word_embeddings = model.get_input_embeddings()  # PEFT finds it by parameter shape: it has buffers
        peft._raydistill_quant = {**meta, "base": model, "adapter": peft}
        return peft
    return model


def _materialize(model: nn.Module) -> None:
    """After assigning the stored tensors to a model built on the meta device: a tied input embedding shares
    the loaded head; buffers that are computed, not stored (rotary ``inv_freq``), are computed on the CPU."""
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if getattr(emb, "weight", None) is not None and emb.weight.is_meta and getattr(model.config, "tie_word_embeddings",
                                                                                   False):
        emb.weight = head.weight
    for module in model.modules():
        if any(b.is_meta for b in module.buffers(recurse=False)):
            module.to_empty(device="cpu", recurse=False)
            model._init_weights(module)  # transformers' own init: recomputes rotary frequencies
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if left:
        raise ValueError(f"load_quantized: {left[:5]} are neither stored nor computed at load time")


def read_stored(model_dir: str | os.PathLike) -> tuple[dict, dict]:
    """``(quantization.json, {name: tensor})`` of a directory written by :func:`save_quantized`, not built into
    a model (the exports read the stored integers directly)."""
    model_dir = Path(model_dir)
    refuse_pickle(model_dir)
    return read_quantization_info(model_dir), load_file(str(model_dir / WEIGHTS_FILE))


def stored_integers(tensors: dict, name: str, layer: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 (out, in), scale float32 (out, groups))`` of one integer layer of the layer table, as stored
    (an untied quantized embedding is stored as ``<name>.source``)."""
    from raydistill.tasks.quantize.qlinear import unpack

    prefix = f"{layer['name']}.source" if layer.get("kind") == "rows" else name
    return unpack(tensors[f"{prefix}.qweight"], layer["bits"]), tensors[f"{prefix}.scale"].float()


def model_file_size(model_dir: str | os.PathLike) -> int:
    """Bytes of the weight files (``*.safetensors``, ``*.bin``, ``*.pt``) in ``model_dir`` and its adapter
    sub-directory (not the tokenizer)."""
    model_dir = Path(model_dir)
    files = [p for p in model_dir.rglob("*") if p.suffix in (".safetensors", ".bin", ".pt") and p.is_file()]
    if not files:
        raise FileNotFoundError(f"no weight files in {model_dir}")
    return sum(p.stat().st_size for p in files)
