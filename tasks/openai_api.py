"""OpenAI-style request bodies and response objects for ``/v1/completions`` and ``/v1/chat/completions`` (pure).

    req = parse_completion_request(body, max_tokens_limit=256, max_prompts=8, max_prompt_chars=16384)
    req = parse_chat_request(body, max_tokens_limit=256, max_prompt_chars=16384)
    prompt = chat_prompt(tokenizer, req.messages)          # the tokenizer's chat template, or RequestError

Both parsers return a :class:`CompletionRequest` (``complete``'s settings per prompt) or raise
:class:`RequestError` naming the offending field (the Serve app answers HTTP 400 with it). The response builders
turn ``tasks.generate.complete`` results into the objects the official ``openai`` client reads: full responses,
and the chunks of a ``stream: true`` response (server-sent events, ended by ``data: [DONE]``). Every response
also carries ``raydistill`` (``{"version", "alias", "quantized", "quantization"}``): which model answered.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass


class RequestError(ValueError):
    """A request is invalid; ``param`` names the offending field."""

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


@dataclass(frozen=True)
class CompletionRequest:
    prompts: tuple[str, ...]
    """The prompts (a chat request has one, set by the server from ``messages`` with the chat template)."""
    max_tokens: int = 16
    """Most tokens generated per prompt."""
    temperature: float = 1.0
    """0 is greedy."""
    logprobs: int | None = None
    """Alternatives per position to return (``None``: no log-probs in the response)."""
    seed: int | None = None
    """Sampling seed."""
    stop: tuple[str, ...] = ()
    """Strings that end the completion (not included in the text)."""
    stream: bool = False
    """Answer as server-sent events."""
    include_usage: bool = False
    """``stream_options.include_usage``: a last chunk with the token counts."""
    messages: tuple = ()
    """Chat requests: the ``messages`` (dicts with ``role`` and text ``content``)."""


_UNSUPPORTED = {"echo": (None, False), "n": (None, 1), "best_of": (None, 1), "suffix": (None,),
                "tools": (None, []), "response_format": (None, {"type": "text"})}
_ROLES = ("system", "user", "assistant", "developer")


def _int_field(body: dict, name: str, default, low: int, high: int | None):
    value = body.get(name, default)
    if value is None and default is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        raise RequestError(f"'{name}' must be an integer, got {value!r}", name)
    if value < low or (high is not None and value > high):
        raise RequestError(f"'{name}' must be in [{low}, {high if high is not None else '∞'}], got {value}", name)
    return value


def _common(body, max_tokens_limit: int, tokens_field: str = "max_tokens") -> dict:
    """The fields both endpoints share: sampling, ``stop``, ``stream``, refusals of what is not supported."""
    if not isinstance(body, dict):
        raise RequestError("the request body must be a JSON object")
    temperature = body.get("temperature", 1.0)
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not 0 <= temperature <= 2:
        raise RequestError(f"'temperature' must be a number in [0, 2], got {temperature!r}", "temperature")
    for name, allowed in _UNSUPPORTED.items():
        if name in body and body[name] not in allowed:
            raise RequestError(f"'{name}'={body[name]!r} is not supported by this server", name)
    if "model" in body and not isinstance(body["model"], str):
        raise RequestError("'model' must be a string", "model")
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else (stop or [])
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(f"'stop' must be a non-empty string or a list of up to 4 of them, got {body['stop']!r}",
                           "stop")
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"'stream' must be true or false, got {stream!r}", "stream")
    options = body.get("stream_options") or {}
    if not isinstance(options, dict):
        raise RequestError("'stream_options' must be an object", "stream_options")
    limit = body.get(tokens_field, body.get("max_completion_tokens", min(16, max_tokens_limit)))
    return {"max_tokens": _int_field({tokens_field: limit}, tokens_field, 16, 1, max_tokens_limit),
            "temperature": float(temperature), "seed": _int_field(body, "seed", None, 0, 2**63 - 1),
            "stop": tuple(stop), "stream": bool(stream), "include_usage": bool(options.get("include_usage"))}


def parse_completion_request(body, *, max_tokens_limit: int, max_prompts: int, max_prompt_chars: int,
                             max_logprobs: int = 20) -> CompletionRequest:
    """Check an OpenAI ``/v1/completions`` body; raise :class:`RequestError` saying what is wrong.

    ``prompt`` (a non-empty string or a list of 1..``max_prompts`` of them, each ≤ ``max_prompt_chars``),
    ``max_tokens`` (1..``max_tokens_limit``, default 16), ``temperature`` (0..2, default 1), ``logprobs``
    (null or 0..``max_logprobs``), ``seed`` (null or an integer), ``stop`` (a string or up to 4), ``stream``.
    ``echo``, ``n``/``best_of`` > 1 and ``suffix`` are refused rather than silently ignored; other OpenAI
    fields are ignored.
    """
    common = _common(body, max_tokens_limit)
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
    if common["stream"] and len(prompts) > 1:
        raise RequestError("'stream': true takes one prompt, not a list", "stream")
    return CompletionRequest(prompts=tuple(prompts), logprobs=_int_field(body, "logprobs", None, 0, max_logprobs),
                             **common)


def parse_chat_request(body, *, max_tokens_limit: int, max_prompt_chars: int,
                       max_logprobs: int = 20) -> CompletionRequest:
    """Check an OpenAI ``/v1/chat/completions`` body: ``messages`` (roles system/developer/user/assistant, text
    content), ``logprobs`` (bool) with ``top_logprobs`` (0..``max_logprobs``), and the fields of
    :func:`parse_completion_request` but ``prompt``. ``prompts`` is left empty: :func:`chat_prompt` renders it."""
    common = _common(body, max_tokens_limit)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects", "messages")
    checked = []
    for m in messages:
        if not isinstance(m, dict) or m.get("role") not in _ROLES:
            raise RequestError(f"each message needs a 'role' in {list(_ROLES)}, got {m!r}"[:300], "messages")
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(isinstance(c, dict) and c.get("type") == "text" for c in content):
                raise RequestError("only text content parts are supported", "messages")
            content = "".join(str(c.get("text", "")) for c in content)
        if not isinstance(content, str):
            raise RequestError("a message's 'content' must be a string or a list of text parts", "messages")
        checked.append({"role": "system" if m["role"] == "developer" else m["role"], "content": content})
    if sum(len(m["content"]) for m in checked) > max_prompt_chars:
        raise RequestError(f"the messages are longer than {max_prompt_chars} characters", "messages")
    want = body.get("logprobs", False)
    if want is not None and not isinstance(want, bool):
        raise RequestError(f"'logprobs' must be true or false for chat, got {want!r}", "logprobs")
    top = _int_field(body, "top_logprobs", 0, 0, max_logprobs) if want else None
    if body.get("top_logprobs") and not want:
        raise RequestError("'top_logprobs' needs 'logprobs': true", "top_logprobs")
    return CompletionRequest(prompts=(), logprobs=top, messages=tuple(checked), **common)


def chat_prompt(tokenizer, messages) -> str:
    """The prompt text of ``messages`` under the tokenizer's chat template, ready for the assistant's turn."""
    if not getattr(tokenizer, "chat_template", None):
        raise RequestError("this model's tokenizer has no chat template, so /v1/chat/completions cannot format "
                           "'messages'; use /v1/completions with a plain 'prompt' instead", "messages")
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=False)


# -------------------------------------------------------------------------------------------------------
# responses
# -------------------------------------------------------------------------------------------------------

def _usage(outs: list[dict]) -> dict:
    return {k: sum(o["usage"][k] for o in outs) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}


def _chat_logprob(token: str, logprob: float, top: dict | None) -> dict:
    alternatives = [{"token": t, "logprob": lp, "bytes": list(t.encode())} for t, lp in (top or {}).items()]
    return {"token": token, "logprob": logprob, "bytes": list(token.encode()), "top_logprobs": alternatives}


def completion_response(req: CompletionRequest, outs: list[dict], model_id: str, extra: dict) -> dict:
    choices = []
    for i, (prompt, o) in enumerate(zip(req.prompts, outs)):
        logprobs = None
        if req.logprobs is not None:
            offsets, at = [], len(prompt)
            for t in o["tokens"]:
                offsets.append(at)
                at += len(t)
            logprobs = {"tokens": o["tokens"], "token_logprobs": o["token_logprobs"],
                        "top_logprobs": o["top_logprobs"], "text_offset": offsets}
        choices.append({"text": o["text"], "index": i, "logprobs": logprobs, "finish_reason": o["finish_reason"]})
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_id, "choices": choices, "usage": _usage(outs), "raydistill": extra}


def chat_response(req: CompletionRequest, out: dict, model_id: str, extra: dict) -> dict:
    logprobs = None
    if req.logprobs is not None:
        logprobs = {"content": [_chat_logprob(t, lp, top) for t, lp, top in
                                zip(out["tokens"], out["token_logprobs"], out["top_logprobs"])]}
    choice = {"index": 0, "message": {"role": "assistant", "content": out["text"]}, "logprobs": logprobs,
              "finish_reason": out["finish_reason"]}
    return {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion", "created": int(time.time()),
            "model": model_id, "choices": [choice], "usage": _usage([out]), "raydistill": extra}


def stream_chunk(req: CompletionRequest, head: dict, event: dict | None, finish_reason: str | None = None) -> dict:
    """One chunk of a streamed response: ``event`` is ``complete``'s ``on_token`` report (``None`` for the
    opening chat chunk carrying the role); ``head`` holds ``id``, ``created``, ``model``, ``raydistill``."""
    chat = bool(req.messages)
    event = event or {"delta": "", "token": None}
    logprobs = None
    if req.logprobs is not None and event.get("token") is not None:
        if chat:
            logprobs = {"content": [_chat_logprob(event["token"], event["logprob"], event["top_logprobs"])]}
        else:
            logprobs = {"tokens": [event["token"]], "token_logprobs": [event["logprob"]],
                        "top_logprobs": [event["top_logprobs"] or {}]}
    if chat:
        delta = {"content": event["delta"]} if event.get("token") is not None or event["delta"] else {}
        if not event.get("token") and finish_reason is None and not event["delta"]:
            delta = {"role": "assistant", "content": ""}
        choice = {"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": event["delta"], "logprobs": logprobs, "finish_reason": finish_reason}
        obj = "text_completion"
    return {**head, "object": obj, "choices": [choice]}


def stream_head(req: CompletionRequest, model_id: str, extra: dict) -> dict:
    prefix = "chatcmpl" if req.messages else "cmpl"
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "created": int(time.time()), "model": model_id,
            "raydistill": extra}


def usage_chunk(req: CompletionRequest, head: dict, out: dict) -> dict:
    """The last chunk when ``stream_options.include_usage``: no choices, the token counts."""
    obj = "chat.completion.chunk" if req.messages else "text_completion"
    return {**head, "object": obj, "choices": [], "usage": _usage([out])}
