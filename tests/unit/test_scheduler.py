"""The serving scheduler without Ray (tasks/scheduler.py) on tiny Llamas: requests share forwards and answer as
they would alone; a cancelled request leaves the batch; a failing forward fails the requests it held and the
thread keeps serving; settings a model cannot take fail one request; a swap finishes running rows on the old
model and runs every later request on the new one (re-tokenized when the tokenizer changed)."""

import copy
import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raydistill.tasks.generate import complete
from raydistill.tasks.openai_api import CompletionRequest, RequestError
from raydistill.tasks.scheduler import GenerationError, Job, Scheduler

BOOM = " Kaboom!"


def _llama(tokenizer, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, eos_token_id=-1)).eval()  # runs to max_tokens


@pytest.fixture(scope="module")
def models(tiny_tokenizer):
    return _llama(tiny_tokenizer, 0), _llama(tiny_tokenizer, 1)


def req(max_tokens: int, **kw) -> CompletionRequest:
    return CompletionRequest(prompts=(), max_tokens=max_tokens, temperature=0.0, **kw)


def alone(model, tokenizer, prompt: str, max_tokens: int) -> list[int]:
    return complete(model, tokenizer, [prompt], max_tokens=max_tokens, temperature=0.0)[0]["token_ids"]


@pytest.fixture
def sched():
    s = Scheduler(max_batch_size=4, batch_wait_timeout_s=0.0)
    yield s
    s.stop()


def test_jobs_waiting_together_share_one_batch_and_answer_as_they_would_alone(sched, models, tiny_tokenizer):
    model = models[0]
    sched.swap((model, tiny_tokenizer, {"name": "a"}))
    jobs = [sched.submit(Job(req(n), (p,))) for p, n in [("ROMEO.", 5), ("JULIET.\nO", 3), ("To be, or", 4)]]
    sched.start()  # all three are queued before the thread looks: one join
    for job, (p, n) in zip(jobs, [("ROMEO.", 5), ("JULIET.\nO", 3), ("To be, or", 4)]):
        outs, info = job.future.result(timeout=60)
        assert info == {"name": "a"} and outs[0]["token_ids"] == alone(model, tiny_tokenizer, p, n)
    stats = sched.stats()
    assert stats["batches"] == 1 and stats["prompts"] == 3 and stats["active"] == 0
    assert stats["generated_tokens"] == 12 and stats["rows_stepped"] == 12  # 5 + 3 + 4 rows, all in shared steps


def test_a_cancelled_job_leaves_at_the_next_token_and_the_others_finish(sched, models, tiny_tokenizer):
    sched.swap((models[0], tiny_tokenizer, {"name": "a"}))
    seen = []
    long = Job(req(200), ("Slowly",), on_token=lambda e: seen.append(e) or (len(seen) == 3 and sched.cancel(long)))
    short = Job(req(6), ("ROMEO.",))
    sched.submit(long), sched.submit(short)
    sched.start()
    outs, _ = long.future.result(timeout=60)
    assert outs[0]["finish_reason"] == "cancelled" and len(outs[0]["token_ids"]) == 3
    assert short.future.result(timeout=60)[0][0]["token_ids"] == alone(models[0], tiny_tokenizer, "ROMEO.", 6)
    assert sched.stats()["cancelled"] == 1 and sched.stats()["active"] == 0


def test_a_failing_forward_fails_the_jobs_it_held_and_the_thread_keeps_serving(sched, tiny_tokenizer):
    model = _llama(tiny_tokenizer, 2)
    boom = tiny_tokenizer(BOOM, add_special_tokens=False)["input_ids"]

    def hook(module, args, kwargs):  # a prefill of a prompt ending in BOOM breaks the forward
        ids = kwargs.get("input_ids")
        if ids is not None and ids.shape[1] > 1 and any(boom == row[-len(boom):].tolist() for row in ids):
            raise RuntimeError("planted failure")

    handle = model.register_forward_pre_hook(hook, with_kwargs=True)
    sched.swap((model, tiny_tokenizer, {"name": "b"}))
    doomed, neighbour = Job(req(3), (f"Now{BOOM}",)), Job(req(3), ("Beside it",))
    sched.submit(doomed), sched.submit(neighbour)
    sched.start()
    for job in (doomed, neighbour):  # one prefill for both: both were held by the failing forward
        with pytest.raises(GenerationError, match="generation failed: RuntimeError: planted failure"):
            job.future.result(timeout=60)
    later = sched.submit(Job(req(3), ("Beside it",)))
    assert later.future.result(timeout=60)[0][0]["finish_reason"] == "length"
    assert sched.alive and sched.stats()["active"] == 0
    handle.remove()


def test_settings_the_model_cannot_take_fail_only_that_job(sched, models, tiny_tokenizer):
    sched.swap((models[0], tiny_tokenizer, {"name": "a"}))
    bad = Job(req(2, logprobs=len(tiny_tokenizer) + 1), ("ROMEO.",))
    good = Job(req(2, logprobs=1), ("ROMEO.",))
    sched.submit(bad), sched.submit(good)
    sched.start()
    with pytest.raises(RequestError, match="logprobs must be null or an integer"):
        bad.future.result(timeout=60)
    assert good.future.result(timeout=60)[0][0]["token_ids"] == alone(models[0], tiny_tokenizer, "ROMEO.", 2)


def test_a_swap_finishes_running_rows_on_the_old_model_and_runs_later_jobs_on_the_new(sched, models, tiny_tokenizer):
    old, new = models
    other = copy.deepcopy(tiny_tokenizer)  # the new version ships its own tokenizer object
    sched.swap((old, tiny_tokenizer, {"version": 1}))
    swapped, later = threading.Event(), []

    def on_token(event):  # two tokens into the running job: the alias moves, and a new request arrives
        if not swapped.is_set():
            swapped.set()
            sched.swap((new, other, {"version": 2}))
            ids = [tiny_tokenizer("JULIET.", add_special_tokens=False)["input_ids"]]
            later.append(sched.submit(Job(req(4), ("JULIET.",), ids=ids, tokenizer=tiny_tokenizer)))

    running = Job(req(8), ("ROMEO.",), on_token=on_token)
    sched.submit(running)
    sched.start()
    outs, info = running.future.result(timeout=60)
    assert info == {"version": 1} and outs[0]["token_ids"] == alone(old, tiny_tokenizer, "ROMEO.", 8)
    outs, info = later[0].future.result(timeout=60)
    assert info == {"version": 2} and outs[0]["token_ids"] == alone(new, other, "JULIET.", 4)
    assert sched.stats()["swaps"] == 1 and sched.current[2] == {"version": 2}


def test_jobs_wait_for_the_first_model(sched, models, tiny_tokenizer):
    sched.start()
    job = sched.submit(Job(req(2), ("ROMEO.",)))
    with pytest.raises(TimeoutError):
        job.future.result(timeout=0.5)  # nothing to run it on yet
    sched.swap((models[0], tiny_tokenizer, {"name": "a"}))
    assert job.future.result(timeout=60)[1] == {"name": "a"}
