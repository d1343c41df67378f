"""Teacher answers to prompts (``raydistill generate``): prompts read and checked, answers keyed, decoded in
batches, committed in parts, assembled into a chat JSONL.

    python -m pytest tests/unit/test_answers.py

Prompts (:func:`read_prompts`): each line of ``generate.prompts`` is a chat record (``messages``; one trailing
assistant turn is dropped: the teacher answers it anew) or a ``prompt`` record (a string, one user turn; or a
message list). A bad line — not valid JSON, not a prompt record, empty, ending with an assistant turn, or longer
than ``generate.max_prompt_tokens`` once rendered with the chat template — becomes a :class:`BadPrompt` naming
its line; the caller skips or refuses them (``generate.on_bad_prompt``), and lists them either way.

Keys (:func:`plan`). An answer's key is the sha256 of its prompt's messages, its sample index, the generation
settings that change it (temperature, top-p, max tokens, seed), the teacher's identity (weights, architecture,
dtype), the tokenizer and the chat template. Its sampler's seed comes from ``generate.seed`` and the prompt's own
hash, so an answer never depends on which other prompts exist or share its batch. The same prompt twice in the
file is answered once. Batch size and actor count are not in the key: they change where an answer is computed.

Parts (:func:`write_part`, :func:`read_parts`). Answers are committed in part files of one batch each
(``parts/part-<hash of its keys>.jsonl``, written to a temporary and renamed), each line a finished output record
carrying its key. A rerun reads the parts' keys and generates only the answers missing (none when nothing
changed); :func:`assemble` writes the chat JSONL in prompt order from the parts.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from raydistill.tasks.chat import ASSISTANT, ChatError, chat_messages, prompt_text, read_records
from raydistill.tasks.config import GenerateConfig
from raydistill.tasks.fileio import atomic_writer

VERSION = 1  # of the key's recipe and the record layout: a change makes every answer new


@dataclass
class BadPrompt:
    """A prompt line that cannot be answered."""

    where: str
    """``file:line`` (or ``file: row N``)."""
    reason: str
    """What is wrong, e.g. ``empty``, ``not valid JSON (…)``, ``1204 tokens > generate.max_prompt_tokens=1024``."""


@dataclass
class Prompt:
    """A prompt ready for the teacher."""

    where: str
    """``file:line``."""
    messages: list[dict]
    """The conversation to answer (its last turn is not the assistant's)."""
    ids: list[int]
    """Its rendering with the chat template and the generation prompt, as the teacher's token ids."""


@dataclass(frozen=True)
class Job:
    """One answer to produce."""

    key: str
    """Content key of the answer (see the module doc)."""
    prompt: int
    """Index of its :class:`Prompt`."""
    sample: int
    """Which of the ``generate.n`` answers to the prompt."""
    seed: int
    """Its sampler's seed."""


def _messages(record: dict, where: str) -> list[dict]:
    """The conversation to answer, or ChatError/ValueError saying why there is none."""
    if "messages" in record:
        value = record["messages"]
    elif "prompt" in record:
        value = [{"role": "user", "content": record["prompt"]}] if isinstance(record["prompt"], str) else record["prompt"]
    else:
        raise ValueError("no 'messages' or 'prompt' field")
    messages = chat_messages({"messages": value}, where)
    if messages[-1]["role"] == ASSISTANT:
        messages = messages[:-1]  # re-answered by the teacher
    if not messages or not messages[-1]["content"].strip():
        raise ValueError("empty (no text to answer)")
    if messages[-1]["role"] == ASSISTANT:
        raise ValueError("ends with two assistant turns (nothing for the teacher to answer)")
    return messages


def read_prompts(path: str | Path, tokenizer, template: str, gc: GenerateConfig,
                 max_bytes: int) -> tuple[list[Prompt], list[BadPrompt]]:
    """The good prompts of ``path`` in file order, and the bad ones (module doc); nothing raises for one line."""
    prompts, bad = [], []
    for where, record, error in read_records(path, max_bytes):
        if error is not None:
            bad.append(BadPrompt(where, error))
            continue
        try:
            messages = _messages(record, where)
        except (ChatError, ValueError) as e:
            bad.append(BadPrompt(where, str(e).removeprefix(f"{where}: ")))
            continue
        ids = tokenizer(prompt_text(tokenizer, template, messages), add_special_tokens=False)["input_ids"]
        if len(ids) > gc.max_prompt_tokens:
            bad.append(BadPrompt(where, f"over-long: {len(ids)} tokens > generate.max_prompt_tokens="
                                        f"{gc.max_prompt_tokens}"))
            continue
        prompts.append(Prompt(where, messages, list(ids)))
    return prompts, bad


def settings(gc: GenerateConfig, teacher: dict, tokenizer_sha256: str, template: str) -> dict:
    """What every answer's key hashes besides its prompt: the settings that change an answer and what answers.
    ``teacher``: ``tasks.teacher.identity_key_fields`` of the teacher's identity on the device it runs on."""
    return {"version": VERSION, "temperature": gc.temperature, "top_p": gc.top_p, "max_tokens": gc.max_tokens,
            "seed": gc.seed, "teacher": teacher, "tokenizer": tokenizer_sha256,
            "template": hashlib.sha256(template.encode()).hexdigest()}


def _sha(payload) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def plan(prompts: list[Prompt], n: int, key_settings: dict) -> list[Job]:
    """``n`` jobs per prompt in prompt order, each keyed and seeded (module doc); a repeated prompt once."""
    jobs, seen = [], set()
    for i, p in enumerate(prompts):
        prompt_key = _sha(p.messages)
        for j in range(n):
            key = _sha({"messages": p.messages, "sample": j, "settings": key_settings})
            if key in seen:
                continue
            seen.add(key)
            seed = int.from_bytes(hashlib.sha256(f"{key_settings['seed']}:{prompt_key}:{j}".encode()).digest()[:8],
                                  "little") >> 1
            jobs.append(Job(key, i, j, seed))
    return jobs


def answer_batch(model, tokenizer, batch: list[tuple[str, list[int], int]], gc: GenerateConfig) -> list[dict]:
    """Decode one batch of ``(key, prompt ids, seed)`` on an :class:`tasks.generate.Engine` (all rows together,
    each with its own sampler); returns ``{key, text, finish_reason, completion_tokens}`` per entry, in order."""
    from raydistill.tasks.generate import Engine

    engine = Engine(model, tokenizer, max_rows=len(batch))
    done = [engine.add("", ids=ids, seed=seed, max_tokens=gc.max_tokens, temperature=gc.temperature,
                       top_p=gc.top_p, tag=key) for key, ids, seed in batch]
    while not engine.idle:
        engine.step()
    return [{"key": c.tag, "text": c.result["text"], "finish_reason": c.result["finish_reason"],
             "completion_tokens": c.result["usage"]["completion_tokens"]} for c in done]


def output_record(prompt: Prompt, job: Job, answer: dict) -> dict:
    """The chat record written for one answer: the prompt's messages + the answer, and where it came from."""
    return {"messages": [*prompt.messages, {"role": ASSISTANT, "content": answer["text"]}],
            "raydistill": {"key": job.key, "prompt": prompt.where, "sample": job.sample,
                           "finish_reason": answer["finish_reason"], "completion_tokens": answer["completion_tokens"]}}


def part_path(parts_dir: str | Path, keys: list[str]) -> Path:
    """Where the part holding the answers ``keys`` goes (named by their hash: the same batch, the same name)."""
    return Path(parts_dir) / f"part-{_sha(keys)[:24]}.jsonl"


def write_part(parts_dir: str | Path, records: list[dict]) -> Path:
    """Commit one batch's records as a part file (temporary + rename: a reader sees all of it or none)."""
    path = part_path(parts_dir, [r["raydistill"]["key"] for r in records])
    with atomic_writer(path) as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


def read_parts(parts_dir: str | Path) -> dict[str, str]:
    """``{key: record line}`` of every committed part (temporaries, named ``.part-…``, are not parts)."""
    found = {}
    for path in sorted(Path(parts_dir).glob("part-*.jsonl")):
        with open(path, encoding="utf-8") as f:
            for line in f:
                found[json.loads(line)["raydistill"]["key"]] = line.rstrip("\n")
    return found


def assemble(path: str | Path, jobs: list[Job], committed: dict[str, str]) -> int:
    """Write the chat JSONL: one line per job, in job order, from the committed records; returns the lines."""
    with atomic_writer(path) as f:
        for job in jobs:
            f.write(committed[job.key] + "\n")
    return len(jobs)


def batches(jobs: list[Job], size: int) -> Iterator[list[Job]]:
    """``jobs`` in order, ``size`` at a time."""
    for a in range(0, len(jobs), size):
        yield jobs[a:a + size]
