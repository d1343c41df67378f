"""Chat records: recognised in their two shapes, rendered with SmolLM2's real chat template with loss only on the
assistant's tokens (checked against Hugging Face's own ``{% generation %}`` mask), split between exchanges when
too long, packed into windows whose mask rows line up with the labels."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from raydistill.tasks.chat import (ChatError, Rendered, chat_messages, chat_template, fit, masked_stream, pack,
                                   read_records, render, windows)

CONV = [{"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Tell me a joke"},
        {"role": "assistant", "content": "No."}]

# SmolLM2's template with the assistant's text marked for Hugging Face's return_assistant_tokens_mask: the
# reference the incremental rendering must agree with
TAGGED = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
          "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
          "{% endif %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}{% generation %}"
          "{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\n' }}{% else %}"
          "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}{% endif %}"
          "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def _masked_text(tok, r: Rendered) -> str:
    return tok.decode(r.ids[r.mask == 1].tolist())


def test_records_with_messages_or_a_prompt_completion_pair_are_chat_and_text_records_are_not():
    assert chat_messages({"messages": CONV}) == CONV
    assert chat_messages({"prompt": "Hi", "completion": "Hello"}) == [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]
    assert chat_messages({"prompt": CONV[:1], "completion": CONV[1:2]}) == CONV[:2]
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}]}
    assert chat_messages(parts)[0]["content"] == "ab"
    assert chat_messages({"text": "plain"}) is None
    with pytest.raises(ChatError, match="f.jsonl:3: message 1 needs a string 'role'"):
        chat_messages({"messages": [CONV[0], {"content": "x"}]}, "f.jsonl:3")
    with pytest.raises(ChatError, match="both be strings or both message lists"):
        chat_messages({"prompt": "Hi", "completion": ["x"]})


def test_only_the_assistant_answers_and_their_end_of_turn_tokens_carry_loss(tiny_tokenizer):
    tok = tiny_tokenizer
    r = render(tok, CONV, template=chat_template(tok))
    assert r.ids.tolist() == tok.apply_chat_template(CONV, tokenize=True, return_dict=True)["input_ids"]
    assert _masked_text(tok, r) == "Hello! How can I help?<|im_end|>No.<|im_end|>"
    last = render(tok, CONV, template=chat_template(tok), mask="last")
    assert _masked_text(tok, last) == "No.<|im_end|>"
    assert r.mask.dtype == np.uint8 and r.ids.dtype == np.int32


def test_the_incremental_mask_equals_hugging_faces_generation_tag_mask(tiny_tokenizer):
    tok = tiny_tokenizer
    convs = [CONV, [{"role": "system", "content": "Be brief."}, *CONV],
             [{"role": "user", "content": "  spaces\n\n"}, {"role": "assistant", "content": "\n ok \n"}]]
    for conv in convs:
        for mask in ("all", "last"):
            mine = render(tok, conv, template=chat_template(tok), mask=mask)
            ref = render(tok, conv, template=TAGGED, mask=mask)  # return_assistant_tokens_mask path
            assert mine.ids.tolist() == ref.ids.tolist()
            assert mine.mask.tolist() == ref.mask.tolist(), (conv, mask)


def test_a_tokenizer_without_a_chat_template_is_an_error_naming_the_setting(tiny_tokenizer, tmp_path):
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    with pytest.raises(ChatError, match="corpus.chat_template=PATH"):
        chat_template(bare)
    path = tmp_path / "t.jinja"
    path.write_text(TAGGED)
    assert chat_template(bare, str(path)) == TAGGED
    with pytest.raises(ChatError, match="no such file"):
        chat_template(bare, str(tmp_path / "missing.jinja"))


def test_a_template_that_rewrites_earlier_turns_is_refused_with_the_fix(tiny_tokenizer):
    rewriting = "{% for m in messages %}{% if loop.last %}LAST {% endif %}{{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ChatError, match="generation"):
        render(tiny_tokenizer, CONV, template=rewriting, where="c.jsonl:7")


def test_conversations_without_an_answer_or_opening_with_one_are_refused(tiny_tokenizer):
    t = chat_template(tiny_tokenizer)
    with pytest.raises(ChatError, match="c.jsonl:2: the conversation has no assistant turn"):
        render(tiny_tokenizer, CONV[:1], template=t, where="c.jsonl:2")
    with pytest.raises(ChatError, match="starts with an assistant turn"):
        render(tiny_tokenizer, CONV[1:], template=t)


def test_a_long_conversation_is_split_between_exchanges_never_inside_a_turn(tiny_tokenizer):
    tok = tiny_tokenizer
    conv = [{"role": "system", "content": "Be brief."}]
    for i in range(4):
        conv += [{"role": "user", "content": f"Question {i} about the weather?"},
                 {"role": "assistant", "content": f"Answer {i}: sunny with some clouds."}]
    r = render(tok, conv, template=chat_template(tok))
    assert len(r.cuts) == 3
    pieces = fit(r, 48, "split")
    assert len(pieces) >= 2 and all(len(p.ids) <= 48 for p in pieces)
    assert np.concatenate([p.ids for p in pieces]).tolist() == r.ids.tolist()  # nothing lost, nothing cut
    assert np.concatenate([p.mask for p in pieces]).tolist() == r.mask.tolist()
    for p in pieces[1:]:
        assert tok.decode(p.ids[:3].tolist()).startswith("<|im_start|>user")
    with pytest.raises(ChatError, match="one exchange alone"):
        fit(r, 20, "split")
    with pytest.raises(ChatError, match="corpus.chat_overflow=split"):
        fit(r, 48, "refuse", "c.jsonl:9")
    with pytest.warns(UserWarning, match="skipped"):
        assert fit(r, 48, "skip") == []
    assert fit(r, len(r.ids), "refuse") == [r]


def test_pieces_are_packed_so_none_crosses_a_window_and_mask_rows_are_the_labels_masks():
    L = 8
    rng = np.random.default_rng(0)
    pieces = [Rendered(rng.integers(10, 99, n).astype(np.int32), (rng.random(n) < 0.5).astype(np.uint8), [])
              for n in (5, 7, 9, 3, 2, 9, 6)]
    for p in pieces:
        p.mask[0] = 0  # a conversation never opens with an answer token
    ids, mask = pack(pieces, L, pad_id=0)
    assert (len(ids) - 1) % L == 0 and mask[ids == 0].sum() == 0
    tokens, rows = windows(ids, mask, L)
    assert tokens.shape == (len(ids) // L, L + 1) and rows.shape == (tokens.shape[0], L)
    for w in range(tokens.shape[0]):
        assert tokens[w].tolist() == ids[w * L: w * L + L + 1].tolist()
        assert rows[w].tolist() == mask[w * L + 1: w * L + L + 1].tolist()  # row j ↔ token j+1
    assert rows.sum() == sum(int(p.mask.sum()) for p in pieces)  # every answer token is a label exactly once
    pos = 0
    for p in pieces:  # find each piece in the stream: it lies inside one window
        while ids[pos: pos + len(p.ids)].tolist() != p.ids.tolist():
            pos += 1
        assert pos + len(p.ids) - 1 <= (pos // L) * L + L  # its last token is in the window of its first
        pos += len(p.ids)
    with pytest.raises(ValueError, match="fit"):
        pack([Rendered(np.ones(L + 2, np.int32), np.ones(L + 2, np.uint8), [])], L, 0)
    assert windows(*pack([], L, 0), L)[0].shape == (0, L + 1)


def test_bad_lines_are_reported_by_line_and_reading_goes_on(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_bytes(b'{"prompt": "a"}\n\n{bad json\n[1, 2]\n' + b'{"prompt": "' + b"x" * 100 + b'"}\n'
                     + b"\xff\xfe\n" + b'{"prompt": "b"}\n')
    got = list(read_records(path, max_bytes=50))
    assert [(w.rsplit(":", 1)[1], r, e and e.split(" (")[0]) for w, r, e in got] == [
        ("1", {"prompt": "a"}, None), ("3", None, "not valid JSON"), ("4", None, "not a JSON object"),
        ("5", None, "longer than 50 bytes"), ("6", None, "not valid JSON"), ("7", {"prompt": "b"}, None)]


def test_a_chat_corpus_becomes_windows_whose_labels_are_masked_in_only_on_answers(tiny_tokenizer, tmp_path):
    from raydistill.tasks.config import CorpusConfig

    path = tmp_path / "chat.jsonl"
    path.write_text('{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]}\n'
                    '{"prompt": "2+2?", "completion": "4"}\n')
    cfg = CorpusConfig(path=str(path), seq_len=64)
    convs = [(w, chat_messages(r, w)) for w, r, _ in read_records(path, cfg.max_record_bytes)]
    tokens, rows = windows(*masked_stream(convs, tiny_tokenizer, cfg), cfg.seq_len)
    labels = tokens[:, 1:]
    assert tiny_tokenizer.decode(labels[rows == 1].tolist()) == "Yo<|im_end|>4<|im_end|>"
