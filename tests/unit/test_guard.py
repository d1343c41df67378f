"""tasks.guard: secrets never leave in what raydistill writes; pickle files are refused; unsafe names too."""

from __future__ import annotations

import pytest

from raydistill.tasks.config import ConfigError, load_config
from raydistill.tasks.guard import MASK, PickleRefusedError, redact, refuse_pickle


@pytest.mark.parametrize("text,clean", [
    ("s3://AKIAFAKE:wJalrFAKESECRET@minio:9000/bucket/cache", "s3://AKIAFAKE:***@minio:9000/bucket/cache"),
    ("postgresql://mlflow:hunter2pass@db:5432/mlflow", "postgresql://mlflow:***@db:5432/mlflow"),
    ("https://ghp_faketoken123@github.com/x.git", "https://***@github.com/x.git"),
    ("http://h/p?a=1&token=abc123&X-Amz-Signature=deadbeef", "http://h/p?a=1&token=***&X-Amz-Signature=***"),
    ("runs/default", "runs/default"),
    ("s3://bucket/cache", "s3://bucket/cache"),
])
def test_urls_lose_their_passwords_and_secret_query_values(text, clean):
    assert redact(text, env={}) == clean


def test_secret_env_values_are_masked_wherever_they_appear_and_nothing_else_is():
    env = {"RAY_AUTH_TOKEN": "fake-ray-token-xyz", "AWS_SECRET_ACCESS_KEY": "fakeAwsSecret99",
           "AWS_ACCESS_KEY_ID": "raydistill", "TOKENIZERS_PARALLELISM": "false-but-long", "MY_PASSWORD": "1"}
    record = {"outputs": {"log": "auth with fake-ray-token-xyz then fakeAwsSecret99", "tokens": 512,
                          "max_tokens": 16, "name": "raydistill", "tokenizer": "false-but-long",
                          "decode_ms_per_token": 45.3},
              "hf_token": "hf_abcdef", "password": "x", "list": ("fake-ray-token-xyz", 3)}
    out = redact(record, env=env)
    assert out["outputs"]["log"] == f"auth with {MASK} then {MASK}"
    assert out["outputs"]["tokens"] == 512 and out["outputs"]["max_tokens"] == 16
    assert out["outputs"]["decode_ms_per_token"] == 45.3  # a number is never a secret
    assert out["outputs"]["name"] == "raydistill" and out["outputs"]["tokenizer"] == "false-but-long"
    assert out["hf_token"] == MASK and out["password"] == MASK and out["list"] == (MASK, 3)
    assert record["hf_token"] == "hf_abcdef"  # a copy: the input is untouched


def test_each_key_of_a_comma_separated_key_list_is_masked_on_its_own():
    env = {"RAYDISTILL_API_KEYS": "first-key-0123456789,second-key-0123456789"}
    assert redact("sent second-key-0123456789; all first-key-0123456789,second-key-0123456789", env=env) == \
        f"sent {MASK}; all {MASK}"


def test_a_model_directory_with_a_pickle_file_is_refused_by_every_loader(tmp_path, tiny_cfg):
    from raydistill.tasks.students import build_student, load_student, save_student
    from raydistill.tasks.teacher import load_teacher, load_tokenizer
    from raydistill.tasks.warmstart import load_init_weights

    teacher, _ = load_teacher(tiny_cfg.teacher)
    student_dir = tmp_path / "student"
    save_student(build_student(tiny_cfg.student, teacher), load_tokenizer(tiny_cfg.teacher), student_dir)
    assert load_student(student_dir) is not None and refuse_pickle(student_dir) == student_dir
    (student_dir / "pytorch_model.bin").write_bytes(b"not really a pickle")
    with pytest.raises(PickleRefusedError, match=r"pytorch_model\.bin.*safetensors only"):
        load_student(student_dir)
    hf = load_config("tiny", [f"teacher.source={student_dir}"]).teacher
    with pytest.raises(PickleRefusedError, match="pytorch_model.bin"):
        load_teacher(hf)
    with pytest.raises(PickleRefusedError, match="pytorch_model.bin"):  # train.init_from: safetensors are there too
        load_init_weights(student_dir)
    (student_dir / "pytorch_model.bin").unlink()
    (student_dir / "sub").mkdir()
    (student_dir / "sub" / "optimizer.pt").write_bytes(b"x")
    with pytest.raises(PickleRefusedError, match="optimizer.pt"):
        refuse_pickle(student_dir)


@pytest.mark.parametrize("key,value", [
    ("registry.model_name", "../etc"), ("registry.model_name", "a'b"), ("registry.model_name", 'a"b'),
    ("registry.model_name", "team/student"), ("registry.model_name", "a\\b"), ("registry.model_name", "m@champion"),
    ("registry.model_name", "x..y"), ("registry.experiment", "exp' OR '1'='1"), ("registry.experiment", "a b"),
])
def test_unsafe_registry_names_are_a_config_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"{key}=.*not a safe name.*e\.g\. {key}="):
        load_config("tiny", [f"{key}={value}"])


def test_filter_strings_refuse_a_name_or_tag_value_that_could_close_the_quotes():
    from raydistill.workflows import tracking

    with pytest.raises(ConfigError, match="registry.model_name"):
        tracking.search_versions(None, "x' or name like '%", {})
    with pytest.raises(ValueError, match="filter string"):
        tracking.search_versions(None, "ok", {"raydistill.stage_key": "k' or '1'='1"})
