"""Stages: a key covers every config field its stage reads (checked against the code), a finished stage is
skipped for the same key, and a missing earlier stage is a typed error that says what to run first."""

import ast
import dataclasses
from pathlib import Path

import pytest

from raydistill.tasks.config import PipelineConfig, load_config
from raydistill.tasks.errors import StageMissingError
from raydistill.workflows import stage
from raydistill.workflows.verbs import LOCATIONS, STAGES, VERBS

ROOT = Path(__file__).resolve().parents[2]
# PipelineConfig properties and methods: the fields they read
DERIVED = {"cache_dir": ("cache.dir", "run_dir"), "tracking_uri": ("registry.tracking_uri", "run_dir"),
           "stage_dir": ("run_dir",), "retempers_sampled_cache": ("cache", "train.teacher_mode")}


def _source(verb: str) -> Path:
    return ROOT / "workflows" / (VERBS[verb].module.rsplit(".", 1)[1] + ".py")


def config_reads(source: str) -> set[str]:
    """Every ``cfg.<section>.<field>…`` chain in ``source``, cut where it leaves the config's fields."""
    tree = ast.parse(source)
    inner = {id(n.value) for n in ast.walk(tree) if isinstance(n, ast.Attribute)}
    reads = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.Attribute) or id(node) in inner:
            continue  # only the outermost attribute of a chain
        chain, base = [], node
        while isinstance(base, ast.Attribute):
            chain.insert(0, base.attr)
            base = base.value
        if not (isinstance(base, ast.Name) and base.id == "cfg"):
            continue
        if chain[0] in DERIVED:
            reads.update(DERIVED[chain[0]])
            continue
        path, value = [], PipelineConfig()
        for name in chain:
            if not (dataclasses.is_dataclass(value) and name in {f.name for f in dataclasses.fields(value)}):
                break
            path.append(name)
            value = getattr(value, name)
        assert path, f"cfg.{'.'.join(chain)} is neither a config field nor in DERIVED (add it there)"
        reads.add(".".join(path))
    return reads


def _declared(verb: str) -> set[str]:
    """What a verb may read: its reads and uses, the locations, and what the stages it needs read (their keys
    enter its key, so a change there reruns it too)."""
    v = VERBS[verb]
    out = {*v.reads, *v.uses, *LOCATIONS}
    for need in v.needs:
        out |= _declared(need) - set(VERBS[need].uses)
    return out


def _covered(path: str, declared: set[str]) -> bool:
    return any(path == d or path.startswith(d + ".") for d in declared)


@pytest.mark.parametrize("verb", sorted(VERBS))
def test_every_config_field_a_verb_reads_is_declared_in_the_verb_table(verb):
    reads = config_reads(_source(verb).read_text())
    missing = sorted(r for r in reads if not _covered(r, _declared(verb)))
    assert missing == [], (f"workflows/verbs.py: '{verb}' reads {missing} but declares neither them nor a section "
                           "holding them in reads (keyed) or uses (not keyed)")


def test_the_scan_sees_a_single_field_read():
    """Quantize times decoding on ``serve.prompt``: without it in ``reads`` its key would miss the prompt."""
    src = "def f(cfg):\n    q = cfg.quantize\n    return cfg.serve.prompt.split(), cfg.cache_dir, q.method\n"
    reads = config_reads(src)
    assert reads == {"quantize", "serve.prompt", "cache.dir", "run_dir"}
    assert not _covered("serve.prompt", {"quantize", *LOCATIONS})


def test_every_declared_path_is_a_config_field():
    for verb in VERBS.values():
        for path in (*verb.reads, *verb.uses, *LOCATIONS):
            node = PipelineConfig()
            for part in path.split("."):
                assert part in {f.name for f in dataclasses.fields(node)}, path
                node = getattr(node, part)
        assert set(verb.needs) <= set(STAGES)


def test_quantize_key_covers_the_prompt_and_nothing_unrelated(tmp_path):
    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    base = stage.key(cfg, "quantize")
    assert stage.key(load_config("tiny", [f"run_dir={tmp_path}", "serve.prompt=HAMLET."]), "quantize") != base
    assert stage.key(load_config("tiny", [f"run_dir={tmp_path}", "quantize.bench_tokens=3"]), "quantize") != base
    assert stage.key(load_config("tiny", [f"run_dir={tmp_path}", "serve.port=9"]), "quantize") == base


def test_key_includes_the_keys_of_the_stages_it_needs(tmp_path):
    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    before = stage.key(cfg, "quantize")
    stage.record(cfg, "train", "train-key-1", {})
    after = stage.key(cfg, "quantize")
    stage.record(cfg, "train", "train-key-2", {})
    assert len({before, after, stage.key(cfg, "quantize")}) == 3


def test_start_requires_the_previous_stage_then_skips_when_done(tmp_path):
    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    with pytest.raises(StageMissingError, match=r"quantize needs a finished 'train' stage.*`raydistill train`"):
        stage.start(cfg, "quantize")
    stage.record(cfg, "train", "k", {"student_dir": "x"})
    started = stage.start(cfg, "quantize")
    assert started.done is None and started.needs["train"]["key"] == "k"
    out = tmp_path / "int8"
    out.mkdir()
    stage.record(cfg, "quantize", started.key, {"int8_dir": str(out)}, paths=[out])
    assert stage.start(cfg, "quantize").done["outputs"] == {"int8_dir": str(out)}
    assert stage.start(cfg, "quantize", skip=False).done is None  # `quantize rerun`
    out.rmdir()  # an output that vanished: not done any more
    assert stage.start(cfg, "quantize").done is None


def test_verb_modules_define_run_with_an_action_exactly_when_the_table_gives_actions():
    for name, verb in VERBS.items():
        tree = ast.parse(_source(name).read_text())
        (run,) = [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "run"]
        assert [a.arg for a in run.args.args] == ["cfg", "action"], name
        assert not [n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in ("add_arguments",
                                                                                           "stage_key")], name


def _shard_entry(name: str, key: str) -> dict:
    return {"name": name, "split": "train", "key": key, "file": f"shards/{name}-{key[:16]}.st", "sha256": "0" * 64,
            "bytes": 10, "tokens": 64, "windows": 1, "vocab_size": 97, "teacher_nll_sum": 1.0,
            "teacher_top1_correct": 1}


def test_train_and_tune_keys_follow_the_cache_content_even_when_the_cache_record_is_stale(tmp_path):
    """The bug of issue 13: new corpus files changed the cache, yet train was skipped and the old student was
    registered again. The key reads the cache's manifest itself (a cache dir grown by another run, a record
    that was not rewritten), and a retrained student changes everything downstream."""
    from raydistill.tasks.cache.manifest import add_entry, cache_key, expected_heads, write_manifest

    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    manifest = expected_heads(cfg.teacher, cfg.cache, cfg.corpus)[0]  # the head the cache stage writes
    add_entry(manifest, _shard_entry("train-a-00000", "a" * 64))
    write_manifest(cfg.cache_dir, manifest)
    stage.record(cfg, "cache", cache_key(manifest), {})
    train_before, tune_before = stage.key(cfg, "train"), stage.key(cfg, "tune")
    assert stage.key(cfg, "train") == train_before  # stable while nothing changes

    add_entry(manifest, _shard_entry("train-new-file-00000", "b" * 64))  # a new corpus file's shard
    write_manifest(cfg.cache_dir, manifest)  # the cache record still holds the old key
    assert stage.key(cfg, "train") != train_before
    assert stage.key(cfg, "tune") != tune_before


def test_downstream_keys_follow_the_files_the_previous_stage_wrote(tmp_path):
    cfg = load_config("tiny", [f"run_dir={tmp_path}"])
    student = tmp_path / "train" / "student"
    student.mkdir(parents=True)
    (student / "model.safetensors").write_bytes(b"weights one")
    stage.record(cfg, "train", "same-key", {"student_dir": str(student)}, paths=[student])
    first = stage.key(cfg, "quantize")
    (student / "model.safetensors").write_bytes(b"weights two")
    stage.record(cfg, "train", "same-key", {"student_dir": str(student)}, paths=[student])
    assert stage.read(cfg, "train")["digest"] and stage.key(cfg, "quantize") != first


def test_a_local_init_from_directory_is_keyed_by_its_weights(tmp_path):
    init = tmp_path / "prev"
    init.mkdir()
    (init / "model.safetensors").write_bytes(b"generation one")
    cfg = load_config("tiny", [f"run_dir={tmp_path}", f"train.init_from={init}"])
    first = stage.key(cfg, "train")
    (init / "model.safetensors").write_bytes(b"generation two")
    assert stage.key(cfg, "train") != first
    assert stage.key(load_config("tiny", [f"run_dir={tmp_path}"]), "train") != first
