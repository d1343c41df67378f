"""Resident memory a model costs once loaded and run: measured in a fresh Python process per model.

    python -m raydistill.tasks.quantize.memory runs/x/quantize/gptq      # prints {"rss_mb": …, …}
    resident_memory("runs/x/quantize/gptq")                               # the same, in a child process

``rss_mb`` is the growth of the process's resident set (``/proc/self/statm``) from just before loading to just
after loading the model and running one forward pass (one 16-token row): what the model holds while it
serves, not the file size. The baseline is taken after torch and transformers are imported, the model's
architecture module is built once on the meta device and the bf16/fp32/int8/int4 kernels have each run once on
small inputs, so library start-up costs are not charged to the model. Freed heap pages are handed back to the
OS (glibc ``malloc_trim``) before reading, so what loading allocated and freed does not count either.

A fresh process per model: the allocator of a process that already loaded other models keeps their pages,
which would pollute every later figure.
"""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

TOKENS = 16


def rss_bytes() -> int:
    """This process's resident set size in bytes (Linux ``/proc``; elsewhere the peak from ``getrusage``)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _trim() -> None:
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to hand back explicitly
        pass


def _warm_up(model_dir: Path) -> None:
    """Import and run once everything loading and a forward will touch, so its start-up is in the baseline."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from raydistill.tasks.quantize import kernels

    with torch.device("meta"):
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(model_dir))
    x = torch.randn(4, 64)
    for dtype in (torch.float32, torch.bfloat16):
        torch.nn.functional.linear(x.to(dtype), torch.randn(64, 64).to(dtype))
    q = torch.randint(-7, 8, (64, 64), dtype=torch.int8)
    kernels.linear(x, kernels.prepare(q, torch.ones(64, 1), 8), None, None, 64)
    kernels.linear(x, kernels.prepare(q, torch.ones(64, 2), 4), None, None, 64)


def measure(model_dir: str | Path) -> dict:
    """``{"rss_mb", "process_rss_mb", "baseline_mb"}`` of loading ``model_dir`` (a quantized directory or a
    float student) and one forward, in this process (see the module doc: call it in a fresh one)."""
    import torch

    from raydistill.tasks.quantize.store import META_FILE, load_quantized
    from raydistill.tasks.students import load_student

    model_dir = Path(model_dir)
    _warm_up(model_dir)
    _trim()
    before = rss_bytes()
    model = load_quantized(model_dir) if (model_dir / META_FILE).exists() else load_student(model_dir)
    with torch.no_grad():
        model(input_ids=torch.arange(TOKENS)[None] % model.config.vocab_size)
    _trim()
    after = rss_bytes()
    return {"rss_mb": (after - before) / 2**20, "process_rss_mb": after / 2**20, "baseline_mb": before / 2**20}


def resident_memory(model_dir: str | Path, timeout_s: float = 600.0) -> dict:
    """:func:`measure` in a fresh Python process (same interpreter and threads)."""
    proc = subprocess.run([sys.executable, "-m", "raydistill.tasks.quantize.memory", str(model_dir)],
                          capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"measuring the resident memory of {model_dir} failed: {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


if __name__ == "__main__":
    print(json.dumps(measure(sys.argv[1])))
