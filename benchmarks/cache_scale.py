"""What the cache's control plane costs per shard as the cache grows: the real ``raydistill cache`` at S shards.

    python benchmarks/cache_scale.py                                   # local 1k, 4k, 16k; S3 (moto) 1k, 4k
    python benchmarks/cache_scale.py --sizes 500 2000 --s3-sizes 500   # quicker

Each size is a fresh cache of the tiny teacher with one 64-token window per shard (``corpus.windows_per_shard=1``,
``corpus.max_tokens = S × 64`` of Shakespeare), run as the CLI runs it, in its own process: its wall time, its peak
resident memory (``ru_maxrss`` of the driver process: the teacher actors are other processes), then a rerun of the
finished cache (wall time, store requests, shard bytes read). S3 runs use moto's S3 server on 127.0.0.1 (the test
suite's), started here.

- ``per_shard_flatness``: seconds per added shard between the two largest sizes ÷ between the two smallest (first
  runs, so the fixed start-up cancels); target ≤ 1.15 (a control plane whose per-shard cost grows with S gives > 1).
- ``driver_rss_growth_bytes_per_added_shard``: how much more the driver's resident memory grew between its first
  and last shard at the largest S than at the smallest, ÷ the shards added; target ≤ 200 (the stage record's
  ``driver_rss_mb``). ``driver_peak_rss_bytes_per_added_shard`` is the same from the processes' peaks (``ru_maxrss``),
  which Ray's and the imports' start-up set: ± a few MB from run to run.
- ``driver_cpu_ms_per_added_shard``: the driver process's CPU time per added shard (the control plane's own
  cost: planning, keys, logging, indexing, Ray calls; the teacher actors are other processes).
- ``rerun_seconds_per_1k_shards``, ``rerun_shard_bytes_read`` (0), ``rerun_requests_per_shard`` (≤ 0.01 on S3).
- ``train_worker_index_mb``: the memory a training worker's process allocates (``RssAnon``) to open the largest
  cache and build its shard order for one epoch (rank 0 of 8), in a fresh process; ``…_smallest`` the same for
  the smallest cache, ``train_worker_index_bytes_per_added_shard`` the difference per shard, and
  ``train_worker_index_mapped_mb`` the index pages it mapped (``RssFile``: shared and reclaimable).
The machine's other load shifts every wall time: the JSON says so by its ``load_avg``; compare ratios, not seconds.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

DRIVER = ("import json, resource, sys; from raydistill.workflows import cli; rc = cli.main(sys.argv[1:]); "
          "u = resource.getrusage(resource.RUSAGE_SELF); "
          "print('RESULT', json.dumps({'rc': rc, 'peak_kb': u.ru_maxrss, 'cpu_s': u.ru_utime + u.ru_stime}))")
WORKER = """
import json, sys
def rss():  # anonymous (allocated) and file-backed (mapped index pages: shared, reclaimable) resident bytes
    with open("/proc/self/status") as f:
        kb = {l.split()[0][:-1]: int(l.split()[1]) for l in f if l.startswith(("RssAnon", "RssFile"))}
    return kb["RssAnon"] * 1024, kb["RssFile"] * 1024
from raydistill.tasks.cache.shards import open_cache
from raydistill.tasks.data import epoch_shards
import numpy as np, pyarrow as pa
pa.array(np.arange(8)).to_numpy()  # pyarrow's one-time allocations, before measuring
anon0, file0 = rss()
cache = open_cache(sys.argv[1])
train = cache.shards("train")
mine = epoch_shards(train, 0, 0, 8, seed=0)
names = [mine[i]["name"] for i in range(min(len(mine), 100))]  # touch a few entries, as the stream does
anon1, file1 = rss()
print("RESULT", json.dumps({"rss_delta_bytes": anon1 - anon0, "file_delta_bytes": file1 - file0,
                            "train_shards": len(train), "mine": len(mine)}))
"""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[1000, 4000, 16000], help="shards, local disk")
    p.add_argument("--s3-sizes", type=int, nargs="*", default=[1000, 4000], help="shards, S3 (moto); none: skip")
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--out", default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    if len(args.sizes) < 2 or sorted(args.sizes) != args.sizes:
        p.error("--sizes needs at least two sizes in increasing order")
    return args


def _cli(args: list[str], env: dict | None = None) -> tuple[dict, float, str]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", DRIVER, *args], capture_output=True, text=True,
                          env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0", **(env or {})})
    wall = time.perf_counter() - t0
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode or not lines or json.loads(lines[-1][7:])["rc"] != 0:
        raise RuntimeError(f"raydistill {' '.join(args)} failed:\n{proc.stderr[-4000:]}")
    return json.loads(lines[-1][7:]), wall, proc.stdout


def _one(size: int, cache_dir: str, run_dir: Path, seq_len: int) -> dict:
    args = ["cache", "--config", "tiny", f"run_dir={run_dir}", f"cache.dir={cache_dir}", f"corpus.seq_len={seq_len}",
            "corpus.windows_per_shard=1", f"corpus.max_tokens={size * seq_len}"]
    first, wall, _ = _cli(args)
    record = json.loads((run_dir / "stages" / "cache.json").read_text())["outputs"]
    again, rerun_wall, _ = _cli(args)
    rerun = json.loads((run_dir / "stages" / "cache.json").read_text())["outputs"]
    requests = rerun.get("store_requests") or {}
    shards = record["shards_total"]
    rss = record.get("driver_rss_mb") or [None, None]
    return {"shards": shards, "first_wall_s": round(wall, 2), "first_stage_s": round(record["wall_s"], 2),
            "driver_peak_rss_mb": round(first["peak_kb"] / 1024, 1), "driver_cpu_s": round(first["cpu_s"], 2),
            "driver_rss_mb_first_to_last_shard": rss,
            "teacher_forwards": record["teacher_forwards"],
            "actors": record.get("actors"), "rerun_wall_s": round(rerun_wall, 2),
            "rerun_stage_s": round(rerun["wall_s"], 3), "rerun_teacher_forwards": rerun["teacher_forwards"],
            "rerun_requests": {k: v for k, v in requests.items() if k != "shard_bytes_read"},
            "rerun_requests_per_shard": round(sum(v for k, v in requests.items() if k != "shard_bytes_read")
                                              / shards, 5),
            "rerun_shard_bytes_read": requests.get("shard_bytes_read", 0),
            "rerun_driver_peak_rss_mb": round(again["peak_kb"] / 1024, 1)}


def _flatness(rows: list[dict]) -> dict:
    a, b, c, d = rows[0], rows[1], rows[-2], rows[-1]
    small = (b["first_wall_s"] - a["first_wall_s"]) / (b["shards"] - a["shards"])
    large = (d["first_wall_s"] - c["first_wall_s"]) / (d["shards"] - c["shards"])
    rss = (d["driver_peak_rss_mb"] - a["driver_peak_rss_mb"]) * 2 ** 20 / (d["shards"] - a["shards"])
    cpu = (d["driver_cpu_s"] - a["driver_cpu_s"]) / (d["shards"] - a["shards"])
    grew = [r["driver_rss_mb_first_to_last_shard"] for r in (a, d)]
    during = None if None in grew[0] + grew[1] else \
        ((grew[1][1] - grew[1][0]) - (grew[0][1] - grew[0][0])) * 2 ** 20 / (d["shards"] - a["shards"])
    return {"marginal_s_per_shard_small": round(small, 5), "marginal_s_per_shard_large": round(large, 5),
            "per_shard_flatness": round(large / small, 3) if small > 0 else None,
            "driver_peak_rss_bytes_per_added_shard": round(rss, 1),
            "driver_rss_growth_bytes_per_added_shard": None if during is None else round(during, 1),
            "driver_cpu_ms_per_added_shard": round(1000 * cpu, 3),
            "rerun_seconds_per_1k_shards": round(d["rerun_stage_s"] / d["shards"] * 1000, 4),
            "rerun_wall_seconds_per_1k_shards": round(d["rerun_wall_s"] / d["shards"] * 1000, 3)}


@contextlib.contextmanager
def _s3():
    import logging

    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        boto3.client("s3", endpoint_url=f"http://127.0.0.1:{port}", region_name="us-east-1", aws_access_key_id="t",
                     aws_secret_access_key="t").create_bucket(Bucket="bench")
        yield port
    finally:
        server.stop()


def _worker_index(cache_dir: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", WORKER, cache_dir], capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if not lines:
        raise RuntimeError(proc.stderr[-3000:])
    out = json.loads(lines[-1][7:])
    return {"rss_mb": round(out["rss_delta_bytes"] / 2 ** 20, 2), "file_mb": round(out["file_delta_bytes"] / 2 ** 20, 2),
            "train_shards": out["train_shards"]}


def main(argv=None) -> dict:
    args = parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="rd-cache-scale-"))
    result = {"teacher": "tiny", "seq_len": args.seq_len, "windows_per_shard": 1, "cpus": os.cpu_count(),
              "load_avg_start": [round(x, 2) for x in os.getloadavg()], "local": [], "s3": []}
    for size in args.sizes:
        result["local"].append(_one(size, str(root / f"local-{size}" / "cache"), root / f"local-{size}", args.seq_len))
        print(json.dumps(result["local"][-1]), file=sys.stderr, flush=True)
    result["local_summary"] = _flatness(result["local"])
    small, large = (_worker_index(str(root / f"local-{s}" / "cache")) for s in (args.sizes[0], args.sizes[-1]))
    result["local_summary"].update(
        train_worker_index_mb=large["rss_mb"], train_worker_index_mb_smallest=small["rss_mb"],
        train_worker_index_mapped_mb=large["file_mb"],
        train_worker_index_bytes_per_added_shard=round((large["rss_mb"] - small["rss_mb"]) * 2 ** 20
                                                       / max(1, large["train_shards"] - small["train_shards"]), 1))
    if args.s3_sizes:
        with _s3() as port:
            for size in args.s3_sizes:
                uri = f"s3://t:t@bench/c{size}?endpoint_override=http://127.0.0.1:{port}&region=us-east-1"
                result["s3"].append(_one(size, uri, root / f"s3-{size}", args.seq_len))
                print(json.dumps(result["s3"][-1]), file=sys.stderr, flush=True)
        if len(result["s3"]) >= 2:
            result["s3_summary"] = _flatness(result["s3"])
    result["load_avg_end"] = [round(x, 2) for x in os.getloadavg()]
    loc = result["local_summary"]
    result["checks"] = {
        "per_shard_flatness_le_1.15": loc["per_shard_flatness"] is not None and loc["per_shard_flatness"] <= 1.15,
        "driver_rss_growth_le_200B_per_shard": loc["driver_rss_growth_bytes_per_added_shard"] is not None
        and loc["driver_rss_growth_bytes_per_added_shard"] <= 200,
        "rerun_reads_no_shard_bytes": all(r["rerun_shard_bytes_read"] == 0 for r in result["local"] + result["s3"]),
        "rerun_requests_per_shard_le_0.01_on_s3": all(r["rerun_requests_per_shard"] <= 0.01 for r in result["s3"]),
        "rerun_no_teacher_forward": all(r["rerun_teacher_forwards"] == 0 for r in result["local"] + result["s3"])}
    print(json.dumps(result))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
