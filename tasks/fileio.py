"""Atomic writes of local files and directories: a reader sees the old content or the new, never half of one.

Everything is written to a hidden temporary beside the target (same filesystem, so the move is a rename) and
moved into place with ``os.replace``, which is atomic on POSIX. A failure before the move leaves the target
as it was and removes the temporary; only a hard crash (SIGKILL, power) can leave a ``.<name>.<hex>.tmp``
behind, never a damaged target.

    atomic_write_json(run_dir / "stages" / "train.json", record)
    with replace_dir(out / "student") as staging:   # build the whole directory, then swap it in
        model.save_pretrained(staging)

Object stores (the cache's ``s3://…``) are ``tasks.cache.store``'s concern: a PUT is atomic there already.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Iterator


def _temporary(target: Path) -> Path:
    """A fresh hidden name beside ``target`` (random, so concurrent writers never share one)."""
    return target.with_name(f".{target.name}.{uuid.uuid4().hex[:12]}.tmp")


@contextlib.contextmanager
def atomic_writer(path: str | os.PathLike, binary: bool = False) -> Iterator:
    """A file (text in UTF-8, or ``binary``) to write ``path`` through, streamed: it becomes ``path`` on a clean
    exit, atomically (parent directories created); on an exception ``path`` is untouched."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        with open(tmp, "xb") if binary else open(tmp, "x", encoding="utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())  # the bytes are on disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically, creating missing parent directories; returns the path."""
    with atomic_writer(path) as f:
        f.write(text)
    return Path(path)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically, creating missing parent directories; returns the path."""
    with atomic_writer(path, binary=True) as f:
        f.write(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, data, *, indent: int | None = 2, default=None) -> Path:
    """``json.dumps(data)`` to ``path`` atomically; an unserialisable ``data`` raises before anything is written."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=default))


@contextlib.contextmanager
def atomic_file(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary name beside ``path`` for a writer that takes a file name (GGUF's); on a clean exit the
    file is synced and renamed to ``path``, on an exception removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def replace_dir(target: str | os.PathLike, *, keep_existing: bool = False) -> Iterator[Path]:
    """Yield an empty staging directory beside ``target``; on a clean exit it becomes ``target``.

    The old ``target``, if any, is moved aside before the swap and removed after it, so ``target`` is always a
    complete directory (old or new; absent only for the instant between the two renames). On an exception the
    staging directory is removed and ``target`` is untouched.

    Args:
        target: the directory to (re)place; its parent is created if missing.
        keep_existing: when ``target`` already exists (another process finished the same content first), keep
            it and discard the staging directory instead of replacing it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = _temporary(target)
    staging.mkdir()
    try:
        yield staging
        if keep_existing:
            _move_unless_present(staging, target)
        else:
            _swap(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # gone already after a successful move


def _move_unless_present(staging: Path, target: Path) -> None:
    try:
        os.replace(staging, target)  # fails on a non-empty target: someone else's complete copy
    except OSError:
        if not target.exists():
            raise


def _swap(staging: Path, target: Path) -> None:
    old = _temporary(target) if target.exists() else None
    if old is not None:
        os.replace(target, old)
    try:
        os.replace(staging, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)  # put the old directory back
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
