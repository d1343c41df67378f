"""Chat corpora through the cache: a chat JSONL is planned as conversations with a loss mask (no setting), the mask
and the chat settings are part of the keys, a masked shard stores targets only for the assistant's rows (every
format), and training and evaluation take loss only there — down to a zero gradient on the user's tokens."""

from __future__ import annotations

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from raydistill.tasks.cache.encode import encode_shard
from raydistill.tasks.cache.formats import format_params
from raydistill.tasks.cache.manifest import add_entry, difference, new_manifest, shard_key, write_manifest
from raydistill.tasks.cache.shards import commit_shard, open_cache
from raydistill.tasks.chat import (ChatError, chat_messages, masked_stream, pack, pack_iter, read_records, render,
                                   chat_template, windows)
from raydistill.tasks.chatstream import chat_chunks, is_chat_file
from raydistill.tasks.config import CacheConfig, CorpusConfig, TrainConfig, load_config
from raydistill.tasks.corpus import list_files, streams
from raydistill.tasks.data import IGNORE_INDEX, train_batches
from raydistill.tasks.evaluate import evaluate
from raydistill.tasks.losses import distillation_loss
from raydistill.tasks.plan import build_shards, plan_record
from raydistill.tasks.teacher import load_teacher
from raydistill.tasks.trainloop import AdamWEngine

PLANTED = " zqx vorpal quibble"  # the user turns' fixed, rare sequence: learnable only through a leaking mask
CONTROL = " plinth gazebo marmot"  # rare words in no conversation
SEQ = 96


def _conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"{PLANTED}{PLANTED} {i}?"},
                         {"role": "assistant", "content": f"It is {i % 7}."}]}


def _chat_file(tmp_path, n=24, name="chat.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(_conversation(i)) + "\n" for i in range(n)))
    return path


def _corpus(path, **kw) -> CorpusConfig:
    return CorpusConfig(path=str(path), seq_len=SEQ, windows_per_shard=4, heldout_fraction=0.25, **kw)


@pytest.fixture(scope="module")
def tiny_teacher():
    model, _ = load_teacher(load_config("tiny").teacher, torch.device("cpu"))
    return model


def _cache(tmp_path, teacher, tok, corpus: CorpusConfig, fmt="topk", label="c"):
    """The cache stage's work on ``corpus`` minus Ray: plan, encode each shard with its mask, commit, index."""
    cc = CacheConfig(format=fmt, top_k=8, num_samples=16)
    params, identity = format_params(cc), {"kind": "tiny", "weights_sha256": "w", "architecture": {},
                                           "dtype": "float32"}
    manifest = new_manifest(identity, "tok", cc, corpus)
    d = str(tmp_path / label)
    for spec in build_shards(corpus, tok):
        key = shard_key(identity, "tok", spec.content_hash, params, 1.0)
        fields, stats, _ = encode_shard(teacher, spec.tokens, spec.split, params, 1.0, 2, key, spec.mask)
        add_entry(manifest, commit_shard(d, spec.name, spec.split, key, spec.tokens, fields, stats, params,
                                         spec.mask))
    manifest["complete"] = True
    write_manifest(d, manifest)
    return open_cache(d, manifest["id"])


# ------------------------------------------------------------------------------------------------ planning

def test_a_chat_jsonl_is_planned_as_conversations_whose_labels_are_masked_in_only_on_answers(tiny_tokenizer,
                                                                                             tmp_path):
    path = _chat_file(tmp_path)
    cfg = _corpus(path)
    specs = build_shards(cfg, tiny_tokenizer)
    assert {s.split for s in specs} == {"train", "heldout"} and all(s.mask is not None for s in specs)
    tokens = np.concatenate([s.tokens for s in specs])
    mask = np.concatenate([s.mask for s in specs]).astype(bool)
    assert mask.shape == (tokens.shape[0], SEQ) and mask.any(axis=1).all()  # no window without an answer
    answers = tiny_tokenizer.decode(tokens[:, 1:][mask].tolist())
    assert "zqx" not in answers and "user" not in answers and answers.count("<|im_end|>") == 24
    # the same windows as the in-memory reference (tasks/chat.py), in another order (split into two packers)
    convs = [(w, chat_messages(r, w)) for w, r, _ in read_records(path, cfg.max_record_bytes)]
    ref_tokens, ref_mask = windows(*masked_stream(convs, tiny_tokenizer, cfg), SEQ)
    assert sorted(map(bytes, tokens)) == sorted(map(bytes, ref_tokens[ref_mask.any(axis=1)]))
    # a text corpus next to it has no mask
    (tmp_path / "text.jsonl").write_text(json.dumps({"text": "plain words " * 200}) + "\n")
    text = build_shards(_corpus(tmp_path / "text.jsonl"), tiny_tokenizer)
    assert text and all(s.mask is None for s in text)


def test_streamed_packing_equals_packing_the_whole_list_and_reads_chunk_by_chunk(tiny_tokenizer, tmp_path):
    path = _chat_file(tmp_path, n=40)
    cfg = _corpus(path)
    template = chat_template(tiny_tokenizer)
    pieces = [render(tiny_tokenizer, _conversation(i)["messages"], template=template) for i in range(40)]
    whole = pack(pieces, SEQ, 0)
    chunks = list(pack_iter(iter(pieces), SEQ, 0, chunk_tokens=100))
    assert len(chunks) > 5 and max(len(c[0]) for c in chunks) < 100 + SEQ + 1
    assert np.array_equal(np.concatenate([c[0] for c in chunks]), whole[0])
    assert np.array_equal(np.concatenate([c[1] for c in chunks]), whole[1])
    stream = next(streams(list_files(cfg)[0], cfg.segment_bytes))
    streamed = list(chat_chunks(stream, cfg, tiny_tokenizer))
    convs = [(w, chat_messages(r, w)) for w, r, _ in read_records(path, cfg.max_record_bytes)]
    ref = masked_stream(convs, tiny_tokenizer, cfg)
    assert np.array_equal(np.concatenate([c[0] for c in streamed]), ref[0])


def test_a_parquet_of_prompt_completion_pairs_is_chat_and_segments_keep_conversations_whole(tiny_tokenizer,
                                                                                         tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["Hi?", "2+2?"] * 20, "completion": ["Yo.", "4."] * 20}), tmp_path / "p.parquet")
    cfg = _corpus(tmp_path / "p.parquet")
    assert is_chat_file(list_files(cfg)[0], cfg)
    specs = build_shards(cfg, tiny_tokenizer)
    answers = tiny_tokenizer.decode(np.concatenate([s.tokens[:, 1:][s.mask == 1] for s in specs]).tolist())
    assert answers.count("4.<|im_end|>") == 20 and "2+2" not in answers
    # a JSONL cut into segments: every conversation is in exactly one segment
    path = _chat_file(tmp_path, n=30)
    seg = dataclasses.replace(_corpus(path), segment_bytes=400)
    assert len(list(streams(list_files(seg)[0], 400))) > 3
    segmented = build_shards(seg, tiny_tokenizer)
    ends = sum(tiny_tokenizer.decode(s.tokens[:, 1:][s.mask == 1].tolist()).count("<|im_end|>") for s in segmented)
    assert ends == 30


def test_chat_errors_name_the_record_and_the_setting(tiny_tokenizer, tmp_path):
    path = _chat_file(tmp_path, n=3)
    with open(path, "a") as f:
        f.write(json.dumps({"text": "not a conversation"}) + "\n")
    with pytest.raises(ChatError, match=r"chat.jsonl:4: not a chat record.*separate files"):
        build_shards(_corpus(path), tiny_tokenizer)
    bare = copy.deepcopy(tiny_tokenizer)
    bare.chat_template = None
    with pytest.raises(ChatError, match="corpus.chat_template=PATH"):
        build_shards(_corpus(_chat_file(tmp_path, n=3, name="ok.jsonl")), bare)
    long = tmp_path / "long.jsonl"
    long.write_text(json.dumps({"messages": [{"role": "user", "content": "word " * 160},
                                             {"role": "assistant", "content": "ok"}]}) + "\n")
    with pytest.raises(ChatError, match="long.jsonl:1: .* set corpus.chat_overflow=split"):
        build_shards(_corpus(long, chat_overflow="refuse"), tiny_tokenizer)
    with pytest.raises(ChatError, match="one exchange alone"):  # split never cuts inside an exchange
        build_shards(_corpus(long), tiny_tokenizer)


# ---------------------------------------------------------------------------------------------------- keys

def test_the_mask_and_the_chat_settings_are_part_of_the_shard_and_cache_keys(tiny_tokenizer, tmp_path):
    path = _chat_file(tmp_path)
    plans = {m: plan_record(build_shards(_corpus(path, chat_mask=m), tiny_tokenizer)) for m in ("all", "none")}
    # chat_mask=none: the same rendered tokens, no mask: other content hashes, so other shard keys
    assert [r[:2] + r[3:] for r in plans["all"]] == [r[:2] + r[3:] for r in plans["none"]]
    assert not {r[2] for r in plans["all"]} & {r[2] for r in plans["none"]}
    none = build_shards(_corpus(path, chat_mask="none"), tiny_tokenizer)
    assert all(s.mask is None for s in none)
    heads = {m: new_manifest({"kind": "tiny", "weights_sha256": "w", "architecture": {}}, "tok", CacheConfig(),
                             _corpus(path, chat_mask=m)) for m in ("all", "last", "none")}
    assert len({h["id"] for h in heads.values()}) == 3
    assert difference(heads["all"], heads["last"]).startswith("corpus.chat_mask (cache: 'all', config: 'last')")


# ------------------------------------------------------------------------------------------ masked encoding

def test_kept_rows_go_back_to_their_places_and_the_others_hold_a_copy_of_the_first():
    from raydistill.tasks.cache.masked import expand_rows, format_tokens

    mask = torch.tensor([[False, True, False], [True, False, True]])
    rows = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0]])
    out = expand_rows(rows, mask)
    assert out.shape == (2, 3, 2) and torch.equal(out[mask], rows)
    assert (out[~mask] == rows[0]).all()
    assert expand_rows(rows[:1], torch.zeros(2, 3, dtype=torch.bool)).shape == (2, 3, 2)  # no row kept: filler
    tokens = np.arange(8, dtype=np.int32).reshape(2, 4)
    assert format_tokens(tokens, mask.numpy()).tolist() == [[0, 2, 5, 7]]  # the kept rows' labels
    assert format_tokens(tokens, None) is tokens


@pytest.mark.parametrize("fmt", ["sampled", "topk", "full", "hidden"])
def test_a_masked_shard_stores_targets_only_for_the_assistant_rows_in_every_format(fmt, tiny_tokenizer,
                                                                                    tiny_teacher, tmp_path):
    masked = _cache(tmp_path, tiny_teacher, tiny_tokenizer, _corpus(_chat_file(tmp_path)), fmt, "m")
    plain = _cache(tmp_path, tiny_teacher, tiny_tokenizer, _corpus(_chat_file(tmp_path), chat_mask="none"), fmt, "u")
    assert masked.totals["tokens"] == sum(int(masked.read(e).mask.sum()) for e in masked.shards())
    assert masked.totals["tokens"] < 0.5 * plain.totals["tokens"]
    assert masked.totals["bytes"] < plain.totals["bytes"]
    by_tokens = {bytes(plain.read(e).tokens.numpy()): plain.read(e) for e in plain.shards()}
    for entry in masked.shards():
        m = masked.read(entry)
        u = by_tokens[bytes(m.tokens.numpy())]  # the same windows, planned unmasked
        assert u.mask is None and m.mask.dtype == torch.bool and m.mask.any(dim=1).all()
        keep = m.mask
        mt, ut = m.targets(slice(1, 3)), u.targets(slice(1, 3))
        k = keep[1:3]
        if fmt == "sampled":  # other rows drawn: compare what is exact, the stored ids are the teacher's support
            assert mt.ids.shape[:2] == k.shape and (mt.counts.sum(-1)[k] > 0).all()
        else:
            for name in ("ids", "logprobs", "tail_logmass", "hidden"):
                a, b = getattr(mt, name), getattr(ut, name)
                if a is not None:
                    assert torch.equal(a[k], b[k]), name
        if m.split == "heldout":
            assert torch.equal(m.teacher_top1[keep], u.teacher_top1[keep])
            assert torch.allclose(m.teacher_nll[keep], u.teacher_nll[keep])


# ---------------------------------------------------------------------------------- training and evaluation

def test_batches_of_a_masked_cache_ignore_every_label_but_the_assistants(tiny_tokenizer, tiny_teacher, tmp_path):
    cache = _cache(tmp_path, tiny_teacher, tiny_tokenizer, _corpus(_chat_file(tmp_path)))
    batch, _ = next(train_batches(cache, rank=0, world_size=1, micro_batch_size=6, temperature=1.0, prefetch=0))
    kept = batch.labels != IGNORE_INDEX
    assert 0 < batch.tokens == int(kept.sum()) < batch.labels.numel()
    text = tiny_tokenizer.decode(batch.labels[kept].tolist())
    assert "zqx" not in text and text.count("<|im_end|>") >= 3
    assert "zqx" in tiny_tokenizer.decode(batch.input_ids[0].tolist())  # the student still reads the user's turn


@pytest.mark.parametrize("fmt", ["sampled", "topk", "full", "hidden"])
@pytest.mark.parametrize("fused", [True, False])
def test_the_loss_gradient_is_exactly_zero_at_the_users_tokens(fmt, fused, tiny_tokenizer, tiny_teacher, tmp_path):
    cache = _cache(tmp_path, tiny_teacher, tiny_tokenizer, _corpus(_chat_file(tmp_path)), fmt)
    batch, _ = next(train_batches(cache, rank=0, world_size=1, micro_batch_size=4, temperature=1.0, prefetch=0))
    V = 49152
    logits = torch.randn(*batch.labels.shape, V, generator=torch.Generator().manual_seed(0)).requires_grad_()
    out = distillation_loss(logits, batch.labels, batch.targets, alpha=0.5, temperature=1.0, fused=fused)
    out["total"].backward()
    grad = logits.grad.abs().sum(-1)
    masked_in = batch.labels != IGNORE_INDEX
    assert torch.isfinite(out["total"]) and (grad[masked_in] > 0).all()
    assert (grad[~masked_in] == 0).all()


def test_evaluation_scores_only_the_assistants_tokens(tiny_tokenizer, tiny_teacher, tmp_path):
    cache = _cache(tmp_path, tiny_teacher, tiny_tokenizer, _corpus(_chat_file(tmp_path)), "full")
    shards = [cache.read(e) for e in cache.shards("heldout")]
    got = evaluate(tiny_teacher, shards, batch_size=2)
    assert got["tokens"] == sum(int(s.mask.sum()) for s in shards)
    nll, agree, n = 0.0, 0, 0
    with torch.no_grad():
        for s in shards:
            logits = tiny_teacher(input_ids=s.tokens[:, :-1]).logits.float()
            keep = s.mask
            nll += torch.nn.functional.cross_entropy(logits[keep], s.tokens[:, 1:][keep], reduction="sum").item()
            agree += int((logits[keep].argmax(-1) == s.teacher_top1[keep]).sum())
            n += int(keep.sum())
    assert got["heldout_loss"] == pytest.approx(nll / n, rel=1e-5)
    assert got["top1_agreement"] == agree / n == 1.0  # the teacher agrees with itself, on the scored rows
    assert got["kl_to_teacher"] == pytest.approx(0.0, abs=1e-3)


def _nll(model, tok, text: str) -> float:
    """The model's mean NLL of ``text`` opening a user turn."""
    ids = torch.tensor([tok(f"<|im_start|>user\n{text}")["input_ids"]])
    n = len(tok(text)["input_ids"])
    with torch.no_grad():
        logits = model(input_ids=ids[:, :-1]).logits.float()
    return torch.nn.functional.cross_entropy(logits[0, -n:], ids[0, -n:]).item()


def _learned(model, tok) -> float:
    """How much better the model predicts the planted user-turn sequence than a control sequence of other rare
    words it never saw (nats/token): what it learned of the planted tokens themselves, not of the vocabulary at
    large."""
    return _nll(model, tok, CONTROL) - _nll(model, tok, PLANTED)


def test_a_student_trained_on_the_masked_cache_does_not_learn_the_users_planted_tokens(tiny_tokenizer,
                                                                                        tiny_teacher, tmp_path):
    from raydistill.tasks.objective import training_loss
    from raydistill.tasks.students import copy_layers

    results = {}
    for mask in ("all", "none"):  # none: the same conversations, every token carrying loss (the control)
        cache = _cache(tmp_path, tiny_teacher, tiny_tokenizer, _corpus(_chat_file(tmp_path, n=32), chat_mask=mask),
                       "topk", mask)
        torch.manual_seed(0)
        student = copy_layers(tiny_teacher, [0]).train()
        # the embedding is tied to the output head: the planted tokens' rows get gradient as *inputs* (context the
        # student rightly learns to read), which would move their output logits too; frozen, what changes the
        # prediction of the planted tokens is what the loss teaches about predicting them
        student.get_input_embeddings().weight.requires_grad_(False)
        before = _learned(student, tiny_tokenizer)
        engine = AdamWEngine(student, lr=1e-2)
        tc = TrainConfig(alpha=0.5, temperature=1.0)
        stream = train_batches(cache, rank=0, world_size=1, micro_batch_size=4, temperature=1.0, prefetch=0)
        for _ in range(30):
            batch, _ = next(stream)
            engine.backward(training_loss(engine, batch, tc)["total"])
            engine.step()
        results[mask] = (before, _learned(student, tiny_tokenizer))
    (before_m, after_m), (before_u, after_u) = results["all"], results["none"]
    assert before_m == pytest.approx(before_u)  # the same untrained student
    assert after_u > before_u + 0.8  # the unmasked control learns the user's tokens (measured: +1.1 nats/token)
    assert after_m - before_m < 0.2 * (after_u - before_u)  # the masked student does not (measured: -0.2)
