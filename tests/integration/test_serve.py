"""Serve over real HTTP on 127.0.0.1: OpenAI-style completions with logprobs, 4xx on bad input, batching, and a
model swap when the registry alias moves."""

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
import requests
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raydistill.tasks.config import load_config
from raydistill.tasks.generate import complete
from raydistill.tasks.quantize import quantize_dynamic_int8, save_quantized
from raydistill.workflows import register, serve, stage, tracking

pytestmark = pytest.mark.integration


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def register_tiny_version(cfg, tokenizer, seed: int, loss: float) -> int:
    """A random tiny int8 student registered through ``workflows.register`` (quantize stage stood in for)."""
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=False, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    int8_dir = cfg.stage_dir("quantize") / "int8"
    save_quantized(quantize_dynamic_int8(LlamaForCausalLM(config)), tokenizer, int8_dir)
    report = {"method": "dynamic_int8", "int8": {"heldout_loss": loss, "top1_agreement": 0.5},
              "fp32": {"heldout_loss": loss}, "teacher": {"heldout_loss": 1.0}}
    (cfg.stage_dir("quantize") / "report.json").write_text(json.dumps(report))
    stage.record(cfg, "quantize", f"test-quantize-{seed}", {"int8_dir": str(int8_dir)})
    return register.run(cfg, None)["version"]


@pytest.fixture(scope="module")
def app(tmp_path_factory, ray_cluster, tiny_tokenizer):
    run_dir = tmp_path_factory.mktemp("serve") / "run"
    cfg = load_config("tiny", [f"run_dir={run_dir}", f"serve.port={free_port()}", "serve.alias_poll_s=0.3",
                               "serve.max_prompt_tokens=32", "serve.max_batch_size=4",
                               "serve.batch_wait_timeout_s=0.2", "serve.num_cpus=1"])
    v1 = register_tiny_version(cfg, tiny_tokenizer, seed=1, loss=5.0)
    v2 = register_tiny_version(cfg, tiny_tokenizer, seed=2, loss=4.0)
    tracking.client(cfg).set_registered_model_alias(cfg.registry.model_name, "champion", str(v1))
    url = serve.start_app(cfg)
    yield cfg, url, (v1, v2)
    serve.shutdown_app()


def post(url, body, **kw):
    return requests.post(f"{url}/v1/completions", json=body, timeout=60, **kw)


def test_completion_with_logprobs_matches_the_registered_model(app):
    cfg, url, (v1, _) = app
    prompts = ["ROMEO.\nBut soft, what light", "JULIET."]
    r = post(url, {"prompt": prompts, "max_tokens": 5, "temperature": 0, "logprobs": 2})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["object"] == "text_completion" and body["id"].startswith("cmpl-")
    assert body["model"] == f"{cfg.registry.model_name}/{v1}"
    model, tokenizer, info = register.load_registered(cfg.tracking_uri,
                                                    tracking.model_uri(cfg.registry.model_name, version=v1))
    expected = complete(model, tokenizer, prompts, max_tokens=5, temperature=0.0, logprobs=2)
    for i, (choice, exp) in enumerate(zip(body["choices"], expected)):
        assert choice["index"] == i and choice["text"] == exp["text"]
        assert choice["finish_reason"] == exp["finish_reason"] == "length"
        lp = choice["logprobs"]
        assert lp["tokens"] == exp["tokens"] and len(lp["top_logprobs"]) == 5
        assert lp["token_logprobs"] == pytest.approx(exp["token_logprobs"], abs=1e-5)
        for alternatives, chosen in zip(lp["top_logprobs"], lp["token_logprobs"]):
            assert len(alternatives) <= 2 and max(alternatives.values()) >= chosen - 1e-5  # greedy: top-1
        assert lp["text_offset"][0] == len(prompts[i])
    assert body["usage"]["completion_tokens"] == 10
    plain = post(url, {"prompt": "JULIET.", "max_tokens": 3, "temperature": 0}).json()
    assert plain["choices"][0]["logprobs"] is None


@pytest.mark.parametrize("kwargs,param", [
    (dict(data="{not json", headers={"Content-Type": "application/json"}), None),
    (dict(json={"max_tokens": 4}), "prompt"),
    (dict(json={"prompt": 7}), "prompt"),
    (dict(json={"prompt": "hi", "max_tokens": 10_000}), "max_tokens"),
    (dict(json={"prompt": "hi", "temperature": -0.5}), "temperature"),
    (dict(json={"prompt": "word " * 100}), "prompt"),  # 100 tokens > serve.max_prompt_tokens=32
    (dict(json={"prompt": ["a"] * 5}), "prompt"),  # more prompts than serve.max_batch_size
])
def test_bad_requests_get_400_with_a_message(app, kwargs, param):
    _, url, _ = app
    r = requests.post(f"{url}/v1/completions", timeout=30, **kwargs)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"] and err["type"] == "invalid_request_error"


def test_routes_models_health_and_unknown(app):
    cfg, url, (v1, _) = app
    models = requests.get(f"{url}/v1/models", timeout=30).json()
    assert models["data"][0]["id"] == f"{cfg.registry.model_name}/{v1}"
    assert requests.get(f"{url}/healthz", timeout=30).json()["status"] == "ok"
    assert requests.get(f"{url}/v2/nothing", timeout=30).status_code == 404
    assert requests.get(f"{url}/v1/completions", timeout=30).status_code == 405


def test_concurrent_requests_are_batched(app):
    _, url, _ = app
    before = requests.get(f"{url}/healthz", timeout=30).json()
    with ThreadPoolExecutor(4) as pool:
        replies = list(pool.map(lambda i: post(url, {"prompt": f"Line {i}", "max_tokens": 3, "temperature": 0}),
                                range(4)))
    assert all(r.status_code == 200 for r in replies)
    after = requests.get(f"{url}/healthz", timeout=30).json()
    assert after["prompts"] - before["prompts"] == 4
    assert after["batches"] - before["batches"] < 4  # at least two requests shared a forward batch


def test_alias_move_swaps_the_served_version(app):
    cfg, url, (v1, v2) = app
    tracking.client(cfg).set_registered_model_alias(cfg.registry.model_name, "champion", str(v2))
    deadline = time.time() + 60
    while requests.get(f"{url}/healthz", timeout=30).json()["version"] != v2:
        assert time.time() < deadline, "the deployment did not pick up the alias move"
        time.sleep(0.3)
    body = post(url, {"prompt": "ROMEO.", "max_tokens": 2, "temperature": 0}).json()
    assert body["model"] == f"{cfg.registry.model_name}/{v2}"
    assert requests.get(f"{url}/healthz", timeout=30).json()["swaps"] == 1
