#!/usr/bin/env bash
# The prepared device script of benchmarks/gpu_teacher.py: one call of the `device` tool, well within 8 minutes.
#
#   run(command="bash benchmarks/gpu_teacher.sh", timeout_s=540)     # from the repository root
#
# The device machine has Python 3.12 with CUDA torch, transformers, peft, pyarrow and safetensors, and no Ray,
# DeepSpeed, MLflow, gguf or network: raydistill is installed there without its dependencies (tasks/ needs none of
# the missing ones for this path: no teacher download, no GGUF — the models are built from their architecture).
# The JSON lands in $OUT/gpu_teacher.json and $OUT/gpu_teacher_threads.json (and on stdout); docs/benchmarks.md records the figures.
set -euo pipefail
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
python3 -m pip install -q --no-deps --no-build-isolation --ignore-requires-python -e . >/dev/null 2>&1 || \
  python3 -m pip install -q --no-deps --no-build-isolation --ignore-requires-python --target /tmp/rd . && export PYTHONPATH=/tmp/rd
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
out="${OUT:-/tmp}"
# one packing thread (2026-12-04: 176 s on an H200), then the host coding spread over 12 of the node's 16 cores
# (what cache.shards_in_flight=13 gives an actor)
timeout 300 python3 benchmarks/gpu_teacher.py --tokens 1048576 --batch-size 64 --rounds 3 | tee "$out/gpu_teacher.json"
timeout 150 python3 benchmarks/gpu_teacher.py --models smollm2 --tokens 1048576 --batch-size 64 --rounds 2 \
  --pack-threads 12 | tee "$out/gpu_teacher_threads.json"
