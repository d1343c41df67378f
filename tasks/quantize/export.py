"""The standard exports of a quantized student, and the check that maintained loaders read them back.

    info = export_all("runs/x/quantize/gptq", "runs/x/export", name="smollm2-shakespeare-student")
    #  runs/x/export/hf/                                   transformers (compressed-tensors), vLLM
    #  runs/x/export/smollm2-shakespeare-student.gguf      llama.cpp-family runtimes, transformers gguf_file=
    verify_exports("runs/x/quantize/gptq", info, ids)     # loads both with transformers, compares logits

Formats: :mod:`.export_hf` and :mod:`.export_gguf` (what each holds exactly, and what it cannot hold).
"""

from __future__ import annotations

from pathlib import Path

import torch

from raydistill.tasks.quantize.export_hf import ExportError, export_hf
from raydistill.tasks.quantize.export_gguf import export_gguf

HF_DIR = "hf"


def export_all(model_dir: str | Path, out_root: str | Path, name: str) -> dict:
    """Both exports of ``model_dir`` under ``out_root`` (``hf/`` and ``<name>.gguf``); a format that cannot
    hold the model says why under ``error`` instead of failing the other one."""
    out_root = Path(out_root)
    info = {}
    for kind, write in (("hf", lambda: export_hf(model_dir, out_root / HF_DIR)),
                        ("gguf", lambda: export_gguf(model_dir, out_root / f"{name}.gguf", name))):
        try:
            info[kind] = write()
        except ExportError as e:
            info[kind] = {"error": str(e)}
    return info


def logits_gap(a: torch.Tensor, b: torch.Tensor) -> dict:
    """How far logits ``b`` are from ``a`` (both ``(..., vocab)``): the largest absolute difference, that as a
    share of ``a``'s largest magnitude, and the mean KL(softmax a ‖ softmax b) per position."""
    a, b = a.float().reshape(-1, a.shape[-1]), b.float().reshape(-1, b.shape[-1])
    kl = torch.nn.functional.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean")
    gap = (a - b).abs().max().item()
    return {"max_abs_diff": gap, "max_rel_diff": gap / max(a.abs().max().item(), 1e-12), "kl": kl.item()}


def load_export(info: dict, kind: str):
    """The export ``kind`` (``hf`` or ``gguf``) loaded by plain transformers (float32, eval mode)."""
    from transformers import AutoModelForCausalLM

    path = Path(info[kind]["path"])
    if kind == "hf":
        return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def verify_exports(model_dir: str | Path, info: dict, ids: torch.Tensor, model=None) -> dict:
    """``{kind: {"loads": bool, "max_abs_diff", "max_rel_diff", "kl"} or {"loads": False, "error"}}``: each
    export loaded by transformers and its logits on ``ids`` ``(batch, seq)`` compared with raydistill's own
    forward of ``model_dir`` (``model``: that model already loaded; a PEFT adapter is left out of the
    comparison: neither format applies it on plain loading)."""
    from raydistill.tasks.quantize.store import META_FILE, load_quantized
    from raydistill.tasks.students import load_student

    if model is None:
        model = load_quantized(model_dir) if (Path(model_dir) / META_FILE).exists() else load_student(model_dir)
    quant = getattr(model, "_raydistill_quant", None) or {}
    base = quant.get("base", model)  # an adapter is not in the GGUF, and loads separately (peft) for the HF one
    with torch.no_grad():
        ours = base(input_ids=ids).logits
    out = {}
    for kind, entry in info.items():
        if "error" in entry:
            out[kind] = {"loads": False, "error": entry["error"]}
            continue
        try:
            loaded = load_export(info, kind)
            with torch.no_grad():
                theirs = loaded(input_ids=ids).logits
        except Exception as e:  # noqa: BLE001 - a loader failure is the finding, reported, not raised
            out[kind] = {"loads": False, "error": f"{type(e).__name__}: {str(e)[:300]}"}
            continue
        out[kind] = {"loads": True, **logits_gap(ours, theirs)}
    return out


def export_tags(info: dict, checks: dict | None = None) -> dict[str, str]:
    """Model version tags: each export's format, what it could not hold, and whether it loaded."""
    tags, notes = {}, []
    hf, gguf = info.get("hf", {}), info.get("gguf", {})
    tags["export.hf.format"] = hf.get("format") or f"none: {hf.get('error')}"
    tags["export.gguf.types"] = ", ".join(f"{k}×{v}" for k, v in (gguf.get("types") or {}).items()) or \
        f"none: {gguf.get('error')}"
    if gguf.get("inexact_scales"):
        notes.append(f"gguf: {gguf['inexact_scales']} block scales below f16's normal range are rounded")
    notes += [f"hf: {n}" for n in hf.get("notes", [])] + [f"gguf: {n}" for n in gguf.get("notes", [])]
    tags["export.notes"] = "; ".join(notes)[:5000] or "none"
    for kind, c in (checks or {}).items():
        tags[f"export.{kind}.loads"] = str(c.get("loads")).lower()
        if c.get("loads"):
            tags[f"export.{kind}.max_abs_logit_diff"] = f"{c['max_abs_diff']:.3g}"
    return tags
