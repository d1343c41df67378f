"""workflows.tracking: registry URIs built and read in one place, and the per-step metric sink."""

from __future__ import annotations

import pytest

from raydistill.workflows import tracking
from raydistill.workflows.tracking import ModelRef, model_uri, parse_model_uri


@pytest.mark.parametrize("name,kwargs,uri,ref", [
    ("tiny-student", {"alias": "champion"}, "models:/tiny-student@champion", ModelRef("tiny-student", "champion", None)),
    ("tiny-student", {"version": 3}, "models:/tiny-student/3", ModelRef("tiny-student", None, 3)),
    ("tiny-student", {"version": "12"}, "models:/tiny-student/12", ModelRef("tiny-student", None, 12)),
    ("team/student", {"version": 1}, "models:/team/student/1", ModelRef("team/student", None, 1)),
])
def test_a_built_uri_parses_back_to_what_built_it(name, kwargs, uri, ref):
    assert model_uri(name, **kwargs) == uri
    assert parse_model_uri(uri) == ref
    back = parse_model_uri(uri)
    assert model_uri(back.name, version=back.version, alias=back.alias) == uri


@pytest.mark.parametrize("uri", ["runs:/abc/student", "models:/", "models:/name", "models:/name@", "models:/@champion",
                                 "models:/name/latest", "models:/name/0", "models:/name/-1", "models:/a@b/1", None])
def test_a_bad_uri_is_refused_with_the_forms_that_work(uri):
    with pytest.raises(ValueError, match=r"models:/name@alias or models:/name/"):
        parse_model_uri(uri)


@pytest.mark.parametrize("name,kwargs,match", [
    ("m", {}, "exactly one of version="),
    ("m", {"version": 1, "alias": "champion"}, "exactly one of version="),
    ("m", {"version": 0}, "positive integer"),
    ("m", {"version": "latest"}, "positive integer"),
    ("m", {"alias": ""}, "bad alias"),
    ("m", {"alias": "a/b"}, "bad alias"),
    ("", {"alias": "champion"}, "registry.model_name"),
    ("a@b", {"version": 1}, "registry.model_name"),
])
def test_model_uri_says_what_is_wrong(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        model_uri(name, **kwargs)


def test_the_metric_sink_logs_each_step_once_across_a_restart(tmp_path):
    from raydistill.tasks.config import load_config

    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}"])
    with tracking.start_run(cfg, "sink") as run:
        run_id = run.info.run_id
    sink = tracking.MetricSink(cfg.tracking_uri, run_id)
    sink.log({"init_heldout_loss": 5.0}, step=0)
    for step in (1, 2, 3):
        sink.log({"loss": 4.0 - step, "note": "not a number"}, step)
    restarted = tracking.MetricSink(cfg.tracking_uri, run_id)  # a worker restarted from the step-2 checkpoint
    for step in (3, 4):
        restarted.log({"loss": 0.5}, step)
    history = tracking.client(cfg).get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [1, 2, 3, 4]
    assert [m.value for m in sorted(history, key=lambda m: m.step)] == [3.0, 2.0, 1.0, 0.5]
    tracking.MetricSink(None, None).log({"loss": 1.0}, 5)  # other ranks: nothing, no error


def test_lineage_takes_the_model_uri_as_its_one_bare_word():
    from raydistill.workflows.cli import _split_words, build_parser
    from raydistill.workflows.verbs import VERBS

    parser, verb = build_parser(), VERBS["lineage"]
    action, overrides = _split_words(parser, "lineage", verb, ["models:/tiny-student/3", "run_dir=x"])
    assert action is None and overrides == ["registry.lineage_uri=models:/tiny-student/3", "run_dir=x"]
    with pytest.raises(SystemExit):
        _split_words(parser, "lineage", verb, ["models:/a/1", "models:/b/2"])
