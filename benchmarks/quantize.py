"""Every quantization method against fp32 on a trained student, scored against the teacher's cached targets.

    python benchmarks/quantize.py                                      # runs/smollm2-shakespeare (default preset)
    python benchmarks/quantize.py --config tiny --run-dir runs/tiny    # any preset's run: its student and cache
    python benchmarks/quantize.py --set teacher.source=... --set corpus.path=...   # another teacher / corpus

Needs a finished ``raydistill pipeline`` (or ``cache`` + ``train``) for that config: the trained student
``<run_dir>/train/student`` and its cache. Prints ``{"rows": [{"method", "size_ratio", "tokens_per_s_ratio",
"kl_to_teacher", "heldout_loss", …}], "checks": {…}}``, every method measured side by side in one process:
size = weight bytes on disk (embeddings and ``lm_head`` included) / fp32's; tokens/s = forward throughput on
held-out windows at batch 8 (``tokens_per_s_ratio``) and batch 1 (``tokens_per_s_ratio_batch1``), medians of
``--repeats`` interleaved rounds (every model timed once per round: load drift hits all alike); KL and loss on ``--windows`` held-out windows of the cache. ``qad`` runs its fine-tuning
in-process here (the shared step loop on an ``AdamWEngine``; the quantize stage runs it on Ray Train).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from raydistill.tasks.config import load_config
from raydistill.tasks.evaluate import evaluate
from raydistill.tasks.quantize import (fake_quantize_model, load_quantized, model_file_size, quantize,
                                       quantize_dynamic_int8, save_quantized)
from raydistill.tasks.quantize.mixed import candidate_layers, plan_bytes, plan_for_budget, sensitivities

METHODS = ("bf16", "int8_dynamic", "int8_weight_only", "int4_weight_only", "gptq", "qad", "mixed",
           "dynamic_int8")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="smollm2-shakespeare", help="preset whose run is measured")
    p.add_argument("--set", action="append", default=[], help="config override key=value (repeatable)")
    p.add_argument("--run-dir", help="run directory (default: the preset's)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (dynamic_int8 = old torch.ao path)")
    p.add_argument("--windows", type=int, default=16, help="held-out windows scored")
    p.add_argument("--group-size", type=int, default=32)
    p.add_argument("--qad-steps", type=int, default=30)
    p.add_argument("--qad-lr", type=float, default=1e-4)
    p.add_argument("--calibration-windows", type=int, default=32)
    p.add_argument("--sensitivity-windows", type=int, default=4)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--int8-per-channel", action="store_true", help="int8_weight_only with one scale per row")
    return p.parse_args(argv)


def interleaved_speeds(models: dict, windows: torch.Tensor, repeats: int) -> dict:
    """``{name: {"tokens_per_s_batch8", "tokens_per_s_batch1"}}``: medians over ``repeats`` rounds, each round
    timing every model once in turn, so that a change of machine load hits all models alike."""
    times = {n: {8: [], 1: []} for n in models}
    with torch.inference_mode():
        for model in models.values():  # warm-up (builds the dequantized weights, torchao layers)
            model(input_ids=windows[:1], use_cache=False)
        for _ in range(repeats):
            for name, model in models.items():
                for batch in (8, 1):
                    ids = windows[:batch]
                    t0 = time.perf_counter()
                    model(input_ids=ids, use_cache=False)
                    times[name][batch].append(ids.numel() / (time.perf_counter() - t0))
    return {n: {f"tokens_per_s_batch{b}": statistics.median(v) for b, v in t.items()} for n, t in times.items()}


def qad_student(cfg, fp32, args):
    """fp32 student fine-tuned with int4 fake-quantized layers on the cached targets (shared step loop)."""
    from raydistill.tasks.cache.shards import open_cache
    from raydistill.tasks.data import train_batches
    from raydistill.tasks.trainloop import AdamWEngine, train_steps

    tc = dataclasses.replace(cfg.train, lr=args.qad_lr, warmup_steps=0, teacher_mode="cache", hidden_loss="none",
                             eval_every=args.qad_steps, checkpoint_every=args.qad_steps)
    student = fake_quantize_model(copy.deepcopy(fp32).train(), 4, args.group_size)
    stream = train_batches(open_cache(cfg.cache_dir), rank=0, world_size=1, micro_batch_size=tc.micro_batch_size,
                           temperature=tc.temperature, seed=tc.seed, vocab_size=student.config.vocab_size)
    engine = AdamWEngine(student, lr=tc.lr, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
    for _ in train_steps(engine, stream, tc, total=args.qad_steps):
        pass
    return student.eval()


def build(method, cfg, fp32, shards, calib, budget, args):
    g = args.group_size
    if method == "dynamic_int8":
        return quantize_dynamic_int8(fp32)
    if method == "gptq":
        return quantize(fp32, "gptq", group_size=g, calibration=calib)
    if method == "qad":
        return quantize(qad_student(cfg, fp32, args), "qad", group_size=g)
    if method == "mixed":
        kl = lambda m: evaluate(m, shards, max_windows=args.sensitivity_windows)["kl_to_teacher"]  # noqa: E731
        sens = sensitivities(fp32, kl, g, candidate_layers(fp32))
        return quantize(fp32, "mixed", group_size=g, plan=plan_for_budget(fp32, sens, budget, g))
    return quantize(fp32, method, group_size=g, int8_per_channel=args.int8_per_channel)


def int8_budget(fp32, group_size) -> float:
    """Uniform per-channel int8's weight bytes (``int8_dynamic``'s) over fp32's: ``mixed`` is planned at it."""
    layers = candidate_layers(fp32)
    return plan_bytes(fp32, dict.fromkeys(layers, 8), group_size) / sum(4 * p.numel() for p in fp32.parameters())


def main(argv=None) -> dict:
    from raydistill.tasks.cache.shards import open_cache
    from raydistill.tasks.students import load_student

    args = parse_args(argv)
    cfg = load_config(args.config, args.set + ([f"run_dir={args.run_dir}"] if args.run_dir else []))
    student_dir = Path(cfg.run_dir, "train", "student")
    if not student_dir.is_dir():
        raise SystemExit(f"no trained student at {student_dir}: run `raydistill pipeline --config {args.config}`")
    cache = open_cache(cfg.cache_dir)
    shards = [cache.read(e) for e in cache.shards("heldout")]
    windows = torch.cat([torch.as_tensor(s.tokens[:, :-1]).long() for s in shards])
    calib = torch.cat([torch.as_tensor(cache.read(e).tokens[:, :-1]).long() for e in cache.shards("train")[:4]])
    calib = calib[:args.calibration_windows]
    fp32 = load_student(student_dir)
    rows, tmp = {}, Path(tempfile.mkdtemp(prefix="bench-quantize-"))
    fp32.save_pretrained(tmp / "fp32")

    def measure(name, model, model_dir):
        m = evaluate(model, shards, max_windows=args.windows)
        return {"method": name, "size_bytes": model_file_size(model_dir), "kl_to_teacher": m["kl_to_teacher"],
                "heldout_loss": m["heldout_loss"], "top1_agreement": m["top1_agreement"]}

    base, models, budget = measure("fp32", fp32, tmp / "fp32"), {"fp32": fp32}, int8_budget(fp32, args.group_size)
    for method in args.methods.split(","):
        t0 = time.perf_counter()
        q = build(method, cfg, fp32, shards, calib, budget, args)
        save_quantized(q, None, tmp / method)
        models[method] = load_quantized(tmp / method)
        rows[method] = {**measure(method, models[method], tmp / method),
                        "quantize_s": round(time.perf_counter() - t0, 1)}
        print(f"[bench] {method}: {rows[method]}", flush=True)
    speeds = interleaved_speeds(models, windows, args.repeats)
    for name, r in [("fp32", base), *rows.items()]:
        r.update(speeds[name])
    return report(args, cfg, base, rows, budget)


def report(args, cfg, base, rows, budget) -> dict:
    out = []
    for r in [base, *rows.values()]:
        out.append({"method": r["method"], "size_ratio": round(r["size_bytes"] / base["size_bytes"], 4),
                    "tokens_per_s_ratio": round(r["tokens_per_s_batch8"] / base["tokens_per_s_batch8"], 3),
                    "tokens_per_s_ratio_batch1": round(r["tokens_per_s_batch1"] / base["tokens_per_s_batch1"], 3),
                    "kl_to_teacher": round(r["kl_to_teacher"], 5), "heldout_loss": round(r["heldout_loss"], 4),
                    "top1_agreement": round(r["top1_agreement"], 4), "size_bytes": r["size_bytes"],
                    "tokens_per_s_batch8": round(r["tokens_per_s_batch8"], 1),
                    "tokens_per_s_batch1": round(r["tokens_per_s_batch1"], 1), "quantize_s": r.get("quantize_s")})
    by = {r["method"]: r for r in out}
    result = {"student": str(Path(cfg.run_dir, "train", "student")), "teacher": cfg.teacher.source,
              "corpus": cfg.corpus.path, "threads": torch.get_num_threads(), "heldout_windows": args.windows,
              "group_size": args.group_size, "qad_steps": args.qad_steps, "mixed_budget": budget,
              "rows": out, "checks": checks(by)}
    print(json.dumps(result, indent=2))
    return result


def checks(by: dict) -> dict:
    """The issue's targets, each ``None`` when a method it needs was not run."""
    def get(m, k):
        return by[m][k] if m in by else None

    fp, out = by["fp32"], {}
    if "int8_dynamic" in by:
        r = by["int8_dynamic"]
        out["int8_dynamic_speed_ge_2x"] = r["tokens_per_s_ratio"] >= 2.0
        out["int8_dynamic_size_le_0.30"] = r["size_ratio"] <= 0.30
        out["int8_dynamic_kl_le_1.05x_fp32"] = r["kl_to_teacher"] <= 1.05 * fp["kl_to_teacher"]
    int4 = [get(m, "size_ratio") for m in ("int4_weight_only", "gptq") if m in by]
    out["int4_or_gptq_size_le_0.20"] = min(int4) <= 0.20 if int4 else None
    if "gptq" in by and "int4_weight_only" in by:
        out["gptq_kl_below_rtn_int4"] = by["gptq"]["kl_to_teacher"] < by["int4_weight_only"]["kl_to_teacher"]
    if "qad" in by and "int4_weight_only" in by:
        lost = by["int4_weight_only"]["kl_to_teacher"] - fp["kl_to_teacher"]
        rec = (by["int4_weight_only"]["kl_to_teacher"] - by["qad"]["kl_to_teacher"]) / lost if lost > 0 else None
        out["qad_kl_recovered"] = None if rec is None else round(rec, 3)
        out["qad_recovers_ge_50pct"] = None if rec is None else rec >= 0.5
    for int8 in ("int8_dynamic", "int8_weight_only"):
        if "mixed" in by and int8 in by:
            out[f"mixed_kl_below_{int8}"] = by["mixed"]["kl_to_teacher"] < by[int8]["kl_to_teacher"]
    return out


if __name__ == "__main__":
    main()
