"""Chat data through the real stages on a local Ray cluster with the tiny teacher (the SmolLM2 tokenizer and its
chat template): a chat JSONL cached with its loss mask (targets only for the answers; a rerun is free) and trained
through Ray Train + DeepSpeed ZeRO-2 on the answers only; then ``pipeline.generate=true``'s path, prompts → the
teacher's answers → a masked cache → a trained student."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from raydistill.tasks.cache.shards import config_cache
from raydistill.tasks.config import load_config
from raydistill.tasks.data import heldout_shards
from raydistill.tasks.evaluate import evaluate
from raydistill.tasks.students import load_student
from raydistill.tasks.teacher import load_tokenizer

pytestmark = pytest.mark.integration

QUESTIONS = ["What is two plus two?", "Name a colour.", "Say hello.", "Count to three.", "Is water wet?"]


def _chat_jsonl(path: Path, n: int = 120) -> Path:
    lines = [{"messages": [{"role": "user", "content": f"zqx vorpal {QUESTIONS[i % 5]} {i}"},
                           {"role": "assistant", "content": f"Answer {i % 9}."}]} for i in range(n)]
    path.write_text("".join(json.dumps(x) + "\n" for x in lines))
    return path


def _check_masked_cache(cfg) -> None:
    cache = config_cache(cfg)
    tok = load_tokenizer(cfg.teacher)
    masked, rows = 0, 0
    for entry in cache.shards():
        shard = cache.read(entry)
        assert shard.mask is not None and shard.mask.any(dim=1).all()
        answers = tok.decode(shard.tokens[:, 1:][shard.mask].tolist())
        assert "zqx" not in answers and "<|im_start|>" not in answers and "<|im_end|>" in answers
        assert entry["tokens"] == int(shard.mask.sum())
        masked, rows = masked + int(shard.mask.sum()), rows + shard.mask.numel()
    assert cache.totals["tokens"] == masked < 0.5 * rows  # targets only for the answers
    assert cache.manifest["corpus"]["chat_mask"] == "all"


def test_a_chat_jsonl_caches_with_its_mask_and_trains_on_the_answers_through_ray_train(tmp_path, ray_cluster):
    from raydistill.workflows import cache, train

    path = _chat_jsonl(tmp_path / "chat.jsonl")
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"corpus.path={path}", "corpus.max_tokens=null"])
    first = cache.run(cfg, None)
    assert first["teacher_forwards"] > 0 and first["tokens"] == config_cache(cfg).totals["tokens"]
    _check_masked_cache(cfg)
    again = cache.run(cfg, None)
    assert again["teacher_forwards"] == 0 and again["cache_key"] == first["cache_key"]

    out = train.run(cfg)  # Ray Train, 2 workers, DeepSpeed ZeRO-2 (the tiny preset)
    metrics = json.loads(Path(out["metrics_path"]).read_text())
    assert metrics["step"] == cfg.train.steps
    assert metrics["heldout_loss"] < metrics["init"]["heldout_loss"]
    c = config_cache(cfg)
    shards = list(heldout_shards(c))
    got = evaluate(load_student(Path(out["student_dir"])), shards)
    assert got["tokens"] == sum(int(s.mask.sum()) for s in shards)  # evaluated on the answers only
    assert metrics["eval_tokens"] <= got["tokens"]


def test_pipeline_generate_answers_prompts_caches_them_masked_and_trains(tmp_path, ray_cluster):
    from raydistill.workflows import cache, pipeline, train

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"zqx {q} {i}"}) + "\n" for i, q in enumerate(QUESTIONS * 8)))
    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "pipeline.generate=true", f"generate.prompts={prompts}",
                               "generate.max_tokens=8", "generate.batch_size=8", "generate.cpus_per_actor=1",
                               "generate.num_actors=1", "corpus.max_tokens=null", "train.steps=3"])
    cfg = pipeline._generate(cfg)  # the pipeline's first stage: the corpus is now the teacher's answers
    assert Path(cfg.corpus.path).name == "answers.jsonl"
    assert cache.run(cfg, None)["teacher_forwards"] > 0
    _check_masked_cache(cfg)
    out = train.run(cfg)
    assert torch.isfinite(torch.tensor(json.loads(Path(out["metrics_path"]).read_text())["heldout_loss"]))
