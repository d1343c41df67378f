"""Shared fixtures. Unit tests need no Ray; integration tests share one local cluster per module."""

from __future__ import annotations

import os

# Make Ray Train runs fast and quiet in tests (must be set before ray is imported anywhere).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.2")
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from raydistill.tasks.config import load_config  # noqa: E402


@pytest.fixture
def tiny_cfg(tmp_path):
    """The tiny preset with its run directory under tmp_path (fresh per test)."""
    return load_config("tiny", [f"run_dir={tmp_path / 'run'}"])


@pytest.fixture(scope="session")
def tiny_tokenizer():
    """The SmolLM2 tokenizer (extracted from the GGUF once, then cached on disk)."""
    from raydistill.tasks.teacher import load_tokenizer

    return load_tokenizer(load_config("tiny").teacher)


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster per test module (2 CPUs, like CI)."""
    import ray

    from raydistill.cluster.ray_init import init_ray
    from raydistill.tasks.config import ClusterConfig

    if ray.is_initialized():
        ray.shutdown()
    init_ray(ClusterConfig(num_cpus=2))
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def tiny_cached(tmp_path_factory, ray_cluster):
    """A tiny run directory whose cache stage has finished (shared by a module's tests; do not mutate)."""
    from raydistill.workflows import cache

    run_dir = tmp_path_factory.mktemp("tiny_cached") / "run"
    cfg = load_config("tiny", [f"run_dir={run_dir}"])
    cache.run(cfg, None)
    return cfg
