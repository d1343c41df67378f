"""QLoRA-style export (``quantize.lora: adapter``): a LoRA student ships as its quantized base plus its LoRA
adapter in float32, instead of the adapter merged into the weights before quantizing.

Why: merging rounds the adapter's low-rank update with the base weights (int4 rounding error is larger than
many LoRA updates), and a merged export loses the adapter — one base can no longer carry several adapters.
Kept beside the base, the adapter adds ``r · (in + out)`` float32 numbers per target layer (a few % of the
bytes) and its update is applied exactly on top of the quantized base.

On disk the base is the ordinary quantized ``model.safetensors`` (the LoRA wrappers' ``base_layer`` names
mapped back to the plain names) and the adapter is PEFT's own ``adapter/`` directory (``adapter_config.json``
+ ``adapter_model.safetensors``), so the adapter also loads onto the float base with plain PEFT. Loading puts
PEFT's LoRA layer around the quantized layers (:class:`QuantLoraLinear`, registered as a PEFT custom module).
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from torch import nn

from raydistill.tasks.quantize.qlinear import QuantLinear

KIND = "lora"  # quantization.json "adapter_kind"


def is_lora(model: nn.Module) -> bool:
    """Whether ``model`` is a PEFT model whose active adapter is LoRA."""
    configs = getattr(model, "peft_config", None) or {}
    config = configs.get(getattr(model, "active_adapter", "default"))
    return str(getattr(config, "peft_type", "")).endswith("LORA")


def split(model: nn.Module) -> tuple[nn.Module, dict, object]:
    """``(float base copy with the LoRA layers removed, not merged; adapter state dict (float32); LoraConfig)``."""
    from peft import get_peft_model_state_dict

    state = {k: v.detach().float().clone() for k, v in get_peft_model_state_dict(model).items()}
    config = copy.deepcopy(model.peft_config[model.active_adapter])
    return copy.deepcopy(model).unload(), state, config


def _quant_lora_class():
    from peft.tuners.lora.layer import Linear

    class QuantLoraLinear(Linear):
        """PEFT's LoRA linear around a :class:`QuantLinear` base (the forward is PEFT's: base output plus
        ``B(A(x)) · scaling``); it only learns the base's shape, which PEFT cannot read off a custom layer."""

        def _get_in_out_features(self, module: nn.Module) -> tuple[int, int]:
            return module.in_features, module.out_features

    return QuantLoraLinear


def _config(config):
    config = copy.deepcopy(config)
    config.inference_mode = True
    config._register_custom_module({QuantLinear: _quant_lora_class()})
    return config


def attach(base: nn.Module, config, state: dict) -> nn.Module:
    """``base`` (quantized) wrapped in its LoRA adapter again, with the adapter weights ``state`` (eval mode)."""
    from peft import get_peft_model, set_peft_model_state_dict

    peft = get_peft_model(base, _config(config))
    result = set_peft_model_state_dict(peft, state)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(f"LoRA adapter does not fit the quantized base: missing {missing[:3]}, "
                         f"unexpected {list(result.unexpected_keys)[:3]}")
    return peft.eval()


def load(base: nn.Module, adapter_dir: Path) -> nn.Module:
    """``base`` (quantized, loaded) with the LoRA adapter saved in ``adapter_dir`` (PEFT format) around it."""
    from peft import LoraConfig, PeftModel

    config = _config(LoraConfig.from_pretrained(str(adapter_dir)))
    return PeftModel.from_pretrained(base, str(adapter_dir), config=config, is_trainable=False).eval()


def base_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The base model's tensors from a LoRA-wrapped state dict: adapter weights dropped, ``.base_layer.`` names
    mapped back to the plain layer names (what :func:`load` expects before it wraps the base)."""
    return {k.replace(".base_layer.", "."): v for k, v in state.items() if ".lora_" not in k}
