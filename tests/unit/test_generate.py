"""Batched completion: greedy is deterministic and matches a plain forward; logprobs are the model's; stops at
EOS; seeded sampling repeats; request bodies are validated."""

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raydistill.tasks.generate import complete, encode_prompts, nucleus
from raydistill.tasks.openai_api import RequestError, parse_completion_request

PROMPTS = ["ROMEO.\nBut soft, what light", "Hi", "To be, or not to be, that is the question"]


@pytest.fixture(scope="module")
def model(tiny_tokenizer):
    config = LlamaConfig(vocab_size=len(tiny_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, tie_word_embeddings=False,  # tied: greedy repeats 1 token
                         bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id)
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


def test_greedy_is_deterministic_and_matches_manual_forward(model, tiny_tokenizer):
    out = complete(model, tiny_tokenizer, PROMPTS, max_tokens=6, temperature=0.0, logprobs=3)
    again = complete(model, tiny_tokenizer, PROMPTS, max_tokens=6, temperature=0.0, logprobs=3)
    assert out == again
    for prompt, ids, o in zip(PROMPTS, encode_prompts(tiny_tokenizer, PROMPTS), out):
        assert o["finish_reason"] == "length" and len(o["token_ids"]) == 6
        full = torch.tensor([ids + o["token_ids"]])
        with torch.no_grad():
            logp = model(input_ids=full).logits[0].log_softmax(-1)
        for step, tok in enumerate(o["token_ids"]):
            row = logp[len(ids) - 1 + step]
            assert tok == int(row.argmax())
            assert o["token_logprobs"][step] == pytest.approx(float(row[tok]), abs=1e-4)
            top = row.topk(3)
            assert list(o["top_logprobs"][step].values()) == pytest.approx(top.values.tolist(), abs=1e-4)
            assert list(o["top_logprobs"][step]) == [tiny_tokenizer.decode([t]) for t in top.indices.tolist()]
        assert o["tokens"] == [tiny_tokenizer.decode([t]) for t in o["token_ids"]]
        assert o["text"] == tiny_tokenizer.decode(o["token_ids"])
        assert o["usage"] == {"prompt_tokens": len(ids), "completion_tokens": 6, "total_tokens": len(ids) + 6}


def test_left_padded_batch_equals_one_by_one(model, tiny_tokenizer):
    batch = complete(model, tiny_tokenizer, PROMPTS, max_tokens=5, temperature=0.0, logprobs=0)
    for prompt, b in zip(PROMPTS, batch):
        (single,) = complete(model, tiny_tokenizer, [prompt], max_tokens=5, temperature=0.0, logprobs=0)
        assert single["token_ids"] == b["token_ids"]
        assert single["token_logprobs"] == pytest.approx(b["token_logprobs"], abs=1e-4)
        assert b["top_logprobs"] == [{}] * 5


def test_stops_at_eos_without_returning_it(model, tiny_tokenizer):
    (free,) = complete(model, tiny_tokenizer, [PROMPTS[0]], max_tokens=6, temperature=0.0)
    assert free["top_logprobs"] is None and len(free["token_logprobs"]) == 6
    ids = free["token_ids"]
    k = max(i for i, t in enumerate(ids) if t not in ids[:i])  # the last position with a new token
    assert k >= 2
    old = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [old, ids[k]]  # pretend that greedy token is an end token
    try:
        (stopped,) = complete(model, tiny_tokenizer, [PROMPTS[0]], max_tokens=6, temperature=0.0)
    finally:
        model.generation_config.eos_token_id = old
    assert stopped["finish_reason"] == "stop"
    assert stopped["token_ids"] == ids[:k] and stopped["usage"]["completion_tokens"] == k


def test_sampling_is_seeded_per_prompt(model, tiny_tokenizer):
    kw = dict(max_tokens=8, temperature=1.0, logprobs=1)
    a = complete(model, tiny_tokenizer, [PROMPTS[0], PROMPTS[1]], seed=[7, 7], **kw)
    b = complete(model, tiny_tokenizer, [PROMPTS[0]], seed=7, **kw)
    c = complete(model, tiny_tokenizer, [PROMPTS[0]], seed=8, **kw)
    greedy = complete(model, tiny_tokenizer, [PROMPTS[0]], max_tokens=8, temperature=0.0)
    assert a[0]["token_ids"] == b[0]["token_ids"]  # same seed, different batch company: same draw
    assert c[0]["token_ids"] != b[0]["token_ids"]
    assert b[0]["token_ids"] != greedy[0]["token_ids"]
    cold = complete(model, tiny_tokenizer, [PROMPTS[0]], max_tokens=8, temperature=1e-4, seed=3)
    assert cold[0]["token_ids"] == greedy[0]["token_ids"]


def test_the_nucleus_keeps_the_likeliest_tokens_until_their_mass_reaches_top_p():
    p = torch.tensor([[0.15, 0.5, 0.05, 0.3]], dtype=torch.float64)
    assert nucleus(p, 1.0) is p
    assert nucleus(p, 0.7).tolist() == [[0.0, 0.5, 0.0, 0.3]]
    assert nucleus(p, 0.5).tolist() == [[0.0, 0.5, 0.0, 0.0]]  # the first token alone reaches 0.5
    assert nucleus(p, 0.51).tolist() == [[0.0, 0.5, 0.0, 0.3]]
    assert nucleus(p, 1e-9).tolist() == [[0.0, 0.5, 0.0, 0.0]]  # the likeliest token always stays


def test_top_p_samples_only_inside_the_nucleus_and_one_draws_as_without_it(model, tiny_tokenizer):
    kw = dict(max_tokens=12, temperature=1.5, seed=[5, 6, 7])
    plain = complete(model, tiny_tokenizer, PROMPTS, **kw)
    assert complete(model, tiny_tokenizer, PROMPTS, top_p=1.0, **kw) == plain
    greedy = complete(model, tiny_tokenizer, PROMPTS, max_tokens=12, temperature=0.0)
    assert [o["token_ids"] for o in complete(model, tiny_tokenizer, PROMPTS, top_p=1e-6, **kw)] == \
        [o["token_ids"] for o in greedy]
    out = complete(model, tiny_tokenizer, PROMPTS, top_p=0.3, **kw)
    assert [o["token_ids"] for o in out] != [o["token_ids"] for o in greedy]  # still sampling
    for ids, o in zip(encode_prompts(tiny_tokenizer, PROMPTS), out):
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([ids + o["token_ids"]])).logits[0]
        for step, tok in enumerate(o["token_ids"]):
            probs = torch.softmax(logits[len(ids) - 1 + step] / 1.5, dim=-1)
            assert nucleus(probs, 0.3)[tok] > 0, f"token {tok} at step {step} is outside the 0.3 nucleus"


def test_per_prompt_settings(model, tiny_tokenizer):
    out = complete(model, tiny_tokenizer, PROMPTS[:2], max_tokens=[2, 4], temperature=[0.0, 0.5],
                   logprobs=[None, 2], seed=[None, 1])
    assert [len(o["token_ids"]) for o in out] == [2, 4]
    assert out[0]["top_logprobs"] is None and all(len(d) <= 2 for d in out[1]["top_logprobs"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(max_tokens=0), "max_tokens"), (dict(temperature=-0.1), "temperature"),
    (dict(logprobs=10**9), "logprobs"), (dict(max_tokens=[1]), "2 prompts"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_complete_rejects_bad_arguments(model, tiny_tokenizer, kwargs, match):
    with pytest.raises(ValueError, match=match):
        complete(model, tiny_tokenizer, PROMPTS[:2], **kwargs)
    with pytest.raises(ValueError, match="empty"):
        complete(model, tiny_tokenizer, ["ok", ""])


LIMITS = dict(max_tokens_limit=32, max_prompts=4, max_prompt_chars=100)


def test_parse_request_defaults_and_lists():
    r = parse_completion_request({"prompt": "hi"}, **LIMITS)
    assert (r.prompts, r.max_tokens, r.temperature, r.logprobs, r.seed) == (("hi",), 16, 1.0, None, None)
    r = parse_completion_request({"prompt": ["a", "b"], "max_tokens": 32, "temperature": 0, "logprobs": 2,
                                  "seed": 3, "user": "ignored", "stream": False, "n": 1}, **LIMITS)
    assert (r.prompts, r.max_tokens, r.temperature, r.logprobs, r.seed) == (("a", "b"), 32, 0.0, 2, 3)


@pytest.mark.parametrize("body,param", [
    (["not", "an", "object"], None), ({}, "prompt"), ({"prompt": 3}, "prompt"), ({"prompt": ["a", 1]}, "prompt"),
    ({"prompt": []}, "prompt"), ({"prompt": ["a"] * 5}, "prompt"), ({"prompt": ""}, "prompt"),
    ({"prompt": "x" * 101}, "prompt"), ({"prompt": "a", "max_tokens": 33}, "max_tokens"),
    ({"prompt": "a", "max_tokens": 0}, "max_tokens"), ({"prompt": "a", "max_tokens": "8"}, "max_tokens"),
    ({"prompt": "a", "max_tokens": True}, "max_tokens"), ({"prompt": "a", "temperature": -1}, "temperature"),
    ({"prompt": "a", "temperature": "hot"}, "temperature"), ({"prompt": "a", "logprobs": 21}, "logprobs"),
    ({"prompt": "a", "logprobs": 1.5}, "logprobs"), ({"prompt": "a", "seed": -1}, "seed"),
    ({"prompt": "a", "stream": "yes"}, "stream"), ({"prompt": ["a", "b"], "stream": True}, "stream"),
    ({"prompt": "a", "n": 2}, "n"), ({"prompt": "a", "stop": 5}, "stop"), ({"prompt": "a", "stop": [""]}, "stop"),
    ({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}, "stop"), ({"prompt": "a", "echo": True}, "echo"),
    ({"prompt": "a", "model": 5}, "model"),
])
def test_parse_request_rejects(body, param):
    with pytest.raises(RequestError) as e:
        parse_completion_request(body, **LIMITS)
    assert e.value.param == param and str(e.value)


def test_stop_strings_cut_the_text_where_they_first_appear(model, tiny_tokenizer):
    free = complete(model, tiny_tokenizer, PROMPTS[:1], max_tokens=12, temperature=0.0)[0]
    assert len(free["text"]) > 4
    stop = free["text"][3:5]  # a string the greedy completion is known to produce
    cut = complete(model, tiny_tokenizer, PROMPTS[:1], max_tokens=12, temperature=0.0, stop=[stop])[0]
    assert cut["finish_reason"] == "stop" and cut["text"] == free["text"][:free["text"].find(stop)]
    assert stop not in cut["text"] and len(cut["token_ids"]) <= len(free["token_ids"])


def test_streamed_deltas_add_up_to_the_text_and_hold_back_a_stop_string(model, tiny_tokenizer):
    free = complete(model, tiny_tokenizer, PROMPTS[:1], max_tokens=12, temperature=0.0, logprobs=2)[0]
    events = []
    streamed = complete(model, tiny_tokenizer, PROMPTS[:1], max_tokens=12, temperature=0.0, logprobs=2,
                        on_token=[events.append])[0]
    assert streamed == free
    assert "".join(e["delta"] for e in events) == free["text"]
    assert [e["token_id"] for e in events] == free["token_ids"]
    assert [e["logprob"] for e in events] == free["token_logprobs"]
    stop = free["text"][3:6]
    events = []
    cut = complete(model, tiny_tokenizer, PROMPTS[:1], max_tokens=12, temperature=0.0, stop=[stop],
                   on_token=[events.append])[0]
    assert "".join(e["delta"] for e in events) == cut["text"]  # no piece of the stop string was ever sent


def test_a_set_cancel_event_ends_only_its_prompt(model, tiny_tokenizer):
    import threading

    cancel = threading.Event()
    seen = []

    def on_token(event):  # cancel after the third token, as a disconnecting client would
        seen.append(event)
        if len(seen) == 3:
            cancel.set()

    out = complete(model, tiny_tokenizer, PROMPTS[:2], max_tokens=10, temperature=0.0,
                   cancel=[cancel, None], on_token=[on_token, None])
    assert out[0]["finish_reason"] == "cancelled" and len(out[0]["token_ids"]) == 3
    assert out[1]["finish_reason"] == "length" and len(out[1]["token_ids"]) == 10


def test_parse_chat_request_and_the_chat_template(tiny_tokenizer):
    from raydistill.tasks.openai_api import chat_prompt, parse_chat_request

    body = {"messages": [{"role": "system", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
            "max_tokens": 4, "temperature": 0, "logprobs": True, "top_logprobs": 2, "stop": "\n", "stream": True}
    r = parse_chat_request(body, max_tokens_limit=8, max_prompt_chars=100)
    assert (r.max_tokens, r.logprobs, r.stop, r.stream) == (4, 2, ("\n",), True)
    assert r.messages[1] == {"role": "user", "content": "Hi"}
    prompt = chat_prompt(tiny_tokenizer, r.messages)
    assert prompt.index("Be brief.") < prompt.index("Hi") and prompt.endswith("assistant\n")
    for bad, param in [({"messages": []}, "messages"), ({"messages": [{"role": "bot", "content": "x"}]}, "messages"),
                       ({"messages": [{"role": "user", "content": 3}]}, "messages"),
                       ({"messages": [{"role": "user", "content": "x"}], "logprobs": 2}, "logprobs"),
                       ({"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2}, "top_logprobs")]:
        with pytest.raises(RequestError) as e:
            parse_chat_request(bad, max_tokens_limit=8, max_prompt_chars=100)
        assert e.value.param == param


def test_chat_prompt_refuses_a_tokenizer_without_a_template(tiny_tokenizer):
    import copy

    from raydistill.tasks.openai_api import chat_prompt

    plain = copy.deepcopy(tiny_tokenizer)
    plain.chat_template = None
    with pytest.raises(RequestError, match="no chat template") as e:
        chat_prompt(plain, [{"role": "user", "content": "hi"}])
    assert e.value.param == "messages"
