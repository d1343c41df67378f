"""Every quantization method against fp32 on a trained student, scored against the teacher's cached targets.

    python benchmarks/quantize.py                                      # runs/smollm2-shakespeare (default preset)
    python benchmarks/quantize.py --config tiny --run-dir runs/tiny    # any preset's run: its student and cache
    python benchmarks/quantize.py --set teacher.source=... --set corpus.path=...   # another teacher / corpus

Needs a finished ``raydistill pipeline`` (or ``cache`` + ``train``) for that config: the trained student
``<run_dir>/train/student`` and its cache. Prints ``{"rows": [{"method", "size_ratio", "tokens_per_s_ratio",
"rss_mb", "rss_over_bf16", "export_loads", "kl_to_teacher", …}], "checks": {…}}``, every method measured side by
side in one run: size = weight bytes on disk (embeddings and ``lm_head`` included) / fp32's; tokens/s = forward
throughput on held-out windows at batch 8 and batch 1 over ``--repeats`` interleaved rounds (every model timed
once per round: load drift hits all alike); ``tokens_per_s_ratio`` is the median over rounds of the round's
ratio to fp32 and ``tokens_per_s_ratio_min/max`` its range, ``tokens_per_s_spread`` the method's own
(max − min) / median; ``rss_mb`` = resident memory after loading and one forward, each model in a fresh
process (``tasks/quantize/memory.py``), ``rss_over_bf16`` its ratio to the bf16 model's (always measured);
``export_loads`` = each standard export (compressed-tensors checkpoint, GGUF) loaded by plain transformers
(``tasks/quantize/export.py``), with its largest logit gap to raydistill's forward; KL and loss on ``--windows``
held-out windows of the cache. ``qad`` runs its fine-tuning in-process here (the shared step loop on an
``AdamWEngine``; the quantize stage runs it on Ray Train).
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
from raydistill.tasks.quantize.choice import interleaved_speeds
from raydistill.tasks.quantize.export import export_all, verify_exports
from raydistill.tasks.quantize.memory import resident_memory
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
    p.add_argument("--int8-group-wise", action="store_true",
                   help="int8_weight_only with one scale per --group-size columns (no int8 kernel takes it)")
    p.add_argument("--no-rss", action="store_true", help="skip the resident-memory processes")
    p.add_argument("--no-export", action="store_true", help="skip the standard exports and their loading")
    return p.parse_args(argv)


def speeds(models: dict, windows: torch.Tensor, repeats: int) -> dict:
    """Per model, at batch 8 and batch 1: :func:`interleaved_speeds`'s median, range and per-round figures."""
    out = {n: {} for n in models}
    for batch in (8, 1):
        for name, s in interleaved_speeds(models, windows[:batch], repeats).items():
            out[name].update({f"{k}_batch{batch}": v for k, v in s.items() if k.startswith("tokens_per_s")})
    return out


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
    return quantize(fp32, method, group_size=g, int8_per_channel=not args.int8_group_wise)


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
    methods = args.methods.split(",")
    for method in methods + ([] if "bf16" in methods or args.no_rss else ["bf16"]):  # bf16: the RSS reference
        t0 = time.perf_counter()
        q = build(method, cfg, fp32, shards, calib, budget, args)
        save_quantized(q, None, tmp / method)
        models[method] = load_quantized(tmp / method)
        rows[method] = {**measure(method, models[method], tmp / method),
                        "quantize_s": round(time.perf_counter() - t0, 1)}
        print(f"[bench] {method}: {rows[method]}", flush=True)
    timed = speeds(models, windows, args.repeats)
    for name, r in [("fp32", base), *rows.items()]:
        r.update(timed[name])
        if not args.no_rss:
            r["rss_mb"] = resident_memory(tmp / name)["rss_mb"]
        if not args.no_export and name != "fp32":
            r["export"] = standard_exports(tmp, name, models[name], windows, student_dir)
        print(f"[bench] {name}: rss {r.get('rss_mb')}, export {r.get('export')}", flush=True)
    return report(args, cfg, base, rows, budget)


def standard_exports(tmp: Path, method: str, model, windows: torch.Tensor, student_dir: Path) -> dict:
    """Both standard exports of one method, each loaded by plain transformers and compared with ``model``."""
    import shutil

    for f in student_dir.glob("tokenizer*"):  # the GGUF carries the tokenizer
        shutil.copy2(f, tmp / method / f.name)
    info = export_all(tmp / method, tmp / f"export-{method}", name="student")
    return verify_exports(tmp / method, info, windows[:2, :64], model=model)


def _round_ratios(r: dict, base: dict, batch: int) -> list[float]:
    key = f"tokens_per_s_rounds_batch{batch}"
    return [a / b for a, b in zip(r[key], base[key])]


def report(args, cfg, base, rows, budget) -> dict:
    out = []
    bf16_rss = (rows.get("bf16") or {}).get("rss_mb")
    for r in [base, *rows.values()]:
        row = {"method": r["method"], "size_ratio": round(r["size_bytes"] / base["size_bytes"], 4),
               "kl_to_teacher": round(r["kl_to_teacher"], 5), "heldout_loss": round(r["heldout_loss"], 4),
               "top1_agreement": round(r["top1_agreement"], 4), "size_bytes": r["size_bytes"],
               "quantize_s": r.get("quantize_s")}
        for batch, suffix in ((8, ""), (1, "_batch1")):
            ratios = _round_ratios(r, base, batch)
            row[f"tokens_per_s_ratio{suffix}"] = round(statistics.median(ratios), 3)
            row[f"tokens_per_s_ratio{suffix}_min"] = round(min(ratios), 3)
            row[f"tokens_per_s_ratio{suffix}_max"] = round(max(ratios), 3)
            row[f"tokens_per_s_batch{batch}"] = round(r[f"tokens_per_s_batch{batch}"], 1)
            row[f"tokens_per_s_spread_batch{batch}"] = round(r[f"tokens_per_s_spread_batch{batch}"], 3)
        if r.get("rss_mb") is not None:
            row["rss_mb"] = round(r["rss_mb"], 1)
            row["rss_over_bf16"] = round(r["rss_mb"] / bf16_rss, 3) if bf16_rss else None
        if "export" in r:
            row["export_loads"] = all(c.get("loads") for c in r["export"].values())
            row["export_max_rel_logit_diff"] = {k: round(c["max_rel_diff"], 5) if c.get("loads") else c.get("error")
                                                for k, c in r["export"].items()}
        out.append(row)
    by = {r["method"]: r for r in out}
    result = {"student": str(Path(cfg.run_dir, "train", "student")), "teacher": cfg.teacher.source,
              "corpus": cfg.corpus.path, "threads": torch.get_num_threads(), "heldout_windows": args.windows,
              "group_size": args.group_size, "qad_steps": args.qad_steps, "mixed_budget": budget,
              "repeats": args.repeats, "rows": out, "checks": checks(by)}
    print(json.dumps(result, indent=2))
    return result


def checks(by: dict) -> dict:
    """The issues' targets, each ``None`` when a method (or a measurement) it needs was not run."""
    def get(m, k):
        return by[m].get(k) if m in by else None

    fp, out = by["fp32"], {}
    if "int8_dynamic" in by:
        r = by["int8_dynamic"]
        out["int8_dynamic_speed_ge_2x"] = r["tokens_per_s_ratio"] >= 2.0
        out["int8_dynamic_size_le_0.30"] = r["size_ratio"] <= 0.30
        out["int8_dynamic_kl_le_1.05x_fp32"] = r["kl_to_teacher"] <= 1.05 * fp["kl_to_teacher"]
    if "int8_weight_only" in by:  # on torch's int8 kernel, no dequantized copy
        r = by["int8_weight_only"]
        out["int8_weight_only_speed_ge_2x"] = r["tokens_per_s_ratio"] >= 2.0
        out["int8_weight_only_speed_ge_2x_every_round"] = r["tokens_per_s_ratio_min"] >= 2.0
        out["int8_weight_only_kl_le_1.05x_fp32"] = r["kl_to_teacher"] <= 1.05 * fp["kl_to_teacher"]
    for method, limit in (("int8_weight_only", 0.6), ("int4_weight_only", 0.4), ("gptq", 0.4)):
        ratio = get(method, "rss_over_bf16")
        out[f"{method}_rss_over_bf16_le_{limit}"] = None if ratio is None else ratio <= limit
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
    loads = [r["export_loads"] for r in by.values() if "export_loads" in r and r["method"] != "dynamic_int8"]
    out["every_export_loads"] = all(loads) if loads else None
    return out


if __name__ == "__main__":
    main()
