"""tasks.targetcodec / tasks.softtargets / tasks.cachestore: formats, re-tempering, keys, commit, verification."""

from __future__ import annotations

import hashlib
import json
import math
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from raydistill.tasks import softtargets as st
from raydistill.tasks.cachestore import Store, pack, unpack
from raydistill.tasks.config import CacheConfig, CorpusConfig, TeacherConfig
from raydistill.tasks.corpus import content_hash
from raydistill.tasks.sampledpack import LOGP_STEP
from raydistill.tasks.targetcodec import (CachedTargets, at_temperature, cat_targets, decode_rows, encode_sampled,
                                          encode_shard, encode_targets, select_windows, tail_logmass, window_generator)

V, L = 40, 6


class FakeTeacher(torch.nn.Module):
    """Deterministic logits [B, L, V] from token ids: a random embedding → vocabulary map."""

    def __init__(self, vocab=V, scale=3.0):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.table = torch.randn(vocab, vocab, generator=g) * scale

    def forward(self, input_ids, use_cache=False):
        return SimpleNamespace(logits=self.table[input_ids] + 0.1 * torch.arange(input_ids.shape[1])[:, None])


def _tokens(seed=0, windows=5):
    return np.random.default_rng(seed).integers(0, V, size=(windows, L + 1)).astype(np.int32)


def _logits(tokens):
    return FakeTeacher()(torch.tensor(tokens[:, :-1], dtype=torch.long)).logits


def _make_cache(tmp_path, fmt="sampled", split="heldout", temperature=1.0, **cache_kw):
    """A one-shard cache built the way workflows.cache builds it (minus Ray)."""
    teacher = TeacherConfig(source="tiny")
    cache_cfg = CacheConfig(format=fmt, temperature=temperature, num_samples=cache_kw.pop("num_samples", 50),
                            **cache_kw)
    corpus = CorpusConfig(seq_len=L)
    tokens = _tokens()
    identity, tok_hash = {"source": "t", "kind": "tiny", "weights_sha256": "w", "architecture": {},
                          "dtype": "float32"}, "tokhash"
    key = st.shard_key(identity, tok_hash, content_hash(tokens), fmt, st.format_params(cache_cfg), temperature)
    fields, stats, forwards = encode_shard(FakeTeacher(), tokens, split, fmt, st.format_params(cache_cfg),
                                           temperature, 2, key)
    assert forwards == 3  # 5 windows, batches of 2
    manifest = st.new_manifest(identity, tok_hash, cache_cfg, corpus)
    entry = st.commit_shard(str(tmp_path), "heldout-doc-00000", split, key, tokens, fields, stats, fmt)
    st.add_entry(manifest, entry)
    manifest["complete"] = True
    st.write_manifest(str(tmp_path), manifest)
    return st.open_cache(str(tmp_path)), tokens, teacher, cache_cfg, corpus


def _dense(sparse, vocab=V):
    """SparseTargets → dense probabilities [..., V] (tail dropped)."""
    out = torch.zeros(*sparse.ids.shape[:-1], vocab)
    return out.scatter_add(-1, sparse.ids, sparse.probs)


def test_row_j_is_the_distribution_over_token_j_plus_1(tmp_path):
    cache, tokens, *_ = _make_cache(tmp_path, fmt="full")
    shard = cache.read(cache.shards("heldout")[0])
    assert torch.equal(shard.tokens, torch.tensor(tokens, dtype=torch.long))
    logits = _logits(tokens)
    nll = torch.logsumexp(logits, -1) - logits.gather(-1, shard.tokens[:, 1:, None]).squeeze(-1)
    assert torch.allclose(shard.teacher_nll, nll, atol=1e-5)
    assert torch.equal(shard.teacher_top1, logits.argmax(-1))
    e = cache.shards()[0]
    assert e["tokens"] == 5 * L and math.isclose(e["teacher_nll_sum"], float(nll.sum()), rel_tol=1e-5)
    assert math.isclose(cache.totals["teacher_heldout_top1_acc"],
                        (logits.argmax(-1) == shard.tokens[:, 1:]).double().mean().item())


def test_alignment_on_a_stream_the_teacher_predicts_perfectly(tmp_path):
    """Tokens generated greedily by the teacher: row j's argmax must equal token j+1 everywhere."""
    teacher, tokens = FakeTeacher(), np.zeros((3, L + 1), np.int32)
    tokens[:, 0] = [1, 2, 3]
    for j in range(L):
        tokens[:, j + 1] = teacher(torch.tensor(tokens[:, : j + 1], dtype=torch.long)).logits[:, j].argmax(-1)
    fields, stats, _ = encode_shard(teacher, tokens, "heldout", "topk", {"top_k": 3}, 1.0, 2, "k")
    assert stats["teacher_top1_correct"] == 3 * L
    assert np.array_equal(fields["ids"][:, 0], tokens[:, 1:].reshape(-1))
    assert np.array_equal(fields["teacher_top1"], tokens[:, 1:].reshape(-1))


@pytest.mark.parametrize("fmt", ["sampled", "topk", "full"])
def test_round_trip(tmp_path, fmt):
    cache, tokens, *_ = _make_cache(tmp_path, fmt=fmt, top_k=7)
    shard = cache.read(cache.shards()[0])
    t = shard.targets()
    lp = torch.log_softmax(_logits(tokens), -1)
    if fmt == "full":
        assert torch.allclose(t.logprobs, lp.half().float())
    elif fmt == "topk":
        vals, ids = lp.topk(7, -1)
        assert torch.equal(t.ids, ids) and torch.allclose(t.logprobs, vals.half().float())
        assert torch.allclose(t.tail_logmass, tail_logmass(vals, V), atol=1e-6)
    else:
        valid = t.counts > 0
        assert torch.all(t.counts.sum(-1) == 50)
        err = (t.logprobs[valid] - lp.gather(-1, t.ids)[valid]).abs().max()
        assert err <= LOGP_STEP / 2 + 1e-5  # quantised to LOGP_STEP
        assert torch.all(valid[..., :-1] | ~valid[..., 1:])  # padding only at the end
        assert all(len(set(row[m].tolist())) == int(m.sum()) for row, m in zip(t.ids.view(-1, t.ids.shape[-1]),
                                                                         valid.view(-1, valid.shape[-1])))
    part = shard.targets(slice(1, 3))
    assert torch.equal(part.logprobs, t.logprobs[1:3, :, : part.logprobs.shape[-1]])
    assert shard.teacher_nll.shape == (5, L)


def test_sampled_reruns_draw_the_same_and_are_unbiased():
    logits = torch.randn(1, 3, V) * 2
    p = torch.softmax(logits[0], -1)
    a = encode_sampled(logits, 16, 1.0, [window_generator("k", 0)])
    b = encode_sampled(logits, 16, 1.0, [window_generator("k", 0)])
    assert all(np.array_equal(a[k], b[k]) for k in a)
    reps = 800  # mean of counts/N over independent draws → teacher distribution
    fields = encode_sampled(logits.expand(reps, -1, -1), 64, 1.0, [window_generator("k", i) for i in range(reps)])
    rows = np.repeat(np.arange(reps * 3), fields["row_len"].astype(np.int64)) % 3
    est = np.zeros((3, V))
    np.add.at(est, (rows, fields["ids"]), fields["counts"] / 64 / reps)
    sigma = np.sqrt(p.numpy() * (1 - p.numpy()) / (64 * reps))
    assert np.all(np.abs(est - p.numpy()) <= 5 * sigma + 1e-9)


def test_sampled_retempering():
    """At T_c the sparse targets are exactly count/N; at T≠T_c the self-normalised importance weights
    count·p^(1/T − 1/T_c), averaged over independent draws, approach softmax(z/T) (bias O(1/N))."""
    logits = torch.randn(1, 2, V) * 1.5
    reps, n = 800, 64
    fields = encode_sampled(logits.expand(reps, -1, -1), n, 1.0, [window_generator("r", i) for i in range(reps)])
    t = decode_rows("sampled", fields, slice(0, reps * 2), 2)
    cached = CachedTargets("sampled", 1.0, t["ids"], t["logprobs"], t["counts"], None, n)
    same = at_temperature(cached, 1.0)
    assert torch.equal(same.probs, cached.counts / n) and torch.all(same.tail == 0)
    for T in (0.5, 2.0):
        est = _dense(at_temperature(cached, T)).mean(0)  # [2, V]
        target = torch.softmax(logits[0] / T, -1)
        assert torch.allclose(est.sum(-1), torch.ones(2))
        assert (est - target).abs().sum(-1).max() < 0.08
        assert (est - target).abs().sum(-1).max() < (_dense(same).mean(0) - target).abs().sum(-1).max() / 3


def test_sampled_without_logprobs_gives_targets_only_at_the_cache_temperature(tmp_path):
    with_lp, *_ = _make_cache(tmp_path / "a", num_samples=50)
    without, *_ = _make_cache(tmp_path / "b", num_samples=50, sampled_logprobs=False)
    assert without.manifest["params"]["logprobs"] is False
    assert without.shards()[0]["bytes"] < with_lp.shards()[0]["bytes"]
    t = without.read(without.shards()[0]).targets()
    assert t.logprobs is None and torch.equal(at_temperature(t, 1.0).probs, t.counts / 50)
    with pytest.raises(ValueError, match="stores no log-probs"):
        at_temperature(t, 2.0)


@pytest.mark.parametrize("cache_t", [1.0, 2.0])
def test_topk_with_k_equal_v_is_full_and_full_retempers_exactly(tmp_path, cache_t):
    full, tokens, *_ = _make_cache(tmp_path / "f", fmt="full", temperature=cache_t)
    topk, *_ = _make_cache(tmp_path / "k", fmt="topk", top_k=V, temperature=cache_t)
    tf, tk = full.read(full.shards()[0]).targets(), topk.read(topk.shards()[0]).targets()
    for T in (cache_t, 0.5, 1.0, 3.0):
        dense, sparse = at_temperature(tf, T), at_temperature(tk, T)
        assert torch.all(sparse.tail == 0)
        assert torch.allclose(_dense(sparse), dense.logprobs.exp(), atol=1e-6)
        assert torch.allclose(dense.logprobs.exp(), torch.softmax(_logits(tokens) / T, -1), atol=2e-3)
    assert torch.allclose(at_temperature(tf, cache_t).logprobs, tf.logprobs, atol=1e-3)  # identity at T_c


def test_topk_tail_mass_is_exact_and_retempering_is_identity_at_cache_temperature(tmp_path):
    cache, tokens, *_ = _make_cache(tmp_path, fmt="topk", top_k=5, temperature=1.5)
    t = cache.read(cache.shards()[0]).targets()
    p = torch.softmax(_logits(tokens).double() / 1.5, -1)
    top = p.topk(5, -1).values.sum(-1)
    assert torch.allclose(t.tail_logmass.double().exp(), 1 - top, rtol=1e-5)
    same = at_temperature(t, 1.5)
    assert torch.allclose(same.probs, t.logprobs.exp(), atol=2e-3)
    assert torch.allclose(same.tail, t.tail_logmass.exp(), atol=2e-3)
    assert torch.allclose(same.probs.sum(-1) + same.tail, torch.ones(5, L), atol=1e-6)
    lse = torch.tensor([[-1e-9, 0.0, 1e-7]]).log_softmax(-1) * 0  # logsumexp ≈ 0 must not produce NaN
    assert not torch.isnan(tail_logmass(lse, 10)).any()


@pytest.mark.parametrize("T", [0.5, 2.0, 4.0])
def test_topk_retempered_tail_lies_between_its_bounds(tmp_path, T):
    """True tail mass at T is bracketed by 'tail tokens as likely as the k-th' and 'tail spread evenly'."""
    cache, tokens, *_ = _make_cache(tmp_path, fmt="topk", top_k=5)
    t = cache.read(cache.shards()[0]).targets()
    assert t.vocab_size == V
    tail = at_temperature(t, T).tail
    p = torch.softmax(_logits(tokens) / T, -1)
    true = 1 - p.gather(-1, t.ids).sum(-1)

    def bound(cls_tail):
        return torch.softmax(torch.cat([t.logprobs / T, cls_tail.unsqueeze(-1)], -1), -1)[..., -1]

    near = bound(t.tail_logmass + (1 / T - 1) * t.logprobs[..., -1])
    spread = bound(t.tail_logmass / T + (1 - 1 / T) * math.log(V - 5))
    lo, hi = torch.minimum(near, spread), torch.maximum(near, spread)
    assert torch.all((lo - 1e-6 <= tail) & (tail <= hi + 1e-6))
    assert torch.all((lo - 2e-3 <= true) & (true <= hi + 2e-3))  # the bounds really bound the truth


def test_shard_keys_are_stable_and_cover_every_field(monkeypatch):
    ident = {"source": "a", "path": "/x", "kind": "gguf", "weights_sha256": "w", "architecture": {"n": 1},
             "dtype": "float32"}
    base = dict(teacher=ident, tok_hash="t", content_hash="c", fmt="sampled", params={"num_samples": 50, "seed": 0},
                temperature=1.0)
    key = st.shard_key(**base)
    assert key == st.shard_key(**base)
    assert key == st.shard_key(**{**base, "teacher": {**ident, "path": "/elsewhere", "source": "b"}})
    variants = [{"teacher": {**ident, "weights_sha256": "w2"}}, {"teacher": {**ident, "dtype": "bfloat16"}},
                {"teacher": {**ident, "architecture": {"n": 2}}}, {"tok_hash": "t2"}, {"content_hash": "c2"},
                {"fmt": "topk"}, {"params": {"num_samples": 49, "seed": 0}}, {"params": {"num_samples": 50, "seed": 1}},
                {"temperature": 2.0}]
    keys = {st.shard_key(**{**base, **v}) for v in variants}
    assert len(keys) == len(variants) and key not in keys
    monkeypatch.setattr(st, "FORMAT_VERSION", st.FORMAT_VERSION + 1)
    assert st.shard_key(**base) != key


def test_flipped_byte_is_detected_and_names_the_shard(tmp_path):
    cache, *_ = _make_cache(tmp_path)
    entry = cache.shards()[0]
    path = tmp_path / entry["file"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(st.CacheCorruptError, match="heldout-doc-00000"):
        cache.read(entry)
    with pytest.raises(st.CacheCorruptError, match="heldout-doc-00000"):
        cache.verify()


def test_temp_files_of_crashed_writers_are_ignored_and_cleaned(tmp_path):
    cache, *_ = _make_cache(tmp_path)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    entry = cache.shards()[0]
    name = entry["file"].split("/")[1]
    tmp = tmp_path / "shards" / f".{name}.tmp-{os.uname().nodename}-{dead.stdout.strip()}-abcd1234"
    tmp.write_bytes(b"half a shard")
    live = tmp_path / "shards" / f".x.st.tmp-{os.uname().nodename}-{os.getpid()}-abcd1234"
    live.write_bytes(b"someone is writing")
    reopened = st.open_cache(str(tmp_path))
    assert [e["name"] for e in reopened.shards()] == [entry["name"]]
    reopened.read(entry)
    removed = Store(str(tmp_path)).clean_temps(("", "shards"))
    assert removed == [tmp.name] and not tmp.exists() and live.exists()


def test_commit_never_overwrites_and_a_committed_orphan_is_adopted(tmp_path):
    cache, tokens, *_ = _make_cache(tmp_path, fmt="topk")
    entry = cache.shards()[0]
    path = tmp_path / entry["file"]
    inode = path.stat().st_ino
    other = {"ids": np.zeros((5 * L, 32), np.int32), "logprobs": np.zeros((5 * L, 32), np.float16),
             "tail": np.zeros(5 * L, np.float32)}
    stats = {"vocab_size": V, "teacher_nll_sum": 0.0, "teacher_top1_correct": 0}
    again = st.commit_shard(str(tmp_path), entry["name"], "heldout", entry["key"], tokens, other, stats, "topk")
    assert again == entry and path.stat().st_ino == inode  # the second writer adopted the first's file
    assert st.entry_from_file(str(tmp_path), entry["file"], entry["key"]) == entry
    with pytest.raises(st.CacheCorruptError, match="expected"):
        st.entry_from_file(str(tmp_path), entry["file"], "another-key")


def test_mismatch_names_the_field(tmp_path, tiny_tokenizer):
    from raydistill.tasks.teacher import teacher_identity, tokenizer_hash

    teacher, corpus = TeacherConfig(source="tiny"), CorpusConfig(seq_len=L)
    cache_cfg = CacheConfig(format="sampled", num_samples=50, top_k=8)
    manifest = st.new_manifest(teacher_identity(teacher), tokenizer_hash(tiny_tokenizer), cache_cfg, corpus)
    manifest["complete"] = True
    st.write_manifest(str(tmp_path), manifest)
    cache = st.open_cache(str(tmp_path))
    st.check_compatible(cache, teacher, cache_cfg, corpus)
    cases = [("teacher.dtype", TeacherConfig(source="tiny", dtype="bfloat16"), cache_cfg, corpus),
             ("teacher.weights_sha256", TeacherConfig(source="tiny", tiny={"seed": 1}), cache_cfg, corpus),
             ("format", teacher, CacheConfig(format="topk"), corpus),
             ("num_samples", teacher, CacheConfig(num_samples=20), corpus),
             ("temperature", teacher, CacheConfig(num_samples=50, temperature=2.0), corpus),
             ("seq_len", teacher, cache_cfg, CorpusConfig(seq_len=L + 1)),
             ("corpus.max_tokens", teacher, cache_cfg, CorpusConfig(seq_len=L, max_tokens=99))]
    for field, t_cfg, c_cfg, k_cfg in cases:
        if isinstance(t_cfg.tiny, dict):
            t_cfg.tiny = type(teacher.tiny)(**t_cfg.tiny)
        with pytest.raises(st.CacheMismatchError, match=field):
            st.check_compatible(cache, t_cfg, c_cfg, k_cfg)
    cache.manifest["tokenizer_hash"] = "0" * 64
    with pytest.raises(st.CacheMismatchError, match="tokenizer"):
        st.check_compatible(cache, teacher, cache_cfg, corpus)
    cache.manifest.update(tokenizer_hash=tokenizer_hash(tiny_tokenizer), format="topk", params={"top_k": 4})
    with pytest.raises(st.CacheMismatchError, match="top_k is 4"):
        st.check_compatible(cache, teacher, CacheConfig(format="topk", top_k=8), corpus)
    cache.manifest.update(format="sampled", params={"num_samples": 50, "seed": 0}, complete=False)
    with pytest.raises(st.CacheMismatchError, match="incomplete"):
        st.check_compatible(cache, teacher, cache_cfg, corpus)


def test_cat_targets_pads_to_the_largest_k(tmp_path):
    cache, *_ = _make_cache(tmp_path)
    t = cache.read(cache.shards()[0]).targets()
    a, b = cache.read(cache.shards()[0]).targets(slice(0, 1)), cache.read(cache.shards()[0]).targets(slice(1, 5))
    both = cat_targets([a, b])
    assert both.ids.shape[:2] == (5, L) and both.ids.shape[2] == t.ids.shape[2]
    assert torch.allclose(at_temperature(both, 1.0).probs.sum(-1), torch.ones(5, L))
    assert torch.allclose(_dense(at_temperature(both, 2.0)), _dense(at_temperature(t, 2.0)))


def test_caches_of_another_format_version_are_refused(tmp_path):
    _make_cache(tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["format_version"] = st.FORMAT_VERSION - 1
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(st.CacheMismatchError, match=f"format_version {st.FORMAT_VERSION - 1}.*rerun"):
        st.open_cache(str(tmp_path))


def test_a_sampled_shard_that_does_not_decode_names_the_shard(tmp_path):
    """Checksums catch flipped bytes; a file whose own metadata disagrees with its streams (a writer bug) must
    still fail loudly, naming the shard."""
    cache, *_ = _make_cache(tmp_path)
    entry = cache.shards()[0]
    path = tmp_path / entry["file"]
    fields, header = unpack(path.read_bytes())
    header["sampled"]["groups"]["count"][1] += 1
    data = pack(fields, header, raw=("sampled_bits",))
    path.write_bytes(data)
    entry["sha256"] = hashlib.sha256(data).hexdigest()
    with pytest.raises(st.CacheCorruptError, match="heldout-doc-00000.*do not decode"):
        cache.read(entry)


def test_open_cache_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="run `raydistill cache`"):
        st.open_cache(str(tmp_path))
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(st.CacheCorruptError, match="manifest.json"):
        st.open_cache(str(tmp_path))


@pytest.mark.parametrize("fmt", ["sampled", "topk", "full"])
def test_encode_targets_gives_what_the_cache_gives_back(tmp_path, fmt):
    """The in-memory round trip the benchmarks use equals a stored shard's targets (sampled log-probs: the
    shard keeps them to LOGP_STEP/2), window by window."""
    cache, tokens, *_ = _make_cache(tmp_path, fmt=fmt, top_k=7)
    entry = cache.shards()[0]
    stored = cache.read(entry).targets()
    gens = [window_generator(entry["key"], w) for w in range(tokens.shape[0])]
    mine = encode_targets(_logits(tokens), fmt, num_samples=50, top_k=7, generators=gens)
    assert mine.format == fmt and mine.vocab_size == V and mine.cache_temperature == 1.0
    if fmt == "sampled":
        assert mine.num_samples == 50
        assert torch.equal(mine.counts.sum(-1), stored.counts.sum(-1))
        # stored rows list ids in rank order, encode_targets by id: compare as dense counts and log-probs
        dense = [torch.zeros(*t.ids.shape[:-1], V).scatter_add(-1, t.ids, t.counts) for t in (mine, stored)]
        assert torch.equal(*dense)
        lp = [torch.zeros(*t.ids.shape[:-1], V).scatter(-1, t.ids, torch.where(t.counts > 0, t.logprobs, 0.0))
              for t in (mine, stored)]
        assert (lp[0] - lp[1]).abs().max() <= LOGP_STEP / 2 + 1e-5
    elif fmt == "topk":
        assert torch.equal(mine.ids, stored.ids) and torch.equal(mine.logprobs, stored.logprobs)
        assert torch.equal(mine.tail_logmass, stored.tail_logmass)
    else:
        assert torch.equal(mine.logprobs, stored.logprobs)
    one = select_windows(mine, 3)
    assert torch.equal(one.logprobs, mine.logprobs[3:4]) and one.format == fmt and one.vocab_size == V


def test_encode_targets_rejects_bad_input():
    logits = _logits(_tokens())
    with pytest.raises(ValueError, match="unknown cache format 'dense'"):
        encode_targets(logits, "dense")
    with pytest.raises(ValueError, match="needs num_samples"):
        encode_targets(logits, "sampled")
    with pytest.raises(ValueError, match="needs top_k"):
        encode_targets(logits, "topk")
    with pytest.raises(ValueError, match="2 generators for 5 windows"):
        encode_targets(logits, "sampled", num_samples=8, generators=[window_generator("k", 0)] * 2)


def test_encode_shard_refuses_an_unknown_format_before_any_forward():
    class Refuses(torch.nn.Module):
        def forward(self, input_ids, use_cache=False):
            raise AssertionError("the teacher ran")

    with pytest.raises(ValueError, match="unknown cache format 'dense'"):
        encode_shard(Refuses(), _tokens(), "train", "dense", {}, 1.0, 2, "k")
