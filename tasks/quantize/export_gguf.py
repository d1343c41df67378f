"""A student as one GGUF file (llama.cpp's format, written with the ``gguf`` package), loadable by llama.cpp
-family runtimes and by ``transformers.AutoModelForCausalLM.from_pretrained(dir, gguf_file=name)``.

    info = export_gguf("runs/x/quantize/gptq", "runs/x/export/student.gguf", name="student")

Tensor types carry raydistill's own integers, not a re-quantization: an int8 layer is ``Q8_0`` and an int4
layer ``Q4_0`` (blocks of 32 weights, one f16 scale each: ``w = d·q`` and ``w = d·(nibble − 8)``) whose block
scale is the layer's group scale, so any group size that is a multiple of 32 (and one scale per row) is held
exactly — raydistill's scales are bf16 numbers, exact in f16 unless below f16's normal range (6.1e-5; those
round, and ``inexact_scales`` counts them). Layers in groups that are not a multiple of 32 are written F16
(dequantized), bf16 layers BF16, norms and other float tensors F32 (BF16 where stored in bf16). The embedding
is quantized like the head it may be tied to (``token_embd``; a tied head has no ``output`` tensor).

The tokenizer goes in as llama.cpp's byte-level BPE (``gpt2``: tokens, merges, token types, special token
ids, chat template); the pre-tokenizer split is left to the reader's default. Architectures: Llama-family
(``model_type`` ``llama``, SmolLM2 included); q/k rows are permuted as llama.cpp's converter does (its
rotary layout; readers undo it). A PEFT adapter is not written (the notes say so).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from raydistill.tasks.fileio import atomic_file
from raydistill.tasks.quantize import legacy
from raydistill.tasks.quantize.export_hf import ExportError, embedding_float, names
from raydistill.tasks.quantize.methods import EMBEDDING
from raydistill.tasks.quantize.qlinear import dequantize
from raydistill.tasks.quantize.store import META_FILE, read_stored, stored_integers

ARCHS = {"llama": "llama"}  # transformers model_type → GGUF architecture


def _permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's q/k row order (``convert_hf_to_gguf.py``'s ``permute``), applied to any per-row tensor."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _blocks(q: torch.Tensor, s: torch.Tensor, bits: int) -> tuple[np.ndarray, int]:
    """``(Q8_0 or Q4_0 bytes (out, in/32 · block bytes), scales f16 cannot hold exactly)``."""
    out, n = q.shape
    d = s.repeat_interleave(n // s.shape[1] // 32, dim=1)  # one scale per block of 32: the group's
    d16 = d.to(torch.float16)
    inexact = int((d16.float() != d).sum())
    head = d16.numpy().view(np.uint8).reshape(out, n // 32, 2)
    if bits == 8:
        body = q.numpy().view(np.uint8).reshape(out, n // 32, 32)
    else:  # element j of a block in byte j's low nibble, element j+16 in its high nibble
        u = (q + 8).to(torch.uint8).numpy().reshape(out, n // 32, 2, 16)
        body = u[:, :, 0] | (u[:, :, 1] << 4)
    return np.concatenate([head, body], axis=-1).reshape(out, -1), inexact


def _add_integers(writer, gname: str, q, s, bits: int, stats: dict) -> None:
    from gguf import GGMLQuantizationType as T

    out, n = q.shape
    if (n // s.shape[1]) % 32:  # groups that GGUF's 32-weight blocks cannot carry
        writer.add_tensor(gname, dequantize(q, s).to(torch.float16).numpy())
        stats["F16"] = stats.get("F16", 0) + 1
        stats.setdefault("notes", []).append(f"{gname}: groups of {n // s.shape[1]} are not a multiple of 32: F16")
        return
    data, inexact = _blocks(q, s, bits)
    kind = T.Q8_0 if bits == 8 else T.Q4_0
    writer.add_tensor(gname, data, raw_dtype=kind)  # byte-shaped: the writer derives (out, n)
    stats[kind.name] = stats.get(kind.name, 0) + 1
    stats["inexact_scales"] = stats.get("inexact_scales", 0) + inexact


def _add_float(writer, gname: str, t: torch.Tensor, stats: dict) -> None:
    from gguf import GGMLQuantizationType as T

    if t.dtype == torch.bfloat16 and t.dim() > 1:
        writer.add_tensor(gname, t.contiguous().view(torch.uint8).numpy(), raw_dtype=T.BF16)  # byte-shaped
        stats["BF16"] = stats.get("BF16", 0) + 1
    else:
        writer.add_tensor(gname, t.float().contiguous().numpy())
        stats["F32"] = stats.get("F32", 0) + 1


def export_gguf(model_dir: str | Path, path: str | Path, name: str) -> dict:
    """Write ``model_dir`` (quantized directory or float student) as the GGUF file ``path`` (atomically);
    ``{"path", "types": {type: tensors}, "inexact_scales", "notes"}``."""
    import gguf
    from transformers import AutoConfig, AutoTokenizer

    model_dir, path = Path(model_dir), Path(path)
    config = AutoConfig.from_pretrained(model_dir)
    arch = ARCHS.get(config.model_type)
    if arch is None:
        raise ExportError(f"export.gguf: model_type {config.model_type!r} has no GGUF writer here (known: "
                          f"{sorted(ARCHS)}); the Hugging Face export still works")
    meta, tensors = read_stored(model_dir) if (model_dir / META_FILE).exists() else (None, _float_tensors(model_dir))
    if meta and meta["method"] in legacy.METHODS:
        raise ExportError(f"{model_dir}: the deprecated {meta['method']!r} layout has no GGUF export")
    stats = {"notes": ["a PEFT adapter is not in the GGUF (base model only)"] if meta and meta.get("adapter") else []}
    with atomic_file(path) as tmp:
        writer = gguf.GGUFWriter(str(tmp), arch)
        _metadata(writer, config, name)
        _tokenizer(writer, AutoTokenizer.from_pretrained(model_dir))
        _weights(writer, config, meta, tensors, stats)
        writer.add_file_type(_file_type(stats))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    types = {k: v for k, v in stats.items() if k not in ("notes", "inexact_scales")}
    return {"path": str(path), "types": types, "inexact_scales": stats.get("inexact_scales", 0),
            "notes": stats["notes"], "method": meta["method"] if meta else "fp32"}


def _file_type(stats: dict) -> int:
    """llama.cpp's ``general.file_type``: the type of most 2-D tensors."""
    from gguf import LlamaFileType as F

    kinds = {"Q4_0": F.MOSTLY_Q4_0, "Q8_0": F.MOSTLY_Q8_0, "F16": F.MOSTLY_F16, "BF16": F.MOSTLY_BF16}
    counted = {k: stats.get(k, 0) for k in kinds}
    best = max(counted, key=counted.get)
    return int(kinds[best] if counted[best] else F.ALL_F32)


def _float_tensors(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _metadata(writer, config, name: str) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    theta = (getattr(config, "rope_parameters", None) or {}).get("rope_theta") or getattr(config, "rope_theta", None)
    if theta:
        writer.add_rope_freq_base(float(theta))
    writer.add_vocab_size(config.vocab_size)


def _tokenizer(writer, tok) -> None:
    from gguf import TokenType

    spec = json.loads(tok.backend_tokenizer.to_str())
    if spec["model"]["type"] != "BPE":
        raise ExportError(f"export.gguf: a {spec['model']['type']} tokenizer has no GGUF writer here (byte-level "
                          "BPE only); the Hugging Face export still works")
    tokens = tok.convert_ids_to_tokens(list(range(len(tok))))
    added = {a["id"]: a for a in spec.get("added_tokens", [])}
    types = [TokenType.NORMAL if i not in added else TokenType.CONTROL if added[i]["special"]
             else TokenType.USER_DEFINED for i in range(len(tokens))]
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for key, value in (("bos", tok.bos_token_id), ("eos", tok.eos_token_id), ("unk", tok.unk_token_id),
                       ("pad", tok.pad_token_id)):
        if value is not None:
            getattr(writer, f"add_{key}_token_id")(value)
    writer.add_add_bos_token(bool(getattr(tok, "add_bos_token", False)))
    if tok.chat_template:
        writer.add_chat_template(tok.chat_template)


def _weights(writer, config, meta: dict | None, tensors: dict, stats: dict) -> None:
    """Every tensor under its GGUF name, q/k rows permuted, integers as Q8_0/Q4_0 blocks."""
    import gguf

    table = (meta or {}).get("layers", {})
    emb_name, head, _ = names(config)
    tmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    emb = table.get(EMBEDDING)

    def gname(key: str) -> str:
        found = tmap.get_name(key, try_suffixes=(".weight", ".bias"))
        if found is None:
            raise ExportError(f"export.gguf: no GGUF name for tensor {key!r}")
        return found

    def rows(layer: str, t: torch.Tensor) -> torch.Tensor:
        kind = layer.rsplit(".", 1)[-1]
        return _permute(t, heads[kind]) if kind in heads else t

    if emb is not None:  # the embedding's integers (its own, or the tied head's)
        src = emb["head"] if emb["kind"] == "tied" else EMBEDDING
        q, s = stored_integers(tensors, src, table[src] if src != EMBEDDING else emb)
        _add_integers(writer, gname(f"{emb_name}.weight"), q, s, emb["bits"], stats)
    for name, t in table.items():
        if name == EMBEDDING or (emb is not None and emb["kind"] == "tied" and name == head):
            continue
        if t["kind"] == "bf16":
            continue  # stored as float tensors: written below
        q, s = stored_integers(tensors, name, t)
        _add_integers(writer, gname(f"{name}.weight"), rows(name, q), rows(name, s), t["bits"], stats)
        if t["bias"]:
            _add_float(writer, gname(f"{name}.bias"), rows(name, tensors[f"{name}.bias"]), stats)
    done = {f"{n}.{k}" for n, t in table.items() if n != EMBEDDING and t["kind"] != "bf16"
            for k in ("qweight", "scale", "bias")}
    if emb is not None and emb["kind"] == "rows":
        done |= {f"{emb['name']}.source.qweight", f"{emb['name']}.source.scale"}
    floats = {k: v for k, v in tensors.items() if k not in done}
    if emb is None and f"{emb_name}.weight" not in floats and f"{head}.weight" in floats:
        floats[f"{emb_name}.weight"] = floats.pop(f"{head}.weight")  # tied, stored once under the head's name
    elif _tied_copy(floats, emb_name, head):
        del floats[f"{head}.weight"]  # the reader ties a head without an ``output`` tensor to ``token_embd``
    for key, t in floats.items():
        _add_float(writer, gname(key), rows(key.rsplit(".", 1)[0], t), stats)


def _tied_copy(tensors: dict, emb_name: str, head: str) -> bool:
    """Whether the head's float weight is the embedding's (stored once, under either name)."""
    e, h = tensors.get(f"{emb_name}.weight"), tensors.get(f"{head}.weight")
    return e is not None and h is not None and e.shape == h.shape and torch.equal(e, h)
