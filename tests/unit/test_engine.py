"""Continuous batching: a prompt that joins a running batch, or stays after others leave it, completes exactly as it
would alone; rows free up for waiting prompts; a cancelled prompt leaves without a forward; a model whose cache
cannot grow rows mid-run still completes everything, one batch at a time."""

import threading

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from raydistill.tasks.generate import Engine, complete

PROMPTS = ["ROMEO.\nBut soft, what light through yonder window breaks", "Hi", "To be, or not to be", "JULIET.\nO"]


def _kw(tokenizer):
    return dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                tie_word_embeddings=False, eos_token_id=-1)  # never stops early: lengths are what the test says


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**_kw(tiny_tokenizer))).eval()


def alone(model, tokenizer, prompt: str, max_tokens: int) -> dict:
    return complete(model, tokenizer, [prompt], max_tokens=max_tokens, temperature=0.0, logprobs=0)[0]


def assert_same(got: dict, want: dict) -> None:
    assert got["token_ids"] == want["token_ids"]
    assert got["token_logprobs"] == pytest.approx(want["token_logprobs"], abs=1e-4)


def test_a_prompt_joining_a_running_batch_completes_as_it_would_alone(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer, max_rows=4)
    first = engine.add(PROMPTS[0], max_tokens=12, logprobs=0)
    for _ in range(5):  # the first prompt is 5 tokens in when the others arrive
        engine.step()
    late = [engine.add(p, max_tokens=n, logprobs=0) for p, n in zip(PROMPTS[1:], (3, 9, 6))]
    while not engine.idle:
        engine.step()
    assert engine.joins == 2
    for c, (p, n) in zip([first, *late], zip(PROMPTS, (12, 3, 9, 6))):
        assert c.result["finish_reason"] == "length"
        assert_same(c.result, alone(model, tiny_tokenizer, p, n))


def test_finished_rows_leave_and_their_padding_columns_go_with_them(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer, max_rows=4)
    long, short = engine.add(PROMPTS[0], max_tokens=2, logprobs=0), engine.add(PROMPTS[1], max_tokens=8, logprobs=0)
    widths = []
    while not engine.idle:
        engine.step()
        widths.append((engine.rows.rows, None if engine.rows.mask is None else engine.rows.mask.shape[1]))
    n_long = len(tiny_tokenizer(PROMPTS[0], add_special_tokens=False)["input_ids"])
    n_short = len(tiny_tokenizer(PROMPTS[1], add_special_tokens=False)["input_ids"])
    assert widths[0] == (2, n_long)  # both rows, padded to the long prompt
    assert widths[2] == (1, n_short + 2)  # the long one left after 2 tokens: only the short one's columns remain
    assert widths[-1] == (0, None)
    assert_same(long.result, alone(model, tiny_tokenizer, PROMPTS[0], 2))
    assert_same(short.result, alone(model, tiny_tokenizer, PROMPTS[1], 8))


def test_waiting_prompts_take_the_rows_that_free_up(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer, max_rows=2)
    cs = [engine.add(p, max_tokens=n, logprobs=0) for p, n in zip(PROMPTS, (2, 5, 4, 3))]
    most = 0
    while not engine.idle:
        engine.step()
        most = max(most, len(engine.running))
    assert most == 2 and engine.joins == 3  # two at first, then one per freed row
    for c, (p, n) in zip(cs, zip(PROMPTS, (2, 5, 4, 3))):
        assert_same(c.result, alone(model, tiny_tokenizer, p, n))


def test_a_cancelled_waiting_prompt_leaves_without_a_forward(model, tiny_tokenizer):
    engine = Engine(model, tiny_tokenizer, max_rows=1)
    cancel = threading.Event()
    running = engine.add(PROMPTS[0], max_tokens=3)
    waiting = engine.add(PROMPTS[1], max_tokens=3, cancel=cancel)
    engine.step()
    cancel.set()
    finished = []
    while not engine.idle:
        finished += engine.step()
    assert waiting in finished and waiting.result["finish_reason"] == "cancelled"
    assert waiting.result["usage"]["completion_tokens"] == 0 and engine.joins == 1
    assert running.result["finish_reason"] == "length"


def test_a_sliding_window_model_batches_without_joining_a_running_batch(tiny_tokenizer):
    torch.manual_seed(0)
    model = MistralForCausalLM(MistralConfig(**_kw(tiny_tokenizer), sliding_window=4096)).eval()
    engine = Engine(model, tiny_tokenizer, max_rows=4)
    first = engine.add(PROMPTS[0], max_tokens=4, logprobs=0)
    engine.step()
    assert not engine.rows.can_join_running()
    late = engine.add(PROMPTS[1], max_tokens=2, logprobs=0)
    engine.step()
    assert late in engine.waiting  # waits for the batch to drain
    while not engine.idle:
        engine.step()
    assert engine.joins == 2
    assert_same(first.result, alone(model, tiny_tokenizer, PROMPTS[0], 4))
    assert_same(late.result, alone(model, tiny_tokenizer, PROMPTS[1], 2))
