"""Serve throughput and latency (p50/p99) of the completions app over HTTP, with concurrent clients.

    python benchmarks/serve.py                                   # tiny random int8 model, 8 clients × 8 requests
    python benchmarks/serve.py --clients 16 --requests 16 --max-batch-size 16 --max-tokens 32
    python benchmarks/serve.py --run-dir runs/smollm2-shakespeare   # the registered models:/<name>@champion

Starts a local Ray cluster and Serve on a free 127.0.0.1 port, deploys ``workflows.serve`` (with a synthetic
loader unless ``--run-dir``), fires ``clients × requests`` greedy completions and prints one JSON object:
requests/s, generated tokens/s, latency percentiles and the mean number of prompts per forward batch.
Everything is shut down at the end.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import time
from concurrent.futures import ThreadPoolExecutor


def synthetic_loader(hidden: int, layers: int, int8: bool):
    """A picklable loader: a random Llama with the SmolLM2 tokenizer (no registry)."""

    def load(current):
        if current is not None:
            return None
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM

        from raydistill.tasks.config import TeacherConfig
        from raydistill.tasks.quantize import quantize_dynamic_int8
        from raydistill.tasks.teacher import load_tokenizer

        tokenizer = load_tokenizer(TeacherConfig(source="tiny"))
        config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=4 * hidden,
                             num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                             max_position_embeddings=1024, eos_token_id=tokenizer.eos_token_id)
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).eval()
        model = quantize_dynamic_int8(model) if int8 else model
        return model, tokenizer, {"name": f"synthetic-{'int8' if int8 else 'fp32'}", "version": 0}

    return load


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", help="serve the registry of this run dir (default: a synthetic model)")
    p.add_argument("--config", default="tiny", help="preset for --run-dir (default: tiny)")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=8, help="requests per client")
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--batch-wait-timeout-s", type=float, default=0.02)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--fp32", action="store_true", help="synthetic model without quantization")
    args = p.parse_args(argv)

    import requests

    from raydistill.tasks.config import load_config
    from raydistill.workflows import serve

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    overrides = [f"serve.port={port}", f"serve.max_batch_size={args.max_batch_size}",
                 f"serve.batch_wait_timeout_s={args.batch_wait_timeout_s}", "serve.alias_poll_s=0",
                 f"serve.max_tokens_limit={max(args.max_tokens, 1)}"]
    if args.run_dir:
        overrides.append(f"run_dir={args.run_dir}")
    cfg = load_config(args.config, overrides)
    loader = None if args.run_dir else synthetic_loader(args.hidden, args.layers, not args.fp32)
    url = serve.start_app(cfg, loader=loader)
    try:
        body = {"max_tokens": args.max_tokens, "temperature": 0}
        requests.post(f"{url}/v1/completions", json={**body, "prompt": "warm up"}, timeout=300).raise_for_status()
        before = requests.get(f"{url}/healthz", timeout=30).json()

        def client(c: int) -> list[tuple[float, int]]:
            out = []
            with requests.Session() as session:
                for r in range(args.requests):
                    t0 = time.perf_counter()
                    resp = session.post(f"{url}/v1/completions", timeout=300,
                                        json={**body, "prompt": f"Client {c} asks question {r}:"})
                    resp.raise_for_status()
                    out.append((time.perf_counter() - t0, resp.json()["usage"]["completion_tokens"]))
            return out

        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as pool:
            results = [x for chunk in pool.map(client, range(args.clients)) for x in chunk]
        wall = time.perf_counter() - t0
        after = requests.get(f"{url}/healthz", timeout=30).json()
    finally:
        serve.shutdown_app()
        import ray

        ray.shutdown()
    latencies = [1000 * lat for lat, _ in results]
    batches = after["batches"] - before["batches"]
    out = {"model": after["model"], "clients": args.clients, "requests": len(results), "max_tokens": args.max_tokens,
           "max_batch_size": args.max_batch_size, "wall_s": wall, "requests_per_s": len(results) / wall,
           "generated_tokens_per_s": sum(n for _, n in results) / wall,
           "latency_ms": {"p50": percentile(latencies, 0.5), "p99": percentile(latencies, 0.99),
                          "mean": statistics.mean(latencies)},
           "mean_prompts_per_batch": (after["prompts"] - before["prompts"]) / batches if batches else None}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
