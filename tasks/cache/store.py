"""Bytes on disk for the cache: a tiny filesystem layer (local or object store) and the shard container.

Commit protocol (local): write ``.<name>.tmp-<host>-<pid>-<rand>`` in the target directory, fsync, then
``os.link`` it to the final name — which fails if the name exists, so a committed file is never replaced;
a second writer of the same shard simply adopts the first one's file. The manifest is replaced atomically
(temp + fsync + ``os.replace``). Object stores (``s3://…``, via ``pyarrow.fs``): a PUT is atomic (an object
is visible whole or not at all), so files are written directly; "create" checks existence first.

Container: a safetensors file whose tensors are uint8 blobs (each array byte-shuffled then LZMA-compressed,
or raw) and whose metadata holds the dtype/shape/codec of each array plus a JSON header. No pickle.
"""

from __future__ import annotations

import json
import lzma
import os
import socket
import time
import uuid
from pathlib import Path

import numpy as np
from safetensors.numpy import save as st_save

TEMP_MARK = ".tmp-"
STALE_TEMP_S = 3600  # a temp file this old is abandoned even if we cannot tell whether its writer is alive
_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]


class Store:
    """Files under a root that is a local directory or an object-store URI (``s3://bucket/prefix``)."""

    def __init__(self, root: str):
        self.uri = str(root)
        self.remote = "://" in self.uri and not self.uri.startswith("file://")
        if self.remote:
            import pyarrow.fs as pafs

            uri = self.uri
            if uri.startswith("s3://") and "allow_delayed_open" not in uri:
                # delayed open lets Arrow send one PutObject for a small file instead of a multipart upload
                # (simpler, and the only kind some S3-compatible stores, moto included, complete reliably)
                uri += ("&" if "?" in uri else "?") + "allow_delayed_open=true"
            self.fs, self.root = pafs.FileSystem.from_uri(uri)
            self.root = self.root.rstrip("/")
        else:
            self.root = self.uri.removeprefix("file://")

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}"

    def url(self, rel: str) -> str:
        """``rel`` as a location a person can read (local path, or the URI without query or credentials)."""
        if not self.remote:
            return self.path(rel)
        scheme, rest = self.uri.split("://", 1)
        return f"{scheme}://{rest.split('?', 1)[0].rsplit('@', 1)[-1].rstrip('/')}/{rel}"

    def exists(self, rel: str) -> bool:
        if not self.remote:
            return os.path.exists(self.path(rel))
        import pyarrow.fs as pafs

        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def read(self, rel: str) -> bytes:
        if not self.remote:
            with open(self.path(rel), "rb") as f:
                return f.read()
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def _write_temp(self, rel: str, data: bytes) -> str:
        final = Path(self.path(rel))
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = final.parent / f".{final.name}{TEMP_MARK}{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return str(tmp)

    def _put(self, rel: str, data: bytes) -> None:
        self.fs.create_dir(self.path(rel).rsplit("/", 1)[0], recursive=True)
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(data)

    def replace(self, rel: str, data: bytes) -> None:
        """Atomically write ``rel``, replacing any previous version (the manifest)."""
        if self.remote:
            return self._put(rel, data)
        tmp = self._write_temp(rel, data)
        os.replace(tmp, self.path(rel))
        _fsync_dir(os.path.dirname(self.path(rel)))

    def create(self, rel: str, data: bytes) -> bool:
        """Atomically create ``rel`` unless it exists (then leave it alone); True if this call created it."""
        if self.remote:
            if self.exists(rel):
                return False
            self._put(rel, data)
            return True
        tmp = self._write_temp(rel, data)
        try:
            os.link(tmp, self.path(rel))  # atomic and never overwrites: the first committed copy wins
            created = True
        except FileExistsError:
            created = False
        finally:
            os.unlink(tmp)
        _fsync_dir(os.path.dirname(self.path(rel)))
        return created

    def listdir(self, rel: str) -> list[str]:
        if not self.remote:
            d = self.path(rel)
            return sorted(os.listdir(d)) if os.path.isdir(d) else []
        import pyarrow.fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self.path(rel), allow_not_found=True))
        return sorted(i.base_name for i in infos if i.type == pafs.FileType.File)

    def remove(self, rel: str) -> None:
        if self.remote:
            self.fs.delete_file(self.path(rel))
        else:
            os.unlink(self.path(rel))

    def clean_temps(self, rel_dirs: tuple[str, ...]) -> list[str]:
        """Delete temp files left by crashed writers (dead pid on this host, or older than an hour)."""
        if self.remote:
            return []
        removed = []
        for rel in rel_dirs:
            for name in self.listdir(rel):
                if TEMP_MARK not in name or not name.startswith("."):
                    continue
                path = os.path.join(self.path(rel), name)
                if _abandoned(name, path):
                    try:
                        os.unlink(path)
                        removed.append(name)
                    except FileNotFoundError:
                        pass
        return removed


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


# ----------------------------------------------------------------------------------------------------------
# container
# ----------------------------------------------------------------------------------------------------------

def _shuffle(arr: np.ndarray) -> bytes:
    """Byte planes (all first bytes, then all second bytes, …): high bytes of small ints compress to ~nothing."""
    b = np.ascontiguousarray(arr).view(np.uint8).reshape(-1, arr.dtype.itemsize)
    return b.T.tobytes()


def _unshuffle(data: bytes, dtype: np.dtype, shape: tuple) -> np.ndarray:
    planes = np.frombuffer(data, dtype=np.uint8).reshape(dtype.itemsize, -1)
    return np.ascontiguousarray(planes.T).view(dtype).reshape(shape)


def pack(fields: dict[str, np.ndarray], header: dict, raw: tuple[str, ...] = ()) -> bytes:
    """Arrays + JSON header → one safetensors file's bytes. Arrays named in ``raw`` are stored uncompressed."""
    blobs, layout = {}, {}
    for name, arr in fields.items():
        arr = np.asarray(arr)
        dtype = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
        arr = arr.astype(dtype, copy=False)
        if name in raw:
            blob, codec = np.ascontiguousarray(arr).tobytes(), "raw"
        else:
            blob = lzma.compress(_shuffle(arr), format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            codec = "shuffle+lzma"
        blobs[name] = np.frombuffer(blob, dtype=np.uint8)
        layout[name] = {"dtype": dtype.str, "shape": list(arr.shape), "codec": codec}
    meta = {"raydistill": json.dumps({"header": header, "layout": layout}, sort_keys=True, separators=(",", ":"))}
    return st_save(blobs, metadata=meta)


def unpack(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    """Inverse of :func:`pack`; raises ValueError on a malformed file."""
    if len(data) < 8:
        raise ValueError("truncated file")
    n = int.from_bytes(data[:8], "little")
    st_header = json.loads(data[8: 8 + n])
    info = json.loads(st_header["__metadata__"]["raydistill"])
    body = memoryview(data)[8 + n:]
    fields = {}
    for name, spec in info["layout"].items():
        begin, end = st_header[name]["data_offsets"]
        blob = bytes(body[begin:end])
        dtype, shape = np.dtype(spec["dtype"]), tuple(spec["shape"])
        if spec["codec"] == "raw":
            fields[name] = np.frombuffer(bytearray(blob), dtype=dtype).reshape(shape)  # writable for torch
        else:
            raw = lzma.decompress(blob, format=lzma.FORMAT_RAW, filters=_LZMA_FILTERS)
            fields[name] = _unshuffle(raw, dtype, shape)
    return fields, info["header"]


def stored_sizes(data: bytes) -> dict[str, int]:
    """Bytes each array takes in a file written by :func:`pack` (``"(header)"``: the safetensors/JSON header)."""
    n = int.from_bytes(data[:8], "little")
    st_header = json.loads(data[8: 8 + n])
    sizes = {name: spec["data_offsets"][1] - spec["data_offsets"][0] for name, spec in st_header.items()
             if name != "__metadata__"}
    return {"(header)": 8 + n, **sizes}
