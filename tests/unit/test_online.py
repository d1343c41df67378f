"""Online teacher: dense targets + hidden states from a frozen teacher, layer maps, projection heads and the
student module that carries them; tokenizers: padding rows are accepted, a real mismatch is refused.
(The objective on these, online and from a cache, is tested in test_objective.py.)"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from raydistill.tasks.config import ConfigError, StudentConfig, TeacherConfig, TinyModelConfig, TrainConfig
from raydistill.tasks.losses import hidden_state_loss
from raydistill.tasks.online import (StudentWithHeads, capture_layer_outputs, make_projections, resolve_layer_map,
                                     student_with_heads, teacher_outputs)
from raydistill.tasks.students import check_vocab, copy_layers, forward_logits, write_init_student
from tinyllama import PAD, WORDS, tiny_batch, tiny_llama


def _tokenizer(words: list[str], eos: str = "<eos>"):
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, unk_token="<eos>")


BASE_WORDS = ["<eos>"] + [f"w{i}" for i in range(1, WORDS)]


# ------------------------------------------------------------------------------------------------ config, maps

def test_hidden_loss_needs_the_online_teacher():
    with pytest.raises(ConfigError, match="teacher_mode=online"):
        TrainConfig(hidden_loss="mse")
    with pytest.raises(ConfigError, match="pairs"):
        TrainConfig(teacher_mode="online", hidden_loss="mse", hidden_layer_map=[[0, 1, 2]])
    assert TrainConfig(teacher_mode="online", hidden_loss="cosine", hidden_layer_map=[[0, -1]]).hidden_weight == 1.0


def test_layer_map_defaults_and_validation():
    assert resolve_layer_map(None, copied=[0, 10, 20, 29], n_student=4, n_teacher=30) == [(0, 0), (1, 10), (2, 20),
                                                                                         (3, 29)]
    assert resolve_layer_map(None, copied=None, n_student=2, n_teacher=4) == [(0, 1), (1, 3)]  # last ↔ last
    assert resolve_layer_map(None, copied=None, n_student=3, n_teacher=3) == [(0, 0), (1, 1), (2, 2)]
    assert resolve_layer_map([[0, -1], [-1, 2]], copied=None, n_student=2, n_teacher=4) == [(0, 3), (1, 2)]
    with pytest.raises(ConfigError, match="teacher layer 4 does not exist"):
        resolve_layer_map([[0, 4]], copied=None, n_student=2, n_teacher=4)
    with pytest.raises(ConfigError, match="student layer -3"):
        resolve_layer_map([[-3, 0]], copied=None, n_student=2, n_teacher=4)


def test_projections_start_as_identity_or_seeded():
    same = make_projections(2, 6, 6)
    assert all(torch.equal(h.weight, torch.eye(6)) for h in same) and same[0].bias is None
    a, b = make_projections(1, 4, 6, seed=3), make_projections(1, 4, 6, seed=3)
    assert a[0].weight.shape == (6, 4) and torch.equal(a[0].weight, b[0].weight)  # identical on every worker


# ------------------------------------------------------------------------------------------------ teacher side

def test_captured_layer_outputs_are_the_pre_norm_residual_stream():
    model = tiny_llama(WORDS, layers=3)
    ids = tiny_batch().input_ids
    with torch.no_grad():
        model(input_ids=ids, output_hidden_states=True)  # Hugging Face installs its own capturing hooks once
    hooks = dict(model.model.layers[0]._forward_hooks)
    with torch.no_grad(), capture_layer_outputs(model, [0, 2]) as states:
        out = model(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    assert torch.allclose(states[0], hs[1])  # layer 0's output
    assert torch.allclose(model.model.norm(states[2]), hs[-1], atol=1e-6)  # HF's last entry is after the norm
    assert not torch.allclose(states[2], hs[-1])
    assert dict(model.model.layers[0]._forward_hooks) == hooks  # ours are removed on exit


def test_teacher_outputs_cut_extra_rows_renormalise_and_can_be_saved_for_backward():
    teacher = tiny_llama(WORDS + PAD, pad_mass=True)
    ids = tiny_batch().input_ids
    targets, states = teacher_outputs(teacher, ids, temperature=2.0, vocab_size=WORDS, layers=[1, 0, 1])
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    assert targets.logprobs.shape == (2, 6, WORDS)
    assert torch.allclose(targets.logprobs, torch.log_softmax(logits[..., :WORDS] / 2.0, -1), atol=1e-6)
    assert len(states) == 3 and torch.equal(states[0], states[2]) and not states[0].requires_grad
    x = torch.randn(2, 6, 16, requires_grad=True)
    F.cosine_similarity(x, states[0], dim=-1).sum().backward()  # inference tensors would refuse this
    assert x.grad is not None


def test_student_with_heads_returns_the_students_logits_and_its_projected_layers():
    teacher = tiny_llama(WORDS + PAD, pad_mass=True)
    student = copy_layers(teacher, [0, 1], vocab_size=WORDS).train()
    tc = TrainConfig(teacher_mode="online", hidden_loss="mse", hidden_layer_map=[[1, 0], [0, 1]])
    model = student_with_heads(student, tc, resolve_layer_map(tc.hidden_layer_map, copied=[0, 1], n_student=2,
                                                              n_teacher=2), teacher_dim=24)
    assert model.layers == [1, 0] and [h.weight.shape for h in model.projections] == [(24, 16), (24, 16)]
    assert {k.split(".")[0] for k in model.state_dict()} == {"student", "projections"}  # one module, one owner
    ids = tiny_batch().input_ids
    out = model(input_ids=ids)
    with capture_layer_outputs(student, [0, 1]) as states:
        logits = forward_logits(student, ids)
    assert torch.equal(out.logits, logits) and torch.equal(forward_logits(model, ids), logits)
    for got, layer, head in zip(out.projected, [1, 0], model.projections):
        assert got.shape == (2, 6, 24) and torch.allclose(got, head(states[layer]))
    targets = [torch.randn(2, 6, 24) for _ in range(2)]  # the loss on projected states = on raw ones + heads
    assert torch.allclose(hidden_state_loss(out.projected, targets, None, "cosine"),
                          hidden_state_loss([states[1], states[0]], targets, model.projections, "cosine"))
    plain = student_with_heads(student, TrainConfig(), [], teacher_dim=24)
    assert plain.projections is not None and len(plain.projections) == 0 and plain(input_ids=ids).projected == []
    with pytest.raises(ValueError, match="one per layer"):
        StudentWithHeads(student, make_projections(1, 16, 16), layers=[0, 1])


# ------------------------------------------------------------------------------------------------ tokenizers

def test_tokenizers_that_extend_the_teachers_are_accepted():
    teacher_tok = _tokenizer(BASE_WORDS)
    check_vocab(teacher_tok, _tokenizer(BASE_WORDS), teacher_rows=WORDS + PAD, student_rows=WORDS)
    check_vocab(teacher_tok, _tokenizer(BASE_WORDS + ["extra"]), teacher_rows=WORDS, student_rows=WORDS + 1)


@pytest.mark.parametrize("student_words,eos,match", [
    (BASE_WORDS[:5] + ["w6", "w5"] + BASE_WORDS[7:], "<eos>", "id 5 is 'w5' in the teacher's and 'w6'"),
    (BASE_WORDS[:30], "<eos>", "has 30 ids"),
    (BASE_WORDS, "w1", "special token ids differ .eos_token_id"),
])
def test_a_real_tokenizer_mismatch_is_refused_naming_both(student_words, eos, match):
    with pytest.raises(ConfigError, match=match) as err:
        check_vocab(_tokenizer(BASE_WORDS), _tokenizer(student_words, eos=eos), teacher_rows=WORDS,
                    student_rows=WORDS, teacher_name="'T-tok'", student_name="'S-tok'")
    assert "'T-tok'" in str(err.value) and "'S-tok'" in str(err.value)


def test_too_few_student_rows_for_the_teachers_tokenizer_are_refused():
    with pytest.raises(ConfigError, match="39 embedding rows"):
        check_vocab(_tokenizer(BASE_WORDS), _tokenizer(BASE_WORDS), teacher_rows=WORDS, student_rows=WORDS - 1)


def test_init_student_with_a_mismatched_student_tokenizer_is_refused(tmp_path, tiny_tokenizer):
    teacher_cfg = TeacherConfig(source="tiny", tiny=TinyModelConfig(num_layers=2, hidden_size=16, num_heads=2,
                                                                    num_kv_heads=1, intermediate_size=32))
    _tokenizer(BASE_WORDS).save_pretrained(tmp_path / "other")
    with pytest.raises(ConfigError, match=f"student tokenizer '{tmp_path / 'other'}'.*teacher tokenizer "
                                          "'of teacher.source=tiny'"):
        write_init_student(teacher_cfg, StudentConfig(layers=[0], tokenizer=str(tmp_path / "other")),
                           tmp_path / "init")
    assert not (tmp_path / "init").exists()
    tiny_tokenizer.save_pretrained(tmp_path / "same")  # the teacher's own tokenizer, from a directory: accepted
    info = write_init_student(teacher_cfg, StudentConfig(layers=[-1], tokenizer=str(tmp_path / "same")),
                              tmp_path / "init")
    assert info["copied"] == [1] and info["student"]["vocab_rows"] == info["teacher"]["vocab_rows"] == len(
        tiny_tokenizer)
    assert (tmp_path / "init" / "tokenizer.json").exists()
