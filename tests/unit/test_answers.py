"""Teacher answers: prompts checked line by line (bad ones named, none lost), answers keyed by content (stable when
prompts are added, new when a setting changes), each answer's sample independent of its batch, parts committed
whole and assembled in prompt order into chat records."""

from __future__ import annotations

import dataclasses
import json

import pytest

from raydistill.tasks import answers
from raydistill.tasks.chat import chat_messages, chat_template, prompt_text
from raydistill.tasks.config import GenerateConfig, load_config
from raydistill.tasks.teacher import identity_key_fields, load_teacher, teacher_identity

GOOD = [{"prompt": "Name a colour."},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "old answer"}]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Why?"}]}]


def _write(path, lines):
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


@pytest.fixture(scope="module")
def teacher():
    return load_teacher(load_config("tiny").teacher)[0]


def _settings(tok, gc=GenerateConfig()):
    cfg = load_config("tiny")
    return answers.settings(gc, identity_key_fields(teacher_identity(cfg.teacher)), "tok-sha", chat_template(tok))


def test_bad_prompts_are_named_by_line_and_the_good_ones_all_kept(tiny_tokenizer, tmp_path):
    path = _write(tmp_path / "p.jsonl", [GOOD[0], "{oops", {"prompt": "   "}, GOOD[1], {"text": "no prompt"},
                                         {"prompt": "word " * 300}, "",
                                         {"messages": [{"role": "user", "content": "a"},
                                                       {"role": "assistant", "content": "b"},
                                                       {"role": "assistant", "content": "c"}]},
                                         GOOD[2], {"messages": [{"content": "no role"}]}])
    tok = tiny_tokenizer
    prompts, bad = answers.read_prompts(path, tok, chat_template(tok), GenerateConfig(max_prompt_tokens=200), 10**6)
    assert [p.where.rsplit(":", 1)[1] for p in prompts] == ["1", "4", "9"]
    assert prompts[1].messages == GOOD[1]["messages"][:1]  # the old answer is dropped: the teacher answers anew
    assert prompts[0].messages == [{"role": "user", "content": "Name a colour."}]
    assert prompts[2].ids == tok(prompt_text(tok, chat_template(tok), GOOD[2]["messages"]),
                                 add_special_tokens=False)["input_ids"]
    reasons = {b.where.rsplit(":", 1)[1]: b.reason for b in bad}
    assert set(reasons) == {"2", "3", "5", "6", "8", "10"}
    assert reasons["2"].startswith("not valid JSON") and reasons["3"].startswith("empty")
    assert reasons["5"] == "no 'messages' or 'prompt' field"
    assert reasons["6"].startswith("over-long:") and "generate.max_prompt_tokens=200" in reasons["6"]
    assert "two assistant turns" in reasons["8"] and "role" in reasons["10"]


def test_answer_keys_are_stable_as_prompts_are_added_and_change_with_a_setting(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    read = lambda lines: answers.read_prompts(_write(tmp_path / "p.jsonl", lines), tok, chat_template(tok),  # noqa
                                              GenerateConfig(), 10**6)[0]
    s = _settings(tok)
    few = answers.plan(read(GOOD[:2]), 2, s)
    more = answers.plan(read([GOOD[2], *GOOD[:2], GOOD[0]]), 2, s)  # a new prompt first, one repeated
    assert len(few) == 4 and len(more) == 6  # the repeated prompt is answered once
    assert {(j.key, j.seed) for j in few} <= {(j.key, j.seed) for j in more}
    assert len({j.seed for j in more}) == 6 and len({j.key for j in more}) == 6
    hotter = answers.plan(read(GOOD[:2]), 2, _settings(tok, GenerateConfig(temperature=1.0)))
    assert not {j.key for j in hotter} & {j.key for j in few}
    other_teacher = answers.plan(read(GOOD[:2]), 2, {**s, "teacher": {**s["teacher"], "weights_sha256": "x"}})
    assert not {j.key for j in other_teacher} & {j.key for j in few}
    assert [j.key for j in answers.plan(read(GOOD[:2]), 2, dict(s))] == [j.key for j in few]


def test_an_answer_does_not_depend_on_its_batch_and_greedy_equals_the_engines(tiny_tokenizer, teacher, tmp_path):
    tok = tiny_tokenizer
    prompts, _ = answers.read_prompts(_write(tmp_path / "p.jsonl", GOOD), tok, chat_template(tok),
                                      GenerateConfig(), 10**6)
    jobs = answers.plan(prompts, 1, _settings(tok))
    gc = GenerateConfig(max_tokens=6, temperature=1.0, top_p=0.9)
    batch = [(j.key, prompts[j.prompt].ids, j.seed) for j in jobs]
    together = answers.answer_batch(teacher, tok, batch, gc)
    alone = answers.answer_batch(teacher, tok, batch[1:2], gc)
    assert alone == together[1:2] and [a["key"] for a in together] == [j.key for j in jobs]
    assert all(a["completion_tokens"] <= 6 and a["finish_reason"] in ("stop", "length") for a in together)
    from raydistill.tasks.generate import complete

    greedy = answers.answer_batch(teacher, tok, batch, dataclasses.replace(gc, temperature=0.0))
    ref = complete(teacher, tok, [prompt_text(tok, chat_template(tok), p.messages) for p in prompts], max_tokens=6)
    assert [a["text"] for a in greedy] == [r["text"] for r in ref]


def test_parts_commit_whole_and_assemble_into_chat_records_in_prompt_order(tiny_tokenizer, tmp_path):
    tok = tiny_tokenizer
    prompts, _ = answers.read_prompts(_write(tmp_path / "p.jsonl", GOOD), tok, chat_template(tok),
                                      GenerateConfig(), 10**6)
    jobs = answers.plan(prompts, 1, _settings(tok))
    fake = {j.key: {"text": f"answer {i}", "finish_reason": "stop", "completion_tokens": 2}
            for i, j in enumerate(jobs)}
    parts = tmp_path / "out" / "parts"
    for batch in answers.batches(jobs[::-1], 2):  # committed out of order
        answers.write_part(parts, [answers.output_record(prompts[j.prompt], j, fake[j.key]) for j in batch])
    (parts / ".part-x.jsonl.abc.tmp").write_text("half a line")  # a crashed write's temporary is no part
    committed = answers.read_parts(parts)
    assert set(committed) == {j.key for j in jobs}
    out = tmp_path / "out" / "answers.jsonl"
    assert answers.assemble(out, jobs, committed) == 3
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    for i, (line, p) in enumerate(zip(lines, prompts)):
        msgs = chat_messages(line)
        assert msgs == [*p.messages, {"role": "assistant", "content": f"answer {i}"}]
        assert line["raydistill"]["prompt"] == p.where and line["raydistill"]["key"] == jobs[i].key
