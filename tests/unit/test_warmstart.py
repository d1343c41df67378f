"""train.init_from a registered (quantized) version: every quantization method dequantizes to the float model."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raydistill.tasks.quantize import quantize, quantize_dynamic_int8, save_quantized
from raydistill.tasks.warmstart import load_init_weights


@pytest.mark.parametrize("tied", [True, False])
@pytest.mark.parametrize("method", ["int8_dynamic", "int8_weight_only", "int4_weight_only", "dynamic_int8"])
def test_a_quantized_version_of_any_method_starts_training_as_its_dequantized_float_model(method, tied, tmp_path,
                                                                                           tiny_tokenizer):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=tied)).eval()
    # dynamic_int8: the old torch.ao format, which registered versions of earlier releases hold
    q = quantize_dynamic_int8(model) if method == "dynamic_int8" else quantize(model, method)
    save_quantized(q, tiny_tokenizer, tmp_path / "v1")
    fp = load_init_weights(tmp_path / "v1")
    assert all(p.dtype == torch.float32 for p in fp.parameters())
    ids = torch.randint(0, 1000, (2, 8), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, served = fp(ids).logits, q(ids).logits.float()
    assert (got - served).abs().max() < 0.05  # the same weights, only the kernels differ
