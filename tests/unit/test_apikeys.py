"""API keys (tasks/apikeys.py): read from RAYDISTILL_API_KEYS and serve.api_keys_file, short keys refused without
echoing them, and a request authorized only by the Bearer header carrying one of the keys."""

import pytest

from raydistill.tasks.apikeys import ENV, authorized, key_digests, read_api_keys
from raydistill.tasks.config import ConfigError, load_config

A, B, C = "a" * 20 + "-first", "b" * 24, "c" * 32


def test_keys_come_from_the_environment_and_the_file_in_order_without_repeats(tmp_path):
    path = tmp_path / "keys"
    path.write_text(f"# rotated 2026-12\n\n{B}\n  {C}  \n{A}\n")
    assert read_api_keys({ENV: f" {A}, {B} ,,"}, str(path)) == (A, B, C)
    assert read_api_keys({}, None) == ()
    assert read_api_keys({ENV: ""}, None) == ()


def test_a_short_key_is_refused_naming_where_it_is_but_not_the_key(tmp_path):
    with pytest.raises(ConfigError, match=r"RAYDISTILL_API_KEYS \(entry 2\) is 6 characters.*secrets.token_urlsafe") as e:
        read_api_keys({ENV: f"{A},s3cr3t"}, None)
    assert "s3cr3t" not in str(e.value)
    path = tmp_path / "keys"
    path.write_text(f"{A}\nhas space in it {A}\n")
    with pytest.raises(ConfigError, match="serve.api_keys_file line 2"):
        read_api_keys({}, str(path))
    with pytest.raises(ConfigError, match=r"serve.api_keys_file='/nonexistent/keys' cannot be read"):
        read_api_keys({}, "/nonexistent/keys")


@pytest.mark.parametrize("header,ok", [
    (f"Bearer {A}", True), (f"bearer {B}", True), (f"Bearer  {A} ", True),
    (None, False), ("", False), ("Bearer", False), ("Bearer ", False), (A, False), (f"Basic {A}", False),
    (f"Bearer {A[:-1]}", False), (f"Bearer {A}x", False), (f"Bearer {C}", False),
])
def test_only_a_bearer_header_with_a_configured_key_is_authorized(header, ok):
    assert authorized(header, key_digests([A, B])) is ok


def test_no_digests_authorize_nothing():
    assert not authorized(f"Bearer {A}", ())
    assert not authorized(None, ())


def test_the_digests_are_not_the_keys():
    digests = key_digests([A])
    assert len(digests[0]) == 64 and A not in digests[0]


def test_the_config_names_a_key_file_never_a_key():
    cfg = load_config("tiny", ["serve.api_keys_file=/run/secrets/keys"])
    assert cfg.serve.api_keys_file == "/run/secrets/keys" and cfg.serve.require_api_keys is False
    assert not any("key" in name and "file" not in name and "require" not in name
                   for name in vars(cfg.serve))
