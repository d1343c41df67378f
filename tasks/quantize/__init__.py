"""Quantize a trained student by one of several methods and save it as safetensors (never pickle).

    from raydistill.tasks.quantize import quantize, save_quantized, load_quantized
    q = quantize(model, "int4_weight_only", group_size=32)       # a new model; ``model`` is left untouched
    save_quantized(q, tokenizer, "run/quantize/int4_weight_only", recipe={"source": "run/train/student"})
    q2 = load_quantized("run/quantize/int4_weight_only")         # same logits

Methods and what stays in higher precision: :mod:`.methods`; integer layers: :mod:`.qlinear`; GPTQ:
:mod:`.gptq`; mixed precision by KL: :mod:`.mixed`; the file format: :mod:`.store`; the old torch.ao
``dynamic_int8`` format (still loadable): :mod:`.legacy`. Every PEFT kind quantizes: LoRA/IA3 are merged, a
prefix/prompt student keeps its adapter beside the quantized base; with ``lora="adapter"`` a LoRA student keeps
its float32 adapter beside the quantized base too (QLoRA-style, :mod:`.lora`).
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from raydistill.tasks.quantize.legacy import quantize_dynamic_int8, quantized_layers
from raydistill.tasks.quantize.lora import KIND as LORA
from raydistill.tasks.quantize.lora import attach, is_lora, split
from raydistill.tasks.quantize.methods import (EMBEDDING, METHOD_BITS, METHODS, apply_plan, fake_quantize_model,
                                               is_tied, uniform_plan, unwrap)
from raydistill.tasks.quantize.store import (META_FILE, UnsafeCheckpointError, load_quantized, model_file_size,
                                             read_quantization_info, save_quantized)

__all__ = ["METHODS", "META_FILE", "quantize", "save_quantized", "load_quantized", "model_file_size", "read_quantization_info",
           "quantize_dynamic_int8", "quantized_layers", "fake_quantize_model", "UnsafeCheckpointError",
           "higher_precision"]


def quantize(model: nn.Module, method: str, *, group_size: int | None = 32, embedding_bits: int | None = None,
             plan: dict | None = None, calibration: torch.Tensor | None = None,
             int8_per_channel: bool = True, lora: str = "merge") -> nn.Module:
    """A quantized copy of ``model`` (plain or PEFT), float32 outside the quantized layers, eval mode, CPU.

    ``plan`` (``mixed``): ``{layer: 16|8|4}`` from :func:`.mixed.plan_for_budget`. ``calibration`` (``gptq``):
    token ids ``(N, L)``. ``qad``: pass the QAD-trained student; it is rounded like ``int4_weight_only``.
    ``int8_per_channel``: ``int8_weight_only`` (and int8 embeddings) with one scale per output row (the layout of
    torch's int8 kernel, :mod:`.kernels`) instead of per ``group_size`` columns (``mixed``'s int8 layers always
    are per row; ``int8_dynamic``'s too).
    ``lora``: ``merge`` folds a LoRA adapter into the weights first; ``adapter`` quantizes the LoRA student's base
    and keeps the adapter (float32) around it, saved beside it (:mod:`.lora`).
    """
    if method not in METHODS:
        raise ValueError(f"quantize.method {method!r} is not one of {METHODS}")
    if lora not in ("merge", "adapter"):
        raise ValueError(f"quantize.lora {lora!r} is not 'merge' or 'adapter'")
    if lora == "adapter" and is_lora(model):
        base, state, config = split(model)
        q = quantize(base, method, group_size=group_size, embedding_bits=embedding_bits, plan=plan,
                     calibration=calibration, int8_per_channel=int8_per_channel)
        info = q._raydistill_quant
        peft = attach(q, config, state)
        info["higher_precision"].append(f"LoRA adapter {sorted(config.target_modules)} (float32)")
        peft._raydistill_quant = q._raydistill_quant = {**info, "adapter": peft, "adapter_kind": LORA}
        return peft
    base, adapter = unwrap(model)
    if adapter is not None:
        adapter = copy.deepcopy(adapter)
        base = adapter.get_base_model()
    else:
        base = copy.deepcopy(base)
    base = base.to("cpu").eval()
    if method == "bf16":
        _to_bf16(base)
        table, dtype = {}, "bfloat16"
    else:
        base.to(torch.float32)
        int8_group = None if int8_per_channel else group_size
        table = _integer_layers(base, method, group_size, int8_group, embedding_bits, plan, calibration)
        dtype = "float32"
    info = {"method": method, "layers": table, "dtype": dtype, "group_size": group_size,
            "tied_embedding": is_tied(model if adapter is None else base) if method == "bf16" else
            (table.get(EMBEDDING) or {}).get("kind") == "tied"}
    info["higher_precision"] = higher_precision(base, table, dtype)
    target = adapter if adapter is not None else base
    if adapter is not None:
        adapter.word_embeddings = base.get_input_embeddings()  # PEFT looks rows up here (prompt tuning)
    target._raydistill_quant = {**info, "base": base, "adapter": adapter}
    return target


def _to_bf16(model: nn.Module) -> None:
    """Cast parameters and persistent buffers to bf16; non-persistent buffers (rotary ``inv_freq``) stay as
    they are, as ``from_config(dtype=bfloat16)`` builds them at load time."""
    keep = {n: b.clone() for n, b in model.named_buffers() if n not in model.state_dict()}
    model.to(torch.bfloat16)
    for name, buf in keep.items():
        owner, _, attr = name.rpartition(".")
        setattr(model.get_submodule(owner) if owner else model, attr, buf)


def _integer_layers(base, method, group_size, int8_group, embedding_bits, plan, calibration) -> dict:
    if method == "mixed":
        if plan is None:
            raise ValueError("quantize: method 'mixed' needs plan= (tasks.quantize.mixed.plan_for_budget)")
        return apply_plan(base, plan, group_size=group_size, int8_group_size=None)
    bits = METHOD_BITS[method]
    uplan = uniform_plan(base, bits, embedding_bits)
    integers = None
    if method == "gptq":
        from raydistill.tasks.quantize.gptq import gptq_integers

        if calibration is None:
            raise ValueError("quantize: method 'gptq' needs calibration= token windows (N, L)")
        names = [n for n, b in uplan.items() if n != EMBEDDING and b == bits]
        integers = gptq_integers(base, names, calibration, bits, group_size)
    kernel = "torchao_int8_dynamic" if method == "int8_dynamic" else "dequant"
    return apply_plan(base, uplan, group_size=group_size, kernel=kernel, integers=integers,
                      int8_group_size=None if method == "int8_dynamic" else int8_group)


def higher_precision(base: nn.Module, table: dict, dtype: str) -> list[str]:
    """Parameters not in an integer layer (norms, biases, bf16 layers): what the report says stays float."""
    integer = [n for n, t in table.items() if n != EMBEDDING and t["kind"] != "bf16"]
    out = sorted({k.rsplit(".", 1)[0] for k, _ in base.named_parameters()
                  if not any(k.startswith(n + ".") for n in integer)})
    return [f"{n} ({dtype if not n or n not in table else 'bfloat16'})" for n in out]
