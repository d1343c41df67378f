"""Low-bit weight-only matmuls on CPU, with no dequantized copy of the weights kept between calls.

A :class:`~.qlinear.QuantLinear` is *prepared* on its first forward: its integers go into the layout of a real
low-bit kernel of torch (2.13, CPU, AVX-512 here) and stay there as the only copy:

=========================  ================================================================================
int8, one scale per row    ``torch.ops.aten._weight_int8pack_mm``: int8 weights ``(out, in)`` as stored, bf16
                           activations, one bf16 scale per output row (1 byte per weight in memory)
int4, group 32/64/128/256  ``torch.ops.aten._weight_int4pack_mm_for_cpu`` ("tinygemm"): the weights packed by
                           ``_convert_weight_to_int4pack_for_cpu`` (½ byte per weight) + bf16 scales and zeros
                           ``(in/group, out, 2)`` (the zeros are 0: raydistill's int4 is symmetric)
anything else              no kernel (int8 group-wise, int4 in other groups): the stored integers, dequantized
                           per call in chunks of rows
=========================  ================================================================================

Which path a call takes depends on how many rows (tokens) it multiplies. The packed kernels are
memory-bound: fastest for decoding (a few rows per step, reading ⅛–¼ of fp32's bytes) but per multiply-add
slower than a GEMM, so up to ~2–3× slower than fp32 at prefill sizes. Past :data:`KERNEL_MAX_ROWS` rows a call
dequantizes a chunk of output rows at a time (at most :data:`CHUNK_ELEMENTS` weights, and as many partial
outputs) to bf16, runs the bf16 GEMM on it (AMX/AVX-512-BF16 here) and writes the product straight into its
columns of the result, then frees the chunk: the transient is a few MB whatever the layer. Dequantizing costs
per weight, the kernels per weight and row, so the crossover is a number of rows whatever the layer's shape;
measured on this shared machine (noisy): ~90–150 rows for int8 (``_weight_int8pack_mm``), a few hundred for
int4 (its dequantization unpacks nibbles in several passes) on the demo student's 576×1536 and 576×49152 layers.

Scales are bf16 numbers (:func:`snap`, applied when quantizing), so the kernels' bf16 scales are exactly the
stored ones, and GGUF's f16 block scales hold them exactly too (:mod:`.export_gguf`).

The int4 kernel's layout (AVX-512: blocks of 64 output rows, ``[block][k][32 bytes]``, low nibble = row j,
high nibble = row j+32) is read back by :func:`int4_unpack` for embedding rows, prefill dequantization and
saving. Whether the layout is the one this code reads is checked once per process on a probe matrix
(:func:`int4_layout_known`); where it is not (another ISA, or a layer whose out-features are not a multiple of
64) the layer also keeps its stored integers, at ½ byte per weight more.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

INT4_GROUPS = (32, 64, 128, 256)  # group sizes _weight_int4pack_mm_for_cpu takes
KERNEL_MAX_ROWS = {8: 128, 4: 256}  # rows per call up to which the packed kernel beats dequantize + bf16 GEMM
CHUNK_ELEMENTS = 1 << 23  # weights dequantized at once past KERNEL_MAX_ROWS (16 MiB of bf16)
BLOCK_N = 64  # output rows per block of the AVX-512 int4 layout


def aligned(t: torch.Tensor) -> torch.Tensor:
    """``t`` contiguous at a 64-byte aligned address (the packed kernels load with aligned AVX-512 loads and
    crash on a tensor read straight out of a safetensors file at an odd offset)."""
    if t.is_contiguous() and t.data_ptr() % 64 == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def snap(scale: torch.Tensor) -> torch.Tensor:
    """``scale`` rounded to the nearest bf16 number, kept float32: what the bf16 kernels compute with."""
    return scale.to(torch.bfloat16).to(torch.float32)


def int4_pack(q: torch.Tensor) -> torch.Tensor:
    """Kernel layout ``(out, in/2)`` uint8 of symmetric int4 integers ``q`` ``(out, in)`` in -7..7."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu((q.to(torch.int32) + 8).contiguous(), 1)


def _nibbles(packed: torch.Tensor, k: int) -> torch.Tensor:
    """``(blocks, k, 64)`` uint8 nibbles of the kernel layout: ``[b, c, j]`` = weight of row ``64b + j``,
    column ``c``. Four bytes per int32 op (uint8 ops are slow on CPU)."""
    words = packed.view(torch.int32).view(-1, k, BLOCK_N // 8)
    out = torch.empty(words.shape[0], k, 2, BLOCK_N // 8, dtype=torch.int32)
    torch.bitwise_and(words, 0x0F0F0F0F, out=out[:, :, 0])
    torch.bitwise_and(words >> 4, 0x0F0F0F0F, out=out[:, :, 1])
    return out.view(torch.uint8).view(-1, k, BLOCK_N)


def int4_unpack(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Integers ``(out, in)`` int8 (-8..7) from the AVX-512 kernel layout (``out`` a multiple of 64)."""
    nib = _nibbles(packed, k)
    return (nib.permute(0, 2, 1).reshape(-1, k).to(torch.int8) - 8)


def int4_rows(packed: torch.Tensor, k: int, ids: torch.Tensor) -> torch.Tensor:
    """Integers ``(len(ids), in)`` int8 of the rows ``ids`` of a kernel-layout weight (embedding lookups)."""
    blocks = packed.view(-1, k, BLOCK_N // 2)
    j = ids % BLOCK_N
    b = blocks[ids // BLOCK_N, :, j % (BLOCK_N // 2)]  # (n, k) bytes
    return ((b >> (4 * (j // (BLOCK_N // 2)))[:, None].to(torch.uint8)) & 0x0F).to(torch.int8) - 8


@functools.cache
def int4_layout_known() -> bool:
    """Whether this machine's int4 kernel packs as :func:`int4_unpack` reads (checked on a probe matrix)."""
    try:
        q = torch.randint(-7, 8, (2 * BLOCK_N, 64), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
        packed = int4_pack(q)
        return packed.shape == (2 * BLOCK_N, 32) and torch.equal(int4_unpack(packed, 64), q)
    except (RuntimeError, NotImplementedError):
        return False


def int4_kernel_ok(out_features: int, in_features: int, group_size: int) -> bool:
    """Whether ``_weight_int4pack_mm_for_cpu`` can run this layer (its packing needs ``out`` a multiple of 16)."""
    return group_size in INT4_GROUPS and in_features % group_size == 0 and out_features % 16 == 0


def prepare(q: torch.Tensor, scale: torch.Tensor, bits: int) -> dict:
    """The run-time form of one layer from its integers ``q`` ``(out, in)`` int8 and float32 ``scale``
    ``(out, groups)``: ``{"kind": "int8"|"int4"|"dequant", ...}``; ``keeps_integers`` says whether the layer
    must also keep its stored integers (no readable kernel layout)."""
    out, n = q.shape
    group = n // scale.shape[1]
    if bits == 8 and scale.shape[1] == 1:
        return {"kind": "int8", "q": aligned(q), "scale": scale[:, 0].to(torch.bfloat16), "keeps_integers": False}
    if bits == 4 and int4_kernel_ok(out, n, group):
        sz = torch.stack([scale.t().to(torch.bfloat16), torch.zeros(scale.shape[::-1], dtype=torch.bfloat16)], -1)
        readable = int4_layout_known() and out % BLOCK_N == 0
        return {"kind": "int4", "packed": int4_pack(q), "sz": sz.contiguous(), "group": group,
                "keeps_integers": not readable}
    return {"kind": "dequant", "keeps_integers": True}


def _dequant_rows(rt: dict, stored, scale, n0: int, n1: int) -> torch.Tensor:
    """bf16 weights of output rows ``n0:n1`` (``(n1-n0, in)``), from the kernel layout where possible, else
    from ``stored(n0, n1)`` (the stored integers of those rows) and ``scale``."""
    if rt["kind"] == "int8":  # int8 × bf16 promotes in one pass (scaling the weights, not the larger output)
        return rt["q"][n0:n1] * rt["scale"][n0:n1, None]
    if rt["kind"] == "int4" and not rt["keeps_integers"]:
        k, g = rt["packed"].shape[1] * 2, rt["group"]
        b0, b1 = n0 // BLOCK_N, n1 // BLOCK_N
        nib = _nibbles(rt["packed"].view(-1, k * BLOCK_N // 2)[b0:b1], k)  # (blocks, k, 64)
        w = nib.view(b1 - b0, k // g, g, BLOCK_N).to(torch.bfloat16).sub_(8)
        s = rt["sz"][:, n0:n1, 0].reshape(k // g, b1 - b0, BLOCK_N).permute(1, 0, 2)  # (blocks, groups, 64)
        w.mul_(s[:, :, None, :])
        return w.view(b1 - b0, k, BLOCK_N).permute(0, 2, 1).reshape(n1 - n0, k)
    qs, s = stored(n0, n1).to(torch.bfloat16), scale[n0:n1].to(torch.bfloat16)
    return qs.view(n1 - n0, s.shape[1], -1).mul_(s[..., None]).view(n1 - n0, -1)


def linear(x: torch.Tensor, rt: dict, stored, scale, out_features: int, bias: torch.Tensor | None = None
           ) -> torch.Tensor:
    """``x (..., in) @ Wᵀ + bias`` in ``x``'s dtype ``(..., out)``, the products in bf16. ``stored(n0, n1)``:
    int8 integers of rows ``n0:n1`` and ``scale``: float32 ``(out, groups)``, used only by a layer that keeps
    its stored integers."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).to(torch.bfloat16)
    rows = x2.shape[0]
    if rt["kind"] != "dequant" and rows <= KERNEL_MAX_ROWS[8 if rt["kind"] == "int8" else 4]:
        if rt["kind"] == "int8":
            y = torch.ops.aten._weight_int8pack_mm(aligned(x2), rt["q"], rt["scale"])
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(aligned(x2), rt["packed"], rt["group"], rt["sz"])
        y = y.to(x.dtype) if bias is None else y.to(x.dtype) + bias.to(x.dtype)
        return y.reshape(*x.shape[:-1], out_features)
    # chunks of output rows: the dequantized weights and the bf16 partial outputs stay a few MB, and each partial
    # output is converted straight into its columns of the result in x's dtype (no full-size bf16 copy of a
    # 49k-wide lm_head output to convert afterwards)
    step = max(BLOCK_N, min(CHUNK_ELEMENTS // k, CHUNK_ELEMENTS // max(rows, 1)) // BLOCK_N * BLOCK_N)
    y = torch.empty(rows, out_features, dtype=x.dtype)
    for n0 in range(0, out_features, step):
        n1 = min(out_features, n0 + step)
        y[:, n0:n1] = F.linear(x2, _dequant_rows(rt, stored, scale, n0, n1))
    if bias is not None:
        y += bias.to(y.dtype)
    return y.reshape(*x.shape[:-1], out_features)
