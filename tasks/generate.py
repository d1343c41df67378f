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
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass
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
             seed: int | None | list = None) -> list[dict]:
    """Complete each prompt; one dict per prompt (see the module doc for the semantics).

    Returns ``[{text, tokens, token_ids, token_logprobs, top_logprobs, finish_reason, usage}]``: ``tokens`` are
    the decoded strings of the generated tokens, ``token_logprobs`` their log-probabilities, ``top_logprobs``
    one ``{token: logprob}`` dict of the ``logprobs`` most likely tokens per position (``None`` when
    ``logprobs`` is ``None``; ``token_logprobs`` is always filled), ``usage`` the prompt/completion token counts.
    """
    if isinstance(prompts, str) or not prompts:
        raise ValueError("prompts must be a non-empty list of strings")
    n = len(prompts)
    max_tokens, temperature = _per_prompt(max_tokens, n, "max_tokens"), _per_prompt(temperature, n, "temperature")
    logprobs, seed = _per_prompt(logprobs, n, "logprobs"), _per_prompt(seed, n, "seed")
    vocab = model.get_output_embeddings().out_features if hasattr(model, "get_output_embeddings") else None
    _check(max_tokens, temperature, logprobs, vocab or 1 << 30)
    ids = encode_prompts(tokenizer, prompts)
    for i, x in enumerate(ids):
        if not x:
            raise ValueError(f"prompt {i} is empty (no tokens)")
    model.eval()
    stop = eos_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (min(stop) if stop else 0)
    decoder = _Decoder(model, *_left_pad(ids, pad_id))
    generators = [_generator(s) if t > 0 else None for s, t in zip(seed, temperature)]
    out = [{"token_ids": [], "token_logprobs": [], "top": [], "finish_reason": None} for _ in range(n)]
    kmax = max((k for k in logprobs if k), default=0)
    for _ in range(max(max_tokens)):
        logits = decoder.step()
        logp = torch.log_softmax(logits, dim=-1)
        chosen = _choose(logits, temperature, generators)
        top = logp.topk(kmax, dim=-1) if kmax else None
        for i, o in enumerate(out):
            if o["finish_reason"]:
                continue
            tok = int(chosen[i])
            if tok in stop:
                o["finish_reason"] = "stop"
                continue
            o["token_ids"].append(tok)
            o["token_logprobs"].append(float(logp[i, tok]))
            if logprobs[i]:
                o["top"].append(list(zip(top.indices[i, :logprobs[i]].tolist(),
                                         top.values[i, :logprobs[i]].tolist())))
            if len(o["token_ids"]) >= max_tokens[i]:
                o["finish_reason"] = "length"
        if all(o["finish_reason"] for o in out):
            break
        decoder.feed(chosen)
    return [_result(tokenizer, o, len(x), logprobs[i]) for i, (o, x) in enumerate(zip(out, ids))]


def _result(tokenizer, o: dict, prompt_tokens: int, logprobs: int | None) -> dict:
    tokens = [tokenizer.decode([t]) for t in o["token_ids"]]
    top = None
    if logprobs is not None:
        top = []
        for alternatives in (o["top"] or [[] for _ in tokens]):
            d = {}
            for tid, lp in alternatives:
                d.setdefault(tokenizer.decode([tid]), lp)  # two ids may decode alike: keep the likelier
            top.append(d)
    n = len(o["token_ids"])
    return {"text": tokenizer.decode(o["token_ids"], skip_special_tokens=True), "tokens": tokens,
            "token_ids": o["token_ids"], "token_logprobs": o["token_logprobs"], "top_logprobs": top,
            "finish_reason": o["finish_reason"],
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": n, "total_tokens": prompt_tokens + n}}


# -------------------------------------------------------------------------------------------------------
# OpenAI-style request bodies (pure; the Serve app maps RequestError to HTTP 400)
# -------------------------------------------------------------------------------------------------------

class RequestError(ValueError):
    """A completion request is invalid; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class CompletionRequest:
    prompts: tuple[str, ...]
    max_tokens: int = 16
    temperature: float = 1.0
    logprobs: int | None = None
    seed: int | None = None


_UNSUPPORTED = {"stream": (None, False), "echo": (None, False), "n": (None, 1), "best_of": (None, 1),
                "stop": (None,), "suffix": (None,)}


def _int_field(body: dict, name: str, default, low: int, high: int | None):
    value = body.get(name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"'{name}' must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        raise RequestError(f"'{name}' must be in [{low}, {high if high is not None else '∞'}], got {value}", name)
    return value


def parse_completion_request(body, *, max_tokens_limit: int, max_prompts: int, max_prompt_chars: int,
                             max_logprobs: int = 20) -> CompletionRequest:
    """Check an OpenAI ``/v1/completions`` body; raise :class:`RequestError` saying what is wrong.

    ``prompt`` (a non-empty string or a list of 1..``max_prompts`` of them, each ≤ ``max_prompt_chars``),
    ``max_tokens`` (1..``max_tokens_limit``, default 16), ``temperature`` (0..2, default 1), ``logprobs``
    (null or 0..``max_logprobs``), ``seed`` (null or an integer). Streaming, ``echo``, ``n``/``best_of`` > 1,
    ``stop`` and ``suffix`` are refused rather than silently ignored; other OpenAI fields are ignored.
    """
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    if "prompt" not in body:
        raise RequestError("'prompt' is required", "prompt")
    prompt = body["prompt"]
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
        raise RequestError("'prompt' must be a string or a list of strings", "prompt")
    if not 1 <= len(prompts) <= max_prompts:
        raise RequestError(f"'prompt' must hold 1 to {max_prompts} prompts, got {len(prompts)}", "prompt")
    for p in prompts:
        if not p:
            raise RequestError("'prompt' must not be empty", "prompt")
        if len(p) > max_prompt_chars:
            raise RequestError(f"a prompt is {len(p)} characters long; the limit is {max_prompt_chars}", "prompt")
    temperature = body.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise RequestError(f"'temperature' must be a number in [0, 2], got {temperature!r}", "temperature")
    for name, allowed in _UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise RequestError(f"'{name}'={body[name]!r} is not supported by this server", name)
    if "model" in body and not isinstance(body["model"], str):
        raise RequestError("'model' must be a string", "model")
    return CompletionRequest(
        prompts=tuple(prompts),
        max_tokens=_int_field(body, "max_tokens", min(16, max_tokens_limit), 1, max_tokens_limit),
        temperature=float(temperature),
        logprobs=_int_field(body, "logprobs", None, 0, max_logprobs),
        seed=_int_field(body, "seed", None, 0, 2**63 - 1),
    )
