"""Training: ZeRO checkpoints round-trip exactly (in-process), then real Ray Train runs on the tiny cache.

Default suite: in-process DeepSpeed checks on a one-process gloo group (checkpoint round-trip for ZeRO 1/2/3
and 3+offload, the lr schedule reaching the optimizer; no Ray), a refused mismatched cache, and two
TorchTrainer runs (ZeRO-2, 2 workers: ``raydistill train``; then the same run name continues from its
checkpoint; in-process again, the shared step loop on ZeRO-2/3 with projection heads). Slow: ZeRO-1, ZeRO-3 and
ZeRO-3+offload+LoRA end to end, a worker killed mid-run that Ray Train restarts from the last checkpoint, and the
online teacher with hidden-state MSE (heads checkpointed by DeepSpeed with the student, resumed, not exported).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from raydistill.tasks.config import TrainConfig, load_config

pytestmark = pytest.mark.integration


def _engine(stage: int, seed: int = 0, weights: Path | None = None, optim: dict | None = None, offload=False):
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    from raydistill.workflows.checkpoint import load_optimizer_tensors, load_weights
    from raydistill.workflows.train import deepspeed_config

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True))
    if weights:
        load_weights(model, weights)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tc = TrainConfig(zero_stage=stage, offload=offload, micro_batch_size=2, grad_clip=1.0)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(tc, 1))
    if optim is not None:
        load_optimizer_tensors(engine, optim)
    return engine


def _step(engine, seed):
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(seed))
    engine.backward(engine(input_ids=ids, labels=ids).loss)
    engine.step()


def _weights(engine, stage, path):
    from safetensors.torch import load_file

    from raydistill.workflows.checkpoint import save_weights

    save_weights(engine, stage, 0, path)
    return load_file(str(path))


@pytest.mark.parametrize("stage,offload", [(1, False), (2, False), (3, False), (3, True)])
def test_zero_checkpoint_round_trip_is_exact(stage, offload, tmp_path, process_group):
    from raydistill.workflows.checkpoint import optimizer_tensors

    a = _engine(stage, offload=offload)
    for s in range(3):
        _step(a, s)
    _weights(a, stage, tmp_path / "ckpt.safetensors")
    optim = optimizer_tensors(a)
    assert {k.split(".", 1)[1] for k in optim} == {"step", "exp_avg", "exp_avg_sq"}
    _step(a, 3)
    want = _weights(a, stage, tmp_path / "a.safetensors")

    b = _engine(stage, seed=1, weights=tmp_path / "ckpt.safetensors", optim=optim, offload=offload)  # all overwritten
    _step(b, 3)
    got = _weights(b, stage, tmp_path / "b.safetensors")
    assert got.keys() == want.keys() and "model.embed_tokens.weight" in got
    for k in want:
        assert torch.allclose(got[k], want[k], atol=1e-6), k

    fresh_moments = _engine(stage, seed=1, weights=tmp_path / "ckpt.safetensors", offload=offload)  # no AdamW state
    _step(fresh_moments, 3)
    differ = _weights(fresh_moments, stage, tmp_path / "c.safetensors")
    assert not all(torch.allclose(differ[k], want[k], atol=1e-6) for k in want)


@pytest.mark.parametrize("stage", [2, 3])
def test_learning_rate_set_on_param_groups_reaches_the_optimizer(stage, tmp_path, process_group):
    """The loop sets the schedule's lr on ``engine.optimizer.param_groups``: lr 0 must freeze the weights."""
    engine = _engine(stage)
    before = _weights(engine, stage, tmp_path / "before.safetensors")
    for group in engine.optimizer.param_groups:
        group["lr"] = 0.0
    _step(engine, 0)
    after = _weights(engine, stage, tmp_path / "after.safetensors")
    assert all(torch.equal(before[k], after[k]) for k in before)
    for group in engine.optimizer.param_groups:
        group["lr"] = 1e-2
    _step(engine, 1)
    moved = _weights(engine, stage, tmp_path / "moved.safetensors")
    assert not all(torch.equal(before[k], moved[k]) for k in before)


def test_deepspeed_config():
    from raydistill.workflows.train import deepspeed_config

    tc = TrainConfig(zero_stage=3, offload=True, micro_batch_size=3, grad_accum=2, grad_clip=0.5, lr=1e-3,
                     warmup_steps=2)
    ds = deepspeed_config(tc, world_size=2)
    assert ds["train_batch_size"] == 12 and ds["gradient_accumulation_steps"] == 2
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"]["enabled"] is False
    assert deepspeed_config(TrainConfig(zero_stage=1, offload=True), 1)["zero_optimization"]["offload_optimizer"]
    # (lr_at and report_steps moved to tasks.trainloop: tests/unit/test_trainloop.py)


@pytest.mark.parametrize("stage", [2, 3])
def test_shared_loop_on_deepspeed_trains_the_heads_and_exports_only_the_student(stage, tmp_path, process_group):
    """The workers' path in one process: StudentWithHeads under DeepSpeed (ZeRO-3: partitioned, gathered inside
    the engine's forward), one step of the shared loop with an online teacher and hidden MSE; the full weights
    carry the trained head, the student's weights do not."""
    import deepspeed
    from safetensors.torch import load_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from raydistill.tasks.data import Batch
    from raydistill.tasks.online import online_teacher, student_with_heads
    from raydistill.tasks.trainloop import train_steps
    from raydistill.workflows.checkpoint import save_weights
    from raydistill.workflows.train import deepspeed_config

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False

    def llama(seed, hidden):
        torch.manual_seed(seed)
        return LlamaForCausalLM(LlamaConfig(vocab_size=97, hidden_size=hidden, intermediate_size=64,
                                            num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                            tie_word_embeddings=True))

    tc = TrainConfig(zero_stage=stage, micro_batch_size=2, lr=1e-2, warmup_steps=0, teacher_mode="online",
                     hidden_loss="mse", hidden_layer_map=[[1, 0]])
    online = online_teacher(llama(1, 48), tc, [(1, 0)])
    model = student_with_heads(llama(0, 32), tc, [(1, 0)], teacher_dim=48)
    head_before = model.projections[0].weight.detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr)
    engine, *_ = deepspeed.initialize(model=model, optimizer=opt, config=deepspeed_config(tc, 1))
    ids = torch.randint(0, 97, (2, 9), generator=torch.Generator().manual_seed(0))
    stream = iter([(Batch(ids[:, :-1], ids[:, 1:], None), 1)])
    step = next(train_steps(engine, stream, tc, total=1, online=online))
    assert step.metrics["hidden"] > 0 and step.window is not None

    full = _weights(engine, stage, tmp_path / "full.safetensors")
    assert full["projections.0.weight"].shape == (48, 32)
    assert not torch.equal(full["projections.0.weight"], head_before)  # DeepSpeed stepped the head
    save_weights(engine, stage, 0, tmp_path / "student.safetensors", module=engine.module.student)
    student = load_file(str(tmp_path / "student.safetensors"))
    assert not any(k.startswith("projections") for k in student)
    assert set(student) == {k.removeprefix("student.") for k in full if k.startswith("student.")}


@pytest.fixture(scope="module")
def trained(tiny_cached, tmp_path_factory):
    """One ZeRO-2 run on the tiny cache (2 workers, 6 steps, checkpoints every 3), via the `train` verb."""
    from raydistill.workflows import train

    cfg = load_config("tiny", [f"run_dir={tiny_cached.run_dir}"])
    outputs = train.run(cfg)
    return cfg, outputs


def test_train_saves_a_loadable_student_that_beats_its_init(trained):
    from mlflow.tracking import MlflowClient

    from raydistill.tasks.cache.shards import config_cache
    from raydistill.tasks.data import heldout_shards
    from raydistill.tasks.evaluate import evaluate, evaluate_sums, finalize
    from raydistill.tasks.students import load_student
    from raydistill.tasks.trainloop import eval_window_budget
    from raydistill.workflows import stage, train

    cfg, out = trained
    student_dir = Path(out["student_dir"])
    assert (student_dir / "model.safetensors").exists() and (student_dir / "tokenizer.json").exists()
    assert not [p for p in student_dir.rglob("*") if p.suffix in (".bin", ".pt", ".pkl")]
    metrics = json.loads(Path(out["metrics_path"]).read_text())
    assert metrics["step"] == cfg.train.steps
    assert metrics["heldout_loss"] < metrics["init"]["heldout_loss"]

    cache = config_cache(cfg)
    # the windows training evaluated: its default budget (about 10 % of the compute between reports), each of
    # the 2 ranks on every 2nd of the held-out shards that cover it
    world, budget = cfg.train.num_workers, eval_window_budget(cfg.train, cfg.train.num_workers)
    sums = sum(evaluate_sums(load_student(student_dir), heldout_shards(cache, rank=r, world_size=world,
                                                                       max_windows=budget),
                             max_windows=-(-budget // world), batch_size=cfg.train.micro_batch_size)
               for r in range(world))
    assert finalize(sums)["heldout_loss"] == pytest.approx(metrics["heldout_loss"], rel=1e-4)  # the saved weights
    assert finalize(sums)["tokens"] <= budget * cfg.corpus.seq_len < cache.totals["heldout_tokens"]
    shards = [cache.read(e) for e in cache.shards("heldout")]
    trained_m = evaluate(load_student(student_dir), shards)
    init_m = evaluate(load_student(Path(cfg.run_dir, "train", "init")), shards)
    assert trained_m["heldout_loss"] < init_m["heldout_loss"]

    history = MlflowClient(cfg.tracking_uri).get_metric_history(out["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, cfg.train.steps + 1))
    assert stage.done(cfg, "train", stage.key(cfg, "train"))
    assert train.run(cfg)["student_dir"] == out["student_dir"]  # done: skipped, no new Train run


def test_same_run_name_continues_from_the_checkpoint(trained, capfd):
    """A second run under the same name and storage resumes at the last checkpoint (step 6) and goes on."""
    from mlflow.tracking import MlflowClient

    from raydistill.workflows import stage, train

    cfg, out = trained
    result = train.train_driver(cfg, run_name=f"train-{stage.key(cfg, 'train')[:12]}",
                                storage_path=str(Path(cfg.run_dir, "train", "ray").resolve()), steps=8,
                                output_dir=str(Path(cfg.run_dir, "resumed")), mlflow_run_id=out["mlflow_run_id"])
    assert result["steps"] == 8
    logs = capfd.readouterr()
    text = logs.out + logs.err
    assert "resuming at step 6" in text and "step 7/8" in text and "step 1/8" not in text
    client = MlflowClient(cfg.tracking_uri)
    history = client.get_metric_history(out["mlflow_run_id"], "loss")
    assert sorted(m.step for m in history) == list(range(1, 9))  # each step once, numbering continued
    assert len(client.get_metric_history(out["mlflow_run_id"], "init_heldout_loss")) == 1  # no fresh start
    assert (Path(cfg.run_dir, "resumed", "student", "model.safetensors")).exists()


def test_a_cache_built_for_another_config_is_refused(tiny_cached, tmp_path):
    from raydistill.tasks.cache.manifest import CacheMissingError
    from raydistill.workflows import train

    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"cache.dir={tiny_cached.cache_dir}",
                               "cache.num_samples=8"])
    # no cache of this config in the dir: the error names the cache that is there and the field that differs
    with pytest.raises(CacheMissingError, match=r"differs in cache.num_samples \(cache: 16, config: 8\)"):
        train.train_driver(cfg, run_name="mismatch", storage_path=str(tmp_path / "ray"))
    assert not (tmp_path / "ray").exists()  # refused before any Train run


def _side_cfg(tiny_cached, tmp_path, *overrides):
    """The tiny preset in its own run dir, reading the module's shared cache."""
    return load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"cache.dir={tiny_cached.cache_dir}", *overrides])


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [["train.zero_stage=1"], ["train.zero_stage=3"],
                                       ["train.zero_stage=3", "train.offload=true", "student.peft.method=lora"]],
                         ids=["zero1", "zero3", "zero3-offload-lora"])
def test_other_zero_stages_and_lora_train_and_export(overrides, tiny_cached, tmp_path):
    from safetensors.torch import load_file

    from raydistill.tasks.students import load_student, peft_method
    from raydistill.workflows import train

    cfg = _side_cfg(tiny_cached, tmp_path, "train.steps=4", "train.eval_every=2", "train.checkpoint_every=2",
                    *overrides)
    out = train.train_driver(cfg, run_name="side", storage_path=str(tmp_path / "ray"))
    m = out["metrics"]
    assert m["step"] == 4 and m["heldout_loss"] < m["init"]["heldout_loss"]
    student = load_student(out["student_dir"])
    assert peft_method(student) == "none"  # LoRA is merged into the exported weights
    init = load_file(str(Path(cfg.run_dir, "train", "init", "model.safetensors")))
    trained = load_file(str(Path(out["student_dir"], "model.safetensors")))
    assert not torch.equal(init["model.layers.0.self_attn.q_proj.weight"],
                           trained["model.layers.0.self_attn.q_proj.weight"])
    if cfg.student.peft.method == "lora":  # only adapter-covered weights moved
        assert torch.equal(init["model.layers.0.mlp.up_proj.weight"], trained["model.layers.0.mlp.up_proj.weight"])


@pytest.mark.slow
def test_worker_killed_mid_run_restarts_from_the_last_checkpoint(tiny_cached, tmp_path, capfd):
    """SIGKILL one Ray Train worker after the step-4 checkpoint: the run restarts there and finishes."""
    import signal
    import threading
    import time

    import psutil
    from mlflow.tracking import MlflowClient

    from raydistill.workflows import tracking, train

    cfg = _side_cfg(tiny_cached, tmp_path, "train.steps=24", "train.eval_every=2", "train.checkpoint_every=2",
                    "train.max_failures=1")
    tracking.setup(cfg)
    with tracking.start_run(cfg, "killed") as run:
        run_id = run.info.run_id
    results, errors = [], []

    def go():
        try:
            results.append(train.train_driver(cfg, run_name="killed", storage_path=str(tmp_path / "ray"),
                                              mlflow_run_id=run_id))
        except Exception as e:  # surfaced by the asserts below
            errors.append(e)

    thread = threading.Thread(target=go)
    thread.start()
    deadline, victim = time.time() + 300, None
    while victim is None and time.time() < deadline and thread.is_alive():
        steps = [json.loads(p.read_text())["step"] for p in (tmp_path / "ray").rglob("state.json")]
        if steps and max(steps) >= 4:
            me = os.getpid()
            workers = [p for p in psutil.process_iter(["cmdline"])
                       if "RayTrainWorker" in " ".join(p.info["cmdline"] or [])
                       and me in {a.pid for a in p.parents()}]
            victim = workers[0] if workers else None
        time.sleep(0.1)
    assert victim is not None, "no checkpoint at step 4 or no Ray Train worker process found"
    os.kill(victim.pid, signal.SIGKILL)
    thread.join(timeout=600)
    assert not errors, errors
    assert results and results[0]["steps"] == 24
    text = "".join(capfd.readouterr())
    assert "resuming at step" in text
    history = MlflowClient(cfg.tracking_uri).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == list(range(1, 25))


@pytest.mark.slow
def test_online_teacher_with_hidden_mse_checkpoints_resumes_and_exports_only_the_student(tiny_cached, tmp_path,
                                                                                          capfd):
    """2 workers run the teacher themselves (dense targets) with hidden-state MSE on the default map (student
    layer 0 ↔ teacher layer 0); the projection is a parameter of the module DeepSpeed owns, so it rides in the
    checkpoint's weights and its AdamW moments in the ranks' optimizer partitions; a continuation resumes them;
    the exported student has exactly the init's tensors."""
    from safetensors.torch import load_file

    from raydistill.workflows import train

    cfg = _side_cfg(tiny_cached, tmp_path, "train.steps=4", "train.eval_every=2", "train.checkpoint_every=2",
                    "train.teacher_mode=online", "train.hidden_loss=mse", "train.hidden_weight=0.5")
    out = train.train_driver(cfg, run_name="online", storage_path=str(tmp_path / "ray"))
    m = out["metrics"]
    assert m["step"] == 4 and m["hidden"] > 0 and m["heldout_loss"] < m["init"]["heldout_loss"]
    checkpoint = Path(out["checkpoint"])
    assert not (checkpoint / "heads.safetensors").exists()  # no side file: DeepSpeed's checkpoint has the heads
    weights = load_file(str(checkpoint / "model.safetensors"))
    assert [k for k in weights if k.startswith("projections.")] == ["projections.0.weight"]
    head = weights["projections.0.weight"]
    assert head.shape == (64, 64) and not torch.equal(head, torch.eye(64))  # trained
    n_student = sum(v.numel() for k, v in weights.items() if k.startswith("student."))
    for rank in (0, 1):  # each rank's AdamW partition covers the head's share too (ZeRO-2, 2 workers)
        optim = load_file(str(checkpoint / f"optim_rank{rank}.safetensors"))
        assert {k.split(".", 1)[1] for k in optim} == {"step", "exp_avg", "exp_avg_sq"}
    moments = sum(load_file(str(checkpoint / f"optim_rank{r}.safetensors"))["0.exp_avg"].numel() for r in (0, 1))
    assert moments >= n_student + head.numel()
    text = "".join(capfd.readouterr())
    assert "teacher online" in text and "hidden mse" in text

    again = train.train_driver(cfg, run_name="online", storage_path=str(tmp_path / "ray"), steps=5,
                               output_dir=str(tmp_path / "continued"))
    assert again["steps"] == 5 and "resuming at step 4" in "".join(capfd.readouterr())
    exported = load_file(str(Path(again["student_dir"], "model.safetensors")))
    init = load_file(str(Path(cfg.run_dir, "train", "init", "model.safetensors")))
    assert exported.keys() == init.keys()  # the projection is training-only
