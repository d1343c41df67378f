"""Batched text completion with per-token log-probabilities (OpenAI completions style). Used by Serve.

    from raydistill.tasks.generate import complete
    out = complete(model, tokenizer, ["ROMEO.\\nBut soft", "JULIET.\\n"], max_tokens=16, temperature=0.0,
                   logprobs=3, seed=0)
    out[0]["text"], out[0]["token_logprobs"], out[0]["top_logprobs"], out[0]["finish_reason"]

Prompts are tokenized as plain text (no BOS/EOS added: the students are trained on packed raw text), left-padded
into one batch and decoded step by step with the KV cache. :class:`Engine` batches continuously: a prompt added
while others run joins the batch at the next token, and a finished one leaves it (``tasks.kvbatch``); ``complete``
starts all its prompts together on one. ``temperature == 0`` is greedy (deterministic);
otherwise each prompt samples from ``softmax(logits / temperature)`` with its own ``torch.Generator`` seeded by
its ``seed``, so a prompt's sample does not depend on what else is in the batch. ``top_p`` < 1 samples from the
nucleus only: the most likely tokens whose probabilities (at the temperature) first sum to ``top_p`` or more,
renormalised; ``top_p = 1`` draws exactly as without it. Generation of a prompt stops at
an end-of-sequence token (``finish_reason: "stop"``, the EOS itself is not returned) or after ``max_tokens``
(``"length"``).

Log-probabilities are the model's own (``log_softmax`` of the logits at temperature 1), whatever temperature
was used to pick the token: they score the text, as OpenAI's ``logprobs`` do. ``max_tokens``, ``temperature``,
``top_p``, ``logprobs`` and ``seed`` may be one value for all prompts or a list with one value per prompt (so one forward
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

import os
from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import nn

from raydistill.tasks.kvbatch import DecodeBatch


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


def _check(max_tokens: list, temperature: list, logprobs: list, vocab: int, top_p: list = ()) -> None:
    for m in max_tokens:
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ValueError(f"max_tokens must be an integer >= 1, got {m!r}")
    for t in temperature:
        if not isinstance(t, (int, float)) or isinstance(t, bool) or not t >= 0:
            raise ValueError(f"temperature must be a number >= 0, got {t!r}")
    for p in top_p:
        if not isinstance(p, (int, float)) or isinstance(p, bool) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
    for k in logprobs:
        if k is not None and (not isinstance(k, int) or isinstance(k, bool) or not 0 <= k <= vocab):
            raise ValueError(f"logprobs must be null or an integer in [0, {vocab}], got {k!r}")


def _generator(seed: int | None) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed(seed if seed is not None else int.from_bytes(os.urandom(8), "little") >> 1)
    return g


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


def nucleus(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """``probs`` ``(..., V)`` with everything outside the top-``top_p`` nucleus set to 0 (not renormalised): the
    most likely tokens whose mass first reaches ``top_p``; the most likely token always stays."""
    if top_p >= 1:
        return probs
    sorted_p, order = probs.sort(dim=-1, descending=True)
    outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # the mass before a token already reaches top_p
    return probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))


def _choose(logits: torch.Tensor, temperature: list, generators: list, top_p: list | None = None) -> torch.Tensor:
    """Next token per row: argmax at temperature 0, else a draw from ``softmax(logits / T)`` (its top-p
    :func:`nucleus`)."""
    chosen = logits.argmax(dim=-1)
    for i, t in enumerate(temperature):
        if t > 0:
            probs = nucleus(torch.softmax(logits[i] / t, dim=-1), top_p[i] if top_p else 1.0)
            chosen[i] = torch.multinomial(probs, 1, generator=generators[i])[0]
    return chosen


@dataclass(eq=False)
class Completion:
    """One prompt being completed by an :class:`Engine`; ``result`` is set when it finishes."""

    ids: list[int]
    """The prompt's token ids."""
    max_tokens: int
    """Tokens to generate at most (``finish_reason: "length"``)."""
    temperature: float
    """0: greedy; else sampled from ``softmax(logits / temperature)``."""
    logprobs: int | None
    """Alternatives per position in ``top_logprobs`` (``None``: no ``top_logprobs``)."""
    generator: torch.Generator | None
    """Its own sampler (``None`` when greedy), so a sample does not depend on the batch."""
    cancel: object = None
    """Anything with ``is_set()``; a set one ends the completion at the next token (``"cancelled"``)."""
    on_token: object = None
    """Called on the generating thread after each token (streaming; see the module doc)."""
    tag: object = None
    """The caller's: whatever it needs to route the result (a server's request)."""
    top_p: float = 1.0
    """Nucleus sampling: draw only among the most likely tokens holding this much mass (1: all of them)."""
    state: dict = field(default_factory=dict)
    """Tokens, log-probs, alternatives, text and finish reason so far (what ``_advance`` fills)."""
    next_id: int = 0
    """The token chosen last, fed to the model at the next step."""
    result: dict | None = None
    """The finished completion (``complete``'s dict), ``None`` until then."""


class Engine:
    """Continuous batching over one model: completions join the running decode batch at token boundaries (a
    prefill of their own, ``tasks.kvbatch``) and leave it when they finish, so a long completion never holds
    the batch and a new request never waits for the batch to drain (``max_rows`` rows at most)."""

    def __init__(self, model: nn.Module, tokenizer, max_rows: int):
        model.eval()
        self.model, self.tokenizer, self.max_rows = model, tokenizer, max_rows
        self.eos = eos_ids(model, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos, default=0)
        out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.vocab = getattr(out, "out_features", None) or 1 << 30
        self.rows, self.running, self.waiting = DecodeBatch(model), [], deque()
        self.steps = self.joins = self.row_steps = 0

    def add(self, prompt: str, *, max_tokens: int = 16, temperature: float = 0.0, logprobs: int | None = None,
            seed: int | None = None, stop: Sequence[str] = (), cancel=None, on_token=None, tag=None,
            ids: Sequence[int] | None = None, top_p: float = 1.0) -> Completion:
        """Queue one prompt (it joins at the next :meth:`step` with room); bad settings raise ``ValueError``.
        ``ids``: the prompt's token ids when the caller has them already (this engine's tokenizer's)."""
        _check([max_tokens], [temperature], [logprobs], self.vocab, [top_p])
        ids = list(ids) if ids is not None else encode_prompts(self.tokenizer, [prompt])[0]
        if not ids:
            raise ValueError("a prompt is empty (no tokens)")
        c = Completion(ids, max_tokens, temperature, logprobs, _generator(seed) if temperature > 0 else None,
                       cancel, on_token, tag, top_p)
        c.state = {"token_ids": [], "token_logprobs": [], "top": [], "finish_reason": None,
                   "text": _Text(self.tokenizer, stop) if (stop or on_token) else None}
        self.waiting.append(c)
        return c

    @property
    def idle(self) -> bool:
        return not self.running and not self.waiting

    @torch.inference_mode()
    def step(self) -> list[Completion]:
        """Cancel what was cancelled, admit waiting prompts, generate one token for every running completion;
        returns the completions that finished (their ``result`` set)."""
        done = [c for c in [*self.running, *self.waiting] if c.cancel is not None and c.cancel.is_set()]
        for c in done:
            c.state["finish_reason"] = "cancelled"
        self.waiting = deque(c for c in self.waiting if not c.state["finish_reason"])
        self._keep()
        logits = self.rows.step(torch.tensor([c.next_id for c in self.running])) if self.running else None
        admit = []
        if not self.running or self.rows.can_join_running():
            while self.waiting and len(self.running) + len(admit) < self.max_rows:
                admit.append(self.waiting.popleft())
        if admit:
            joined = self.rows.join([c.ids for c in admit], self.pad_id)
            logits = joined if logits is None else torch.cat([logits, joined])
            self.running, self.joins = self.running + admit, self.joins + 1
        if self.running:
            self._advance_all(logits)
        done += [c for c in self.running if c.state["finish_reason"]]
        self._keep()
        for c in done:
            c.result = _result(self.tokenizer, c.state, len(c.ids), c.logprobs)
        return done

    def _advance_all(self, logits: torch.Tensor) -> None:
        logp = torch.log_softmax(logits, dim=-1)
        chosen = _choose(logits, [c.temperature for c in self.running], [c.generator for c in self.running],
                         [c.top_p for c in self.running])
        kmax = max((c.logprobs or 0 for c in self.running), default=0)
        top = logp.topk(kmax, dim=-1) if kmax else None
        for i, c in enumerate(self.running):
            c.next_id = int(chosen[i])
            _advance(self.tokenizer, c.state, i, c.next_id, logp, top, self.eos, c.logprobs, c.max_tokens,
                     c.on_token)
        self.steps, self.row_steps = self.steps + 1, self.row_steps + len(self.running)

    def _keep(self) -> None:
        """Drop finished rows from the decode batch."""
        keep = [i for i, c in enumerate(self.running) if not c.state["finish_reason"]]
        if len(keep) < len(self.running):
            self.rows.keep(keep)
            self.running = [self.running[i] for i in keep]


_SETTINGS = ("max_tokens", "temperature", "logprobs", "seed", "stop", "cancel", "on_token", "top_p")


def complete(model: nn.Module, tokenizer, prompts: Sequence[str], *, max_tokens: int | list[int] = 16,
             temperature: float | list[float] = 0.0, logprobs: int | None | list = None,
             seed: int | None | list = None, stop: Sequence[str] | list | None = None,
             cancel: Sequence | None = None, on_token: Sequence | None = None,
             top_p: float | list[float] = 1.0) -> list[dict]:
    """Complete each prompt; one dict per prompt (see the module doc for the semantics). All prompts start as
    one left-padded batch on an :class:`Engine`; each leaves it when it finishes.

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
    top_p = _per_prompt(top_p, n, "top_p")
    engine = Engine(model, tokenizer, max_rows=n)  # add() checks each prompt's settings
    completions = []
    for i, args in enumerate(zip(prompts, max_tokens, temperature, logprobs, seed, stop, cancel, on_token, top_p)):
        try:
            completions.append(engine.add(args[0], **dict(zip(_SETTINGS, args[1:]))))
        except ValueError as e:
            raise ValueError(f"prompt {i}: {e}") from None
    while not engine.idle:
        engine.step()
    return [c.result for c in completions]


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
