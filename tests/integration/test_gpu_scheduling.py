"""The GPU path on a CPU machine: a local Ray cluster that declares 2 *logical* GPUs (no CUDA kernel runs).

Cache actors and Train workers get GPUs assigned by Ray from what the code requests; the real teacher actor,
handed a GPU on a machine whose torch has no CUDA, stops the cache stage with a typed error naming the key and
the fix; the DeepSpeed config built for GPUs (bf16) trains and checkpoints (on DeepSpeed's CPU accelerator)."""

from __future__ import annotations

import os

import pytest
import torch

from raydistill.tasks.config import TrainConfig, load_config
from raydistill.tasks.device import DeviceError

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gpu_cluster():
    """2 CPUs and 2 logical GPUs: Ray schedules and assigns them; nothing checks they exist."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(num_cpus=2, num_gpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _probe():
    """What Ray gave a process: its GPU ids and CUDA_VISIBLE_DEVICES."""
    import ray

    @ray.remote
    class Probe:
        def gpus(self):
            return ray.get_gpu_ids(), os.environ.get("CUDA_VISIBLE_DEVICES")

    return Probe


def test_cache_actors_request_gpus_where_the_cluster_offers_them(gpu_cluster, tmp_path):
    import ray

    from raydistill.cluster.ray_init import cluster_device
    from raydistill.workflows.cache import actor_options

    cfg = load_config("tiny", [f"run_dir={tmp_path}", "cache.num_gpus_per_actor=0.5", "cache.cpus_per_actor=1"])
    assert cluster_device(cfg.cluster) == "cuda"  # cluster.device=auto on a cluster with GPUs
    options = actor_options(cfg.cache, "cuda")
    assert options == {"num_cpus": 1, "num_gpus": 0.5, "max_concurrency": cfg.cache.shards_in_flight}
    assert actor_options(cfg.cache, "cpu")["num_gpus"] == 0
    probes = [_probe().options(**options).remote() for _ in range(2)]
    seen = ray.get([p.gpus.remote() for p in probes])
    assert all(len(ids) == 1 for ids, _ in seen) and all(env == ",".join(map(str, ids)) for ids, env in seen)
    # an actor that requests no GPU is assigned none; Ray 2.60 no longer hides the node's GPUs from it (no
    # CUDA_VISIBLE_DEVICES=""), so the code passes the planned device instead of trusting what torch sees
    cpu_only = _probe().options(num_cpus=0, num_gpus=0).remote()
    assert ray.get(cpu_only.gpus.remote())[0] == []
    for p in [*probes, cpu_only]:
        ray.kill(p)


def test_train_workers_get_one_gpu_each_and_nccl(gpu_cluster):
    """The ScalingConfig the train driver builds for CUDA, placed on the cluster: one GPU per worker bundle."""
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from raydistill.tasks.device import plan_device
    from raydistill.workflows.train import scaling

    tc = TrainConfig(num_workers=2, cpus_per_worker=1)
    device = plan_device("auto", ray.cluster_resources().get("GPU", 0))
    sc, torch_config = scaling(tc, device)
    assert device == "cuda" and sc.use_gpu and sc.num_gpus_per_worker == 1 and torch_config.backend == "nccl"
    cpu_sc, cpu_torch = scaling(tc, "cpu")
    assert not cpu_sc.use_gpu and cpu_sc.num_gpus_per_worker == 0 and cpu_torch.backend == "gloo"
    pg = placement_group([sc._resources_per_worker_not_none] * sc.num_workers, strategy=sc.placement_strategy)
    ray.get(pg.ready(), timeout=60)
    try:
        workers = [_probe().options(num_cpus=sc.num_cpus_per_worker, num_gpus=sc.num_gpus_per_worker,
                                    scheduling_strategy=PlacementGroupSchedulingStrategy(pg, i)).remote()
                   for i in range(sc.num_workers)]
        ids = [tuple(g) for g, _ in ray.get([w.gpus.remote() for w in workers])]
        assert len(set(ids)) == 2 and all(len(g) == 1 for g in ids)  # two workers, two different GPUs
        for w in workers:
            ray.kill(w)
    finally:
        remove_placement_group(pg)


def test_the_cache_stage_on_a_gpu_with_cpu_only_torch_stops_with_a_clear_error(gpu_cluster, tmp_path):
    """cluster.device=cuda: the real TeacherActor gets a (logical) GPU, sees no CUDA, and the stage raises the
    typed DeviceError (exit code 2 in the CLI) naming cluster.device, instead of caching on the CPU."""
    from raydistill.workflows import cache

    cfg = load_config("tiny", [f"run_dir={tmp_path}", "cluster.device=cuda", "cache.cpus_per_actor=1",
                               "corpus.max_tokens=512"])
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the actor would run")
    with pytest.raises(DeviceError, match=r"cluster.device=cuda but torch.cuda.is_available\(\) is False") as e:
        cache.run(cfg)
    assert "set cluster.device=cpu" in str(e.value) and e.value.exit_code == 2


def test_the_bf16_deepspeed_config_built_for_gpus_trains_and_checkpoints(tmp_path, process_group):
    """DeepSpeed's CPU accelerator runs bf16 too: the GPU config (ZeRO-2, bf16) through the shared step loop and
    the checkpoint writer, so the GPU run differs from this one only by the device."""
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from raydistill.tasks.data import Batch, DataPosition
    from raydistill.tasks.online import StudentWithHeads
    from raydistill.tasks.trainloop import train_steps
    from raydistill.workflows import checkpoint as ckpt
    from raydistill.workflows.train import deepspeed_config

    # the session's gloo group (tests/integration/conftest.py), shared with test_train's in-process engines
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(0)
    model = StudentWithHeads(LlamaForCausalLM(LlamaConfig(
        vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, tie_word_embeddings=True)))
    tc = TrainConfig(zero_stage=2, micro_batch_size=2, lr=1e-2, warmup_steps=0, alpha=1.0)
    ds = deepspeed_config(tc, 1, "cuda")
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.AdamW(model.parameters(), lr=1e-2),
                                      config=ds)
    assert ds["bf16"]["enabled"] and next(engine.module.parameters()).dtype == torch.bfloat16
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    stream = iter([(Batch(ids[:, :-1], ids[:, 1:], None), DataPosition(0, 0, i)) for i in range(2)])
    losses = [s.metrics["loss"] for s in train_steps(engine, stream, tc, total=2)]
    assert losses[1] < losses[0]  # the same batch twice: the bf16 step learned
    d = ckpt.write_checkpoint(engine, 2, 0, 2, DataPosition(0, 0, 2), {})
    assert ckpt.optimizer_tensors(engine)["0.exp_avg"].dtype == torch.float32  # fp32 moments beside bf16
    assert sorted(os.listdir(d)) == ["data_rank0.json", "model.safetensors", "optim_rank0.safetensors",
                                     "state.json"]
