"""Batched text completion with per-token log-probabilities (OpenAI completions style). Used by Serve.

    from raydistill.tasks.generate import complete
    out = complete(model, tokenizer, ["ROMEO.\\nBut soft", "JULIET.\\n"], max_tokens=16, temperature=0.0,
                   logprobs=3, seed=0)
    out[0]["text"], out[0]["token_logprobs"], out[0]["top_logprobs"], out[0]["finish_reason"]

Prompts are tokenized as plain text (no BOS/EOS added: the students are trained on packed raw text), left-padded
into one batch and decoded step by step with the KV cache. ``temperature == 0`` is greedy (deterministic);
otherwise each prompt samples from ``softmax(logits / temperature)`` with its own ``torch.Generator`` seeded by
its ``seed``, so a prompt's sample does not depend on what else is in the batch. Generation of a prompt stops at
an end-of-sequence token (``finish_reason: "stop"``, the EOS itself is not returned) or after ``max_tokens``
(``"length"``).

Log-probabilities are the model's own (``log_softmax`` of the logits at temperature 1), whatever temperature
was used to pick the token: they score the text, as OpenAI's ``logprobs`` do. ``max_tokens``, ``temperature``,
``logprobs`` and ``seed`` may be one value for all prompts or a list with one value per prompt (so one forward
batch can serve requests with different settings).

Per prompt, ``stop`` lists strings that end the completion where they first appear in the generated text (the
text is cut before them, ``finish_reason: "stop"``); ``cancel`` holds objects with ``is_set()`` (a
``threading.Event``) checked between tokens: a set one ends that prompt at once (``finish_reason:
"cancelled"``) and the batch stops when no prompt is left, so a caller that went away frees the forward batch;
``on_token`` holds callbacks called after each generated token with ``{"delta", "token", "token_id",
"logprob", "top_logprobs"}`` (``delta`` is the new text, held back while it may be the start of a stop
string), which is how a server streams. The callbacks run on the generating thread.
"""

from __future__ import annotations

import inspect
import os
from typing import Sequence

import torch
from torch import nn

from raydistill.tasks.device import module_device


def encode_prompts(tokenizer, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of each prompt (plain text, no special tokens added)."""
    return [list(tokenizer(p, add_special_tokens=False)["input_ids"]) for p in prompts]


def eos_ids(model: nn.Module, tokenizer) -> set[int]:
    """Ids that end a completion: the tokenizer's EOS and the model's generation-config EOS ids."""
    ids = set()
    for value in (getattr(tokenizer, "eos_token_id", None),
                  getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


def _per_prompt(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name}: {len(value)} values for {n} prompts")
        return list(value)
    return [value] * n


def _check(max_tokens: list, temperature: list, logprobs: list, vocab: int) -> None:
    for m in max_tokens:
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {m!r}")
    for t in temperature:
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {t!r}")
    for k in logprobs:
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= vocab):
            raise ValueError(f"logprobs must be null or an integer in [0, {vocab}], got {k!r}")


def _left_pad(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, attention_mask)``, both ``(batch, longest)``, padded on the left."""
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, width - len(x):] = torch.tensor(x, dtype=torch.long)
        mask[i, width - len(x):] = 1
    return input_ids, mask


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


class _Decoder:
    """Step-by-step forward with the KV cache over a left-padded batch."""

    def __init__(self, model: nn.Module, input_ids: torch.Tensor, mask: torch.Tensor):
        device = module_device(model)  # the model's; sampling and log-probs stay on the CPU (CPU generators)
        self.model, self.mask, self.cache = model, mask.to(device), None
        self.keep = "logits_to_keep" in inspect.signature(model.forward).parameters
        self.next_ids = input_ids.to(device)
        self.positions = (self.mask.cumsum(-1) - 1).clamp(min=0)

    def step(self) -> torch.Tensor:
        """Logits ``(batch, vocab)`` for the next token after everything fed so far."""
        kwargs = {"logits_to_keep": 1} if self.keep else {}
        out = self.model(input_ids=self.next_ids, attention_mask=self.mask, position_ids=self.positions,
                         cache=self.cache, use_cache=True, **kwargs)
        self.cache = out.cache
        return out.logits[:, -1, :].float().cpu()

    def feed(self, tokens: torch.Tensor) -> None:
        """Append one token per row (``(batch,)``)."""
        self.next_ids = tokens[:, None].to(self.mask.device)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        self.positions = self.positions[:, -1:] + 1


class _Text:
    """The text of one prompt's generated tokens: cut at the first stop string, and the streamed part held back
    while its end may begin a stop string (or is an incomplete UTF-8 character)."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.ids, self.text, self.sent = [], "", 0

    def push(self, token_id: int) -> tuple[str, bool]:
        """Add a token; returns ``(new text safe to send, whether a stop string was reached)``."""
        self.ids.append(token_id)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        hits = [text.find(s) for s in self.stop if s in text]
        if hits:
            self.text = text[:min(hits)]
            return self.flush(), True
        hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
        if text.endswith("\ufffd"):
            hold = max(hold, 1)
        self.text = text
        safe = text[:len(text) - hold]
        delta, self.sent = safe[self.sent:], max(self.sent, len(safe))
        return delta, False

    def flush(self) -> str:
        """The text not sent yet (at the end of the completion)."""
        delta, self.sent = self.text[self.sent:], len(self.text)
        return delta


def _choose(logits: torch.Tensor, temperature: list, generators: list) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a draw from ``softmax(logits / T)``."""
    chosen = logits.argmax(dim=-1)
    for i, t in enumerate(temperature):
        if t > 0:
            probs = torch.softmax(logits[i] / t, dim=-1)
            chosen[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return chosen


@torch.inference_mode()
def complete(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_tokens: int | list[int] = 16,
             temperature: float | list[float] = 0.0, logprobs: int | None | list = None,
             seed: int | None | list = None, stop: Sequence[str] | list | None = None,
             cancel: Sequence | None = None, on_token: Sequence | None = None) -> list[dict]:
    """Complete each prompt; one dict per prompt (see the module doc for the semantics).

    Returns ``[{text, tokens, token_ids, token_logprobs, top_logprobs, finish_reason, usage}]``: ``tokens`` are
    the decoded strings of the generated tokens, ``token_logprobs`` their log-probabilities, ``top_logprobs``
    one ``{token: logprob}`` dict of the ``logprobs`` most likely tokens per position (``None`` when
    ``logprobs`` is ``None``; ``token_logprobs`` is always filled), ``usage`` the prompt/completion token counts.
    ``stop``, ``cancel`` and ``on_token`` are ``None`` or one entry per prompt (``stop`` may also be one list
    of strings for all).
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    n = len(prompts)
    max_tokens, temperature = _per_prompt(max_tokens, n, "max_tokens"), _per_prompt(temperature, n, "temperature")
    logprobs, seed = _per_prompt(logprobs, n, "logprobs"), _per_prompt(seed, n, "seed")
    if stop is None or (isinstance(stop, (list, tuple)) and all(isinstance(x, str) for x in stop)):
        stop = [list(stop or [])] * n
    stop, cancel, on_token = _per_prompt(list(stop), n, "stop"), _per_prompt(cancel, n, "cancel"), \
        _per_prompt(on_token, n, "on_token")
    vocab = model.get_output_embeddings().out_features if hasattr(model, "get_output_embeddings") else None
    _check(max_tokens, temperature, logprobs, vocab or 1 << 30)
    ids = encode_prompts(tokenizer, prompts)
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompt {i} is empty (no tokens)")
    model.eval()
    eos = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(eos) if eos else 0)
    decoder = _Decoder(model, *_left_pad(ids, pad_id))
    generators = [_generator(s) if t > 0 else None for s, t in zip(seed, temperature)]
    out = [{"token_ids": [], "token_logprobs": [], "top": [], "finish_reason": None,
            "text": _Text(tokenizer, st) if (st or cb) else None} for st, cb in zip(stop, on_token)]
    kmax = max((k for k in logprobs if k), default=0)
    for _ in range(max(max_tokens)):
        for o, c in zip(out, cancel):
            if c is not None and c.is_set() and not o["finish_reason"]:
                o["finish_reason"] = "cancelled"
        if all(o["finish_reason"] for o in out):
            break
        logits = decoder.step()
        logp = torch.log_softmax(logits, dim=-1)
        chosen = _choose(logits, temperature, generators)
        top = logp.topk(kmax, dim=-1) if kmax else None
        for i, o in enumerate(out):
            if not o["finish_reason"]:
                _advance(tokenizer, o, i, int(chosen[i]), logp, top, eos, logprobs[i], max_tokens[i], on_token[i])
        if all(o["finish_reason"] for o in out):
            break
        decoder.feed(chosen)
    return [_result(tokenizer, o, len(x), logprobs[i]) for i, (o, x) in enumerate(zip(out, ids))]


def _advance(tokenizer, o: dict, i: int, tok: int, logp, top, eos: set, k: int | None, limit: int, on_token):
    """Row ``i`` of the batch takes token ``tok``: record it, check EOS / stop strings / length, report it."""
    if tok in eos:
        o["finish_reason"] = "stop"
        if on_token is not None:
            on_token({"delta": o["text"].flush(), "token": None, "token_id": None, "logprob": None,
                      "top_logprobs": None})
        return
    o["token_ids"].append(tok)
    o["token_logprobs"].append(float(logp[i, tok]))
    alternatives = None
    if k:
        o["top"].append(list(zip(top.indices[i, :k].tolist(), top.values[i, :k].tolist())))
        alternatives = _top_dict(tokenizer, o["top"][-1])
    delta, stopped = o["text"].push(tok) if o["text"] is not None else ("", False)
    if stopped:
        o["finish_reason"] = "stop"
    elif len(o["token_ids"]) >= limit:
        o["finish_reason"] = "length"
        delta += o["text"].flush() if o["text"] is not None else ""
    if on_token is not None:
        on_token({"delta": delta, "token": tokenizer.decode([tok]), "token_id": tok,
                  "logprob": o["token_logprobs"][-1], "top_logprobs": alternatives})


def _top_dict(tokenizer, alternatives: list) -> dict:
    d = {}
    for tid, lp in alternatives:
        d.setdefault(tokenizer.decode([tid]), lp)  # two ids may decode alike: keep the likelier
    return d


def _result(tokenizer, o: dict, prompt_tokens: int, logprobs: int | None) -> dict:
    tokens = [tokenizer.decode([t]) for t in o["token_ids"]]
    top = None
    if logprobs is not None:
        top = [_top_dict(tokenizer, alternatives) for alternatives in (o["top"] or [[] for _ in tokens])]
    n = len(o["token_ids"])
    text = o["text"].text if o["text"] is not None else tokenizer.decode(o["token_ids"], skip_special_tokens=True)
    return {"text": text, "tokens": tokens,
            "token_ids": o["token_ids"], "token_logprobs": o["token_logprobs"], "top_logprobs": top,
            "finish_reason": o["finish_reason"],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}}
