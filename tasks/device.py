"""Where tensors live: the device a process computes on, and the dtypes that follow from it.

    python -m pytest tests/unit/test_device.py

``cluster.device`` (``auto`` | ``cpu`` | ``cuda``) is resolved twice:

- on the driver, against the GPUs the Ray cluster offers (:func:`plan_device`): that decides what cache actors
  request (``cache.num_gpus_per_actor``), whether Ray Train workers ``use_gpu`` (NCCL) and which dtype the
  teacher's identity records (so a cache computed on GPUs never mixes with shards computed on CPUs);
- in each process that computes, against ``torch.cuda.is_available()`` (:func:`resolve_device`): a GPU node
  with a CPU-only torch build is a :class:`DeviceError` there, never a silent CPU run. A process planned for
  ``cpu`` stays on the CPU even where it could see GPUs (Ray 2.60 no longer hides a node's GPUs from actors
  that requested none), so the planned device is passed to every actor and worker rather than guessed there.

Dtypes (:func:`resolve_dtype`): ``auto`` is ``bfloat16`` on CUDA and ``float32`` on CPU — except for the teacher
(``cpu_bf16=True``), which runs in ``bfloat16`` on a CPU with native bf16 arithmetic too (:func:`cpu_has_bf16`:
AVX-512 BF16 / AMX on x86, BF16 on Arm; measured 3.6× fp32 on 2 cores here). Whatever the teacher
runs in, its logits are upcast to float32 before a cache format encodes them (``tasks.cache.encode``), so the
stored targets (fp32 log-softmax, then the format's own rounding) have the same format on every device.
"""

from __future__ import annotations

import dataclasses
import difflib
import os

import torch

from raydistill.tasks.config import ConfigError

DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16", "float16")


class DeviceError(ConfigError):
    """The device or dtype asked for is not there (no CUDA, no bf16); the message names the key and the fix."""


def _check_choice(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        close = difflib.get_close_matches(str(value), choices, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise DeviceError(f"{key}={value!r} is not one of {', '.join(choices)}{hint}")


def plan_device(requested: str, cluster_gpus: float, key: str = "cluster.device") -> str:
    """``"cpu"`` or ``"cuda"`` for the actors and workers of a run, decided on the driver.

    Args:
        requested: ``cluster.device``.
        cluster_gpus: GPUs the Ray cluster offers (``ray.cluster_resources().get("GPU", 0)``, logical or real).
    """
    _check_choice(requested, DEVICES, key)
    if requested == "cpu":
        return "cpu"
    if requested == "cuda" and cluster_gpus <= 0:
        raise DeviceError(f"{key}=cuda but the Ray cluster offers no GPUs (resource 'GPU' is 0): start the nodes "
                          "on GPU machines (`ray start --num-gpus=N`), or set cluster.device=cpu (or auto)")
    return "cuda" if cluster_gpus > 0 else "cpu"


def resolve_device(requested: str, key: str = "cluster.device") -> torch.device:
    """The device this process computes on; ``cuda`` without a visible CUDA device is a :class:`DeviceError`."""
    _check_choice(requested, DEVICES, key)
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        why = []
        if torch.version.cuda is None:
            why.append(f"torch {torch.__version__} is a CPU-only build")
        if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
            why.append("CUDA_VISIBLE_DEVICES is empty: this process was given no GPU")
        reason = "; ".join(why) or "no CUDA driver or device"
        raise DeviceError(f"{key}=cuda but torch.cuda.is_available() is False in this process ({reason}): run on "
                          "GPU nodes with a CUDA build of torch, or set cluster.device=cpu (or auto)")
    return torch.device("cuda", torch.cuda.current_device())


CPU_BF16_FLAGS = ("avx512_bf16", "amx_bf16", "bf16")
"""``/proc/cpuinfo`` flags of native bf16 arithmetic (x86: AVX-512 BF16, AMX; Arm: the BF16 extension)."""
_CPU_BF16: list[bool] = []


def cpu_has_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has native bf16 arithmetic (a flag of :data:`CPU_BF16_FLAGS` in ``/proc/cpuinfo``; False
    where there is no such file). ``cpuinfo``: the text to read instead (tests)."""
    if cpuinfo is None:
        if not _CPU_BF16:
            try:
                with open("/proc/cpuinfo") as f:
                    _CPU_BF16.append(cpu_has_bf16(f.read()))
            except OSError:
                _CPU_BF16.append(False)
        return _CPU_BF16[0]
    for line in cpuinfo.splitlines():
        name, _, value = line.partition(":")
        if name.strip().lower() in ("flags", "features") and set(CPU_BF16_FLAGS) & set(value.split()):
            return True
    return False


def resolve_dtype(requested: str, device: str | torch.device, key: str, cpu_bf16: bool = False) -> str:
    """The dtype name for ``requested`` (``teacher.dtype``, ``train.dtype``) on ``device``: ``auto`` is
    ``bfloat16`` on CUDA and ``float32`` on CPU; with ``cpu_bf16`` (the teacher, which only runs inference),
    ``bfloat16`` also on a CPU where :func:`cpu_has_bf16`."""
    _check_choice(requested, DTYPES, key)
    if requested != "auto":
        return requested
    if torch.device(device).type == "cuda" or (cpu_bf16 and cpu_has_bf16()):
        return "bfloat16"
    return "float32"


def check_dtype(dtype: str, device: torch.device, key: str) -> torch.dtype:
    """``torch.<dtype>`` after checking that ``device`` runs it (bf16 needs a GPU that supports it)."""
    if device.type == "cuda" and dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise DeviceError(f"{key} resolves to bfloat16 but {torch.cuda.get_device_name(device)} has no bf16 "
                          f"support: set {key}=float16 (or float32)")
    return getattr(torch, dtype)


def to_device(obj, device: torch.device):
    """``obj`` with every tensor in it on ``device`` (tensors, dataclasses, lists, tuples, dicts; others as is).
    A no-op (the same objects) when everything is already there."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        changes = {f.name: to_device(getattr(obj, f.name), device) for f in dataclasses.fields(obj)}
        return dataclasses.replace(obj, **changes)
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(x, device) for x in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def module_device(module) -> torch.device:
    """Where ``module``'s inputs go: a DeepSpeed engine's ``device`` (its parameters may be offloaded to CPU),
    else the device of the first parameter (CPU for a module without parameters)."""
    device = getattr(module, "device", None)
    if isinstance(device, (torch.device, str)):
        return torch.device(device)
    params = getattr(module, "parameters", None)
    first = next(iter(params()), None) if callable(params) else None
    return first.device if first is not None else torch.device("cpu")
