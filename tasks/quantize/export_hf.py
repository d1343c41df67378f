"""A quantized student as a Hugging Face checkpoint in the compressed-tensors format, loadable by plain
``transformers.AutoModelForCausalLM.from_pretrained`` (and by vLLM, which reads the same format).

    info = export_hf("runs/x/quantize/gptq", "runs/x/export/hf")
    AutoModelForCausalLM.from_pretrained("runs/x/export/hf")     # needs `compressed-tensors` installed

Every integer layer (int4 or int8, group-wise or per channel, GPTQ's and QAD's integers alike) is written as
compressed-tensors' ``pack-quantized`` format with raydistill's own integers and scales (``weight_packed``
int32, ``weight_scale``, ``weight_shape``; symmetric, no zero point), so the loaded weights are exactly the ones
raydistill computes with. What the format cannot hold is said in the returned ``notes`` (and so in the
registered version's ``export.notes`` tag):

- compressed-tensors quantizes ``Linear`` layers only: a quantized input embedding is written dequantized in
  float16 (int4 values are exact in float16; int8 ones round by at most 2⁻¹² relative), and a head tied to it
  is that float16 matrix too;
- ``int8_dynamic``'s activation quantization (int8 per token at run time) is a run-time choice not stored in
  the file: the export is weight-only (W8A16);
- a PEFT adapter (prefix/prompt, or LoRA kept beside the base) is copied to ``adapter/`` for ``peft`` to load;
- ``mixed``: one config group per bit width (targets are the layers' names), bf16 layers stored in bf16.

Other tensors (norms, biases, float layers) are written as stored. ``bf16`` and a float student are plain
checkpoints (no ``quantization_config``).
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from raydistill.tasks.fileio import replace_dir
from raydistill.tasks.quantize import legacy
from raydistill.tasks.quantize.methods import EMBEDDING, head_name
from raydistill.tasks.quantize.qlinear import dequantize
from raydistill.tasks.quantize.store import ADAPTER_DIR, META_FILE, WEIGHTS_FILE, read_stored, stored_integers

INFO_FILE = "raydistill_export.json"


class ExportError(ValueError):
    """A model this export cannot write (the deprecated ``dynamic_int8``, an architecture GGUF lacks)."""


def names(config) -> tuple[str, str | None, bool]:
    """``(input embedding name, output head name, tied)`` of the architecture ``config`` describes (built on
    the meta device: no weights allocated)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    emb = model.get_input_embeddings()
    emb_name = next(n for n, m in model.named_modules() if m is emb)
    return emb_name, head_name(model), bool(getattr(config, "tie_word_embeddings", False))


def embedding_float(table: dict, tensors: dict, emb_name: str) -> tuple[torch.Tensor, int | None]:
    """``(input embedding float32 (vocab, dim), bits or None)``: dequantized from its integers (its own, or the
    tied head's) or as stored."""
    emb = table.get(EMBEDDING)
    if emb is None:
        return tensors[f"{emb_name}.weight"].float(), None
    if emb["kind"] == "tied":
        return dequantize(*stored_integers(tensors, emb["head"], table[emb["head"]])), emb["bits"]
    return dequantize(*stored_integers(tensors, EMBEDDING, emb)), emb["bits"]


def _scheme(bits: int, per_channel: bool, group: int, targets: list[str]):
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="channel" if per_channel else "group",
                            group_size=None if per_channel else group)
    return QuantizationScheme(targets=targets, weights=args)


def export_hf(model_dir: str | Path, out_dir: str | Path) -> dict:
    """Write ``model_dir`` (a quantized directory, or a float student) as a HF checkpoint at ``out_dir``
    (atomically); ``{"path", "format", "quantized_layers", "notes"}``."""
    from transformers import AutoConfig

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if not (model_dir / META_FILE).exists():  # a float student is a HF checkpoint already
        with replace_dir(out_dir) as tmp:
            for f in model_dir.iterdir():
                (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        return _written(out_dir, {"format": "safetensors (float)", "quantized_layers": 0, "notes": []})
    meta, tensors = read_stored(model_dir)
    if meta["method"] in legacy.METHODS:
        raise ExportError(f"{model_dir}: the deprecated {meta['method']!r} (torch.ao) layout has no standard "
                          "export; quantize with int8_dynamic or int8_weight_only instead")
    config = AutoConfig.from_pretrained(model_dir)
    out, groups, ignore, notes = _tensors(meta, tensors, config)
    info = {"format": "safetensors (bf16)" if meta["method"] == "bf16" else "safetensors (float)",
            "quantized_layers": sum(len(v) for v in groups.values()), "notes": notes}
    with replace_dir(out_dir) as tmp:
        save_file(out, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        emb_name, head, _ = names(config)
        config.tie_word_embeddings = not any(k.startswith(f"{head}.") for k in out)  # no head of its own: tied
        config.save_pretrained(tmp)
        for f in model_dir.iterdir():  # tokenizer, generation config, chat template
            if f.is_file() and f.name not in (WEIGHTS_FILE, META_FILE, "config.json"):
                shutil.copy2(f, tmp / f.name)
        if (model_dir / ADAPTER_DIR).is_dir():
            shutil.copytree(model_dir / ADAPTER_DIR, tmp / ADAPTER_DIR)
            notes.append(f"the {meta.get('adapter_kind') or 'prefix/prompt'} adapter is in {ADAPTER_DIR}/ "
                         "(load it with peft.PeftModel.from_pretrained onto this model)")
        if groups:
            info["format"] = _write_quantization_config(tmp, groups, ignore)
    return _written(out_dir, {**info, "method": meta["method"]})


def _tensors(meta: dict, tensors: dict, config) -> tuple[dict, dict, list, list]:
    """``(tensors to write, {(bits, per_channel, group): [layers]}, float Linear layers, notes)``."""
    table = meta["layers"]
    emb_name, head, tied = names(config)
    out, groups, ignore, notes, used = {}, {}, [], [], set()
    emb = table.get(EMBEDDING)
    for name, t in table.items():
        if name == EMBEDDING or (emb and emb["kind"] == "tied" and name == head):
            continue  # the embedding (and a head tied to it) below
        if t["kind"] == "bf16":
            ignore.append(name)
            continue  # a bf16 layer: its tensors are copied as stored below
        q, s = stored_integers(tensors, name, t)
        out[f"{name}.weight_packed"] = _pack(q, t["bits"])
        out[f"{name}.weight_scale"] = s.contiguous()
        out[f"{name}.weight_shape"] = torch.tensor(q.shape, dtype=torch.int64)
        used.update({f"{name}.qweight", f"{name}.scale"})
        per_channel = s.shape[1] == 1
        groups.setdefault((t["bits"], per_channel, 0 if per_channel else t["group_size"]), []).append(name)
    if emb is not None:
        w, bits = embedding_float(table, tensors, emb_name)
        out[f"{emb_name}.weight"] = w.half()
        used.update(k for k in tensors if k.startswith(f"{emb['name']}.source.") or
                    (emb["kind"] == "tied" and k.startswith(f"{head}.")))
        notes.append(f"the input embedding is float16 (its int{bits} values dequantized: compressed-tensors "
                     "quantizes Linear layers only)" + ("; the tied head is that matrix" if emb["kind"] == "tied"
                                                        else ""))
        if emb["kind"] == "tied":
            ignore.append(head)
    for k, v in tensors.items():
        if k not in used and k not in out:
            out[k] = v.contiguous()
    if tied and f"{head}.weight" in out and f"{emb_name}.weight" not in out:  # bf16: stored under the head
        out[f"{emb_name}.weight"] = out.pop(f"{head}.weight")
    if meta["method"] == "int8_dynamic":
        notes.append("int8_dynamic quantizes activations per token at run time; the file holds the int8 weights "
                     "only (weight-only W8A16 when loaded elsewhere)")
    return out, groups, ignore, notes


def _pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    return pack_to_int32(q.contiguous(), bits)


def _write_quantization_config(out_dir: Path, groups: dict, ignore: list[str]) -> str:
    """``quantization_config`` in ``config.json``, written by compressed-tensors' own ``ModelCompressor``."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import QuantizationConfig

    single = len(groups) == 1
    schemes = {f"group_{i}": _scheme(bits, per_channel, group,
                                     ["Linear"] if single else [f"re:^{re.escape(n)}$" for n in layers])
               for i, ((bits, per_channel, group), layers) in enumerate(sorted(groups.items()))}
    qcfg = QuantizationConfig(config_groups=schemes, ignore=sorted(ignore), format="pack-quantized",
                              quantization_status="compressed")
    ModelCompressor(quantization_config=qcfg).update_config(str(out_dir))
    kinds = ", ".join(f"int{b} {'per channel' if pc else f'group {g}'} ×{len(groups[(b, pc, g)])}"
                      for b, pc, g in sorted(groups))
    return f"compressed-tensors pack-quantized ({kinds})"


def _written(out_dir: Path, info: dict) -> dict:
    info = {"path": str(out_dir), **info}
    (out_dir / INFO_FILE).write_text(json.dumps(info, indent=2))
    return info
