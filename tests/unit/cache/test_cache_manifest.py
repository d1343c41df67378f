"""tasks/cache/manifest: shard keys, the cache key, the config compatibility check, manifest errors."""

from __future__ import annotations

import hashlib
import json

import pytest

from cachefakes import L, make_cache
from raydistill.tasks.cache import manifest
from raydistill.tasks.cache.formats import full, sampled, topk
from raydistill.tasks.cache.index import multiset_key
from raydistill.tasks.cache.manifest import (FORMAT_VERSION, CacheCorruptError, CacheMismatchError, CacheMissingError,
                                             cache_key, check_compatible, new_manifest, shard_key, write_manifest)
from raydistill.tasks.cache.shards import open_cache
from raydistill.tasks.config import CacheConfig, CorpusConfig, TeacherConfig

# Keys of FORMAT_VERSION 3 (draws on the teacher's device, the device type in the teacher's identity, byte budgets):
# pinned, so that a change of what a key hashes is a deliberate FORMAT_VERSION bump (caches of version 2 are refused
# with "rerun `raydistill cache`": their draws came from another sampler).
IDENT = {"source": "a", "path": "/x", "kind": "gguf", "weights_sha256": "w", "architecture": {"n": 1},
         "dtype": "float32", "device": "cpu"}
PINNED = [(sampled.Params(num_samples=50, seed=0, logprobs=True),
           "9ba2ca27bec407834ee3dced70db297c1b8c916d84c473f2b328c45c53ee8111"),
          (sampled.Params(num_samples=64, seed=0, logprobs=False),
           "03705e6cc87371adffd4035069d3166b29580f1ece835319d2e6fceb32bee8d2"),
          (sampled.Params(num_samples=255, logprobs=False, bytes_per_token=36.0),
           "1952ce324016b582e40de25019f7380018e25cc96d2748277285afcfe5daadbd"),
          (topk.Params(top_k=32), "631f037c93f0250e47853d76b39bb59a5d8e8efbb353a591eab9f9aa8895a62b"),
          (full.Params(), "93703ea52d2f0679913ba10393b34577cb1b8b9b677708bb9457cb09f9a74f02")]


@pytest.mark.parametrize("params,key", PINNED)
def test_shard_keys_are_pinned_for_format_version_3(params, key):
    assert FORMAT_VERSION == 3
    assert shard_key(IDENT, "t", "c", params, 1.0) == key


def test_the_cache_key_is_an_order_free_hash_of_the_shard_keys(tmp_path):
    assert cache_key({"shards": []}) is None and cache_key({}) is None
    cache, *_ = make_cache(tmp_path)
    (entry,) = cache.shards()
    assert cache_key(cache.manifest) == cache.key == multiset_key([entry["key"]])
    keys = [hashlib.sha256(str(i).encode()).hexdigest() for i in range(5)]
    assert multiset_key(keys) == multiset_key(keys[::-1]) == cache_key({"shards": [{"key": k} for k in keys]})
    assert multiset_key(keys) != multiset_key(keys[:4]) != multiset_key(keys[:4] + [keys[0]])
    assert multiset_key(keys[1:]) != multiset_key(keys[:4])


def test_shard_keys_are_stable_and_cover_every_field(monkeypatch):
    ident = {"source": "a", "path": "/x", "kind": "gguf", "weights_sha256": "w", "architecture": {"n": 1},
             "dtype": "float32"}
    base = dict(teacher=ident, tok_hash="t", content_hash="c", params=sampled.Params(num_samples=50, seed=0),
                temperature=1.0)
    key = shard_key(**base)
    assert key == shard_key(**base)
    assert key == shard_key(**{**base, "teacher": {**ident, "path": "/elsewhere", "source": "b"}})
    variants = [{"teacher": {**ident, "weights_sha256": "w2"}}, {"teacher": {**ident, "dtype": "bfloat16"}},
                {"teacher": {**ident, "architecture": {"n": 2}}}, {"tok_hash": "t2"}, {"content_hash": "c2"},
                {"params": topk.Params(top_k=50)}, {"params": sampled.Params(num_samples=49, seed=0)},
                {"params": sampled.Params(num_samples=50, seed=1)}, {"params": sampled.Params(50, 0, logprobs=False)},
                {"temperature": 2.0}]
    keys = {shard_key(**{**base, **v}) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    monkeypatch.setattr(manifest, "FORMAT_VERSION", manifest.FORMAT_VERSION + 1)
    assert shard_key(**base) != key


def test_mismatch_names_the_field(tmp_path, tiny_tokenizer):
    from raydistill.tasks.teacher import teacher_identity, tokenizer_hash

    teacher, corpus = TeacherConfig(source="tiny", dtype="float32"), CorpusConfig(seq_len=L)
    cache_cfg = CacheConfig(format="sampled", num_samples=50, top_k=8)
    written = new_manifest(teacher_identity(teacher), tokenizer_hash(tiny_tokenizer), cache_cfg, corpus)
    written["complete"] = True
    write_manifest(str(tmp_path), written)
    cache = open_cache(str(tmp_path))
    check_compatible(cache, teacher, cache_cfg, corpus)
    cases = [("teacher.dtype", TeacherConfig(source="tiny", dtype="bfloat16"), cache_cfg, corpus),
             ("teacher.weights_sha256", TeacherConfig(source="tiny", dtype="float32", tiny={"seed": 1}), cache_cfg,
              corpus),
             ("format", teacher, CacheConfig(format="topk"), corpus),
             ("num_samples", teacher, CacheConfig(num_samples=20), corpus),
             ("temperature", teacher, CacheConfig(num_samples=50, temperature=2.0), corpus),
             ("seq_len", teacher, cache_cfg, CorpusConfig(seq_len=L + 1)),
             ("corpus.max_tokens", teacher, cache_cfg, CorpusConfig(seq_len=L, max_tokens=99))]
    for field, t_cfg, c_cfg, k_cfg in cases:
        if isinstance(t_cfg.tiny, dict):
            t_cfg.tiny = type(teacher.tiny)(**t_cfg.tiny)
        with pytest.raises(CacheMismatchError, match=field):
            check_compatible(cache, t_cfg, c_cfg, k_cfg)
    cache.manifest["tokenizer_hash"] = "0" * 64
    with pytest.raises(CacheMismatchError, match="tokenizer"):
        check_compatible(cache, teacher, cache_cfg, corpus)
    cache.manifest.update(tokenizer_hash=tokenizer_hash(tiny_tokenizer), format="topk", params={"top_k": 4})
    with pytest.raises(CacheMismatchError, match=r"top_k \(cache: 4, config: 8\)"):
        check_compatible(cache, teacher, CacheConfig(format="topk", top_k=8), corpus)
    cache.manifest.update(format="sampled", params=written["params"], complete=False)
    with pytest.raises(CacheMismatchError, match="incomplete"):
        check_compatible(cache, teacher, cache_cfg, corpus)


def test_a_missing_cache_names_the_field_that_differs_not_the_dtype_auto_resolved_to(tmp_path, tiny_tokenizer):
    """``teacher.dtype=auto`` may resolve to bf16 where the cache ran and to fp32 where it is read: the cache of
    another config in the dir is compared with the expected head of its own dtype and device."""
    from raydistill.tasks.cache.shards import find_cache
    from raydistill.tasks.teacher import teacher_identity, tokenizer_hash

    teacher, corpus = TeacherConfig(source="tiny", dtype="auto"), CorpusConfig(seq_len=L)
    written = new_manifest({**teacher_identity(teacher), "dtype": "bfloat16"}, tokenizer_hash(tiny_tokenizer),
                           CacheConfig(num_samples=16), corpus)
    written["complete"] = True
    write_manifest(str(tmp_path), written)
    with pytest.raises(CacheMissingError, match=r"differs in cache.num_samples \(cache: 16, config: 8\)"):
        find_cache(str(tmp_path), teacher, CacheConfig(num_samples=8), corpus)
    assert find_cache(str(tmp_path), teacher, CacheConfig(num_samples=16), corpus).manifest["teacher"]["dtype"] == \
        "bfloat16"


def test_caches_of_another_format_version_are_refused(tmp_path):
    cache, *_ = make_cache(tmp_path)
    head = tmp_path / "caches" / cache.manifest["id"] / "head.json"
    written = json.loads(head.read_text())
    written["format_version"] = FORMAT_VERSION - 1
    head.write_text(json.dumps(written))
    with pytest.raises(CacheMismatchError, match=f"format {FORMAT_VERSION - 1}.*rerun `raydistill cache`"):
        open_cache(str(tmp_path))


def test_open_cache_errors(tmp_path):
    with pytest.raises(CacheMissingError, match="run `raydistill cache`"):
        open_cache(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{}")  # the layout before caches/<id>/: a rerun adopts its shards
    with pytest.raises(CacheMissingError, match="older raydistill.*rerun `raydistill cache`.*adopted"):
        open_cache(str(tmp_path))
    cache, *_ = make_cache(tmp_path / "x")
    (tmp_path / "x" / "caches" / cache.manifest["id"] / "head.json").write_text("{not json")
    with pytest.raises(CacheCorruptError, match="head.json"):
        open_cache(str(tmp_path / "x"))
    other, *_ = make_cache(tmp_path / "x", fmt="topk")  # a second cache beside it: which one must be said
    with pytest.raises(CacheMismatchError, match="holds 2 caches"):
        open_cache(str(tmp_path / "x"))
    assert open_cache(other.location).manifest["format"] == "topk"  # one cache, by its own location
