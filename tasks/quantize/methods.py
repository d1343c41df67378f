"""Turn a float causal LM into a quantized one by a per-layer plan: which layers get 16 (bf16), 8 or 4 bits.

Every method is a plan plus how the integers are chosen:

==================  ==============================================================================================
``bf16``            the whole model cast to bfloat16 (norms included); no integer layers
``int8_dynamic``    int8 per-channel weights; activations quantized per token at run time by torchao's
                    ``Int8DynamicActivationInt8WeightConfig`` (maintained; replaces the deprecated torch.ao path)
``int8_weight_only`` int8 weights per channel (the stage's default, ``quantize.int8_per_channel``) or
                    group-wise; per channel they run on torch's packed int8 kernel (:mod:`.kernels`)
``int4_weight_only`` int4 group-wise weights (two per byte), torch's packed int4 CPU kernel
``gptq``            int4 group-wise, integers chosen by GPTQ on calibration windows (:mod:`.gptq`)
``qad``             int4 group-wise round-to-nearest of a student fine-tuned with fake-quantized weights
``mixed``           per layer 16/8/4 bits chosen by KL sensitivity under a size budget (:mod:`.mixed`); its
                    int8 layers are per channel (one scale per output row), its int4 layers group-wise
==================  ==============================================================================================

Embeddings and ``lm_head`` are quantized too (``embedding_bits``, default: the method's bits). A tied
embedding shares the quantized ``lm_head`` integers: stored once, looked up row by row. Norms and biases stay
float32 (bf16 in ``bf16``): they are a few KB.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from raydistill.tasks.quantize.qlinear import FakeQuantEmbedding, FakeQuantLinear, QuantEmbedding, QuantLinear, rtn

METHODS = ("bf16", "int8_dynamic", "int8_weight_only", "int4_weight_only", "gptq", "qad", "mixed")
METHOD_BITS = {"int8_dynamic": 8, "int8_weight_only": 8, "int4_weight_only": 4, "gptq": 4, "qad": 4}
EMBEDDING = "<embedding>"  # plan key of an untied input embedding


class HalfLinear(nn.Linear):
    """A linear layer kept at bf16 inside a float32 model (``mixed``): casts in and out."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = None if self.bias is None else self.bias
        return nn.functional.linear(x.to(self.weight.dtype), self.weight, b).to(x.dtype)


class Int8DynamicLinear(QuantLinear):
    """int8 per-channel weights (stored like :class:`QuantLinear`, 8 bits) run by torchao's dynamic int8 kernel:
    the torchao layer is rebuilt from the stored integers on first use, so saved and loaded models agree."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ao = self.__dict__.get("_ao")
        if ao is None:
            from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

            ao = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None)
            with torch.no_grad():
                ao.weight.copy_(self.weight_float())
                if self.bias is not None:
                    ao.bias.copy_(self.bias)
            holder = nn.Sequential(ao)
            quantize_(holder, Int8DynamicActivationInt8WeightConfig())
            self.__dict__["_ao"] = ao = holder[0]  # not a submodule: not in the state dict
        return ao(x.float()).to(x.dtype)


def unwrap(model: nn.Module) -> tuple[nn.Module, nn.Module | None]:
    """``(base model, prompt/prefix PEFT wrapper or None)``; LoRA/IA3 adapters are merged into a copy first."""
    if not hasattr(model, "peft_config"):
        return model, None
    if hasattr(model, "merge_and_unload"):  # LoRA / IA3: the adapter folds into the weights
        return copy.deepcopy(model).merge_and_unload(), None
    return model.get_base_model(), model  # prefix / prompt: quantize the base, keep the adapter beside it


def linear_names(model: nn.Module) -> list[str]:
    """Names of every ``nn.Linear`` (``lm_head`` included), in module order."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]


def is_tied(model: nn.Module) -> bool:
    emb, out = model.get_input_embeddings(), model.get_output_embeddings()
    return isinstance(out, nn.Linear) and emb is not None and out.weight.data_ptr() == emb.weight.data_ptr()


def uniform_plan(model: nn.Module, bits: int, embedding_bits: int | None = None) -> dict[str, int]:
    """``{layer: bits}`` for every linear; ``lm_head`` and an untied embedding get ``embedding_bits``."""
    head = head_name(model)
    eb = embedding_bits or bits
    plan = {n: (eb if n == head else bits) for n in linear_names(model)}
    if not is_tied(model):
        plan[EMBEDDING] = eb
    return plan


def head_name(model: nn.Module) -> str | None:
    """The module name of ``model``'s output embedding (``lm_head``), or None without one."""
    head = model.get_output_embeddings()
    return next((n for n, m in model.named_modules() if m is head), None)


def _set(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _embedding_name(model: nn.Module) -> str:
    emb = model.get_input_embeddings()
    return next(n for n, m in model.named_modules() if m is emb)


def build_layer(kind: str, bits: int, in_f: int, out_f: int, group_size: int | None, bias: bool) -> nn.Module:
    """An empty layer of the stored kind (``dequant``, ``torchao_int8_dynamic`` or ``bf16``), for loading."""
    if kind == "bf16":
        return HalfLinear(in_f, out_f, bias=bias, dtype=torch.bfloat16)
    cls = Int8DynamicLinear if kind == "torchao_int8_dynamic" else QuantLinear
    return cls(in_f, out_f, bits, group_size, bias)


def apply_plan(model: nn.Module, plan: dict[str, int], *, group_size: int | None, int8_group_size: int | None,
               kernel: str = "dequant", integers: dict | None = None) -> dict:
    """Replace ``model``'s layers in place by ``plan`` and return the layer table stored in ``quantization.json``
    (``{name: {"kind", "bits", "group_size", "in", "out", "bias"}}``). 4-bit layers use ``group_size``, 8-bit
    ones ``int8_group_size`` (``None``: one scale per output row). ``integers`` (GPTQ) gives ``(q, scale)``
    for some layers instead of round-to-nearest."""
    integers = integers or {}
    groups = {4: group_size, 8: int8_group_size}
    tied, table = is_tied(model), {}
    head = head_name(model)
    for name in [n for n in plan if n != EMBEDDING]:
        lin, bits = model.get_submodule(name), plan[name]
        if bits == 16:
            new = HalfLinear(lin.in_features, lin.out_features, bias=lin.bias is not None, dtype=torch.bfloat16)
            with torch.no_grad():
                new.weight.copy_(lin.weight)
                if lin.bias is not None:
                    new.bias.copy_(lin.bias)
            kind = "bf16"
        else:
            q, s = integers.get(name) or rtn(lin.weight.data, bits, groups[bits])
            kind = kernel if bits == 8 else "dequant"
            cls = Int8DynamicLinear if kind == "torchao_int8_dynamic" else QuantLinear
            new = cls.from_weights(q, s, None if lin.bias is None else lin.bias.data.float(), bits)
        table[name] = {"kind": kind, "bits": bits, "group_size": getattr(new, "group_size", None),
                       "in": lin.in_features, "out": lin.out_features, "bias": lin.bias is not None}
        _set(model, name, new)
    emb_name = _embedding_name(model)
    if tied and head in plan and plan[head] != 16:
        _set(model, emb_name, QuantEmbedding(model.get_submodule(head), tied=True))
        table[EMBEDDING] = {"kind": "tied", "name": emb_name, "bits": plan[head], "head": head}
    elif EMBEDDING in plan and plan[EMBEDDING] != 16:
        w = model.get_submodule(emb_name).weight.data
        q, s = rtn(w, plan[EMBEDDING], groups[plan[EMBEDDING]])
        _set(model, emb_name, QuantEmbedding(QuantLinear.from_weights(q, s, None, plan[EMBEDDING])))
        table[EMBEDDING] = {"kind": "rows", "name": emb_name, "bits": plan[EMBEDDING],
                            "group_size": model.get_submodule(emb_name).source.group_size,
                            "in": w.shape[1], "out": w.shape[0]}
    return table


def rebuild(model: nn.Module, table: dict) -> None:
    """Put empty layers of ``table``'s kinds into a freshly built float ``model`` (then load the state dict)."""
    for name, t in table.items():
        if name != EMBEDDING:
            _set(model, name, build_layer(t["kind"], t["bits"], t["in"], t["out"], t["group_size"], t["bias"]))
    emb = table.get(EMBEDDING)
    if emb and emb["kind"] == "tied":
        _set(model, emb["name"], QuantEmbedding(model.get_submodule(emb["head"]), tied=True))
    elif emb:
        _set(model, emb["name"], QuantEmbedding(QuantLinear(emb["in"], emb["out"], emb["bits"], emb["group_size"],
                                                            False)))


def fake_quantize_model(model: nn.Module, bits: int, group_size: int | None) -> nn.Module:
    """Make every ``nn.Linear`` and the input embedding fake-quantized in place (same parameters, so training,
    checkpoints and export see an ordinary model; straight-through gradients) for QAD: the forward is the one
    ``quantize(model, "qad")`` will have, up to its bf16 matmuls."""
    emb = model.get_input_embeddings()
    for m in model.modules():
        if type(m) is nn.Linear or (m is emb and type(m) is nn.Embedding):
            m.__class__ = FakeQuantLinear if isinstance(m, nn.Linear) else FakeQuantEmbedding
            m.bits, m.group_size = bits, group_size
    return model


def layer_bytes(numel_out: int, numel_in: int, bits: int, group_size: int | None) -> int:
    """Stored bytes of one ``(out, in)`` weight at ``bits`` (16 = bf16), scales included."""
    if bits == 16:
        return 2 * numel_out * numel_in
    groups = 1 if not group_size or group_size >= numel_in else numel_in // group_size
    return numel_out * numel_in * bits // 8 + 4 * numel_out * groups
