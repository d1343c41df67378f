"""Chat records → token ids with a loss mask on the assistant's tokens → windows with a window mask.

    python -m pytest tests/unit/test_chat.py

Records. A JSONL object or Parquet row is a *chat record* when it holds an OpenAI-style ``messages`` list
(``[{"role": "user", "content": "…"}, {"role": "assistant", …}, …]``) or the ``prompt``/``completion`` pair (two
strings: one user turn and its answer; or two message lists, TRL's conversational form). :func:`chat_messages`
recognises one and returns its messages; a record holding neither is not a chat record (``None``).

Rendering (:func:`render`). The conversation is rendered with the teacher tokenizer's chat template (or
``corpus.chat_template``) and tokenized once, with character offsets. Which tokens are the assistant's is found by
rendering the conversation incrementally: assistant turn k spans the characters between the rendering of the
turns before it *with the generation prompt* (``…<|im_start|>assistant\\n``) and the rendering that includes it,
less trailing whitespace (the template's newline after the end-of-turn token is scaffolding; the end-of-turn
token itself is the answer's, so the student learns to stop). A token is the assistant's when any of its
characters lies in such a span (as in Hugging Face's own mask: a token merging the template's last newline with
the answer's first characters carries answer text). Every partial rendering must be a prefix of the whole one; a
template for which that fails (one that rewrites earlier turns) must mark the answers with ``{% generation %}``
instead, and then Hugging Face's ``return_assistant_tokens_mask`` gives the mask. ``mask="last"`` keeps the last
assistant turn only; ``mask="none"`` puts every token in (the unmasked control).

Length (:func:`fit`). A rendered conversation of more than ``seq_len + 1`` tokens is split (``split``) at
exchange boundaries — before a non-assistant turn that follows an assistant turn, so a question and its answer
stay together — left out with a warning (``skip``) or refused (``refuse``); pieces with no assistant token are
dropped. Nothing is ever cut inside a turn.

Windows. :func:`pack` (streamed in chunks: :func:`pack_iter`) lays pieces into one stream so that no piece
crosses a window (window k is ``stream[k*L : k*L + L + 1]``, as in :mod:`tasks.corpus`), padding with mask 0;
:func:`windows` cuts any masked stream into ``tokens [W, L+1]`` and ``mask [W, L]`` with ``mask[w, j]`` the mask
of token ``j + 1`` (the label of row ``j``: the cache's alignment, row j ↔ token j+1). The cache planner reads chat
files through :mod:`tasks.chatstream`.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Literal

import numpy as np

from raydistill.tasks.config import ConfigError

ASSISTANT = "assistant"
_GENERATION_TAG = ("{% generation %}", "{%- generation %}", "{% generation -%}", "{%- generation -%}")


class ChatError(ConfigError):
    """A chat record or the chat template cannot be used; the message names the record (file and line) and the fix."""


@dataclass
class Rendered:
    """One conversation (or a piece of one) as tokens."""

    ids: np.ndarray
    """int32 ``[T]`` token ids of the rendered conversation."""
    mask: np.ndarray
    """uint8 ``[T]``: 1 on the assistant tokens that carry loss."""
    cuts: list[int]
    """Token indices where the conversation may be split (exchange boundaries), ascending, without 0."""


def _content(message, where: str) -> str:
    content = message.get("content")
    if isinstance(content, list):  # OpenAI content parts: [{"type": "text", "text": "…"}, …]
        if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                   for c in content):
            raise ChatError(f"{where}: only text content parts ({{'type': 'text', 'text': …}}) are supported")
        content = "".join(c["text"] for c in content)
    if not isinstance(content, str):
        raise ChatError(f"{where}: a message's 'content' must be a string, got {type(content).__name__}")
    return content


def _messages(value, where: str) -> list[dict]:
    if not isinstance(value, list) or not value:
        raise ChatError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not m["role"]:
            raise ChatError(f"{where}: message {i} needs a string 'role' (system, user, assistant, …)")
        out.append({"role": m["role"], "content": _content(m, f"{where}: message {i}")})
    return out


def chat_messages(record, where: str = "record") -> list[dict] | None:
    """The messages of a chat record (see the module doc), or None when ``record`` is not one.

    Raises :class:`ChatError` naming ``where`` for a record that is chat-shaped but malformed.
    """
    if not isinstance(record, dict):
        return None
    if "messages" in record:
        return _messages(record["messages"], where)
    if "prompt" in record and "completion" in record:
        prompt, completion = record["prompt"], record["completion"]
        if isinstance(prompt, str) and isinstance(completion, str):
            return [{"role": "user", "content": prompt}, {"role": ASSISTANT, "content": completion}]
        if isinstance(prompt, list) and isinstance(completion, list):
            return _messages(prompt + completion, where)
        raise ChatError(f"{where}: 'prompt' and 'completion' must both be strings or both message lists")
    return None


def chat_template(tokenizer, path: str | None = None) -> str:
    """The Jinja chat template to render with: the file ``path`` (``corpus.chat_template``), else the tokenizer's."""
    if path:
        p = Path(path).expanduser()
        if not p.is_file():
            raise ChatError(f"corpus.chat_template={path!r}: no such file (a Jinja chat template, e.g. one copied "
                            "from a tokenizer_config.json's 'chat_template')")
        return p.read_text(encoding="utf-8")
    template = getattr(tokenizer, "chat_template", None)
    if not template:
        raise ChatError(f"the teacher's tokenizer ({type(tokenizer).__name__}) has no chat template, so chat records "
                        "cannot be rendered; set corpus.chat_template=PATH to a Jinja chat template file")
    return template if isinstance(template, str) else template.get("default", next(iter(template.values())))


def _apply(tokenizer, template: str, messages: list[dict], generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=generation_prompt)


def prompt_text(tokenizer, template: str, messages: list[dict]) -> str:
    """The text a model continues to answer ``messages``: their rendering with the generation prompt."""
    return _apply(tokenizer, template, messages, generation_prompt=True)


def _assistant_spans(tokenizer, template: str, messages: list[dict], full: str, where: str) -> list[tuple]:
    """``[(start, end)]`` character spans of the assistant turns, and the message boundaries, by incremental
    rendering; a ChatError when a partial rendering is not a prefix of ``full``."""
    spans, bounds = [], []
    for k, m in enumerate(messages):
        before = _apply(tokenizer, template, messages[:k], generation_prompt=m["role"] == ASSISTANT) if k else ""
        through = _apply(tokenizer, template, messages[:k + 1])
        if not (full.startswith(before) and full.startswith(through)) or len(through) < len(before):
            raise ChatError(f"{where}: the chat template does not render turn {k} as a prefix of the whole "
                            "conversation, so the assistant's tokens cannot be found by rendering turn by turn; "
                            "use a corpus.chat_template that marks assistant text with {% generation %}")
        bounds.append(len(before) if m["role"] != ASSISTANT else None)
        if m["role"] == ASSISTANT:
            spans.append((len(before), len(before) + len(full[len(before):len(through)].rstrip())))
    return spans, bounds


def render(tokenizer, messages: list[dict], *, template: str, mask: Literal["all", "last", "none"] = "all",
           where: str = "record") -> Rendered:
    """Token ids of the conversation rendered with ``template`` and the loss mask on its assistant tokens."""
    roles = [m["role"] for m in messages]
    if ASSISTANT not in roles:
        raise ChatError(f"{where}: the conversation has no assistant turn (nothing to learn from)")
    if roles[0] == ASSISTANT:
        raise ChatError(f"{where}: the conversation starts with an assistant turn (there is nothing it answers)")
    full = _apply(tokenizer, template, messages)
    enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = np.asarray(enc["input_ids"], dtype=np.int32)
    starts, ends = (np.asarray(x, dtype=np.int64).reshape(len(ids)) for x in zip(*enc["offset_mapping"] or [(), ()]))
    tagged = any(tag in template for tag in _GENERATION_TAG)
    try:
        spans, bounds = _assistant_spans(tokenizer, template, messages, full, where)
    except ChatError:
        if not tagged:
            raise
        spans, bounds = [], []  # the tags give the mask; without prefixes there is no place to split
    if tagged:  # the template says which text is the assistant's
        out = tokenizer.apply_chat_template(messages, chat_template=template, return_dict=True,
                                            return_assistant_tokens_mask=True)
        if list(out["input_ids"]) != ids.tolist():
            raise ChatError(f"{where}: the template's tokens differ from the rendered text's tokens")
        flags = np.asarray(out["assistant_masks"], dtype=np.uint8)
        runs = np.flatnonzero(np.diff(np.concatenate([[0], flags])) == 1)
        if mask == "last" and len(runs):
            flags[:runs[-1]] = 0
    else:
        flags = np.zeros(len(ids), dtype=np.uint8)
        for a, b in spans[-1:] if mask == "last" else spans:
            flags[(starts < b) & (ends > a)] = 1
    if mask == "none":  # the unmasked control: every token carries loss, as in a text corpus
        flags = np.ones(len(ids), dtype=np.uint8)
    previous = [None, *roles[:-1]]
    cuts = [int(np.searchsorted(starts, b)) for b, prev in zip(bounds, previous) if b is not None and prev == ASSISTANT]
    return Rendered(ids, flags, [c for c in cuts if 0 < c < len(ids)])


def fit(conv: Rendered, max_tokens: int, overflow: Literal["split", "skip", "refuse"],
        where: str = "record") -> list[Rendered]:
    """``conv`` as pieces of at most ``max_tokens`` tokens (``seq_len + 1``), each holding assistant tokens.

    ``split``: greedily cut at :attr:`Rendered.cuts` (an exchange longer than ``max_tokens`` is a ChatError);
    ``skip``: a conversation that is too long gives no piece (and a warning naming it); ``refuse``: it is a
    ChatError.
    """
    n = len(conv.ids)
    if n <= max_tokens:
        return [conv] if conv.mask.any() else []
    too_long = f"{where}: the conversation has {n} tokens, more than one window of {max_tokens} (corpus.seq_len + 1)"
    if overflow == "refuse":
        raise ChatError(f"{too_long}; set corpus.chat_overflow=split (cut between exchanges) or skip, or raise "
                        "corpus.seq_len")
    if overflow == "skip":
        warnings.warn(f"{too_long}: skipped (corpus.chat_overflow=skip)", stacklevel=2)
        return []
    pieces, start = [], 0
    bounds = [*conv.cuts, n]
    for i, cut in enumerate(bounds):
        following = bounds[i + 1] if i + 1 < len(bounds) else None
        if following is not None and following - start <= max_tokens:
            continue  # the next exchange still fits in this piece
        if cut - start > max_tokens:
            raise ChatError(f"{too_long}, and one exchange alone (tokens {start}..{cut}) is longer than a window; "
                            "raise corpus.seq_len or set corpus.chat_overflow=skip")
        piece = Rendered(conv.ids[start:cut], conv.mask[start:cut], [c - start for c in conv.cuts if start < c < cut])
        if piece.mask.any():
            pieces.append(piece)
        start = cut
    return pieces


def pack_iter(pieces: Iterable[Rendered], seq_len: int, pad_id: int,
              chunk_tokens: int = 1 << 16) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """:func:`pack` as ``(ids, mask)`` chunks of about ``chunk_tokens`` tokens, consuming ``pieces`` lazily (the
    planner streams a corpus through it); the chunks concatenate to :func:`pack` of the same pieces."""
    L = seq_len
    ids, mask, pos, held, any_piece = [], [], 0, 0, False
    for p in pieces:
        any_piece, n = True, len(p.ids)
        if n > L + 1:
            raise ValueError(f"a piece of {n} tokens does not fit in a window of {L + 1} (use fit() first)")
        if pos % L and (pos // L) * L + L < pos + n - 1:  # its last token would fall past this window's end
            gap = (pos // L + 1) * L - pos
            ids.append(np.full(gap, pad_id, dtype=np.int32))
            mask.append(np.zeros(gap, dtype=np.uint8))
            pos, held = pos + gap, held + gap
        ids.append(p.ids.astype(np.int32))
        mask.append(p.mask.astype(np.uint8))
        pos, held = pos + n, held + n
        if held >= chunk_tokens:
            yield np.concatenate(ids), np.concatenate(mask)
            ids, mask, held = [], [], 0
    if any_piece:
        tail = (1 - pos) % L  # complete the last window: T = W*L + 1
        ids.append(np.full(tail, pad_id, dtype=np.int32))
        mask.append(np.zeros(tail, dtype=np.uint8))
    if ids:
        yield np.concatenate(ids), np.concatenate(mask)


def pack(pieces: list[Rendered], seq_len: int, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """``(ids int32 [T], mask uint8 [T])``: the pieces in order in one stream, none crossing a window of
    :func:`windows` (a piece that does not fit in the rest of the current window starts the next one, the gap
    padded with ``pad_id`` at mask 0); the end is padded to a whole number of windows.

    A piece may share its first token with the window before (windows overlap by one token), but that token is
    only ever a label there, never context the piece needs.
    """
    chunks = list(pack_iter(pieces, seq_len, pad_id))
    if not chunks:
        return np.zeros(0, dtype=np.int32), np.zeros(0, dtype=np.uint8)
    return np.concatenate([c[0] for c in chunks]), np.concatenate([c[1] for c in chunks])


def windows(ids: np.ndarray, mask: np.ndarray, seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(tokens int32 [W, L+1], mask uint8 [W, L])`` of a masked stream, windows as in :mod:`tasks.corpus`
    (window k = ``ids[k*L : k*L + L + 1]``, an incomplete last window dropped); ``mask[k, j]`` is the mask of token
    ``j + 1`` of window k, i.e. of the label of row j."""
    if len(ids) != len(mask):
        raise ValueError(f"{len(ids)} ids but {len(mask)} mask values")
    L = seq_len
    n = max((len(ids) - 1) // L, 0)
    index = np.arange(n)[:, None] * L + np.arange(L + 1)[None, :]
    tokens = np.asarray(ids, dtype=np.int32)[index] if n else np.zeros((0, L + 1), dtype=np.int32)
    rows = np.asarray(mask, dtype=np.uint8)[index[:, 1:]] if n else np.zeros((0, L), dtype=np.uint8)
    return tokens, rows


def masked_stream(conversations, tokenizer, cfg) -> tuple[np.ndarray, np.ndarray]:
    """``(ids, mask)`` of one packed stream (:func:`pack`) of ``conversations`` — ``(where, messages)`` pairs —
    rendered, fitted and packed under ``cfg`` (a ``CorpusConfig``: ``seq_len``, ``chat_mask``, ``chat_template``,
    ``chat_overflow``); :func:`windows` of it are the shard windows and their label mask. Padding is EOS."""
    template = chat_template(tokenizer, cfg.chat_template)
    pieces = []
    for where, messages in conversations:
        conv = render(tokenizer, messages, template=template, mask=cfg.chat_mask, where=where)
        pieces += fit(conv, cfg.seq_len + 1, cfg.chat_overflow, where)
    return pack(pieces, cfg.seq_len, tokenizer.eos_token_id)


def read_records(path: str | Path, max_bytes: int) -> Iterator[tuple[str, dict | None, str | None]]:
    """``(where, record, error)`` for each non-blank line of a ``.jsonl`` (or row of a ``.parquet``) file: exactly
    one of ``record``/``error`` is set, so a caller can report a bad line and go on. A line longer than
    ``max_bytes`` is never read whole."""
    path = Path(path)
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        row = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=1024):
            for record in batch.to_pylist():
                yield f"{path}: row {row}", record, None
                row += 1
        return
    with open(path, "rb") as f:
        lineno = 0
        while raw := f.readline(max_bytes + 2):
            lineno += 1
            where = f"{path}:{lineno}"
            if len(raw.rstrip(b"\r\n")) > max_bytes:
                while raw and not raw.endswith(b"\n"):  # skip the rest of the over-long line
                    raw = f.readline(1 << 20)
                yield where, None, f"longer than {max_bytes} bytes"
                continue
            try:
                line = raw.decode("utf-8").strip()
                if line:
                    record = json.loads(line)
                    yield (where, record, None) if isinstance(record, dict) else (where, None, "not a JSON object")
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                yield where, None, f"not valid JSON ({e.msg if isinstance(e, json.JSONDecodeError) else e.reason})"
