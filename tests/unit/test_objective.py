"""The objective of one micro-batch (``tasks.objective.training_loss``): online (dense targets from the teacher
run inside the step, hidden-state matching through ``StudentWithHeads``) and from a cache; padding-row vocabulary
mismatches between teacher and student train either way."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from raydistill.tasks.cache.targets import at_temperature, restrict_vocab
from raydistill.tasks.config import CacheConfig, CorpusConfig, TrainConfig
from raydistill.tasks.data import heldout_shards, train_batches
from raydistill.tasks.evaluate import evaluate
from raydistill.tasks.losses import LOSSES
from raydistill.tasks.objective import training_loss
from raydistill.tasks.online import online_teacher, resolve_layer_map, student_with_heads
from raydistill.tasks.students import copy_layers, forward_logits
from tinyllama import PAD, WORDS, tiny_batch, tiny_llama


def _online_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"alpha": 0.0, "temperature": 2.0, "teacher_mode": "online", **kw})


# ------------------------------------------------------------------------------------------------ online

@pytest.mark.parametrize("loss", LOSSES)
def test_a_student_equal_to_the_teacher_has_zero_kd_and_hidden_loss(loss):
    """All layers copied, fewer output rows: KD and MSE (identity projections) vanish exactly — the teacher
    distribution is renormalised over the student's ids, not lumped into a tail."""
    teacher = tiny_llama(WORDS + PAD, pad_mass=True)
    student = copy_layers(teacher, [0, 1], vocab_size=WORDS).train()
    tc = _online_cfg(loss=loss, hidden_loss="mse", alpha=0.5)
    layer_map = resolve_layer_map(None, copied=[0, 1], n_student=2, n_teacher=2)
    online = online_teacher(teacher, tc, layer_map)
    out = training_loss(student_with_heads(student, tc, layer_map, teacher.config.hidden_size), tiny_batch(), tc, online)
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-5) and out["hidden"].item() == pytest.approx(0.0, abs=1e-8)
    assert out["total"].item() == pytest.approx(0.5 * out["ce"].item(), rel=1e-4)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("hidden", ["mse", "cosine"])
def test_online_objective_trains_student_and_projections_with_every_kd_loss(loss, hidden):
    teacher = tiny_llama(WORDS + PAD, layers=2, pad_mass=True)  # teacher has padding rows, student does not
    student = copy_layers(teacher, [0], vocab_size=WORDS).train()
    tc = _online_cfg(loss=loss, hidden_loss=hidden, hidden_weight=0.5, alpha=0.2, hidden_layer_map=[[0, -1]])
    # (the default map, student layer 0 ↔ teacher layer 0, starts at hidden = 0: same input, same weights)
    layer_map = resolve_layer_map(tc.hidden_layer_map, copied=[0], n_student=1, n_teacher=2)
    online = online_teacher(teacher, tc, layer_map)
    model = student_with_heads(student, tc, layer_map, teacher.config.hidden_size)
    heads_before = model.projections[0].weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)  # one optimizer: the student and its heads
    batch, totals = tiny_batch(seed=4), []
    for _ in range(4):
        out = training_loss(model, batch, tc, online)
        assert out["hidden"].item() > 0
        assert out["total"].item() == pytest.approx(0.2 * out["ce"].item() + 0.8 * 4.0 * out["kd"].item()
                                                     + 0.5 * out["hidden"].item(), rel=1e-5)
        out["total"].backward()
        assert all(p.grad is None for p in teacher.parameters())
        opt.step()
        opt.zero_grad()
        totals.append(out["total"].item())
    assert totals[-1] < totals[0]
    assert not torch.equal(model.projections[0].weight, heads_before)


def test_online_teacher_with_fewer_rows_than_the_student_trains_the_padding_rows_down():
    teacher = tiny_llama(WORDS)
    student = copy_layers(teacher, [0], vocab_size=WORDS + PAD).train()
    tc = _online_cfg(alpha=0.0)
    online = online_teacher(teacher, tc, [])
    opt = torch.optim.AdamW(student.parameters(), lr=3e-2)
    batch = tiny_batch(seed=5)

    def pad_mass():
        with torch.no_grad():
            return torch.softmax(forward_logits(student, batch.input_ids), -1)[..., WORDS:].sum(-1).mean().item()

    before = pad_mass()
    for _ in range(5):
        training_loss(student, batch, tc, online)["total"].backward()
        opt.step()
        opt.zero_grad()
    assert pad_mass() < 0.5 * before


def test_hidden_matching_needs_the_heads_module():
    teacher = tiny_llama(WORDS)
    student = copy_layers(teacher, [0], vocab_size=WORDS).train()
    tc = _online_cfg(hidden_loss="mse")
    online = online_teacher(teacher, tc, [(0, 0)])
    assert online.layers == [0] and not any(p.requires_grad for p in teacher.parameters())
    with pytest.raises(ValueError, match="one projection per"):  # a bare student returns no projected states
        training_loss(student, tiny_batch(), tc, online)
    out = training_loss(student, tiny_batch(), _online_cfg(), online_teacher(teacher, _online_cfg(), [(0, 0)]))
    assert out["hidden"].item() == 0.0  # hidden_loss none: no teacher layers asked for, no hidden term


# ------------------------------------------------------------------------------------------------ cache mode

def _cache(tmp_path, teacher, fmt):
    """A real cache (3 train + 1 held-out shard) of ``teacher``'s targets in ``fmt``."""
    from raydistill.tasks.cache.encode import encode_shard
    from raydistill.tasks.cache.formats import format_params
    from raydistill.tasks.cache.manifest import add_entry, new_manifest, write_manifest
    from raydistill.tasks.cache.shards import commit_shard, open_cache

    cc, length = CacheConfig(format=fmt, num_samples=16, top_k=8, sampled_logprobs=True), 6  # tests re-temper
    manifest = new_manifest({"kind": "test", "weights_sha256": "0", "architecture": {}, "dtype": "float32"}, "tok",
                            cc, CorpusConfig(seq_len=length))
    g = torch.Generator().manual_seed(0)
    for s in range(4):
        split, key = ("train" if s < 3 else "heldout"), f"{s:064x}"
        tokens = torch.randint(0, WORDS, (2, length + 1), generator=g).numpy().astype(np.int32)
        fields, stats, _ = encode_shard(teacher, tokens, split, format_params(cc), 1.0, 2, key)
        add_entry(manifest, commit_shard(str(tmp_path), f"s{s}", split, key, tokens, fields, stats, format_params(cc)))
    manifest["complete"] = True
    write_manifest(str(tmp_path), manifest)
    return open_cache(str(tmp_path))


@pytest.mark.parametrize("fmt", ["sampled", "topk", "full"])
def test_cache_with_teacher_padding_rows_trains_a_smaller_student(fmt, tmp_path):
    teacher = tiny_llama(WORDS + PAD, pad_mass=True)
    cache = _cache(tmp_path, teacher, fmt)
    raw, _ = next(train_batches(cache, rank=0, world_size=1, micro_batch_size=2, temperature=2.0))
    student = copy_layers(teacher, [0], vocab_size=WORDS).train()
    tc = TrainConfig(alpha=0.2, temperature=2.0)
    with pytest.raises(ValueError, match="restrict_vocab"):  # unrestricted targets reach past the student's rows
        training_loss(student, raw, tc)

    stream = train_batches(cache, rank=0, world_size=1, micro_batch_size=2, temperature=2.0, vocab_size=WORDS)
    batch, _ = next(stream)
    t = batch.targets
    if fmt == "full":
        assert t.logprobs.shape[-1] == WORDS and torch.allclose(t.logprobs.logsumexp(-1), torch.zeros(2, 6), atol=1e-5)
    else:
        assert int(t.ids.max()) < WORDS and torch.allclose(t.probs.sum(-1) + t.tail, torch.ones(2, 6), atol=1e-5)
        assert (raw.targets.ids >= WORDS).any()  # the teacher really put mass on its padding ids
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    totals = []
    for _ in range(4):
        out = training_loss(student, batch, tc)
        out["total"].backward()
        opt.step()
        opt.zero_grad()
        totals.append(out["total"].item())
    assert totals[-1] < totals[0]
    metrics = evaluate(student, heldout_shards(cache, vocab_size=WORDS))
    assert metrics["kl_to_teacher"] is not None and np.isfinite(metrics["kl_to_teacher"])


def test_restricted_full_targets_equal_the_renormalised_teacher(tmp_path):
    teacher = tiny_llama(WORDS + PAD, pad_mass=True)
    cache = _cache(tmp_path, teacher, "full")
    shard = cache.read(cache.shards("train")[0])
    with torch.no_grad():
        logits = teacher(input_ids=shard.tokens[:, :-1]).logits
    got = at_temperature(restrict_vocab(shard.targets(), WORDS), 2.0).logprobs
    assert torch.allclose(got, torch.log_softmax(logits[..., :WORDS] / 2.0, -1), atol=2e-3)  # float16 storage
    all_layers = copy_layers(teacher, [0, 1], vocab_size=WORDS)  # the teacher minus its padding rows
    kl = evaluate(all_layers, heldout_shards(cache, vocab_size=WORDS))["kl_to_teacher"]
    assert kl == pytest.approx(0.0, abs=1e-4)


def test_cache_of_a_smaller_teacher_trains_a_padded_student(tmp_path):
    teacher = tiny_llama(WORDS)
    cache = _cache(tmp_path, teacher, "sampled")
    student = copy_layers(teacher, [0], vocab_size=WORDS + PAD).train()
    batch, _ = next(train_batches(cache, rank=0, world_size=1, micro_batch_size=2, temperature=1.0,
                                  vocab_size=WORDS + PAD))
    out = training_loss(student, batch, TrainConfig(alpha=0.0, temperature=1.0))
    out["total"].backward()
    assert torch.isfinite(out["total"]) and student.lm_head.weight.grad[WORDS:].abs().sum() > 0
