"""Serve over real HTTP on 127.0.0.1: throughput/latency at several concurrencies, streaming time to first token,
HTTP vs the same batched ``complete()`` in-process, API keys, the official ``openai`` client, an alias swap under
load across two replicas and a replica killed under load.

    python benchmarks/serve.py                        # two tiny random int8 students in a throw-away registry
    python benchmarks/serve.py --concurrency 1 8 --requests 32 --max-tokens 16 --skip-kill
    python benchmarks/serve.py --model-dir runs/smollm2-shakespeare/quantize/gptq   # the demo's served student

Starts a local Ray cluster and Serve on a free 127.0.0.1 port with an API key (``serve.api_keys_file``: every
request below sends it); registers two random int8 students (``workflows.register``, as the integration tests
do) and serves ``models:/<name>@champion`` with the real registry loader. Everything is bounded in count
(``--requests`` per level) and in time (``--level-timeout-s``). Prints one JSON object:

- ``unauthenticated_status``: the status of a request without a key (target 401).
- ``levels[c]``: requests/s, generated tokens/s, latency p50/p99 (ms) with ``c`` concurrent clients, the
  streaming time to first token p50/p99, and ``http_over_inprocess``: HTTP tokens/s ÷ the tokens/s of the same
  prompts through ``tasks.generate.complete`` in this process, in batches of ``min(c, max_batch_size)`` (target
  >= 0.8), timed in ``--rounds`` interleaved rounds (all rounds' tokens ÷ all rounds' seconds, each side);
  ``http_over_inprocess_rounds`` (each round's ratio) and ``http_over_inprocess_spread`` (their min, median,
  max); ``rows_per_forward`` (the replica's mean batch rows), ``decode_steps`` and ``joins`` (the replica's
  forwards: one per generated token of the batch, and one prefill per group of requests joining it),
  ``replica_busy_share`` (the share of the HTTP time the replica spent generating), and the cores the load
  generator (``client_cores``: this process's client threads), the Serve proxy (``proxy_cores``) and the replica
  (``replica_cores``: its generating thread is at most 1 with ``serve.num_cpus=1``) used meanwhile
  — on a small machine they compete with the replica, which the in-process figure does not.
- ``openai_client_ok``: completions, chat and a stream through the ``openai`` client all answered.
- the swap (2 replicas × 0.5 CPU, 8 clients, ``@champion`` moved v1 → v2 under load): ``swap_failed_requests``
  (target 0); ``swap_mixed_seconds``: how long the two replicas served different versions (their switch times
  as the app's version watcher recorded them, target <= 2 s); ``swap_seconds``: alias move → the last replica
  switched (``serve.alias_poll_s`` = 0.5 here + loading + reporting); ``swap_old_answers_after_switch``:
  requests sent after the last switch but answered by v1 (target 0); ``swap_mixed_seconds_seen_by_clients``:
  the clients' own lower bound (the last request answered by v1 was sent this long after the first answer from
  v2 arrived; 0 when none).
- ``replica_kill_success_rate``: the same 2 replicas, 8 clients, one replica's process SIGKILLed:
  successful/all requests (target >= 0.97), with ``replica_kill_recovery_s`` (kill → 2 running replicas again).
"""

import argparse
import contextlib
import json
import os
import secrets
import signal
import socket
import statistics
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


AUTH = {}  # {"Authorization": "Bearer <the benchmark's key>"}, set by measure()


def run_clients(url: str, clients: int, total: int, max_tokens: int, timeout_s: float, stream: bool = False):
    """``clients`` threads share ``total`` requests (one at a time each, stopping at ``timeout_s``); returns
    ``(wall_s, [(latency_s, tokens, ttft_s or None, ok)])``."""
    import requests

    counter, lock, results, deadline = [0], threading.Lock(), [], time.time() + timeout_s

    def one(session, i):
        body = {"prompt": f"Request {i}: ROMEO.", "max_tokens": max_tokens, "temperature": 0, "stream": stream}
        t0 = time.perf_counter()
        try:
            r = session.post(f"{url}/v1/completions", json=body, timeout=120, stream=stream, headers=AUTH)
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


def inprocess(model, tokenizer, n: int, batch: int, max_tokens: int) -> tuple[float, int]:
    """``(seconds, tokens)`` of ``n`` prompts through ``tasks.generate.complete`` in batches of ``batch``."""
    from raydistill.tasks.generate import complete

    prompts = [f"Request {i}: ROMEO." for i in range(n)]
    t0, tokens = time.perf_counter(), 0
    for start in range(0, n, batch):
        outs = complete(model, tokenizer, prompts[start:start + batch], max_tokens=max_tokens, temperature=0.0)
        tokens += sum(o["usage"]["completion_tokens"] for o in outs)
    return time.perf_counter() - t0, tokens


def level(url, c, args, model, tokenizer) -> dict:
    """One concurrency level: ``--rounds`` interleaved rounds of in-process then HTTP (load drift on a shared
    machine hits both alike), then the streaming TTFT."""
    import requests

    n = max(args.requests // args.rounds, c)
    before = requests.get(f"{url}/healthz", timeout=30).json()
    wall, res, in_s, in_tokens, client_cpu, proxy_cpu, replica_cpu = 0.0, [], 0.0, 0, 0.0, 0.0, 0.0
    ratios = []
    for _ in range(args.rounds):
        s, t = inprocess(model, tokenizer, n, min(c, args.max_batch_size), args.max_tokens)
        in_s, in_tokens = in_s + s, in_tokens + t
        cpu, proxy, replica = time.process_time(), actor_cpu_s("ProxyActor"), actor_cpu_s(replica_class())
        w, r = run_clients(url, c, n, args.max_tokens, args.level_timeout_s / args.rounds)
        client_cpu += time.process_time() - cpu
        proxy_cpu += actor_cpu_s("ProxyActor") - proxy
        replica_cpu += actor_cpu_s(replica_class()) - replica
        wall, res = wall + w, res + r
        ratios.append((sum(x[1] for x in r if x[3]) / w) / (t / s))
    after = requests.get(f"{url}/healthz", timeout=30).json()
    rows = (after["rows_stepped"] - before["rows_stepped"]) / max(1, after["steps"] - before["steps"])
    busy = (after["busy_s"] - before["busy_s"]) / wall  # share of the HTTP time the replica was generating
    ok = [r for r in res if r[3]]
    _, sres = run_clients(url, c, max(args.requests // 2, c), args.max_tokens, args.level_timeout_s, stream=True)
    lat, ttft = [1000 * r[0] for r in ok], [1000 * r[2] for r in sres if r[3] and r[2] is not None]
    tps, inproc = sum(r[1] for r in ok) / wall, in_tokens / in_s
    return {"requests": len(res), "failed": len(res) - len(ok), "requests_per_s": len(ok) / wall,
            "generated_tokens_per_s": tps, "latency_ms": {"p50": percentile(lat, 0.5), "p99": percentile(lat, 0.99)},
            "stream_ttft_ms": {"p50": percentile(ttft, 0.5), "p99": percentile(ttft, 0.99)},
            "inprocess_tokens_per_s": inproc, "http_over_inprocess": tps / inproc,
            "http_over_inprocess_rounds": ratios, "http_over_inprocess_spread": {
                "min": min(ratios), "median": statistics.median(ratios), "max": max(ratios)},
            "rows_per_forward": rows, "decode_steps": after["steps"] - before["steps"],
            "joins": after["batches"] - before["batches"],
            "replica_busy_share": busy, "client_cores": client_cpu / wall, "proxy_cores": proxy_cpu / wall,
            "replica_cores": replica_cpu / wall}


def replica_class() -> str:
    """Serve's actor class name for the replicas of ``workflows.serve``'s app."""
    from raydistill.workflows import serve

    return f"ServeReplica:{serve.APP_NAME}:{serve.DEPLOYMENT}"


def actor_pids(class_name: str) -> set[int]:
    """Process ids of the live actors of ``class_name`` (the Serve proxy, the replicas), from the State API."""
    import ray
    from ray.util.state import list_actors

    return {a.pid for a in list_actors(address=ray.get_runtime_context().gcs_address,
                                       filters=[("class_name", "=", class_name), ("state", "=", "ALIVE")])}


def actor_cpu_s(class_name: str) -> float:
    """CPU seconds (user + system) the live actors of ``class_name`` have used."""
    import psutil

    return sum(sum(psutil.Process(pid).cpu_times()[:2]) for pid in actor_pids(class_name))


def openai_ok(url: str, name: str) -> bool:
    import openai

    key = AUTH["Authorization"].removeprefix("Bearer ")
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=120)
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
    """Bounded constant load: ``clients`` threads, one request at a time, until ``stop()`` (or ``limit`` each);
    ``results``: ``(sent, status or None, model or error, answered)``."""

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
                        r = s.post(f"{url}/v1/completions", timeout=120, headers=AUTH, json={
                            "prompt": f"Client {c} line {i}", "max_tokens": max_tokens, "temperature": 0})
                        self.results.append((t0, r.status_code, r.json().get("model") if r.ok else r.text[:200],
                                             time.time()))
                    except requests.RequestException as e:
                        self.results.append((t0, None, repr(e)[:200], time.time()))

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


def unauthenticated(url: str) -> int:
    import requests

    return requests.post(f"{url}/v1/completions", json={"prompt": "ROMEO.", "max_tokens": 1}, timeout=60).status_code


def two_replicas(cfg) -> None:
    """Deploy the registry app with 2 replicas × 0.5 CPU (and its version watcher); wait until both report."""
    from ray import serve as ray_serve

    from raydistill.workflows import serve

    ray_serve.run(serve.build_app(cfg), name=serve.APP_NAME, route_prefix="/")
    wait_for(lambda: running() == 2 and len(actor_pids(replica_class())) == 2
             and len(serve.watcher_status()["replicas"]) == 2, 180)


def running() -> int:
    from ray import serve as ray_serve

    from raydistill.workflows import serve

    d = ray_serve.status().applications[serve.APP_NAME].deployments[serve.DEPLOYMENT]
    return d.replica_states.get("RUNNING", 0)


def swap_under_load(url, cfg, name, v1, v2, args) -> dict:
    """``@champion`` v1 → v2 under 8 clients; how long the replicas served different versions (see the doc)."""
    from raydistill.workflows import serve, tracking

    load = Load(url, 8, args.max_tokens)
    time.sleep(2)
    moved = time.time()
    tracking.client(cfg).set_registered_model_alias(cfg.registry.model_name, "champion", str(v2))
    seen = wait_for(lambda: (x := serve.watcher_status())["committed"] == v2 and x["mixed_s"] is not None, 120)
    status = serve.watcher_status()
    time.sleep(2)
    results = load.stop()
    switched = max((r["since"] for r in status["replicas"].values() if r["serving"] == v2), default=None)
    old = [r for r in results if r[2] == f"{name}/{v1}"]
    new = [r for r in results if r[2] == f"{name}/{v2}"]
    clients = max(0.0, max(r[0] for r in old) - min(r[3] for r in new)) if old and new else None
    return {"swap_replicas": len(status["replicas"]), "swap_requests": len(results),
            "swap_failed_requests": sum(1 for r in results if r[1] != 200), "swap_seen": seen,
            "swap_mixed_seconds": status["mixed_s"], "swap_mixed_seconds_seen_by_clients": clients,
            "swap_seconds": None if switched is None else switched - moved,
            "swap_old_answers_after_switch": None if switched is None else
            sum(1 for r in old if r[0] > switched)}


def kill_under_load(url, args) -> dict:
    """Kill one of the 2 running replicas' processes under 8 clients."""
    def pids():
        return actor_pids(replica_class())

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


def checks(out: dict) -> dict:
    """The issue's targets against what was measured (``None``: not measured in this run)."""
    kill, recovery = out.get("replica_kill_success_rate"), out.get("replica_kill_recovery_s")
    mixed = out["swap_mixed_seconds"]
    return {"http_over_inprocess_ge_0.8": {c: lv["http_over_inprocess"] >= 0.8 for c, lv in out["levels"].items()},
            "no_failed_requests": all(lv["failed"] == 0 for lv in out["levels"].values()),
            "unauthenticated_status_eq_401": out["unauthenticated_status"] == 401,
            "swap_failed_requests_eq_0": out["swap_failed_requests"] == 0,
            "swap_mixed_seconds_le_2": mixed is not None and mixed <= 2,
            "swap_old_answers_after_switch_eq_0": out["swap_old_answers_after_switch"] == 0,
            "replica_kill_success_rate_ge_0.97": None if kill is None else kill >= 0.97,
            "replica_kill_recovery_le_30s": None if "replica_kill_requests" not in out else
            recovery is not None and recovery <= 30}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per concurrency level (at least c)")
    p.add_argument("--rounds", type=int, default=4, help="interleaved in-process/HTTP rounds per level")
    p.add_argument("--level-timeout-s", type=float, default=120, help="time bound per level")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.02)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    p.add_argument("--skip-kill", action="store_true")
    p.add_argument("--model-dir", help="measure the levels and the openai client on this model directory (fp32 or "
                   "quantized, e.g. runs/smollm2-shakespeare/quantize/gptq) instead of the tiny random student; the "
                   "swap and kill parts still use the tiny registered versions")
    args = p.parse_args(argv)
    with contextlib.redirect_stdout(sys.stderr):  # Ray's and register's lines: stdout holds only the JSON
        out = measure(args)
    print(json.dumps(out, indent=2))
    return out


def measure(args) -> dict:
    import ray

    from raydistill.cluster.ray_init import init_ray
    from raydistill.tasks.config import ClusterConfig, load_config
    from raydistill.tasks.teacher import load_tokenizer
    from raydistill.workflows import register, serve, tracking

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    key = secrets.token_urlsafe(32)
    with open(os.path.join(tmp, "api-keys"), "w") as f:
        f.write(key + "\n")
    AUTH["Authorization"] = f"Bearer {key}"
    base = [f"run_dir={tmp}/run", f"serve.port={port}", f"serve.api_keys_file={tmp}/api-keys",
            f"serve.max_batch_size={args.max_batch_size}", f"serve.batch_wait_timeout_s={args.batch_wait_timeout_s}",
            "serve.alias_poll_s=0.5", f"serve.max_tokens_limit={args.max_tokens}", "serve.max_ongoing_requests=64",
            "serve.max_queued_requests=256", "serve.num_cpus=1"]
    cfg = load_config("tiny", base)
    init_ray(ClusterConfig(num_cpus=args.num_cpus))
    tokenizer = load_tokenizer(cfg.teacher)
    v1 = register_tiny(cfg, tokenizer, 1, args.hidden, args.layers)
    v2 = register_tiny(cfg, tokenizer, 2, args.hidden, args.layers)
    client, name = tracking.client(cfg), cfg.registry.model_name
    client.set_registered_model_alias(name, "champion", str(v1))
    import torch

    torch.set_num_threads(1)  # as the replica (serve.num_cpus=1)
    loader = serve.DirectoryLoader(args.model_dir) if args.model_dir else None
    if loader:
        model, tok, info = loader()
        shape = {"model": info["model_uri"], "quantization": info["quantization"]}
    else:
        model, tok, _ = register.load_registered(cfg.tracking_uri, tracking.model_uri(name, version=v1))
        shape = {"model": f"{name}/{v1}", "hidden": args.hidden, "layers": args.layers}
    weights = sum(t.numel() * t.element_size() for t in model.state_dict().values() if isinstance(t, torch.Tensor))
    out = {**shape, "weights_bytes": weights, "max_tokens": args.max_tokens,
           "max_batch_size": args.max_batch_size, "batch_wait_timeout_s": args.batch_wait_timeout_s, "levels": {}}
    url = serve.start_app(cfg, loader)
    try:
        out["unauthenticated_status"] = unauthenticated(url)
        run_clients(url, 2, 4, args.max_tokens, 60)  # warm-up, both sides
        inprocess(model, tok, 2, 2, 2)
        for c in args.concurrency:
            out["levels"][str(c)] = level(url, c, args, model, tok)
        out["openai_client_ok"] = openai_ok(url, out["model"] if not loader else info["name"])
        # the swap and the kill: the tiny registered versions behind the registry loader, 2 replicas
        two_replicas(load_config("tiny", base + ["serve.num_replicas=2", "serve.num_cpus=0.5"]))
        out.update(swap_under_load(url, cfg, name, v1, v2, args))
        if not args.skip_kill:
            out.update(kill_under_load(url, args))
    finally:
        serve.shutdown_app()
        ray.shutdown()
    out["checks"] = checks(out)
    return out


if __name__ == "__main__":
    main()
