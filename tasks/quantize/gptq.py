"""GPTQ (Frantar et al., 2023): int4 group-wise weights chosen column by column so that each column's rounding
error is compensated by the columns not yet quantized, weighted by the layer's input Hessian ``H = 2 XᵀX / n``.

One pass: every linear layer's Hessian is collected from the *float* model on the calibration windows (the
paper quantizes block by block and feeds each block the previous blocks' quantized outputs; the one-pass
variant is simpler and close on small models). The per-group scale is taken from the *updated* weights when
the column loop enters the group, as in the reference implementation.
"""

from __future__ import annotations

import torch
from torch import nn

from raydistill.tasks.quantize.qlinear import _groups, qmax, scales_for


def hessians(model: nn.Module, names: list[str], windows: torch.Tensor, batch_size: int = 4) -> dict:
    """``{name: H (in, in) float64}`` from forward passes of ``windows`` ``(N, L)`` token ids through ``model``."""
    sums, counts, hooks = {}, {}, []

    def hook(name):
        def fn(module, args, output):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[name] = sums.get(name, 0) + x.T @ x
            counts[name] = counts.get(name, 0) + x.shape[0]
        return fn

    for name in names:
        hooks.append(model.get_submodule(name).register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            for i in range(0, windows.shape[0], batch_size):
                model(input_ids=windows[i:i + batch_size], use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return {n: 2 * sums[n] / counts[n] for n in sums}


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, bits: int, group_size: int | None, *,
                  damp: float = 0.01, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q int8 (out, in), scale float32 (out, groups))`` for weight ``w`` ``(out, in)`` and Hessian ``h``."""
    w = w.detach().double().clone()
    out, n = w.shape
    g = _groups(n, group_size)
    h = h.double().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    h += damp * torch.diag(h).mean() * torch.eye(n, dtype=h.dtype)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(out, n, dtype=torch.int8)
    scale = torch.zeros(out, n // g, dtype=torch.float32)
    top = qmax(bits)
    for b0 in range(0, n, block):
        b1 = min(b0 + block, n)
        err = torch.zeros(out, b1 - b0, dtype=w.dtype)
        for i in range(b0, b1):
            if i % g == 0:
                scale[:, i // g] = scales_for(w[:, i:i + g], bits, None)[:, 0]
            s = scale[:, i // g].double()
            qi = torch.round(w[:, i] / s).clamp(-top, top)
            q[:, i] = qi.to(torch.int8)
            e = (w[:, i] - qi * s) / hinv[i, i]
            w[:, i:b1] -= e[:, None] * hinv[i, i:b1][None]
            err[:, i - b0] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]  # the block's errors, applied to the later columns at once
    return q, scale


def gptq_integers(model: nn.Module, names: list[str], windows: torch.Tensor, bits: int,
                  group_size: int | None) -> dict:
    """``{name: (q, scale)}`` for the named linear layers of the float ``model``."""
    hs = hessians(model, names, windows)
    return {n: gptq_quantize(model.get_submodule(n).weight.data, hs[n], bits, group_size) for n in names}
