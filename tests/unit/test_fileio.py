"""Atomic writes: the target is the old content or the new one, never half of one, and no temporaries linger."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from raydistill.tasks.fileio import atomic_write_json, atomic_write_text, replace_dir


def test_a_json_write_lands_whole_with_no_temporary_left(tmp_path):
    path = tmp_path / "deep" / "stages" / "train.json"  # missing parents are created
    assert atomic_write_json(path, {"key": "k", "n": [1, 2]}) == path
    assert json.loads(path.read_text()) == {"key": "k", "n": [1, 2]}
    atomic_write_json(path, {"key": "k2"})
    assert json.loads(path.read_text()) == {"key": "k2"}
    assert sorted(p.name for p in path.parent.iterdir()) == ["train.json"]


def test_a_failure_before_the_rename_keeps_the_old_file_and_removes_the_temporary(tmp_path, monkeypatch):
    path = tmp_path / "report.json"
    path.write_text("old")

    def disk_full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match="No space"):
        atomic_write_text(path, "new " * 1000)
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_unserialisable_data_raises_before_anything_is_written(tmp_path):
    path = tmp_path / "version.json"
    path.write_text('{"version": 1}')
    with pytest.raises(TypeError):
        atomic_write_json(path, {"version": object()})
    assert path.read_text() == '{"version": 1}'
    assert [p.name for p in tmp_path.iterdir()] == ["version.json"]


def test_a_process_killed_mid_write_leaves_the_old_file_intact(tmp_path):
    """SIGKILL-like death (``os._exit``) after the new bytes are written, before the rename."""
    path = tmp_path / "stage.json"
    path.write_text('{"key": "old"}')
    code = ("import os, sys\n"
            "from raydistill.tasks import fileio\n"
            "os.fsync = lambda fd: os._exit(9)\n"
            "fileio.atomic_write_json(sys.argv[1], {'key': 'new'})\n")
    out = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 9, out.stderr
    assert json.loads(path.read_text()) == {"key": "old"}


def test_replace_dir_swaps_in_the_whole_new_directory(tmp_path):
    target = tmp_path / "quantize" / "int8"
    with replace_dir(target) as staging:
        assert staging.is_dir() and staging.parent == target.parent and staging.name.startswith(".")
        (staging / "a.txt").write_text("1")
        (staging / "b.txt").write_text("1")
    with replace_dir(target) as staging:
        (staging / "a.txt").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["a.txt"]  # nothing of the old directory survives
    assert (target / "a.txt").read_text() == "2"
    assert [p.name for p in target.parent.iterdir()] == ["int8"]


def test_replace_dir_leaves_the_target_untouched_when_building_fails(tmp_path):
    target = tmp_path / "student"
    target.mkdir()
    (target / "model.safetensors").write_text("old")
    with pytest.raises(RuntimeError, match="export failed"):
        with replace_dir(target) as staging:
            (staging / "model.safetensors").write_text("half")
            raise RuntimeError("export failed")
    assert (target / "model.safetensors").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["student"]


def test_replace_dir_keep_existing_keeps_the_first_complete_copy(tmp_path):
    target = tmp_path / "tokenizer"
    with replace_dir(target, keep_existing=True) as staging:
        (staging / "tokenizer_config.json").write_text("first")
    with replace_dir(target, keep_existing=True) as staging:
        (staging / "tokenizer_config.json").write_text("second")
    assert (target / "tokenizer_config.json").read_text() == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["tokenizer"]
