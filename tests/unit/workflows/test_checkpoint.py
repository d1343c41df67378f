"""Checkpoint weights of the student module: projection heads ride in ``model.safetensors`` with the student, and
a checkpoint whose heads do not fit the run is refused naming the settings to keep (no DeepSpeed needed)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from raydistill.tasks.config import TrainConfig
from raydistill.tasks.online import StudentWithHeads, student_with_heads
from raydistill.tasks.guard import PickleRefusedError
from raydistill.workflows.checkpoint import load_weights, read_checkpoint


def _student(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                        num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False))


def _save(module: torch.nn.Module, path) -> None:
    save_file({k: v.detach().contiguous() for k, v in module.state_dict().items()}, str(path))


def test_heads_load_with_the_student_and_a_mismatch_names_the_settings(tmp_path):
    tc = TrainConfig(teacher_mode="online", hidden_loss="mse")
    with_heads = student_with_heads(_student(0), tc, [(0, 1), (1, 1)], teacher_dim=24)
    with torch.no_grad():
        with_heads.projections[1].weight.mul_(3.0)
    _save(with_heads, tmp_path / "model.safetensors")
    other = student_with_heads(_student(1), tc, [(0, 1), (1, 1)], teacher_dim=24)
    load_weights(other, tmp_path / "model.safetensors")
    assert all(torch.equal(a, b) for a, b in zip(with_heads.state_dict().values(), other.state_dict().values()))
    with pytest.raises(RuntimeError, match="train.hidden_loss and train.hidden_layer_map"):
        load_weights(StudentWithHeads(_student(1)), tmp_path / "model.safetensors")  # a run without heads
    _save(StudentWithHeads(_student(0)), tmp_path / "plain.safetensors")
    with pytest.raises(RuntimeError, match="train.hidden_layer_map"):
        load_weights(other, tmp_path / "plain.safetensors")  # a run with heads from a checkpoint without


def test_a_checkpoint_with_a_pickle_file_is_refused_before_anything_is_loaded(tmp_path):
    model = StudentWithHeads(_student(0))
    _save(model, tmp_path / "model.safetensors")
    save_file({"0.step": torch.zeros(1)}, str(tmp_path / "optim_rank0.safetensors"))
    (tmp_path / "state.json").write_text('{"step": 2, "zero_stage": 2}')
    (tmp_path / "data_rank0.json").write_text('{"epoch": 0, "shard": 0, "window": 2}')
    (tmp_path / "optimizer.pt").write_bytes(b"planted: unpickling this could run code")
    other = StudentWithHeads(_student(1))
    with pytest.raises(PickleRefusedError, match=r"optimizer\.pt.*safetensors only"):
        read_checkpoint(str(tmp_path), other, 0, 2)
    assert not torch.equal(other.student.lm_head.weight, model.student.lm_head.weight)  # nothing was loaded
    (tmp_path / "optimizer.pt").unlink()
    state, _, _ = read_checkpoint(str(tmp_path), other, 0, 2)
    assert state["step"] == 2 and torch.equal(other.student.lm_head.weight, model.student.lm_head.weight)
