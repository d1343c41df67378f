"""What raydistill refuses to leak or to load: :func:`redact` (secrets) and :func:`refuse_pickle` (model files).

    python -m pytest tests/unit/test_guard.py

MLflow params and the ``config.yaml`` artifact, stage records and log lines go through :func:`redact` before
they are written. It replaces, in any string (nested in dicts, lists and tuples):

- the password of a URL's user info: ``s3://key:secret@host/…`` → ``s3://key:***@host/…`` (also
  ``postgresql://user:pass@…``, ``https://token@host`` → ``https://***@host``);
- the value of a secret-looking query parameter (``?token=…``, ``&X-Amz-Signature=…``, ``password=…``);
- every occurrence of the value of a secret environment variable (a name ending in TOKEN, SECRET, PASSWORD,
  PASSWD, CREDENTIAL(S), API_KEY(S), ACCESS_KEY, SECRET_KEY or SIGNATURE), and of each comma-separated part
  of one (values shorter than :data:`MIN_SECRET_LEN` are left alone: redacting "1" everywhere would wreck
  every number);

and the whole value of a dict entry whose key looks secret (``password``, ``*_token``, ``secret_key``…).
Pure: it reads ``os.environ`` only when ``env`` is not given, and returns a new object.

Every model load (teacher, student, registered version, ``train.init_from``'s weights, a resumed training
checkpoint) calls :func:`refuse_pickle` on the directory first and loads safetensors only: a pickle file
(``*.bin``, ``*.pt``, ``*.pth``, ``*.pkl``, ``*.pickle``, ``*.ckpt``) can run arbitrary code when unpickled, so
its mere presence is an error, not something to skip silently.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Mapping

from raydistill.tasks.errors import DataError

MASK = "***"
MIN_SECRET_LEN = 6
# a name *ending* in one of these words: ``RAY_AUTH_TOKEN``, ``AWS_SECRET_ACCESS_KEY``, ``password``, ``hf_token``
# (``tokens``, ``max_tokens``, ``tokenizer``, ``AWS_ACCESS_KEY_ID`` are not secrets)
SECRET_NAME = re.compile(r"(^|[^a-z])(token|secret|password|passwd|credentials?|api_?keys?|access_?key|secret_?key|"
                         r"signature)$", re.IGNORECASE)
# scheme://user:password@  or  scheme://token@  (user info ends at the first @ before the host)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)(?::(?P<pw>[^/@\s]*))?@")
_QUERY = re.compile(r"(?P<key>[?&;][^=&\s]*(?:token|secret|password|passwd|signature|credential|api_?key|"
                    r"access_?key|auth)[^=&\s]*=)(?P<value>[^&\s#]+)", re.IGNORECASE)


def secret_env_values(env: Mapping[str, str] | None = None) -> list[str]:
    """Values of secret-named environment variables and each of their comma-separated parts (a list of keys,
    ``RAYDISTILL_API_KEYS``), longest first (so one never hides part of another)."""
    env = os.environ if env is None else env
    values = {part.strip() for k, v in env.items() if SECRET_NAME.search(k) and v
              for part in [v, *v.split(",")] if len(part.strip()) >= MIN_SECRET_LEN}
    return sorted(values, key=len, reverse=True)


def _userinfo(m: re.Match) -> str:
    if m.group("pw") is not None:
        return f"{m.group('scheme')}{m.group('user')}:{MASK}@"
    return f"{m.group('scheme')}{MASK}@" if m.group("user") else m.group(0)


def redact_text(text: str, secrets: list[str]) -> str:
    """``text`` with URL passwords, secret query values and the given secret values masked."""
    for value in secrets:
        text = text.replace(value, MASK)
    text = _USERINFO.sub(_userinfo, text)
    return _QUERY.sub(lambda m: m.group("key") + MASK, text)


def redact(obj: Any, env: Mapping[str, str] | None = None) -> Any:
    """A copy of ``obj`` (str / dict / list / tuple / scalar) with every secret masked (see module doc)."""
    return _redact(obj, secret_env_values(env))


def _redact(obj: Any, secrets: list[str]) -> Any:
    if isinstance(obj, str):
        return redact_text(obj, secrets)
    if isinstance(obj, Mapping):
        # only a string value can be a secret: ``decode_ms_per_token: 45.3`` is a number, not a token
        return {k: (MASK if isinstance(k, str) and SECRET_NAME.search(k) and isinstance(v, str) and v
                    else _redact(v, secrets)) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_redact(v, secrets) for v in obj)
    return obj


PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class PickleRefusedError(DataError):
    """A model directory holds a pickle-format file; raydistill loads safetensors only."""


def refuse_pickle(model_dir: str | os.PathLike) -> Path:
    """``model_dir`` if it holds no pickle-format file (recursively), else :class:`PickleRefusedError`."""
    root = Path(model_dir)
    if root.is_dir():
        found = sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.suffix.lower() in PICKLE_SUFFIXES)
        if found:
            raise PickleRefusedError(
                f"{root} holds pickle-format files ({', '.join(found[:5])}): raydistill loads safetensors only, "
                "because unpickling can run arbitrary code. Convert the weights to model.safetensors "
                "(`model.save_pretrained(dir, safe_serialization=True)`) and delete the pickle files")
    return root
