"""The training recipe: lr schedule, report steps, the sampled-cache temperature warning, named step sums, and the
one step loop on a plain AdamW engine (training, reports, gradient accumulation, resume, heads with the student)."""

from __future__ import annotations

import copy
import dataclasses
import itertools

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raydistill.tasks.config import TrainConfig, load_config
from raydistill.tasks.data import Batch
from raydistill.tasks.objective import training_loss
from raydistill.tasks.online import StudentWithHeads, online_teacher, student_with_heads
from raydistill.tasks.trainloop import (AdamWEngine, StepSums, checkpoint_step, lr_at, report_steps,
                                        temperature_warning, train_steps)

WORDS = 40


def _llama(seed: int, layers: int = 2) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=WORDS, hidden_size=16, intermediate_size=32,
                                        num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=1,
                                        max_position_embeddings=64, tie_word_embeddings=False))


def _batches(n: int = 4, b: int = 2, length: int = 8) -> list[Batch]:
    g = torch.Generator().manual_seed(7)
    out = []
    for _ in range(n):
        ids = torch.randint(0, WORDS, (b, length + 1), generator=g)
        out.append(Batch(ids[:, :-1], ids[:, 1:], None))
    return out


def _stream(batches: list[Batch], start: int = 0):
    """``(batch, position)``: the batches in order, cycling; position = micro-batches consumed so far."""
    for i in itertools.count(start):
        yield batches[i % len(batches)], i + 1


def _online_setup(seed: int = 0, **kw):
    """A 2-layer student with one projection head (student layer 1 ↔ teacher layer 0), a different teacher."""
    tc = TrainConfig(**{"alpha": 0.5, "lr": 1e-2, "warmup_steps": 1, "teacher_mode": "online", "hidden_loss": "mse",
                        "hidden_layer_map": [[1, 0]], "grad_accum": 2, "eval_every": 3, "checkpoint_every": 4, **kw})
    teacher = _llama(seed=100)
    online = online_teacher(teacher, tc, [(1, 0)])
    model = student_with_heads(_llama(seed).train(), tc, [(1, 0)], teacher_dim=16)
    engine = AdamWEngine(model, lr=tc.lr, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip,
                         grad_accum=tc.grad_accum)
    return tc, online, model, engine


# ------------------------------------------------------------------------------------------------ pure parts

def test_lr_schedule_warms_up_then_decays_to_a_tenth_of_peak():
    tc = TrainConfig(lr=1e-3, warmup_steps=2)
    assert [lr_at(s, tc, 10) for s in (1, 2)] == [5e-4, 1e-3]
    assert lr_at(10, tc, 10) == pytest.approx(1e-4)
    assert lr_at(3, tc, 10) > lr_at(6, tc, 10) > lr_at(9, tc, 10)


def test_report_steps_are_every_eval_every_checkpoint_and_the_last_step():
    assert report_steps(TrainConfig(eval_every=3, checkpoint_every=3), 4) == [3, 4]
    assert report_steps(TrainConfig(eval_every=20, checkpoint_every=20), 15) == [15]
    assert report_steps(TrainConfig(eval_every=2, checkpoint_every=3), 7) == [2, 3, 4, 6, 7]
    assert report_steps(TrainConfig(eval_every=20, checkpoint_every=15), 40) == [15, 20, 30, 40]
    tc = TrainConfig(eval_every=2, checkpoint_every=3)
    assert [s for s in report_steps(tc, 7) if checkpoint_step(tc, s, 7)] == [3, 6, 7]


def test_training_warns_when_a_sampled_cache_is_used_at_another_temperature():
    assert temperature_warning(load_config("tiny")) is None
    lp = "cache.sampled_logprobs=true"  # re-tempering a sampled cache needs its log-probs (else a config error)
    msg = temperature_warning(load_config("tiny", [lp, "train.temperature=2.0"]))
    assert "train.temperature=2.0" in msg and "T=1.0" in msg
    for other in (["cache.format=topk"], ["train.teacher_mode=online"],
                  ["cache.temperature=2.0", "tune.temperature=[2.0]"]):
        assert temperature_warning(load_config("tiny", [lp, "train.temperature=2.0", *other])) is None


def test_step_sums_are_named_and_averaged_per_micro_batch():
    sums = StepSums()
    sums.add({"total": torch.tensor(3.0), "ce": torch.tensor(2.0), "kd": torch.tensor(1.0),
              "hidden": torch.tensor(0.5)}, tokens=16)
    sums.add({"total": torch.tensor(5.0), "ce": torch.tensor(4.0), "kd": torch.tensor(3.0),
              "hidden": torch.tensor(1.5)}, tokens=8)
    assert (sums.tokens, sums.micro_batches) == (24, 2)
    assert sums.means() == {"loss": 4.0, "ce": 3.0, "kd": 2.0, "hidden": 1.0}
    assert sums.all_reduce() == sums  # one rank (or no process group): this rank's sums are the sums


# ------------------------------------------------------------------------------------------------ the loop

def test_the_loop_trains_student_and_heads_and_reports_at_the_report_steps():
    tc, online, model, engine = _online_setup()
    batches = _batches()
    initial = copy.deepcopy(model)
    heads_before = model.projections[0].weight.detach().clone()
    steps = list(train_steps(engine, _stream(batches), tc, total=8, online=online))

    assert [s.step for s in steps] == list(range(1, 9))
    assert [s.step for s in steps if s.window is not None] == report_steps(tc, 8) == [3, 4, 6, 8]
    assert [s.position for s in steps] == [2 * k for k in range(1, 9)]  # grad_accum micro-batches per step
    assert set(steps[0].metrics) == {"loss", "ce", "kd", "hidden", "lr", "grad_norm", "tokens_per_s"}
    assert [s.metrics["lr"] for s in steps] == [lr_at(k, tc, 8) for k in range(1, 9)]
    assert steps[2].window == pytest.approx({k: sum(s.metrics[k] for s in steps[:3]) / 3 for k in steps[0].metrics})
    assert steps[3].window == steps[3].metrics  # the window restarts after each report

    first = [training_loss(initial, b, tc, online) for b in batches[:2]]  # step 1 sees the initial weights
    for name, key in (("loss", "total"), ("ce", "ce"), ("kd", "kd"), ("hidden", "hidden")):
        assert steps[0].metrics[name] == pytest.approx(sum(o[key].item() for o in first) / 2, rel=1e-5)
    assert steps[0].metrics["grad_norm"] > 0 and steps[0].metrics["tokens_per_s"] > 0

    losses = [s.metrics["loss"] for s in steps]
    assert sum(losses[-2:]) < sum(losses[:2])
    assert not torch.equal(model.projections[0].weight, heads_before)  # one optimizer steps the heads too
    assert all(p.grad is None for p in online.model.parameters())


def test_cache_mode_steps_have_no_hidden_metric():
    tc = TrainConfig(alpha=1.0, lr=1e-2, eval_every=2, checkpoint_every=2)
    engine = AdamWEngine(StudentWithHeads(_llama(0).train()), lr=tc.lr)
    steps = list(train_steps(engine, _stream(_batches()), tc, total=2))
    assert "hidden" not in steps[0].metrics and steps[1].window is not None


def test_gradient_accumulation_matches_one_batch_of_all_the_micro_batches():
    """Like DeepSpeed: backward scales by 1/grad_accum, step applies AdamW at the boundary only."""
    tc = TrainConfig(alpha=1.0, lr=1e-2, warmup_steps=0)
    a, b = _batches(2, b=2), _batches(2, b=2)
    whole = Batch(torch.cat([x.input_ids for x in a]), torch.cat([x.labels for x in a]), None)
    accum = AdamWEngine(_llama(0).train(), lr=tc.lr, grad_accum=2)
    once = AdamWEngine(_llama(0).train(), lr=tc.lr, grad_accum=1)
    list(train_steps(accum, _stream(b), dataclasses.replace(tc, grad_accum=2), total=1))
    list(train_steps(once, _stream([whole]), tc, total=1))
    assert accum.micro_steps == 2 and once.micro_steps == 1
    assert accum.get_global_grad_norm() == pytest.approx(once.get_global_grad_norm(), rel=1e-5)
    for p, q in zip(accum.module.parameters(), once.module.parameters()):
        assert torch.allclose(p, q, atol=1e-6)


def test_resume_from_a_position_continues_identically_heads_included():
    """Weights (student + heads), AdamW moments and the data position are the whole state of a run."""
    batches = _batches()
    tc, online, model, engine = _online_setup()
    straight = list(train_steps(engine, _stream(batches), tc, total=6, online=online))

    final = copy.deepcopy(model.state_dict())

    tc, online, model, engine = _online_setup()
    loop = train_steps(engine, _stream(batches), tc, total=6, online=online)
    position = [next(loop) for _ in range(3)][-1].position  # stopped after step 3, as a checkpoint is
    weights, moments = copy.deepcopy(model.state_dict()), copy.deepcopy(engine.optimizer.state_dict())

    def resumed(with_moments: bool):
        tc, online, fresh, engine = _online_setup(seed=5)  # other initial weights: all overwritten
        fresh.load_state_dict(weights)
        if with_moments:
            engine.optimizer.load_state_dict(moments)
        rest = list(train_steps(engine, _stream(batches, start=position), tc, total=6, start=3, online=online))
        return fresh, rest

    fresh, rest = resumed(True)
    assert [s.step for s in rest] == [4, 5, 6] and rest[-1].window is not None
    for a, b in zip(straight[3:], rest):
        assert a.position == b.position
        assert {k: v for k, v in a.metrics.items() if k != "tokens_per_s"} == pytest.approx(
            {k: v for k, v in b.metrics.items() if k != "tokens_per_s"}, rel=1e-5)
    assert fresh.state_dict().keys() == final.keys() and any(k.startswith("projections.") for k in final)
    assert all(torch.allclose(fresh.state_dict()[k], v, atol=1e-6) for k, v in final.items())
    no_moments, _ = resumed(False)  # weights without the AdamW moments: the next steps differ
    assert not all(torch.allclose(no_moments.state_dict()[k], v, atol=1e-6) for k, v in final.items())


def test_the_default_evaluation_costs_about_a_tenth_of_the_training_between_two_reports():
    from raydistill.tasks.config import TrainConfig
    from raydistill.tasks.trainloop import eval_window_budget

    tc = TrainConfig(micro_batch_size=4, grad_accum=2, eval_every=50)
    # 50 steps × 4 × 2 × 8 workers = 3,200 windows trained (≈ 9,600 forward-equivalents); 10 % of that: 960
    assert eval_window_budget(tc, 8) == 960
    assert eval_window_budget(TrainConfig(micro_batch_size=2, eval_every=1), 2) == 4  # one micro-batch per worker
    assert eval_window_budget(TrainConfig(eval_windows=7), 8) == 7
