"""Group-wise integer weights in pure torch: round-to-nearest, int4 packing, and the layers that hold them.

On disk a weight costs ``bits/8`` bytes per element plus one float32 scale per group (``qweight`` packed
row-major: int8 as is, int4 two per byte). In memory a :class:`QuantLinear` runs on torch's packed int8/int4
CPU kernels (:mod:`.kernels`) and keeps no dequantized copy: int8 per channel costs 1 byte per weight, int4 in
groups of 32–256 half a byte (plus bf16 scales).

Symmetric quantization: ``q = clamp(round(w / s), -qmax, qmax)``, ``s = max|w_group| / qmax`` rounded to a bf16
number (:func:`.kernels.snap`: the kernels compute with bf16 scales) with ``qmax = 2**(bits-1) - 1`` (127 for
int8, 7 for int4); ``w ≈ q * s``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from raydistill.tasks.quantize import kernels


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def _groups(in_features: int, group_size: int | None) -> int:
    """Group width actually used: ``group_size`` (must divide ``in_features``) or the whole row (per channel)."""
    if not group_size or group_size >= in_features:
        return in_features
    if in_features % group_size:
        raise ValueError(f"quantize.group_size={group_size} does not divide in_features={in_features}; use a "
                         f"divisor such as {next(g for g in (128, 64, 32, 16, 8) if in_features % g == 0)}")
    return group_size


def scales_for(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """Per-group scales ``(out, in // group)`` float32 of weight ``w`` ``(out, in)``."""
    g = _groups(w.shape[1], group_size)
    absmax = w.detach().float().reshape(w.shape[0], -1, g).abs().amax(-1)
    return kernels.snap((absmax / qmax(bits)).clamp(min=1e-12))


def quantize_with(w: torch.Tensor, scale: torch.Tensor, bits: int) -> torch.Tensor:
    """Integers ``(out, in)`` int8 of ``w`` under the given per-group ``scale`` ``(out, groups)``."""
    out, n = w.shape
    g = n // scale.shape[1]
    q = torch.round(w.float().reshape(out, -1, g) / scale[..., None]).clamp(-qmax(bits), qmax(bits))
    return q.reshape(out, n).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q * s`` float32 ``(out, in)`` from integers ``(out, in)`` and scales ``(out, groups)``."""
    out, n = q.shape
    return (q.float().reshape(out, scale.shape[1], -1) * scale[..., None]).reshape(out, n)


def rtn(w: torch.Tensor, bits: int, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest ``(q int8 (out, in), scale float32 (out, groups))``."""
    scale = scales_for(w, bits, group_size)
    return quantize_with(w, scale, bits), scale


def fake_quantize(w: torch.Tensor, bits: int, group_size: int | None) -> torch.Tensor:
    """``dequantize(rtn(w))`` with a straight-through gradient (identity), for quantization-aware training."""
    q, s = rtn(w, bits, group_size)
    return w + (dequantize(q, s).to(w.dtype) - w).detach()


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 → storage: int8 as is; int4 as two values per uint8 (low nibble = even column). ``in`` must be even."""
    if bits == 8:
        return q.contiguous()
    u = (q + 8).to(torch.uint8)  # -7..7 → 1..15
    return (u[:, 0::2] | (u[:, 1::2] << 4)).contiguous()


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    if bits == 8:
        return packed
    lo, hi = (packed & 0x0F).to(torch.int8) - 8, (packed >> 4).to(torch.int8) - 8
    return torch.stack([lo, hi], -1).reshape(packed.shape[0], -1)


class QuantLinear(nn.Module):
    """A linear layer with ``bits``-bit group-wise weights (packed buffer ``qweight``, float32 ``scale``).

    ``forward(x (..., in)) → (..., out)`` in ``x``'s dtype, computed in bf16 on a packed low-bit kernel
    (:mod:`.kernels`). The first forward *prepares* the layer: its integers move into the kernel's layout, and
    where that layout can be read back the stored buffers are dropped (the state dict still holds them: they
    are read back from the kernel form, so saving a used model writes the same tensors).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None, bias: bool,
                 compute_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = _groups(in_features, group_size)
        self.register_buffer("qweight", torch.zeros(out_features, self._cols(),
                                                    dtype=torch.int8 if bits == 8 else torch.uint8))
        self.register_buffer("scale", torch.ones(out_features, in_features // self.group_size))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self.compute_dtype = compute_dtype  # the kernels' activation dtype is bf16 whatever this says
        self._rt = None  # the run-time (kernel) form, built by prepare()

    def _cols(self) -> int:
        return self.in_features if self.bits == 8 else self.in_features // 2

    @classmethod
    def from_weights(cls, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, bits: int,
                     compute_dtype: torch.dtype = torch.bfloat16) -> "QuantLinear":
        out, n = q.shape
        layer = cls(n, out, bits, n // scale.shape[1], bias is not None, compute_dtype)
        layer.set(pack(q, bits), scale, bias)
        return layer

    def set(self, packed: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Put stored tensors in (shapes checked) and drop the run-time form."""
        self._unprepare()
        for name, value in (("qweight", packed), ("scale", scale), ("bias", bias)):
            target = getattr(self, name)
            if (target is None) != (value is None) or (value is not None and target.shape != value.shape):
                raise ValueError(f"QuantLinear.{name}: stored {None if value is None else tuple(value.shape)} "
                                 f"does not fit {None if target is None else tuple(target.shape)}")
            if value is not None:
                target.copy_(value)

    def prepare(self) -> None:
        """Build the kernel form (once); drop the stored integers where the kernel form can give them back."""
        if self._rt is not None:
            return
        with torch.inference_mode(False), torch.no_grad():
            rt = kernels.prepare(unpack(self.qweight, self.bits), self.scale, self.bits)
        if not rt["keeps_integers"]:
            self.qweight = self.scale = None  # the registered buffers: the kernel form is the only copy now
        self._rt = rt

    def _unprepare(self) -> None:
        """Back to the stored buffers (before loading or setting integers into a used layer)."""
        if self.qweight is None:
            q, s = self.integers()
            self.qweight, self.scale = pack(q, self.bits), s.contiguous()
        self._rt = None

    def integers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(q int8 (out, in), scale float32 (out, groups))``, from the stored buffers or the kernel form."""
        if self.qweight is not None:
            return unpack(self.qweight, self.bits), self.scale
        rt = self._rt
        if rt["kind"] == "int8":
            return rt["q"], rt["scale"].float()[:, None]
        return kernels.int4_unpack(rt["packed"], self.in_features), rt["sz"][..., 0].t().float()

    def weight_float(self) -> torch.Tensor:
        """The dequantized weight ``(out, in)`` float32 (built on demand, not kept)."""
        return dequantize(*self.integers())

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Dequantized rows ``ids`` ``(n, in)`` float32 (an embedding lookup), without dequantizing the rest."""
        rt = self._rt if self.qweight is None else None
        if rt is None:
            q, s = unpack(self.qweight[ids], self.bits), self.scale[ids]
        elif rt["kind"] == "int8":
            q, s = rt["q"][ids], rt["scale"][ids].float()[:, None]
        else:
            q, s = kernels.int4_rows(rt["packed"], self.in_features, ids), rt["sz"][:, ids, 0].t().float()
        return dequantize(q, s)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.prepare()
        stored = None if self.qweight is None else (lambda n0, n1: unpack(self.qweight[n0:n1], self.bits))
        return kernels.linear(x, self._rt, stored, self.scale, self.out_features, self.bias)

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        if self.qweight is None:  # prepared: the stored form, read back from the kernel form
            q, s = self.integers()
            destination[prefix + "qweight"], destination[prefix + "scale"] = pack(q, self.bits), s.contiguous()
        super()._save_to_state_dict(destination, prefix, keep_vars)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        self._unprepare()
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        return f"{self.in_features}, {self.out_features}, bits={self.bits}, group_size={self.group_size}"


class QuantEmbedding(nn.Module):
    """An embedding whose rows are quantized like a linear weight ``(num, dim)``, or share a tied head's.

    A tied head is referenced, not registered as a submodule: the state dict holds its integers once, under
    the head's names."""

    def __init__(self, source: QuantLinear, tied: bool = False):
        super().__init__()
        if tied:
            self.__dict__["source"] = source  # the lm_head itself (registered where it lives)
        else:
            self.source = source  # a QuantLinear over the (num, dim) matrix

    @property
    def weight(self) -> torch.Tensor:  # HF code reads embed_tokens.weight (dtype, device, resize)
        return self.source.weight_float()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.source.rows(ids.reshape(-1)).reshape(*ids.shape, -1)


class FakeQuantLinear(nn.Linear):
    """``nn.Linear`` whose forward uses the fake-quantized weight (straight-through gradient): the parameters and
    their names stay those of ``nn.Linear``, so training, checkpoints and export see an ordinary model."""

    bits: int = 4
    group_size: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, fake_quantize(self.weight, self.bits, self.group_size), self.bias)


class FakeQuantEmbedding(nn.Embedding):
    """``nn.Embedding`` looking rows up in the fake-quantized matrix (rows quantized like a linear weight)."""

    bits: int = 4
    group_size: int | None = None

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, fake_quantize(self.weight, self.bits, self.group_size), self.padding_idx)
