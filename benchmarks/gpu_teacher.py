"""The teacher pass on an accelerator: bare bf16 forward tokens/s and MFU vs the cache stage's tokens/s; one JSON.

    python benchmarks/gpu_teacher.py                                 # CUDA: tiny and SmolLM2-135M-shaped teachers
    python benchmarks/gpu_teacher.py --device cpu --models tiny --tokens 2048 --batch-size 2   # the CPU path
    bash benchmarks/gpu_teacher.sh                                   # the prepared device script (see there)

Ray-free, through ``tasks/`` alone: per model, a Llama of the model's architecture (random weights: the SmolLM2
GGUF does not fit the device machine's 64 MiB upload, and speed does not depend on the weights' values) in bf16 on
the device; windows of random tokens; then in interleaved ``--rounds``:

- ``bare``: ``model(x)`` over all windows (``torch.cuda.synchronize`` before the clock stops);
- ``cache``: what a teacher actor does per shard — :func:`tasks.cache.encode.encode_shard` (forward + the format's
  draws on the device; only draws cross to the host) and :func:`tasks.cache.shards.commit_shard` (entropy coding,
  pack, atomic write to local disk) on a worker thread, overlapping the next shard's forward.

``mfu`` = bare tokens/s × forward FLOPs per token ÷ ``--peak-tflops`` (default 989: H100/H200 SXM dense bf16):
FLOPs per token = 2 × (matmul parameters, head included) + 2 × layers × seq_len × d_model (causal attention).
Random weights give near-uniform logits, the most expensive case for draws and coding (every draw a new id).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from raydistill.tasks.cache.encode import encode_shard
from raydistill.tasks.cache.formats import format_params
from raydistill.tasks.cache.shards import commit_shard
from raydistill.tasks.config import CacheConfig, TinyModelConfig

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
           "num_key_value_heads": 3, "vocab_size": 49152}
"""SmolLM2-135M's architecture (from its GGUF's metadata)."""


def architecture(name: str) -> dict:
    if name == "smollm2":
        return dict(SMOLLM2)
    t = TinyModelConfig()
    return {"hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size, "num_hidden_layers": t.num_layers,
            "num_attention_heads": t.num_heads, "num_key_value_heads": t.num_kv_heads, "vocab_size": 49152}


def build(name: str, device: torch.device, dtype: torch.dtype) -> LlamaForCausalLM:
    cfg = LlamaConfig(**architecture(name), max_position_embeddings=4096, tie_word_embeddings=True)
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()


def flops_per_token(model: LlamaForCausalLM, seq_len: int) -> float:
    c = model.config
    matmul = sum(p.numel() for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n)
    matmul += c.vocab_size * c.hidden_size  # the (tied) output head
    return 2.0 * matmul + 2.0 * c.num_hidden_layers * seq_len * c.hidden_size


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bare(model, shards: list[np.ndarray], batch: int, device: torch.device) -> float:
    _sync(device)
    t0 = time.perf_counter()
    with torch.inference_mode():
        for tokens in shards:
            for i in range(0, tokens.shape[0], batch):
                model(input_ids=torch.from_numpy(tokens[i: i + batch, :-1]).long().to(device), use_cache=False)
    _sync(device)
    return time.perf_counter() - t0


def cache(model, shards: list[np.ndarray], batch: int, params, out_dir: str, threads: int = 1) -> float:
    """The actor's path: each shard's forward + draws here, its coding and commit on one of ``threads`` workers
    (as ``cache.shards_in_flight`` - 1 shards code while the next one runs forward); at most ``threads``
    shards wait on the host."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        pending: list = []
        for k, tokens in enumerate(shards):
            split = "heldout" if k % 10 == 9 else "train"
            fields, stats, _ = encode_shard(model, tokens, split, params, 1.0, batch, f"{k:064x}")
            if len(pending) >= threads:
                pending.pop(0).result()
            pending.append(pool.submit(commit_shard, out_dir, f"s{k}", split, f"{k:064x}", tokens, fields, stats,
                                       params))
        for f in pending:
            f.result()
    return time.perf_counter() - t0


def measure(name: str, args, device: torch.device) -> dict:
    model = build(name, device, getattr(torch, args.dtype))
    rng = np.random.default_rng(0)
    windows = max(1, args.tokens // args.seq_len)
    tokens = rng.integers(0, model.config.vocab_size, size=(windows, args.seq_len + 1)).astype(np.int32)
    shards = [tokens[i: i + args.windows_per_shard] for i in range(0, windows, args.windows_per_shard)]
    n = windows * args.seq_len
    params = format_params(CacheConfig(num_samples=args.num_samples))
    bare(model, shards[:1], args.batch_size, device)  # warm-up: kernels, allocator
    cache(model, shards[:1], args.batch_size, params, tempfile.mkdtemp(), args.pack_threads)
    rates = {"bare": [], "cache": []}
    for _ in range(args.rounds):
        rates["bare"].append(n / bare(model, shards, args.batch_size, device))
        rates["cache"].append(n / cache(model, shards, args.batch_size, params, tempfile.mkdtemp(),
                                        args.pack_threads))
    bare_tps, cache_tps = statistics.median(rates["bare"]), statistics.median(rates["cache"])
    fpt = flops_per_token(model, args.seq_len)
    return {"model": name, "architecture": architecture(name), "tokens": n, "dtype": args.dtype,
            "bare_tokens_per_s": round(bare_tps, 1), "cache_tokens_per_s": round(cache_tps, 1),
            "ratio": round(cache_tps / bare_tps, 3),
            "mfu": round(bare_tps * fpt / (args.peak_tflops * 1e12), 4) if device.type == "cuda" else None,
            "gflops_per_token": round(fpt / 1e9, 3),
            "spread": {k: {"min": round(min(v), 1), "max": round(max(v), 1)} for k, v in rates.items()}}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--models", nargs="+", default=["tiny", "smollm2"], choices=["tiny", "smollm2"])
    p.add_argument("--tokens", type=int, default=1 << 20, help="tokens per round (random windows)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=64, help="windows per forward")
    p.add_argument("--windows-per-shard", type=int, default=256)
    p.add_argument("--num-samples", type=int, default=None, help="a fixed N (default: the byte budget)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--peak-tflops", type=float, default=989.0)
    p.add_argument("--pack-threads", type=int, default=1,
                   help="host threads coding and committing shards (an actor's cache.shards_in_flight - 1)")
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_teacher: no CUDA device here; use --device cpu for the CPU path")
    device = torch.device(args.device)
    result = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "batch_size": args.batch_size, "seq_len": args.seq_len,
              "peak_tflops": args.peak_tflops, "pack_threads": args.pack_threads, "rows": []}
    for name in args.models:
        print(f"[gpu_teacher] {name} …", file=sys.stderr, flush=True)
        result["rows"].append(measure(name, args, device))
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
