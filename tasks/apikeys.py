"""API keys of the OpenAI-compatible server: where they come from, and how a request's key is checked (pure).

    keys = read_api_keys(os.environ, cfg.serve.api_keys_file)   # () when neither is set: no auth
    digests = key_digests(keys)                                 # what travels to the replicas
    authorized(request.headers.get("authorization"), digests)   # "Bearer <key>" → True / False

Keys come from the environment variable ``RAYDISTILL_API_KEYS`` (comma-separated) and from the file named by
``serve.api_keys_file`` (one key per line; blank lines and ``#`` comments skipped), both read by the process
that builds the Serve app; never from the config itself, so no config dump, MLflow param or stage record can
hold one. Replicas get only SHA-256 digests: a replica's constructor arguments are stored by Serve's
controller, and a digest of a long random key gives nothing away. A request's key is hashed and compared with
every digest by ``hmac.compare_digest`` (fixed-length digests, no early exit), so timing does not reveal how
much of a key was right. Keys shorter than :data:`MIN_KEY_LEN` are refused: a digest of a short key can be
brute-forced.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from typing import Mapping

from raydistill.tasks.config import ConfigError

ENV = "RAYDISTILL_API_KEYS"
MIN_KEY_LEN = 16
MAKE_ONE = "python -c 'import secrets; print(secrets.token_urlsafe(32))'"


def read_api_keys(environ: Mapping[str, str], path: str | None) -> tuple[str, ...]:
    """The keys in ``environ[ENV]`` and in the file ``path`` (see the module doc), in order, without repeats."""
    found = [(f"{ENV} (entry {i + 1})", k.strip()) for i, k in enumerate(environ.get(ENV, "").split(","))
             if k.strip()]
    if path:
        try:
            lines = open(os.path.expanduser(path), encoding="utf-8").read().splitlines()
        except OSError as e:
            raise ConfigError(f"serve.api_keys_file={path!r} cannot be read ({type(e).__name__}: {e.strerror}); "
                              "point it at a file with one API key per line, or unset it") from None
        found += [(f"serve.api_keys_file line {n}", line.strip()) for n, line in enumerate(lines, 1)
                  if line.strip() and not line.strip().startswith("#")]
    for where, key in found:
        if len(key) < MIN_KEY_LEN or any(c.isspace() for c in key):
            raise ConfigError(f"the API key in {where} is {len(key)} characters long or holds white space; use "
                              f"keys of at least {MIN_KEY_LEN} characters without spaces, e.g. from `{MAKE_ONE}`")
    return tuple(dict.fromkeys(key for _, key in found))


def digest(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def key_digests(keys) -> tuple[str, ...]:
    """SHA-256 hex digests of ``keys`` (what the replicas compare against)."""
    return tuple(digest(k) for k in keys)


def bearer_key(header: str | None) -> str | None:
    """The key of an ``Authorization: Bearer <key>`` header value, else ``None``."""
    scheme, _, key = (header or "").strip().partition(" ")
    return key.strip() or None if scheme.lower() == "bearer" else None


def authorized(header: str | None, digests) -> bool:
    """Whether the ``Authorization`` header carries one of the keys behind ``digests``, in time that depends on
    neither the key sent nor which stored key it matches."""
    key = bearer_key(header)
    sent = digest(key if key is not None else "")
    match = False
    for d in digests:  # every digest, no early exit
        match |= hmac.compare_digest(sent, d)
    return match and key is not None
