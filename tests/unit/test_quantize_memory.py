"""Resident memory (tasks/quantize/memory.py), each model measured in a fresh Python process: an int4 model
holds less than a bf16 one, an int8 one in between, and a float32 one about twice the bf16 one."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raydistill.tasks.quantize import quantize, save_quantized
from raydistill.tasks.quantize.memory import resident_memory


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A 10M-parameter model (a 32k vocabulary, as real ones: the embedding dominates) in four forms."""
    root = tmp_path_factory.mktemp("rss")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=32768, hidden_size=256, intermediate_size=1024,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                         tie_word_embeddings=True)).eval()
    model.save_pretrained(root / "fp32")
    for method in ("bf16", "int8_weight_only", "int4_weight_only"):
        save_quantized(quantize(model, method, group_size=32), None, root / method)
    return root


WEIGHTS_MB = 10.36e6 / 2**20  # parameters, the tied embedding once
BUFFERS_MB = 16.0


def test_an_int4_model_holds_less_resident_memory_than_a_bf16_one(saved):
    rss = {name: resident_memory(saved / name)["rss_mb"] for name in ("bf16", "int4_weight_only")}
    # each holds its weights once plus run-time buffers (11-13 MB seen, varying by machine); a dequantized or
    # second bf16 copy of the weights would add 2 * WEIGHTS_MB (19.8 MB), more than the 16 MB allowed for buffers
    assert rss["int4_weight_only"] < 0.6 * rss["bf16"], rss
    assert rss["bf16"] < 2 * WEIGHTS_MB + BUFFERS_MB and rss["int4_weight_only"] < 0.7 * WEIGHTS_MB + BUFFERS_MB, rss


@pytest.mark.slow
def test_resident_memory_orders_int4_int8_bf16_fp32(saved):
    rss = {name: resident_memory(saved / name)["rss_mb"] for name in ("fp32", "bf16", "int8_weight_only",
                                                                       "int4_weight_only")}
    assert rss["int4_weight_only"] < rss["int8_weight_only"] < rss["bf16"] < rss["fp32"], rss
    assert rss["fp32"] > 4 * WEIGHTS_MB * 0.9, rss  # the figure is real: a float32 model costs its bytes
