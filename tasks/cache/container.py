"""The shard container: a safetensors file whose tensors are uint8 blobs (each array byte-shuffled then
LZMA-compressed, or raw) and whose metadata holds the dtype/shape/codec of each array plus a JSON header. No pickle.
"""

from __future__ import annotations

import json
import lzma

import numpy as np
from safetensors.numpy import save as st_save

_LZMA_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 6}]


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
