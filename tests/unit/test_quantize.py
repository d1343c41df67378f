"""Dynamic int8: the saved/loaded model is bit-identical to the in-memory one, smaller, and close to fp32."""

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from raydistill.tasks.quantize import (
                                       load_quantized,
                                       model_file_size,
                                       quantize_dynamic_int8,
                                       quantized_layers,
                                       save_quantized,
                                       )


def tiny_llama(vocab=49152, hidden=64, inter=128, layers=2, tied=True, seed=0):
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         max_position_embeddings=512, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("tied", [True, False])
def test_round_trip_is_bit_identical(tmp_path, tiny_tokenizer, tied):
    model = tiny_llama(vocab=len(tiny_tokenizer), tied=tied)
    q = quantize_dynamic_int8(model)
    save_quantized(q, tiny_tokenizer, tmp_path / "int8", recipe={"source": "test"})
    loaded = load_quantized(tmp_path / "int8")
    ids = torch.randint(0, len(tiny_tokenizer), (3, 17), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(q, ids), logits(loaded, ids))
    assert quantized_layers(loaded) == quantized_layers(q)
    # a second save of the loaded model writes the very same tensors
    save_quantized(loaded, tiny_tokenizer, tmp_path / "again")
    first, second = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("int8", "again"))
    assert first.keys() == second.keys()
    assert all(first[k].dtype == second[k].dtype and torch.equal(first[k], second[k]) for k in first)


def test_every_linear_incl_lm_head_is_int8_and_original_untouched(tiny_tokenizer):
    model = tiny_llama(vocab=len(tiny_tokenizer))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = quantize_dynamic_int8(model)
    layers = quantized_layers(q)
    n_linear = sum(isinstance(m, nn.Linear) for m in model.modules())
    assert len(layers) == n_linear == 2 * 7 + 1 and "lm_head" in layers
    assert not any(isinstance(m, nn.Linear) for m in q.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert q.lm_head.weight().qscheme() == torch.per_channel_affine
    # tied: the embedding is the dequantized int8 lm_head matrix
    assert torch.equal(q.model.embed_tokens.weight, q.lm_head.weight().dequantize())


def test_saved_files_and_metadata(tmp_path, tiny_tokenizer):
    q = quantize_dynamic_int8(tiny_llama(vocab=len(tiny_tokenizer)))
    out = save_quantized(q, tiny_tokenizer, tmp_path / "int8", recipe={"source": "x"})
    names = {p.name for p in out.iterdir()}
    assert {"model.safetensors", "config.json", "quantization.json", "tokenizer.json"} <= names
    assert not any(n.endswith((".bin", ".pt", ".pkl")) for n in names)
    meta = json.loads((out / "quantization.json").read_text())
    assert meta["method"] == "dynamic_int8" and meta["scheme"] == "per_channel_affine"
    assert meta["torch_version"] == torch.__version__ and meta["recipe"] == {"source": "x"}
    assert meta["tied_embedding"] == "model.embed_tokens.weight" and "lm_head" in meta["layers"]
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert f.get_tensor("lm_head.weight.int8").dtype == torch.int8
        assert f.get_tensor("model.layers.0.mlp.up_proj.weight.scale").shape == (128,)
    assert "model.embed_tokens.weight" not in keys  # stored once, as the int8 lm_head


@pytest.mark.parametrize("tied,vocab,hidden,inter", [(True, None, 64, 128), (False, 512, 256, 1024)])
def test_int8_is_smaller_and_close(tmp_path, tiny_tokenizer, tied, vocab, hidden, inter):
    model = tiny_llama(vocab=vocab or len(tiny_tokenizer), hidden=hidden, inter=inter, tied=tied)
    model.save_pretrained(tmp_path / "fp32")
    q = quantize_dynamic_int8(model)
    save_quantized(q, None, tmp_path / "int8")
    ratio = model_file_size(tmp_path / "int8") / model_file_size(tmp_path / "fp32")
    assert ratio < 0.6, ratio
    ids = torch.randint(0, model.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    a, b = logits(model, ids), logits(q, ids)
    rel = (a - b).norm() / a.norm()
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    assert rel < 0.1 and kl < 1e-2, (rel, kl)


def test_bad_directories_are_clear_errors(tmp_path, tiny_tokenizer):
    with pytest.raises(ValueError, match="no quantized layers"):
        save_quantized(tiny_llama(vocab=256), None, tmp_path / "x")
    assert not (tmp_path / "x").exists()
    with pytest.raises(FileNotFoundError, match="quantization.json"):
        load_quantized(tmp_path)
    out = save_quantized(quantize_dynamic_int8(tiny_llama(vocab=256)), None, tmp_path / "int8")
    meta = json.loads((out / "quantization.json").read_text())
    (out / "quantization.json").write_text(json.dumps({**meta, "method": "gptq_int3"}))
    with pytest.raises(ValueError, match="unsupported quantization method 'gptq_int3'"):
        load_quantized(out)
    (out / "quantization.json").write_text(json.dumps(meta))
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(ValueError, match="does not fit|does not match"):
        load_quantized(out)


def test_save_replaces_existing_dir_atomically(tmp_path):
    q1 = quantize_dynamic_int8(tiny_llama(vocab=256, seed=1))
    q2 = quantize_dynamic_int8(tiny_llama(vocab=256, seed=2))
    save_quantized(q1, None, tmp_path / "int8")
    save_quantized(q2, None, tmp_path / "int8")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["int8"]  # no temp/old dirs left behind
    ids = torch.arange(10)[None]
    assert torch.equal(logits(load_quantized(tmp_path / "int8"), ids), logits(q2, ids))
