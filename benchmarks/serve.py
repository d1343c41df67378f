"""Serve over real HTTP on 127.0.0.1: throughput/latency at several concurrencies, streaming time to first token,
HTTP vs the same batched ``complete()`` in-process, the official ``openai`` client, an alias swap under load and a
replica killed under load.

    python benchmarks/serve.py                        # two tiny random int8 students in a throw-away registry
    python benchmarks/serve.py --concurrency 1 8 --requests 32 --max-tokens 16 --skip-kill

Starts a local Ray cluster and Serve on a free 127.0.0.1 port; registers two random int8 students (``workflows
.register``, as the integration tests do) and serves ``models:/<name>@champion`` with the real registry loader.
Everything is bounded in count (``--requests`` per level) and in time (``--level-timeout-s``). Prints one JSON
object:

- ``levels[c]``: requests/s, generated tokens/s, latency p50/p99 (ms) with ``c`` concurrent clients, the
  streaming time to first token p50/p99, and ``http_over_inprocess``: HTTP tokens/s ÷ the tokens/s of the same
  prompts through ``tasks.generate.complete`` in this process, in batches of ``min(c, max_batch_size)`` (target
  >= 0.8).
- ``openai_client_ok``: completions, chat and a stream through the ``openai`` client all answered.
- ``swap_failed_requests``: failed requests while ``@champion`` moves v1 → v2 under load (target 0).
- ``replica_kill_success_rate``: 2 replicas, 8 clients, one replica's process SIGKILLed: successful/all requests
  (target >= 0.97), with ``replica_kill_recovery_s`` (kill → 2 running replicas again).
"""

import argparse
import contextlib
import json
import os
import signal
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor


def register_tiny(cfg, tokenizer, seed: int, hidden: int, layers: int) -> int:
    """A random int8 student registered through ``workflows.register`` (the quantize stage stood in for)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from raydistill.tasks.quantize import quantize_dynamic_int8, save_quantized
    from raydistill.workflows import register, stage

    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=1024, tie_word_embeddings=False, eos_token_id=-1)
    torch.manual_seed(seed)
    int8_dir = cfg.stage_dir("quantize") / "int8"
    save_quantized(quantize_dynamic_int8(LlamaForCausalLM(config)), tokenizer, int8_dir)
    report = {"method": "dynamic_int8", "int8": {"heldout_loss": 5.0}, "fp32": {"heldout_loss": 5.0},
              "teacher": {"heldout_loss": 1.0}}
    (cfg.stage_dir("quantize") / "report.json").write_text(json.dumps(report))
    stage.record(cfg, "quantize", f"bench-quantize-{seed}", {"int8_dir": str(int8_dir)})
    return register.run(cfg, None)["version"]


def percentile(values: list, q: float):
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def run_clients(url: str, clients: int, total: int, max_tokens: int, timeout_s: float, stream: bool = False):
    """``clients`` threads share ``total`` requests (one at a time each, stopping at ``timeout_s``); returns
    ``(wall_s, [(latency_s, tokens, ttft_s or None, ok)])``."""
    import requests

    counter, lock, results, deadline = [0], threading.Lock(), [], time.time() + timeout_s

    def one(session, i):
        body = {"prompt": f"Request {i}: ROMEO.", "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        t0 = time.perf_counter()
        try:
            r = session.post(f"{url}/v1/completions", json=body, timeout=120, stream=stream)
            if not stream:
                ok = r.status_code == 200
                return time.perf_counter() - t0, r.json()["usage"]["completion_tokens"] if ok else 0, None, ok
            ttft, tokens = None, 0
            for line in r.iter_lines():
                if line.startswith(b"data: {") and b'"text": ""' not in line:
                    ttft = ttft or time.perf_counter() - t0
                    tokens += 1
            return time.perf_counter() - t0, tokens, ttft, r.status_code == 200
        except requests.RequestException:
            return time.perf_counter() - t0, 0, None, False

    def client(_):
        with requests.Session() as session:
            while time.time() < deadline:
                with lock:
                    if counter[0] >= total:
                        return
                    counter[0] += 1
                    i = counter[0]
                results.append(one(session, i))

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return time.perf_counter() - t0, results


def inprocess_tokens_per_s(model, tokenizer, n: int, batch: int, max_tokens: int) -> float:
    from raydistill.tasks.generate import complete

    prompts = [f"Request {i}: ROMEO." for i in range(n)]
    complete(model, tokenizer, prompts[:1], max_tokens=2, temperature=0.0)  # warm-up
    t0, tokens = time.perf_counter(), 0
    for start in range(0, n, batch):
        outs = complete(model, tokenizer, prompts[start:start + batch], max_tokens=max_tokens, temperature=0.0)
        tokens += sum(o["usage"]["completion_tokens"] for o in outs)
    return tokens / (time.perf_counter() - t0)


def level(url, c, args, inproc) -> dict:
    wall, res = run_clients(url, c, max(args.requests, c), args.max_tokens, args.level_timeout_s)
    ok = [r for r in res if r[3]]
    _, sres = run_clients(url, c, max(args.requests // 2, c), args.max_tokens, args.level_timeout_s, stream=True)
    lat, ttft = [1000 * r[0] for r in ok], [1000 * r[2] for r in sres if r[3] and r[2] is not None]
    tps = sum(r[1] for r in ok) / wall
    return {"requests": len(res), "failed": len(res) - len(ok), "requests_per_s": len(ok) / wall,
            "generated_tokens_per_s": tps, "latency_ms": {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)},
            "stream_ttft_ms": {"p50": percentile(ttft, 0.5), "p99": percentile(ttft, 0.99)},
            "inprocess_tokens_per_s": inproc, "http_over_inprocess": tps / inproc}


def openai_ok(url: str, name: str) -> bool:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    try:
        c = client.completions.create(model=name, prompt="ROMEO.", max_tokens=4, temperature=0)
        chat = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=4, temperature=0)
        chunks = list(client.chat.completions.create(model=name, messages=[{"role": "user", "content": "hi"}],
                                                     max_tokens=4, temperature=0, stream=True))
        return bool(c.choices and chat.choices[0].message.content is not None and chunks)
    except openai.OpenAIError as e:
        print(f"openai client failed: {e}")
        return False


class Load:
    """Bounded constant load: ``clients`` threads, one request at a time, until ``stop()`` (or ``limit`` each)."""

    def __init__(self, url: str, clients: int, max_tokens: int, limit: int = 2000):
        import requests

        self.results, self._stop = [], threading.Event()

        def client(c):
            with requests.Session() as s:
                for i in range(limit):
                    if self._stop.is_set():
                        return
                    t0 = time.time()
                    try:
                        r = s.post(f"{url}/v1/completions", timeout=120, json={
                            "prompt": f"Client {c} line {i}", "max_tokens": max_tokens, "temperature": 0})
                        self.results.append((t0, r.status_code, r.json().get("model") if r.ok else r.text[:200]))
                    except requests.RequestException as e:
                        self.results.append((t0, None, repr(e)[:200]))

        self._pool = ThreadPoolExecutor(clients)
        self._futures = [self._pool.submit(client, c) for c in range(clients)]

    def stop(self) -> list:
        self._stop.set()
        for f in self._futures:
            f.result()
        self._pool.shutdown()
        return self.results


def wait_for(condition, timeout: float) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if condition():
            return True
        time.sleep(0.2)
    return False


def swap_under_load(url, cfg, name, v2, args) -> dict:
    from raydistill.workflows import tracking

    load = Load(url, 8, args.max_tokens)
    time.sleep(2)
    tracking.client(cfg).set_registered_model_alias(cfg.registry.model_name, "champion", str(v2))
    seen = wait_for(lambda: any(m == f"{name}/{v2}" for _, _, m in list(load.results)), 120)
    time.sleep(2)
    results = load.stop()
    return {"swap_requests": len(results), "swap_failed_requests": sum(1 for r in results if r[1] != 200),
            "swap_seen": seen}


def kill_under_load(url, cfg, loader_cfg, args) -> dict:
    import ray
    from ray import serve as ray_serve
    from ray.util.state import list_actors

    from raydistill.workflows import serve

    def pids():
        name = f"ServeReplica:{serve.APP_NAME}:{serve.DEPLOYMENT}"
        return {a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                  filters=[("class_name", "=", name), ("state", "=", "ALIVE")])}

    def running():
        d = ray_serve.status().applications[serve.APP_NAME].deployments[serve.DEPLOYMENT]
        return d.replica_states.get("RUNNING", 0)

    ray_serve.run(serve.build_app(loader_cfg), name=serve.APP_NAME, route_prefix="/")
    wait_for(lambda: running() == 2 and len(pids()) == 2, 180)
    load = Load(url, 8, args.max_tokens)
    time.sleep(3)
    victim = sorted(pids())[0]
    killed = time.time()
    os.kill(victim, signal.SIGKILL)
    recovered = wait_for(lambda: running() == 2 and victim not in pids() and len(pids()) == 2, 60)
    recovery_s = time.time() - killed
    time.sleep(2)
    results = load.stop()
    ok = sum(1 for r in results if r[1] == 200)
    failed = [r for r in results if r[1] != 200]
    return {"replica_kill_requests": len(results), "replica_kill_failed": len(failed),
            "replica_kill_failed_after_kill_started": sum(1 for r in failed if r[0] > killed),
            "replica_kill_success_rate": ok / max(1, len(results)),
            "replica_kill_recovery_s": recovery_s if recovered else None}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least c)")
    p.add_argument("--level-timeout-s", type=float, default=120, help="time bound per level")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.02)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--skip-kill", action="store_true")
    args = p.parse_args(argv)

    import ray

    from raydistill.cluster.ray_init import init_ray
    from raydistill.tasks.config import ClusterConfig, load_config
    from raydistill.tasks.teacher import load_tokenizer
    from raydistill.workflows import register, serve, tracking

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = [f"run_dir={tempfile.mkdtemp(prefix='bench-serve-')}/run", f"serve.port={port}",
            f"serve.max_batch_size={args.max_batch_size}", f"serve.batch_wait_timeout_s={args.batch_wait_timeout_s}",
            "serve.alias_poll_s=0.5", f"serve.max_tokens_limit={args.max_tokens}", "serve.max_ongoing_requests=64",
            "serve.max_queued_requests=256", "serve.num_cpus=1"]
    cfg = load_config("tiny", base)
    init_ray(ClusterConfig(num_cpus=args.num_cpus))
    tokenizer = load_tokenizer(cfg.teacher)
    with contextlib.redirect_stdout(sys.stderr):  # register's progress lines: stdout holds only the JSON
        v1 = register_tiny(cfg, tokenizer, 1, args.hidden, args.layers)
        v2 = register_tiny(cfg, tokenizer, 2, args.hidden, args.layers)
    client, name = tracking.client(cfg), cfg.registry.model_name
    client.set_registered_model_alias(name, "champion", str(v1))
    model, tok, _ = register.load_registered(cfg.tracking_uri, tracking.model_uri(name, version=v1))
    import torch

    torch.set_num_threads(1)  # as the replica (serve.num_cpus=1)
    out = {"model": f"{name}/{v1}", "hidden": args.hidden, "layers": args.layers, "max_tokens": args.max_tokens,
           "max_batch_size": args.max_batch_size, "levels": {}}
    url = serve.start_app(cfg)
    try:
        run_clients(url, 2, 4, args.max_tokens, 60)  # warm-up
        for c in args.concurrency:
            inproc = inprocess_tokens_per_s(model, tok, max(args.requests, c), min(c, args.max_batch_size),
                                            args.max_tokens)
            out["levels"][str(c)] = level(url, c, args, inproc)
        out["openai_client_ok"] = openai_ok(url, f"{name}/{v1}")
        out.update(swap_under_load(url, cfg, name, v2, args))
        if not args.skip_kill:
            two = load_config("tiny", base + ["serve.num_replicas=2", "serve.num_cpus=0.5"])
            out.update(kill_under_load(url, cfg, two, args))
    finally:
        serve.shutdown_app()
        ray.shutdown()
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
