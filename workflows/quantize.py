"""Quantize the trained student to int8 and score fp32 vs int8 against the cached teacher on the held-out split.

    raydistill quantize --config tiny          # skipped when done for the same key
    raydistill quantize rerun --config tiny    # quantize and score again anyway

Runs in-process (one model, a few forward passes: Ray would add nothing). Reads ``<run_dir>/train/student``,
writes ``<run_dir>/quantize/int8/`` (safetensors int8 weights + scales, config, tokenizer) and
``<run_dir>/quantize/report.json``: for the teacher (from the cache manifest), the fp32 student and the int8
student (scored *as reloaded from disk*): held-out loss, perplexity, top-1 agreement with the teacher, ECE, KL
to the teacher, forward tokens/s, greedy decoding ms/token (batch 1) and weight bytes on disk.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from raydistill.tasks.config import PipelineConfig
from raydistill.tasks.errors import DataError
from raydistill.tasks.fileio import atomic_write_json
from raydistill.workflows import stage

METRICS = ("heldout_loss", "perplexity", "top1_agreement", "ece", "kl_to_teacher", "tokens_per_s",
           "decode_ms_per_token", "size_bytes")


def heldout_shards(cfg: PipelineConfig) -> tuple[list, dict]:
    """The verified held-out shards of the cache and its totals."""
    from raydistill.tasks.cache.shards import open_cache

    cache = open_cache(cfg.cache_dir)
    entries = cache.shards("heldout")
    if not entries:
        raise DataError(f"the cache at {cfg.cache_dir} has no held-out shards to score on; rebuild it with "
                        "corpus.heldout_fraction > 0 (`raydistill cache`)")
    return [cache.read(e) for e in entries], cache.totals


def teacher_metrics(totals: dict) -> dict:
    nll = totals.get("teacher_heldout_nll")
    return {"heldout_loss": nll, "perplexity": math.exp(min(nll, 700.0)) if nll is not None else None,
            "top1_agreement": 1.0, "top1_accuracy": totals.get("teacher_heldout_top1_acc"),
            "tokens": totals.get("heldout_tokens")}


def decode_ms_per_token(model, tokenizer, prompt: str, tokens: int) -> float | None:
    """Wall ms per generated token, greedy, batch 1 (after one warm-up call)."""
    from raydistill.tasks.generate import complete

    if tokens <= 0:
        return None
    complete(model, tokenizer, [prompt], max_tokens=2, temperature=0.0)
    t0 = time.perf_counter()
    (out,) = complete(model, tokenizer, [prompt], max_tokens=tokens, temperature=0.0)
    return 1000 * (time.perf_counter() - t0) / max(1, len(out["token_ids"]))


def score(cfg: PipelineConfig, model, tokenizer, shards: list, model_dir: Path) -> dict:
    from raydistill.tasks.evaluate import evaluate
    from raydistill.tasks.quantize import model_file_size

    q = cfg.quantize
    metrics = evaluate(model, shards, max_windows=q.eval_max_windows, batch_size=q.eval_batch_size)
    metrics["decode_ms_per_token"] = decode_ms_per_token(model, tokenizer, cfg.serve.prompt, q.bench_tokens)
    metrics["size_bytes"] = model_file_size(model_dir)
    return metrics


def _ratio(a, b):
    return a / b if a is not None and b else None


def build_report(cfg: PipelineConfig, fp32: dict, int8: dict, teacher: dict, student_dir: Path,
                 int8_dir: Path) -> dict:
    return {
        "method": cfg.quantize.method, "torch_version": torch.__version__,
        "student_dir": str(student_dir), "int8_dir": str(int8_dir),
        "teacher": teacher, "fp32": fp32, "int8": int8,
        "ratios": {"size": _ratio(int8["size_bytes"], fp32["size_bytes"]),
                   "tokens_per_s": _ratio(int8["tokens_per_s"], fp32["tokens_per_s"]),
                   "decode_latency": _ratio(int8["decode_ms_per_token"], fp32["decode_ms_per_token"])},
        "delta": {k: int8[k] - fp32[k] for k in ("heldout_loss", "top1_agreement", "kl_to_teacher")
                  if int8.get(k) is not None and fp32.get(k) is not None},
    }


def print_report(report: dict) -> None:
    cols = ("heldout_loss", "perplexity", "top1_agreement", "kl_to_teacher", "tokens_per_s", "decode_ms_per_token",
            "size_bytes")
    heads = ("loss", "ppl", "top1 agr", "KL→T", "tok/s", "ms/tok", "MB")
    print(f"{'':<9}" + "".join(f"{h:>10}" for h in heads))
    for name in ("teacher", "fp32", "int8"):
        row = report[name]
        cells = []
        for c in cols:
            v = row.get(c)
            v = v / 2**20 if c == "size_bytes" and v is not None else v
            cells.append(f"{v:>10.3f}" if isinstance(v, float) else f"{v if v is not None else '-':>10}")
        print(f"{name:<9}" + "".join(cells))
    r = report["ratios"]
    print("int8/fp32: " + ", ".join(f"{k} {v:.2f}x" for k, v in r.items() if v is not None))


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """Quantize and score (skipped when done for the same key); ``rerun`` does it again anyway."""
    from transformers import AutoTokenizer

    from raydistill.tasks.quantize import load_quantized, quantize_dynamic_int8, save_quantized
    from raydistill.tasks.students import load_student

    started = stage.start(cfg, "quantize", skip=action != "rerun")
    if started.done:
        print(f"[quantize] already done for these inputs: {started.done['outputs']['int8_dir']}")
        return started.done["outputs"]
    key, train = started.key, started.needs["train"]
    student_dir = Path((train.get("outputs") or {}).get("student_dir") or cfg.stage_dir("train") / "student")
    out_dir = cfg.stage_dir("quantize")
    int8_dir = out_dir / "int8"
    shards, totals = heldout_shards(cfg)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    fp32_model = load_student(student_dir)
    save_quantized(quantize_dynamic_int8(fp32_model), tokenizer, int8_dir,
                   recipe={"source": str(student_dir), "train_stage_key": train.get("key")})
    fp32 = score(cfg, fp32_model, tokenizer, shards, student_dir)
    int8 = score(cfg, load_quantized(int8_dir), tokenizer, shards, int8_dir)
    report = build_report(cfg, fp32, int8, teacher_metrics(totals), student_dir, int8_dir)
    path = out_dir / "report.json"
    atomic_write_json(path, report)
    print_report(report)
    outputs = {**report, "report": str(path)}
    stage.record(cfg, "quantize", key, outputs, paths=[int8_dir, path])
    return outputs
