"""A decode batch whose rows join and leave at token boundaries (continuous batching), over one KV cache.

    rows = DecodeBatch(model)
    logits = rows.join([[5, 6, 7], [8, 9]], pad_id=0)   # prefill two prompts: (2, vocab) next-token logits
    logits = rows.step(torch.tensor([11, 12]))          # feed one token per row: (2, vocab)
    rows.keep([1])                                      # row 0 finished: drop it from the cache
    logits = rows.join([[3, 4, 5, 6]], pad_id=0)        # a new prompt joins; rows.step then runs all of them

Rows are left-padded: the cache holds ``(rows, heads, width, head_dim)`` keys/values per layer and ``mask``
``(rows, width)`` says which columns are real tokens. A join prefills the new prompts on their own (one
left-padded forward), then pads the shorter of the two caches on the left and stacks them; a row's positions
count only its real tokens, so padding never moves a token. ``keep`` selects rows and crops the columns that
are padding in every row left (a long prompt that finished no longer costs the others attention width).

Joining while other rows run needs a cache whose layers are plain ``DynamicLayer`` s (keys and values grow by
concatenation). A model whose cache is anything else (sliding-window, static, recurrent state) still batches,
but rows join only an empty batch: ``can_join_running`` says which.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from torch.nn import functional as F

from raydistill.tasks.device import module_device


def left_pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(batch, longest)``, padded on the left."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    return input_ids, mask


def _layers(cache) -> list | None:
    """The cache's per-layer objects when every one is a plain growing ``DynamicLayer``, else ``None``."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    if not layers or any(type(layer) is not DynamicLayer or not getattr(layer, "is_initialized", False)
                         for layer in layers):
        return None
    return list(layers)


class DecodeBatch:
    """The running rows of one model: their KV cache, attention mask and positions (see the module doc)."""

    def __init__(self, model: nn.Module):
        self.model, self.device = model, module_device(model)
        self.keep_arg = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.cache, self.mask = None, None  # mask: (rows, width) over the cached columns

    @property
    def rows(self) -> int:
        return 0 if self.mask is None else self.mask.shape[0]

    def can_join_running(self) -> bool:
        """Whether new rows may join while others run (see the module doc)."""
        return self.cache is None or _layers(self.cache) is not None

    def _forward(self, input_ids: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, cache):
        kwargs = {"logits_to_keep": 1} if self.keep_arg else {}
        out = self.model(input_ids=input_ids.to(self.device), attention_mask=mask, position_ids=positions,
                         cache=cache, use_cache=True, **kwargs)
        return out.logits[:, -1, :].float().cpu(), out.cache

    def join(self, ids: list[list[int]], pad_id: int) -> torch.Tensor:
        """Prefill ``ids`` (one token list per new row) and add them as the last rows; returns their next-token
        logits ``(len(ids), vocab)``. The rows already running are not advanced."""
        if self.rows and not self.can_join_running():
            raise RuntimeError("this model's KV cache cannot take rows while others run; join an empty batch")
        input_ids, mask = left_pad(ids, pad_id)
        mask = mask.to(self.device)
        logits, cache = self._forward(input_ids, mask, (mask.cumsum(-1) - 1).clamp(min=0), None)
        if not self.rows:
            self.cache, self.mask = cache, mask
            return logits
        old, new = _layers(self.cache), _layers(cache)
        if new is None:
            raise RuntimeError("this model's KV cache cannot take rows while others run; join an empty batch")
        width = max(self.mask.shape[1], mask.shape[1])
        for a, b in zip(old, new):  # stack the new rows under the old ones, both left-padded to one width
            for name in ("keys", "values"):
                x, y = getattr(a, name), getattr(b, name)
                setattr(a, name, torch.cat([F.pad(x, (0, 0, width - x.shape[2], 0)),
                                            F.pad(y, (0, 0, width - y.shape[2], 0))], dim=0))
        self.mask = torch.cat([F.pad(self.mask, (width - self.mask.shape[1], 0)),
                               F.pad(mask, (width - mask.shape[1], 0))], dim=0)
        return logits

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row (``(rows,)``, in row order); returns the next-token logits ``(rows, vocab)``."""
        mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        positions = self.mask.sum(-1, keepdim=True)  # a row's real tokens so far: the new token's position
        logits, self.cache = self._forward(tokens[:, None], mask, positions, self.cache)
        self.mask = mask
        return logits

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows`` (in that order); drops the columns that are padding in every kept row."""
        if not rows:
            self.cache, self.mask = None, None
            return
        if rows == list(range(self.rows)):
            return
        index = torch.tensor(rows, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        layers = _layers(self.cache)
        pad = int((self.mask.cumsum(-1) == 0).sum(-1).min())  # leading padding shared by every kept row
        if pad and layers is not None:
            for layer in layers:
                layer.keys, layer.values = layer.keys[:, :, pad:], layer.values[:, :, pad:]
            self.mask = self.mask[:, pad:]
