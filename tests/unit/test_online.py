"""Online teacher and vocabularies: dense targets + hidden states from a frozen teacher, the shared objective,
layer maps and projection checkpoints; padding-row vocabulary mismatches train (online and from a cache),
a real tokenizer mismatch is refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from raydistill.tasks.config import (CacheConfig, ConfigError, CorpusConfig, StudentConfig, TeacherConfig,
                                     TinyModelConfig, TrainConfig)
from raydistill.tasks.data import Batch, heldout_shards, train_batches
from raydistill.tasks.evaluate import evaluate
from raydistill.tasks.losses import LOSSES
from raydistill.tasks.online import (capture_layer_outputs, make_projections, online_teacher, resolve_layer_map,
                                     step_projections, teacher_outputs, training_loss)
from raydistill.tasks.students import check_vocab, copy_layers, forward_logits, write_init_student
from raydistill.tasks.cache.targets import at_temperature, restrict_vocab

WORDS = 40  # tokenizer ids; models may have more (padding) rows
PAD = 8


def _tokenizer(words: list[str], eos: str = "<eos>"):
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<eos>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, eos_token=eos, unk_token="<eos>")


BASE_WORDS = ["<eos>"] + [f"w{i}" for i in range(1, WORDS)]


def _llama(rows: int, layers: int = 2, seed: int = 0, pad_mass: bool = False) -> LlamaForCausalLM:
    """A tiny Llama with ``rows`` embedding/output rows; ``pad_mass``: output rows ≥ WORDS copy rows 0.. so the
    padding ids carry real probability (what a cache then stores)."""
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=rows, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                         max_position_embeddings=64, tie_word_embeddings=not pad_mass))
    if pad_mass:
        with torch.no_grad():
            model.lm_head.weight[WORDS:] = model.lm_head.weight[: rows - WORDS] * 2.0
    return model.eval()


def _batch(b=2, length=6, seed=0) -> Batch:
    ids = torch.randint(0, WORDS, (b, length + 1), generator=torch.Generator().manual_seed(seed))
    return Batch(ids[:, :-1], ids[:, 1:], None)


def _online_cfg(**kw) -> TrainConfig:
    return TrainConfig(**{"alpha": 0.0, "temperature": 2.0, "teacher_mode": "online", **kw})


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
    model = _llama(WORDS, layers=3)
    ids = _batch().input_ids
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
    teacher = _llama(WORDS + PAD, pad_mass=True)
    ids = _batch().input_ids
    targets, states = teacher_outputs(teacher, ids, temperature=2.0, vocab_size=WORDS, layers=[1, 0, 1])
    with torch.no_grad():
        logits = teacher(input_ids=ids).logits
    assert targets.logprobs.shape == (2, 6, WORDS)
    assert torch.allclose(targets.logprobs, torch.log_softmax(logits[..., :WORDS] / 2.0, -1), atol=1e-6)
    assert len(states) == 3 and torch.equal(states[0], states[2]) and not states[0].requires_grad
    x = torch.randn(2, 6, 16, requires_grad=True)
    F.cosine_similarity(x, states[0], dim=-1).sum().backward()  # inference tensors would refuse this
    assert x.grad is not None


@pytest.mark.parametrize("loss", LOSSES)
def test_a_student_equal_to_the_teacher_has_zero_kd_and_hidden_loss(loss):
    """All layers copied, fewer output rows: KD and MSE (identity projections) vanish exactly — the teacher
    distribution is renormalised over the student's ids, not lumped into a tail."""
    teacher = _llama(WORDS + PAD, pad_mass=True)
    student = copy_layers(teacher, [0, 1], vocab_size=WORDS).train()
    tc = _online_cfg(loss=loss, hidden_loss="mse", alpha=0.5)
    online = online_teacher(teacher, student, tc, resolve_layer_map(None, copied=[0, 1], n_student=2, n_teacher=2))
    out = training_loss(student, _batch(), tc, online)
    assert out["kd"].item() == pytest.approx(0.0, abs=1e-5) and out["hidden"].item() == pytest.approx(0.0, abs=1e-8)
    assert out["total"].item() == pytest.approx(0.5 * out["ce"].item(), rel=1e-4)


@pytest.mark.parametrize("loss", LOSSES)
@pytest.mark.parametrize("hidden", ["mse", "cosine"])
def test_online_objective_trains_student_and_projections_with_every_kd_loss(loss, hidden):
    teacher = _llama(WORDS + PAD, layers=2, pad_mass=True)  # teacher has padding rows, student does not
    student = copy_layers(teacher, [0], vocab_size=WORDS).train()
    tc = _online_cfg(loss=loss, hidden_loss=hidden, hidden_weight=0.5, alpha=0.2, hidden_layer_map=[[0, -1]])
    # (the default map, student layer 0 ↔ teacher layer 0, starts at hidden = 0: same input, same weights)
    online = online_teacher(teacher, student, tc, resolve_layer_map(tc.hidden_layer_map, copied=[0], n_student=1,
                                                                    n_teacher=2))
    heads_before = online.projections[0].weight.detach().clone()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-2)
    heads_opt = torch.optim.AdamW(online.projections.parameters(), lr=1e-2)
    batch, totals = _batch(seed=4), []
    for _ in range(4):
        out = training_loss(student, batch, tc, online)
        assert out["hidden"].item() > 0
        assert out["total"].item() == pytest.approx(0.2 * out["ce"].item() + 0.8 * 4.0 * out["kd"].item()
                                                     + 0.5 * out["hidden"].item(), rel=1e-5)
        out["total"].backward()
        assert all(p.grad is None for p in teacher.parameters())
        opt.step()
        opt.zero_grad()
        step_projections(online.projections, heads_opt, lr=1e-2, grad_clip=1.0)
        totals.append(out["total"].item())
    assert totals[-1] < totals[0]
    assert not torch.equal(online.projections[0].weight, heads_before)


def test_online_teacher_with_fewer_rows_than_the_student_trains_the_padding_rows_down():
    teacher = _llama(WORDS)
    student = copy_layers(teacher, [0], vocab_size=WORDS + PAD).train()
    tc = _online_cfg(alpha=0.0)
    online = online_teacher(teacher, student, tc, [])
    opt = torch.optim.AdamW(student.parameters(), lr=3e-2)
    batch = _batch(seed=5)

    def pad_mass():
        with torch.no_grad():
            return torch.softmax(forward_logits(student, batch.input_ids), -1)[..., WORDS:].sum(-1).mean().item()

    before = pad_mass()
    for _ in range(5):
        training_loss(student, batch, tc, online)["total"].backward()
        opt.step()
        opt.zero_grad()
    assert pad_mass() < 0.5 * before


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
    teacher = _llama(WORDS + PAD, pad_mass=True)
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
    teacher = _llama(WORDS + PAD, pad_mass=True)
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
    teacher = _llama(WORDS)
    cache = _cache(tmp_path, teacher, "sampled")
    student = copy_layers(teacher, [0], vocab_size=WORDS + PAD).train()
    batch, _ = next(train_batches(cache, rank=0, world_size=1, micro_batch_size=2, temperature=1.0,
                                  vocab_size=WORDS + PAD))
    out = training_loss(student, batch, TrainConfig(alpha=0.0, temperature=1.0))
    out["total"].backward()
    assert torch.isfinite(out["total"]) and student.lm_head.weight.grad[WORDS:].abs().sum() > 0


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


# ------------------------------------------------------------------------------------------------ checkpoints

def test_projection_heads_and_their_adamw_state_round_trip(tmp_path):
    from safetensors.torch import load_file, save_file

    from raydistill.workflows.checkpoint import heads_tensors, load_heads_tensors

    def setup():
        heads = make_projections(2, 4, 6, seed=1)
        return heads, torch.optim.AdamW(heads.parameters(), lr=1e-2)

    def step(heads, opt, seed):
        x = torch.randn(3, 4, generator=torch.Generator().manual_seed(seed))
        sum(h(x).pow(2).sum() for h in heads).backward()
        step_projections(heads, opt, lr=1e-2, grad_clip=1.0)

    a, a_opt = setup()
    for s in range(3):
        step(a, a_opt, s)
    save_file(heads_tensors(a, a_opt), str(tmp_path / "heads.safetensors"))
    step(a, a_opt, 3)
    b, b_opt = setup()
    load_heads_tensors(b, b_opt, load_file(str(tmp_path / "heads.safetensors")))
    step(b, b_opt, 3)
    assert all(torch.allclose(x, y, atol=1e-7) for x, y in zip(a.parameters(), b.parameters()))
    c, c_opt = setup()  # weights without the AdamW moments: the next step differs
    load_heads_tensors(c, c_opt, {k: v for k, v in load_file(str(tmp_path / "heads.safetensors")).items()
                                  if k.startswith("param.")})
    step(c, c_opt, 3)
    assert not all(torch.allclose(x, y, atol=1e-7) for x, y in zip(a.parameters(), c.parameters()))
    with pytest.raises(RuntimeError, match="hidden_layer_map"):
        load_heads_tensors(make_projections(1, 4, 6), c_opt, load_file(str(tmp_path / "heads.safetensors")))
