"""Bytes on disk for the cache: files under a local directory or an object store, written atomically, retried.

Commit protocol (local): write ``.<name>.tmp-<host>-<pid>-<rand>`` in the target directory, fsync, then
``os.link`` it to the final name — which fails if the name exists, so a committed file is never replaced; a second
writer of the same shard simply adopts the first one's file. Replacing (a cache's small head file) is temp + fsync +
``os.replace``. S3 (``s3://[key:secret@]bucket/prefix?endpoint_override=…&region=…``, through boto3): a PUT is
atomic (an object is visible whole or not at all); :meth:`Store.create` is a *conditional* PUT (``If-None-Match:
*``), so of two writers racing for one name exactly one creates it, on AWS S3 and on S3-compatible servers that
implement it (moto, MinIO). Listing is paged (1,000 names a request) and streamed: a listing never holds the whole
directory. Other ``pyarrow.fs`` URIs (``gs://``, ``hdfs://``) work without the conditional create.

Transient errors (a refused or dropped connection, a timeout, a 5xx or ``SlowDown`` answer) are retried with
exponential backoff for up to ``retry_s`` seconds (default 60, env ``RAYDISTILL_STORE_RETRY_S``); then
:class:`StoreUnavailableError` names the store without its credentials. A missing file, a refused precondition or
access denied is never retried. ``Store.requests`` counts the requests sent, by kind (the benchmarks read it).
"""

from __future__ import annotations

import errno
import os
import socket
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

from raydistill.tasks.cache.container import pack, stored_sizes, unpack  # noqa: F401  (the container's old home)
from raydistill.tasks.errors import DataError

TEMP_MARK = ".tmp-"
STALE_TEMP_S = 3600  # a temp file this old is abandoned even if we cannot tell whether its writer is alive
_LOCAL_TRANSIENT = {errno.EIO, errno.EAGAIN, errno.ETIMEDOUT, errno.ESTALE, errno.EINTR}
_S3_CLIENTS: dict[tuple, object] = {}
_S3_LOCK = threading.Lock()
PROCESS_REQUESTS: Counter = Counter()
"""Requests every Store of this process sent, by kind, and ``shard_bytes_read`` (bytes read under ``shards/``):
what a test or benchmark asserts a rerun did not do."""


class StoreUnavailableError(DataError):
    """The cache's store kept failing with transient errors for the whole retry budget; the message names the store
    (credentials masked) and how to resume."""


@dataclass(frozen=True)
class FileInfo:
    """One listed file: its name in the listed directory, size in bytes and modification time (seconds)."""

    name: str
    size: int
    mtime: float


class Store:
    """Files under a root that is a local directory or an object-store URI (``s3://bucket/prefix``)."""

    def __init__(self, root: str, retry_s: float | None = None):
        self.uri = str(root)
        self.remote = "://" in self.uri and not self.uri.startswith("file://")
        self.retry_s = float(os.environ.get("RAYDISTILL_STORE_RETRY_S", 60)) if retry_s is None else retry_s
        self.requests: Counter = Counter()
        self._s3, self.fs = None, None
        if self.uri.startswith("s3://"):
            self._s3, self.bucket, self.root = _s3_client(self.uri)
        elif self.remote:
            import pyarrow.fs as pafs

            self.fs, self.root = pafs.FileSystem.from_uri(self.uri)
            self.root = self.root.rstrip("/")
        else:
            self.root = self.uri.removeprefix("file://")

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if self.root else rel

    def url(self, rel: str = "") -> str:
        """``rel`` as a location a person can read (local path, or the URI without query or credentials)."""
        if not self.remote:
            return self.path(rel).rstrip("/")
        scheme, rest = self.uri.split("://", 1)
        return f"{scheme}://{rest.split('?', 1)[0].rsplit('@', 1)[-1].rstrip('/')}/{rel}".rstrip("/")

    # ------------------------------------------------------------------------------------------ retries

    def _retry(self, what: str, rel: str, fn: Callable):
        """``fn()``, retried on transient errors with backoff (0.25 s doubling to 8 s) for ``retry_s`` seconds."""
        began, delay = time.monotonic(), 0.25
        while True:
            self.requests[what] += 1
            PROCESS_REQUESTS[what] += 1
            try:
                return fn()
            except Exception as e:  # noqa: BLE001 — classified below; anything not transient propagates
                if not self._transient(e):
                    raise
                waited = time.monotonic() - began
                if waited + delay > self.retry_s:
                    raise StoreUnavailableError(
                        f"store {self.url()} unavailable: {what} {rel!r} failed for {waited:.0f} s "
                        f"({type(e).__name__}: {_first_line(e)}); committed shards are kept: rerun the same "
                        f"command to resume once the store answers") from None
                time.sleep(delay)
                delay = min(delay * 2, 8.0)

    def _transient(self, e: Exception) -> bool:
        if isinstance(e, (FileNotFoundError, FileExistsError, PermissionError, IsADirectoryError)):
            return False
        if self._s3 is not None:
            return _s3_transient(e)
        if self.remote:
            return isinstance(e, (OSError, ConnectionError, TimeoutError))
        return isinstance(e, OSError) and e.errno in _LOCAL_TRANSIENT

    # ------------------------------------------------------------------------------------------ operations

    def exists(self, rel: str) -> bool:
        if self._s3 is not None:
            return self._retry("head", rel, lambda: _s3_exists(self._s3, self.bucket, self.path(rel)))
        if self.fs is not None:
            import pyarrow.fs as pafs

            return self._retry("head", rel, lambda: self.fs.get_file_info(self.path(rel)).type
                               != pafs.FileType.NotFound)
        return os.path.exists(self.path(rel))

    def read(self, rel: str) -> bytes:
        data = self._read(rel)
        if rel.startswith("shards/"):
            PROCESS_REQUESTS["shard_bytes_read"] += len(data)
        return data

    def _read(self, rel: str) -> bytes:
        if self._s3 is not None:
            return self._retry("get", rel, lambda: _s3_get(self._s3, self.bucket, self.path(rel)))
        if self.fs is not None:
            def get():
                with self.fs.open_input_stream(self.path(rel)) as f:
                    return f.read()
            return self._retry("get", rel, get)
        return self._retry("get", rel, lambda: Path(self.path(rel)).read_bytes())

    def replace(self, rel: str, data: bytes) -> None:
        """Atomically write ``rel``, replacing any previous version (a cache's head file)."""
        if self.remote:
            return self._put(rel, data, only_new=False)
        tmp = self._write_temp(rel, data)
        os.replace(tmp, self.path(rel))
        _fsync_dir(os.path.dirname(self.path(rel)))

    def create(self, rel: str, data: bytes) -> bool:
        """Atomically create ``rel`` unless it exists (then leave it alone); True if this call created it."""
        if self.remote:
            return self._put(rel, data, only_new=True)
        tmp = self._retry("put", rel, lambda: self._write_temp(rel, data))
        try:
            os.link(tmp, self.path(rel))  # atomic and never overwrites: the first committed copy wins
            created = True
        except FileExistsError:
            created = False
        finally:
            os.unlink(tmp)
        _fsync_dir(os.path.dirname(self.path(rel)))
        return created

    def create_from_file(self, rel: str, path: str) -> bool:
        """:meth:`create` from a local file without reading it into memory: a hard link on the same local store
        (``path`` must be in its filesystem), a streamed upload to S3."""
        if self._s3 is not None:
            def put():
                with open(path, "rb") as f:
                    return _s3_put(self._s3, self.bucket, self.path(rel), f, True)
            return self._retry("put", rel, put)
        if self.remote:
            with open(path, "rb") as f:
                return self.create(rel, f.read())
        Path(self.path(rel)).parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(path, self.path(rel))
        except FileExistsError:
            return False
        _fsync_dir(os.path.dirname(self.path(rel)))
        return True

    def _put(self, rel: str, data: bytes, only_new: bool) -> bool:
        if self._s3 is not None:
            return self._retry("put", rel, lambda: _s3_put(self._s3, self.bucket, self.path(rel), data, only_new))
        if only_new and self.exists(rel):  # pyarrow.fs has no conditional write: check, then write
            return False

        def put():
            self.fs.create_dir(self.path(rel).rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(self.path(rel)) as f:
                f.write(data)
            return True
        return self._retry("put", rel, put)

    def _write_temp(self, rel: str, data: bytes) -> str:
        final = Path(self.path(rel))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return str(tmp)

    def iter_files(self, rel: str) -> Iterator[FileInfo]:
        """The files directly under ``rel`` (none if it does not exist), streamed: S3 pages of 1,000 names, a local
        directory through ``os.scandir``. Not sorted."""
        if self._s3 is not None:
            yield from _s3_list(self, self.path(rel).rstrip("/") + "/")
            return
        if self.fs is not None:
            import pyarrow.fs as pafs

            infos = self._retry("list", rel, lambda: self.fs.get_file_info(
                pafs.FileSelector(self.path(rel), allow_not_found=True)))
            for i in infos:
                if i.type == pafs.FileType.File:
                    yield FileInfo(i.base_name, i.size, i.mtime.timestamp() if i.mtime else 0.0)
            return
        self.requests["list"] += 1
        PROCESS_REQUESTS["list"] += 1
        try:
            with os.scandir(self.path(rel)) as it:
                for d in it:
                    if d.is_file(follow_symlinks=False):
                        st = d.stat(follow_symlinks=False)
                        yield FileInfo(d.name, st.st_size, st.st_mtime)
        except FileNotFoundError:
            return

    def listdir(self, rel: str) -> list[str]:
        """Sorted names of the files directly under ``rel`` (for small directories: it holds them all)."""
        return sorted(i.name for i in self.iter_files(rel))

    def remove(self, rel: str) -> None:
        if self._s3 is not None:
            return self._retry("delete", rel, lambda: self._s3.delete_object(Bucket=self.bucket, Key=self.path(rel)))
        if self.fs is not None:
            return self._retry("delete", rel, lambda: self.fs.delete_file(self.path(rel)))
        os.unlink(self.path(rel))

    def clean_temps(self, rel_dirs: tuple[str, ...]) -> list[str]:
        """Delete temp files left by crashed writers (dead pid on this host, or older than an hour)."""
        if self.remote:
            return []
        removed = []
        for rel in rel_dirs:
            for info in self.iter_files(rel):
                if TEMP_MARK not in info.name or not info.name.startswith("."):
                    continue
                path = os.path.join(self.path(rel), info.name)
                if _abandoned(info.name, path):
                    try:
                        os.unlink(path)
                        removed.append(info.name)
                    except FileNotFoundError:
                        pass
        return sorted(removed)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [""])[0][:300]


def _fsync_dir(path: str) -> None:
    """Make a rename durable (POSIX: the directory entry lives in the directory)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _abandoned(name: str, path: str) -> bool:
    host, _, rest = name.rsplit(TEMP_MARK, 1)[1].rpartition("-")[0].rpartition("-")
    try:
        pid = int(rest)
        if host == socket.gethostname():
            os.kill(pid, 0)  # raises if no such process
            return False
    except (ValueError, ProcessLookupError):
        return True
    except PermissionError:  # alive, someone else's
        return False
    try:
        return time.time() - os.path.getmtime(path) > STALE_TEMP_S
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------------------- S3

def _s3_client(uri: str):
    """``(client, bucket, key prefix)`` for an ``s3://`` URI in pyarrow's form (credentials in the user info or the
    environment; ``endpoint_override``, ``region``, ``scheme`` query parameters). One client per endpoint and
    credentials, shared by every Store of the process (boto3 clients are thread-safe)."""
    import boto3
    from botocore.config import Config

    parts = urlsplit(uri)
    query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
    endpoint = query.get("endpoint_override")
    if endpoint and "://" not in endpoint:
        endpoint = f"{query.get('scheme', 'https')}://{endpoint}"
    key = unquote(parts.username) if parts.username else None
    secret = unquote(parts.password) if parts.password else None
    ident = (endpoint, query.get("region"), key, secret)
    with _S3_LOCK:
        if ident not in _S3_CLIENTS:
            _S3_CLIENTS[ident] = boto3.session.Session().client(
                "s3", endpoint_url=endpoint, region_name=query.get("region"), aws_access_key_id=key,
                aws_secret_access_key=secret,
                config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=5, read_timeout=60))
    return _S3_CLIENTS[ident], parts.hostname, parts.path.strip("/")


def _s3_status(e: Exception) -> tuple[int, str]:
    response = getattr(e, "response", None) or {}
    return (int(response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0),
            str(response.get("Error", {}).get("Code", "")))


def _s3_transient(e: Exception) -> bool:
    from botocore.exceptions import BotoCoreError, ClientError

    if isinstance(e, ClientError):
        status, code = _s3_status(e)
        return status >= 500 or code in ("SlowDown", "RequestTimeout", "Throttling", "InternalError")
    return isinstance(e, (BotoCoreError, ConnectionError, TimeoutError))


def _s3_exists(client, bucket: str, key: str) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as e:
        if _s3_status(e)[0] == 404:
            return False
        raise


def _s3_get(client, bucket: str, key: str) -> bytes:
    from botocore.exceptions import ClientError

    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except ClientError as e:
        if _s3_status(e)[1] in ("NoSuchKey", "404") or _s3_status(e)[0] == 404:
            raise FileNotFoundError(key) from None
        raise


def _s3_put(client, bucket: str, key: str, data: bytes, only_new: bool) -> bool:
    from botocore.exceptions import ClientError

    try:
        client.put_object(Bucket=bucket, Key=key, Body=data, **({"IfNoneMatch": "*"} if only_new else {}))
        return True
    except ClientError as e:
        status, code = _s3_status(e)
        if only_new and (status in (409, 412) or code in ("PreconditionFailed", "ConditionalRequestConflict")):
            return False  # another writer created it first (409: a concurrent conditional write is in flight)
        raise


def _s3_list(store: Store, prefix: str) -> Iterator[FileInfo]:
    token = None
    while True:
        kwargs = {"Bucket": store.bucket, "Prefix": prefix, "Delimiter": "/", "MaxKeys": 1000,
                  **({"ContinuationToken": token} if token else {})}
        page = store._retry("list", prefix, lambda: store._s3.list_objects_v2(**kwargs))
        for obj in page.get("Contents", []):
            yield FileInfo(obj["Key"][len(prefix):], int(obj["Size"]), obj["LastModified"].timestamp())
        token = page.get("NextContinuationToken")
        if not page.get("IsTruncated") or not token:
            return
