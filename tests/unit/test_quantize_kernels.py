"""Low-bit layers run on torch's packed int8/int4 CPU kernels, keep no dequantized copy, and give their stored
integers back exactly (tasks/quantize/kernels.py, QuantLinear)."""

import pytest
import torch
import torch.nn.functional as F

from raydistill.tasks.quantize import kernels
from raydistill.tasks.quantize.qlinear import QuantLinear, dequantize, rtn

G = torch.Generator().manual_seed(0)


def layer(bits, out=128, n=64, group=32, bias=True):
    w = torch.randn(out, n, generator=G) * 0.05
    q, s = rtn(w, bits, group)
    return QuantLinear.from_weights(q, s, torch.randn(out, generator=G) if bias else None, bits), q, s


def reference(x, q, s, bias):
    """The dequantized bf16 matmul the kernels stand for."""
    y = F.linear(x.bfloat16(), dequantize(q, s).bfloat16())
    return (y + bias.bfloat16() if bias is not None else y).float()


def held_bytes(lin: QuantLinear) -> int:
    """Bytes of every tensor the layer holds (buffers and its run-time form)."""
    tensors = [t for t in lin.buffers()] + [v for v in (lin._rt or {}).values() if isinstance(v, torch.Tensor)]
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


@pytest.mark.skipif(not kernels.int4_layout_known(), reason="this CPU's int4 kernel packs in another layout")
def test_the_int4_kernel_layout_reads_back_exactly_rows_included():
    q = torch.randint(-7, 8, (192, 96), generator=G, dtype=torch.int8)
    packed = kernels.int4_pack(q)
    assert packed.shape == (192, 48) and packed.dtype == torch.uint8
    assert torch.equal(kernels.int4_unpack(packed, 96), q)
    ids = torch.tensor([0, 31, 32, 63, 64, 191, 5, 5])
    assert torch.equal(kernels.int4_rows(packed, 96, ids), q[ids])


@pytest.mark.parametrize("bits,group,kind", [(8, None, "int8"), (4, 32, "int4"), (4, 64, "int4"),
                                             (8, 32, "dequant"), (4, 16, "dequant")])
@pytest.mark.parametrize("rows", [3, 300])  # 3: the packed kernel; 300: dequantize in chunks + bf16 GEMM
def test_both_paths_compute_the_dequantized_matmul(monkeypatch, bits, group, kind, rows):
    monkeypatch.setattr(kernels, "CHUNK_ELEMENTS", 64 * 64)  # several chunks even on a small layer
    lin, q, s = layer(bits, out=192, group=group)
    x = torch.randn(rows, 64, generator=G)
    with torch.no_grad():
        y = lin(x)
    assert lin._rt["kind"] == kind and y.dtype == x.dtype
    ref = reference(x, q, s, lin.bias)
    # bf16 activations and outputs: both compute the same products, rounded differently (a few bf16 ulps)
    assert (y - ref).abs().max() <= 2e-2 * ref.abs().max(), (y - ref).abs().max()


@pytest.mark.parametrize("bits,group,bytes_per_weight", [(8, None, 1.0), (4, 32, 0.5 + 4 / 32)])
def test_a_used_layer_holds_its_integers_once_and_no_float_copy(bits, group, bytes_per_weight):
    lin, q, s = layer(bits, out=256, n=128, group=group)
    stored = {k: v.clone() for k, v in lin.state_dict().items()}
    with torch.no_grad():
        lin(torch.randn(4, 128, generator=G))
        lin(torch.randn(300, 128, generator=G))
    if kernels.int4_layout_known() or bits == 8:
        assert lin.qweight is None and lin.scale is None  # the kernel form is the only copy
        weights = 256 * 128
        assert held_bytes(lin) <= weights * bytes_per_weight + 256 * 4 + 256 * 2  # + bias + int8's bf16 scales
    again = lin.state_dict()  # read back from the kernel form: exactly what was stored
    assert again.keys() == stored.keys() and all(torch.equal(again[k], stored[k]) for k in stored)
    assert torch.equal(lin.weight_float(), dequantize(q, s))
    ids = torch.tensor([3, 0, 255, 3])
    assert torch.equal(lin.rows(ids), dequantize(q[ids], s[ids]))


def test_a_layer_whose_kernel_layout_cannot_be_read_keeps_its_integers():
    lin, q, s = layer(4, out=32, group=32)  # 32 output rows: a partial block of the int4 layout
    with torch.no_grad():
        y = lin(torch.randn(2, 64, generator=G))
    assert lin._rt["kind"] == "int4" and lin._rt["keeps_integers"] and lin.qweight is not None
    assert torch.equal(lin.integers()[0], q) and y.shape == (2, 32)


def test_integers_at_an_odd_address_are_realigned_for_the_kernel():
    """safetensors hands out tensors at any offset of its buffer; AVX-512 aligned loads would crash on them."""
    lin, q, s = layer(8, group=None)
    raw = torch.empty(q.numel() + 40, dtype=torch.int8)
    odd = raw[40:].view(q.shape)
    odd.copy_(q)
    lin.qweight = odd
    assert odd.data_ptr() % 64 != 0
    with torch.no_grad():
        y = lin(torch.randn(2, 64, generator=G))
    assert lin._rt["q"].data_ptr() % 64 == 0 and torch.isfinite(y).all()


def test_loading_integers_into_a_used_layer_replaces_them():
    a, _, _ = layer(4, out=128)
    b, qb, sb = layer(4, out=128)
    with torch.no_grad():
        a(torch.randn(2, 64, generator=G))
    a.load_state_dict(b.state_dict())
    assert a._rt is None and torch.equal(a.integers()[0], qb) and torch.equal(a.integers()[1], sb)


def test_scales_are_bf16_numbers():
    _, q, s = layer(4)
    assert torch.equal(s, s.bfloat16().float())


def test_a_layer_the_int4_kernel_cannot_pack_runs_dequantized_per_call():
    lin, q, s = layer(4, out=40, group=32)  # the packing needs a multiple of 16 output rows (a vocabulary may not be)
    x = torch.randn(3, 64, generator=G)
    with torch.no_grad():
        y = lin(x)
    assert lin._rt["kind"] == "dequant" and lin.qweight is not None
    assert (y - reference(x, q, s, lin.bias)).abs().max() <= 2e-2 * y.abs().max()
