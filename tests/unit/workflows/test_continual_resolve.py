"""train.init_from resolution (workflows.continual): directories, registry URIs, the first run without a champion."""

import pytest

from raydistill.tasks.config import ConfigError, load_config, resolve_paths
from raydistill.workflows import continual


def _cfg(tmp_path, init_from):
    return resolve_paths(load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"train.init_from={init_from}"]))


def test_a_student_directory_is_used_in_place_and_identified_by_its_weights(tmp_path):
    d = tmp_path / "student"
    d.mkdir()
    (d / "model.safetensors").write_bytes(b"w")
    got = continual.resolve(_cfg(tmp_path, d))
    assert got["dir"] == str(d) and len(got["weights_sha256"]) == 64 and "version" not in got
    assert continual.resolve(load_config("tiny", [f"run_dir={tmp_path}"])) is None  # unset: built from the teacher
    with pytest.raises(ConfigError, match=r"train.init_from '.*nowhere': no such directory; use champion"):
        continual.resolve(_cfg(tmp_path, tmp_path / "nowhere"))


def test_champion_before_the_first_promotion_builds_from_the_teacher_but_a_missing_version_is_an_error(tmp_path,
                                                                                                      capsys):
    assert continual.resolve(_cfg(tmp_path, "champion")) is None
    assert "no models:/tiny-student@champion yet; building the student from the teacher" in capsys.readouterr().out
    from raydistill.workflows.tracking import model_uri

    missing = model_uri("tiny-student", version=7)
    with pytest.raises(ConfigError, match=rf"train.init_from '{missing}': .*not found"):
        continual.resolve(_cfg(tmp_path, missing))
