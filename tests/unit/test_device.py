"""tasks.device: cluster.device planned on the driver and resolved in each process, dtypes, tensors moved whole.

No GPU here: CUDA-side behaviour is checked through what the code decides (the plan, the dtype, the error), and
tensor moves through the ``meta`` device (a second device every torch build has)."""

from __future__ import annotations

import pytest
import torch

from raydistill.tasks.cache.targets import SparseTargets
from raydistill.tasks.config import CacheConfig, ConfigError, load_config
from raydistill.tasks.data import Batch
from raydistill.tasks.device import (DeviceError, module_device, plan_device, resolve_device, resolve_dtype,
                                     to_device)

NO_CUDA = not torch.cuda.is_available()


def test_the_driver_plans_cuda_only_where_the_ray_cluster_offers_gpus():
    assert plan_device("auto", 0) == "cpu" and plan_device("auto", 2) == "cuda" and plan_device("auto", 0.5) == "cuda"
    assert plan_device("cpu", 8) == "cpu" and plan_device("cuda", 1) == "cuda"
    with pytest.raises(DeviceError, match=r"cluster.device=cuda but the Ray cluster offers no GPUs.*"
                                          r"--num-gpus.*cluster.device=cpu"):
        plan_device("cuda", 0)
    with pytest.raises(DeviceError, match=r"cluster.device='gpu' is not one of auto, cpu, cuda"):
        plan_device("gpu", 1)


@pytest.mark.skipif(not NO_CUDA, reason="checks the error raised where CUDA is absent")
def test_cuda_asked_for_where_torch_sees_none_is_a_config_error_naming_the_key_and_the_fix(monkeypatch):
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    with pytest.raises(DeviceError, match=r"cluster.device=cuda but torch.cuda.is_available\(\) is False") as e:
        resolve_device("cuda")
    assert isinstance(e.value, ConfigError) and e.value.exit_code == 2  # the CLI's config-error exit code
    assert "set cluster.device=cpu" in str(e.value)
    if torch.version.cuda is None:
        assert "CPU-only build" in str(e.value)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # Ray's for a GPU-less process (RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO=1)
    with pytest.raises(DeviceError, match="this process was given no GPU"):
        resolve_device("cuda")


def test_auto_dtype_is_bf16_on_cuda_and_fp32_on_cpu_and_explicit_dtypes_stay():
    assert resolve_dtype("auto", "cuda", "teacher.dtype") == "bfloat16"
    assert resolve_dtype("auto", torch.device("cuda", 1), "teacher.dtype") == "bfloat16"
    assert resolve_dtype("auto", "cpu", "teacher.dtype") == "float32"
    assert resolve_dtype("float16", "cuda", "teacher.dtype") == "float16"
    assert resolve_dtype("float32", "cuda", "train.dtype") == "float32"
    with pytest.raises(DeviceError, match=r"teacher.dtype='bf16'.*did you mean 'bfloat16'"):
        resolve_dtype("bf16", "cuda", "teacher.dtype")


def test_device_and_dtype_settings_are_validated_by_the_config():
    cfg = load_config("tiny", ["cluster.device=cuda", "cache.num_gpus_per_actor=0.25", "teacher.dtype=float16",
                               "train.dtype=bfloat16"])
    assert (cfg.cluster.device, cfg.cache.num_gpus_per_actor, cfg.teacher.dtype, cfg.train.dtype) == \
        ("cuda", 0.25, "float16", "bfloat16")
    with pytest.raises(ConfigError, match=r"cluster.device must be one of \['auto', 'cpu', 'cuda'\]"):
        load_config("tiny", ["cluster.device=gpu"])
    with pytest.raises(ConfigError, match="num_gpus_per_actor must be > 0"):
        CacheConfig(num_gpus_per_actor=0)
    with pytest.raises(ConfigError, match=r"cache.num_gpus_per_actor=1.5: Ray takes a fraction <= 1 or a whole"):
        CacheConfig(num_gpus_per_actor=1.5)
    assert CacheConfig(num_gpus_per_actor=2).num_gpus_per_actor == 2


def test_a_batch_moves_whole_to_the_model_device_targets_included():
    ids = torch.zeros(2, 3, 4, dtype=torch.long)
    targets = SparseTargets(ids, torch.full((2, 3, 4), 0.25), torch.zeros(2, 3), None)
    batch = Batch(torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3, dtype=torch.long), targets)
    moved = to_device(batch, torch.device("meta"))
    assert isinstance(moved, Batch) and isinstance(moved.targets, SparseTargets)
    assert {t.device.type for t in (moved.input_ids, moved.labels, moved.targets.ids, moved.targets.probs,
                                    moved.targets.tail)} == {"meta"}
    assert moved.targets.kl_offset is None and batch.input_ids.device.type == "cpu"  # the original is untouched
    same = to_device(batch, torch.device("cpu"))
    assert same.input_ids is batch.input_ids and same.targets.probs is batch.targets.probs  # no copies on CPU


def test_module_device_prefers_an_engines_device_over_its_parameters():
    layer = torch.nn.Linear(2, 2)
    assert module_device(layer) == torch.device("cpu")
    assert module_device(layer.to("meta")) == torch.device("meta")
    assert module_device(torch.nn.ReLU()) == torch.device("cpu")

    class Engine(torch.nn.Module):  # DeepSpeed's engine: parameters offloaded to CPU, inputs go to its device
        device = torch.device("meta")

    assert module_device(Engine()) == torch.device("meta")
