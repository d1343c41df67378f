"""Students: layer copies reproduce the teacher, KV cache works after renumbering, PEFT trains/saves/loads."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raydistill.tasks.config import ConfigError, PeftConfig, StudentConfig
from raydistill.tasks.students import (build_student, forward_logits, load_student, peft_method, resolve_layers,
                                       save_student)

VOCAB = 97


@pytest.fixture(scope="module")
def teacher():
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def ids():
    return torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(1))


def test_resolve_layers_validates():
    assert resolve_layers([0, -1], 4) == [0, 3]
    with pytest.raises(ConfigError, match="does not exist"):
        resolve_layers([4], 4)
    with pytest.raises(ConfigError, match="twice"):
        resolve_layers([1, -3], 4)
    with pytest.raises(ConfigError, match="at least one"):
        resolve_layers([], 4)


def test_layer_subset_copies_the_listed_teacher_layers(teacher):
    student = build_student(StudentConfig(init="layers", layers=[0, -1]), teacher)
    assert student.config.num_hidden_layers == 2
    t, s = teacher.state_dict(), student.state_dict()
    for new, old in enumerate([0, 3]):
        for name in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(s[f"model.layers.{new}.{name}"], t[f"model.layers.{old}.{name}"])
    assert not torch.equal(s["model.layers.1.self_attn.q_proj.weight"], t["model.layers.1.self_attn.q_proj.weight"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert torch.equal(s["model.norm.weight"], t["model.norm.weight"])
    assert student.lm_head.weight.data_ptr() == student.model.embed_tokens.weight.data_ptr()  # still tied
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]


def test_all_layers_student_has_the_teachers_logits(teacher, ids):
    student = build_student(StudentConfig(init="layers", layers=[0, 1, 2, 3]), teacher).eval()
    with torch.no_grad():
        assert torch.allclose(student(ids).logits, teacher(ids).logits, atol=1e-5)


def test_kv_cache_decoding_matches_full_forward(teacher, ids):
    student = build_student(StudentConfig(init="layers", layers=[1, 3]), teacher).eval()
    with torch.no_grad():
        full = student(ids).logits
        out = student(ids[:, :8], use_cache=True)
        past, steps = out.cache, [out.logits]
        for j in range(8, 12):
            out = student(ids[:, j:j + 1], cache=past, use_cache=True)
            past = out.cache
            steps.append(out.logits)
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)


@pytest.mark.parametrize("rows", [VOCAB - 7, VOCAB + 11])
def test_layer_copy_with_another_vocab_size_cuts_or_pads_the_embedding_rows(teacher, ids, rows):
    student = build_student(StudentConfig(layers=[0, 1, 2, 3], overrides={"vocab_size": rows}), teacher).eval()
    emb, t_emb = student.model.embed_tokens.weight, teacher.model.embed_tokens.weight
    shared = min(rows, VOCAB)
    assert emb.shape == (rows, t_emb.shape[1]) and torch.equal(emb[:shared], t_emb[:shared])
    if rows > VOCAB:  # new rows start at the mean embedding
        assert torch.allclose(emb[VOCAB:], t_emb.mean(0, keepdim=True).expand(rows - VOCAB, -1))
    with torch.no_grad():  # all layers copied: the shared logits are the teacher's
        want = teacher(ids.clamp(max=shared - 1)).logits[..., :shared]
        assert torch.allclose(student(ids.clamp(max=shared - 1)).logits[..., :shared], want, atol=1e-5)
    with pytest.raises(ConfigError, match="only vocab_size"):
        build_student(StudentConfig(layers=[0], overrides={"hidden_size": 8}), teacher)


def test_config_init_applies_overrides_and_rejects_unknown(teacher):
    student = build_student(StudentConfig(init="config", overrides={"num_hidden_layers": 1,
                                                                    "intermediate_size": 48}), teacher)
    assert student.config.num_hidden_layers == 1 and len(student.model.layers) == 1
    assert student.model.layers[0].mlp.up_proj.out_features == 48
    with pytest.raises(ConfigError, match="num_hiden_layers"):
        build_student(StudentConfig(init="config", overrides={"num_hiden_layers": 1}), teacher)


def _train_one_step(model, ids):
    params = [p for p in model.parameters() if p.requires_grad]
    before = [p.detach().clone() for p in params]
    opt = torch.optim.AdamW(params, lr=1e-2)
    logits = forward_logits(model, ids)
    assert logits.shape == (*ids.shape, VOCAB)
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1))
    loss.backward()
    opt.step()
    return any(not torch.equal(b, p) for b, p in zip(before, params))


@pytest.mark.parametrize("method", ["none", "lora", "ia3", "prefix", "prompt"])
def test_peft_students_train_save_and_load(method, teacher, ids, tmp_path):
    torch.manual_seed(0)
    student = build_student(StudentConfig(layers=[0, 2], peft=PeftConfig(method=method, num_virtual_tokens=3)),
                            teacher)
    assert peft_method(student) == method
    trainable = sum(p.numel() for p in student.parameters() if p.requires_grad)
    total = sum(p.numel() for p in student.parameters())  # parameters() yields a tied weight once
    assert (trainable < total) == (method != "none")  # an adapter freezes the base weights
    student.train()
    assert _train_one_step(student, ids)
    student.eval()
    with torch.no_grad():
        want = forward_logits(student, ids)
    out = save_student(student, None, tmp_path / "s")
    assert (out / "model.safetensors").exists() and not list(out.rglob("*.bin"))
    assert peft_method(student) == method  # saving did not strip the adapter off the caller's model
    loaded = load_student(out)
    assert peft_method(loaded) == ("none" if method in ("none", "lora", "ia3") else method)
    with torch.no_grad():
        assert torch.allclose(forward_logits(loaded, ids), want, atol=1e-5)


def test_student_of_a_quantized_teacher_is_plain_and_resaves(teacher, ids, tmp_path):
    """A GGUF teacher's config carries a quantization_config; the fp32 student must not inherit it."""
    import copy

    gguf_like = copy.deepcopy(teacher)
    gguf_like.config.quantization_config = {"quant_method": "gguf", "gguf_file": "x.gguf", "dequantize": False}
    first = save_student(build_student(StudentConfig(layers=[0]), gguf_like), None, tmp_path / "a")
    assert "quantization_config" not in (first / "config.json").read_text()
    again = save_student(load_student(first), None, tmp_path / "b")  # what the training export does
    with torch.no_grad():
        assert torch.equal(load_student(again)(ids).logits, load_student(first)(ids).logits)


def test_load_student_rejects_a_non_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_student(tmp_path)


def test_born_again_student_has_the_teachers_architecture_and_fresh_weights(teacher, ids):
    student = build_student(StudentConfig(init="born_again", overrides={"vocab_size": VOCAB}), teacher)
    for name in ("num_hidden_layers", "hidden_size", "intermediate_size", "num_attention_heads", "vocab_size"):
        assert getattr(student.config, name) == getattr(teacher.config, name), name
    assert set(student.state_dict()) == set(teacher.state_dict())
    assert not torch.equal(student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight)
    again = build_student(StudentConfig(init="born_again"), teacher)  # seeded: the same fresh weights
    assert torch.equal(again.model.layers[0].mlp.up_proj.weight, student.model.layers[0].mlp.up_proj.weight)
    with pytest.raises(ConfigError, match=r"born_again.*teacher's own architecture"):
        build_student(StudentConfig(init="born_again", overrides={"num_hidden_layers": 1}), teacher)


def test_init_from_loads_a_student_export_or_a_dequantized_int8_model(teacher, ids, tmp_path):
    from raydistill.tasks.quantize import load_quantized, quantize_dynamic_int8, save_quantized
    from raydistill.tasks.warmstart import check_architecture, load_init_weights, weights_digest

    trained = build_student(StudentConfig(layers=[0, 2]), teacher).eval()
    with torch.no_grad():
        trained.model.layers[0].mlp.up_proj.weight.add_(0.5)  # weights the teacher's layers do not have
    export = save_student(trained, None, tmp_path / "export")
    loaded = load_init_weights(export)
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), trained.state_dict().values()))
    save_quantized(quantize_dynamic_int8(trained), None, tmp_path / "int8")
    dq = load_init_weights(tmp_path / "int8")  # what the registry holds: the champion as it is served
    with torch.no_grad():
        want = forward_logits(load_quantized(tmp_path / "int8"), ids)
        assert torch.allclose(forward_logits(dq, ids), want, atol=0.05)
        assert torch.allclose(dq.model.layers[0].mlp.up_proj.weight, trained.model.layers[0].mlp.up_proj.weight,
                              atol=0.02)
    assert weights_digest(export) != weights_digest(tmp_path / "int8")
    check_architecture(build_student(StudentConfig(layers=[1, 3]), teacher), loaded, "x")  # same shape: fine
    with pytest.raises(ConfigError, match=r"train.init_from x: num_hidden_layers is 2 there but 1 in the student"):
        check_architecture(build_student(StudentConfig(layers=[0]), teacher), loaded, "x")


def test_init_from_refuses_pickle_weights_and_non_model_dirs(tmp_path):
    from raydistill.tasks.warmstart import load_init_weights

    with pytest.raises(ConfigError, match="not a model directory"):
        load_init_weights(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ConfigError, match=r"no \*.safetensors weights there \(pickle weight files are never loaded"):
        load_init_weights(tmp_path)
