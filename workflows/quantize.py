"""Quantize the trained student by every method in ``quantize.methods``, score each against the cached teacher on
the held-out split, keep the smallest the registry gate accepts within the size budget (then the closest to the
teacher; speed decides only beyond its noise: ``tasks/quantize/choice.py``), and export it in standard formats.

    raydistill quantize --config tiny                                  # skipped when done for the same key
    raydistill quantize rerun --config tiny                            # quantize and score again anyway
    raydistill quantize --config tiny 'quantize.methods=[gptq,qad]'    # qad starts a Ray Train run

In-process except ``qad`` (fake-quantized fine-tuning on Ray Train workers with ``workflows.train``'s worker) and
the resident-memory figures (one fresh Python process per model, ``tasks/quantize/memory.py``). Reads
``<run_dir>/train/student``, writes ``<run_dir>/quantize/<method>/`` (safetensors, config, tokenizer,
``quantization.json``) per method, ``<run_dir>/quantize/report.json`` and the chosen method's exports
``<run_dir>/export/hf/`` (compressed-tensors, for transformers and vLLM) and ``<run_dir>/export/<model name>.gguf``
(``tasks/quantize/export.py``; each loaded back by transformers and compared with raydistill's forward).
The report holds the teacher (cache manifest), the fp32 student, one row per candidate (scored *as reloaded
from disk*: held-out loss, perplexity, top-1 agreement, ECE, KL to the teacher, tokens/s as the median of
interleaved rounds with their spread, decode ms/token, bytes, resident MB, ratios to fp32, gate verdict), the
choice and why, and the exports. ``report["quantized"]`` (alias ``int8``, read by register/promote) and
``model_dir`` (alias ``int8_dir``) are the chosen method's. Candidates, choice and exports are also logged to
MLflow (one ``quantize`` run).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path

import torch

from raydistill.tasks.config import PipelineConfig
from raydistill.tasks.errors import DataError
from raydistill.tasks.fileio import atomic_write_json
from raydistill.workflows import stage

METRICS = ("heldout_loss", "perplexity", "top1_agreement", "ece", "kl_to_teacher", "tokens_per_s",
           "tokens_per_s_spread", "decode_ms_per_token", "size_bytes", "rss_mb")
EXPORT_DIR = "export"


def heldout_shards(cfg: PipelineConfig) -> tuple:
    """The held-out shards every candidate is scored on (``quantize.eval_max_windows`` windows, re-read one shard
    at a time per candidate: never held together) and the cache's totals."""
    from raydistill.tasks.cache.shards import config_cache
    from raydistill.tasks.data import HeldoutSet

    cache = config_cache(cfg)
    shards = HeldoutSet(cache, cfg.quantize.eval_max_windows)
    if not len(shards):
        raise DataError(f"the cache at {cache.where} has no held-out shards to score on; rebuild it with "
                        "corpus.heldout_fraction > 0 (`raydistill cache`)")
    return shards, cache.totals


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


def generation_scorer(cfg: PipelineConfig, shards):
    """``student -> {"gen_teacher_nll", "gen_length", "gen_answers"}`` (a partial of
    :func:`tasks.evaluate.generation_scores`, its ``teacher`` in ``.keywords``) on ``registry.gate.gen_prompts``
    held-out prompts of ``shards`` (the teacher loaded once, on the CPU, here), or None when that is 0."""
    g = cfg.registry.gate
    if not g.gen_prompts:
        return None
    from raydistill.tasks.evaluate import generation_scores
    from raydistill.tasks.generate import eos_ids
    from raydistill.tasks.onpolicy import generation_prompts
    from raydistill.tasks.teacher import load_teacher, load_tokenizer

    try:
        prompts = generation_prompts(shards, g.gen_prompts, g.gen_prompt_tokens)
    except ValueError as e:
        raise DataError(f"registry.gate.gen_prompts={g.gen_prompts}: {e}; or set registry.gate.gen_prompts=0"
                        ) from None
    teacher = load_teacher(cfg.teacher, "cpu")[0].requires_grad_(False)
    eos = eos_ids(teacher, load_tokenizer(cfg.teacher))
    return functools.partial(generation_scores, teacher=teacher, prompts=prompts, max_new_tokens=g.gen_max_tokens,
                             eos=eos)


def score(cfg: PipelineConfig, model, tokenizer, shards: list, model_dir: Path, generation=None) -> dict:
    """Held-out metrics, batch-1 decode speed and size of one model; ``generation``: a
    :func:`generation_scorer` (adds the teacher's verdict on the model's greedy answers)."""
    from raydistill.tasks.evaluate import evaluate
    from raydistill.tasks.quantize import model_file_size

    q = cfg.quantize
    metrics = evaluate(model, shards, max_windows=q.eval_max_windows, batch_size=q.eval_batch_size)
    if generation is not None:
        metrics.update(generation(model))
    metrics["decode_ms_per_token"] = decode_ms_per_token(model, tokenizer, cfg.serve.prompt, q.bench_tokens)
    metrics["size_bytes"] = model_file_size(model_dir)
    return metrics


def _ratio(a, b):
    return a / b if a is not None and b else None


def calibration_windows(cfg: PipelineConfig) -> torch.Tensor:
    """Token windows ``(N, L)`` of the cache's train split (the corpus the student learnt from), for GPTQ."""
    from raydistill.tasks.cache.shards import config_cache

    cache = config_cache(cfg)
    rows, need = [], cfg.quantize.calibration_windows
    for entry in cache.shards("train"):
        rows.append(torch.as_tensor(cache.read(entry).tokens[:, :-1]).long())
        if sum(r.shape[0] for r in rows) >= need:
            break
    return torch.cat(rows)[:need]


def candidate_row(method: str, m: dict, fp32: dict, gate, budget: float) -> dict:
    from raydistill.tasks.gate import check

    passed, reasons = check(m, gate)
    size = _ratio(m["size_bytes"], fp32["size_bytes"])
    return {"method": method, **m, "size_ratio": size, "tokens_per_s_ratio": _ratio(m["tokens_per_s"], fp32["tokens_per_s"]),
            "kl_ratio": _ratio(m.get("kl_to_teacher"), fp32.get("kl_to_teacher")),
            "rss_ratio": _ratio(m.get("rss_mb"), fp32.get("rss_mb")), "gate_passed": passed,
            "gate_reasons": reasons, "within_budget": size is not None and size <= budget}


def choose(rows: dict[str, dict]) -> tuple[str, str]:
    """``(method, why)``: :func:`raydistill.tasks.quantize.choice.choose` (smallest passing the gate within the
    budget, then lowest KL; speed only beyond its measured noise)."""
    from raydistill.tasks.quantize.choice import choose as choose_method

    return choose_method(rows)


def build_report(cfg: PipelineConfig, fp32: dict, rows: dict, teacher: dict, student_dir: Path, out_dir: Path,
                 chosen: str, reason: str, notes: dict) -> dict:
    q = rows[chosen]
    metrics = {k: q.get(k) for k in METRICS + ("perplexity", "top1_accuracy", "tokens", "gen_teacher_nll", "gen_length")
               if k in q}
    model_dir = str(out_dir / chosen)
    return {
        "method": chosen, "reason": reason, "methods": list(rows), "torch_version": torch.__version__,
        "size_budget": cfg.quantize.size_budget, "student_dir": str(student_dir), "model_dir": model_dir,
        "int8_dir": model_dir, "teacher": teacher, "fp32": fp32, "quantized": metrics, "int8": metrics,
        "candidates": rows, "notes": notes,
        "ratios": {"size": _ratio(q["size_bytes"], fp32["size_bytes"]),
                   "tokens_per_s": _ratio(q["tokens_per_s"], fp32["tokens_per_s"]),
                   "decode_latency": _ratio(q["decode_ms_per_token"], fp32["decode_ms_per_token"]),
                   "rss": _ratio(q.get("rss_mb"), fp32.get("rss_mb"))},
        "delta": {k: q[k] - fp32[k] for k in ("heldout_loss", "top1_agreement", "kl_to_teacher")
                  if q.get(k) is not None and fp32.get(k) is not None},
    }


def print_report(report: dict) -> None:
    cols = ("heldout_loss", "top1_agreement", "kl_to_teacher", "tokens_per_s", "tokens_per_s_spread",
            "decode_ms_per_token", "size_bytes", "rss_mb")
    heads = ("loss", "top1 agr", "KL→T", "tok/s", "±spread", "ms/tok", "MB", "RSS MB")
    named = [("teacher", report["teacher"]), ("fp32", report["fp32"]), *report["candidates"].items()]
    if any(row.get("gen_teacher_nll") is not None for _, row in named):  # registry.gate.gen_prompts
        cols, heads = cols + ("gen_teacher_nll", "gen_length"), heads + ("gen NLL", "gen len")
    print(f"{'':<18}" + "".join(f"{h:>10}" for h in heads) + "  gate budget")
    for name, row in named:
        cells = []
        for c in cols:
            v = row.get(c)
            v = v / 2**20 if c == "size_bytes" and v is not None else v
            cells.append(f"{v:>10.3f}" if isinstance(v, float) else f"{v if v is not None else '-':>10}")
        flags = f"  {row['gate_passed']!s:>5} {row['within_budget']!s:>6}" if "gate_passed" in row else ""
        print(f"{name:<18}" + "".join(cells) + flags)
    r = report["ratios"]
    print(f"chosen: {report['method']} — {report['reason']}; vs fp32: "
          + ", ".join(f"{k} {v:.2f}x" for k, v in r.items() if v is not None))
    for kind, e in (report.get("exports") or {}).items():
        check = (report.get("export_checks") or {}).get(kind, {})
        where = e.get("path") or f"none ({e.get('error')})"
        loads = (f"; transformers loads it: max |Δlogit| {check['max_abs_diff']:.3g} ({check['max_rel_diff']:.2%} of "
                 f"the largest), KL {check['kl']:.2g} vs raydistill's forward") if check.get("loads") else \
            (f"; NOT loadable: {check.get('error')}" if check else "")
        print(f"export {kind}: {where}{loads}")


def quantized_model(cfg: PipelineConfig, method: str, fp32_model, shards: list, out_dir: Path) -> tuple:
    """``(quantized model, note)`` for one method; ``mixed`` measures sensitivities, ``qad`` trains first."""
    from raydistill.tasks.evaluate import evaluate
    from raydistill.tasks.quantize import quantize
    from raydistill.tasks.quantize.methods import unwrap

    q = cfg.quantize
    if method == "gptq":
        return quantize(fp32_model, "gptq", group_size=q.group_size, embedding_bits=q.embedding_bits,
                        calibration=calibration_windows(cfg), lora=q.lora), {
            "calibration_windows": q.calibration_windows}
    if method == "mixed":
        from raydistill.tasks.quantize.mixed import candidate_layers, plan_for_budget, sensitivities

        base = unwrap(fp32_model)[0]
        kl = lambda m: evaluate(m, shards, max_windows=q.sensitivity_windows,  # noqa: E731
                                batch_size=q.eval_batch_size)["kl_to_teacher"]
        sens = sensitivities(base, kl, q.group_size, candidate_layers(base))
        plan = plan_for_budget(base, sens, q.size_budget, q.group_size)
        return quantize(fp32_model, "mixed", group_size=q.group_size, plan=plan, lora=q.lora), {
            "plan": plan, "sensitivity": sens}
    if method == "qad":
        trained = qad_train(cfg, fp32_model, out_dir / "qad_train")
        return quantize(trained, "qad", group_size=q.group_size, embedding_bits=q.embedding_bits), {
            "qad_steps": q.qad_steps, "qad_lr": q.qad_lr}
    if method == "dynamic_int8":
        from raydistill.tasks.quantize import quantize_dynamic_int8

        return quantize_dynamic_int8(fp32_model), {"deprecated": "torch.ao dynamic int8 (use int8_dynamic)"}
    return quantize(fp32_model, method, group_size=q.group_size, embedding_bits=q.embedding_bits,
                    int8_per_channel=q.int8_per_channel, lora=q.lora), {}


def qad_train(cfg: PipelineConfig, student, out_dir: Path):
    """Quantization-aware distillation for ``quantize``'s ``qad``: the trained ``student`` (PEFT merged) with
    int4 fake-quantized linear layers, fine-tuned ``quantize.qad_steps`` steps on the cached teacher targets with
    the train stage's objective and workers; returns the fine-tuned float student (round it with int4 RTN)."""
    from transformers import AutoTokenizer

    from raydistill.tasks.config import ConfigError, PeftConfig
    from raydistill.tasks.quantize.methods import unwrap
    from raydistill.tasks.students import load_student, save_student
    from raydistill.workflows.train import train_driver

    base, adapter = unwrap(student)
    if adapter is not None:
        raise ConfigError("quantize.methods: qad fine-tunes the full weights; a prefix/prompt student cannot be "
                          "merged into them. Drop qad from quantize.methods or train a full/LoRA student")
    q = cfg.quantize
    init = Path(out_dir) / "init"
    save_student(base, AutoTokenizer.from_pretrained(Path(cfg.stage_dir("train")) / "student"), init)
    tc = dataclasses.replace(cfg.train, lr=q.qad_lr, warmup_steps=0, teacher_mode="cache", hidden_loss="none",
                             eval_every=q.qad_steps, checkpoint_every=q.qad_steps)
    qcfg = dataclasses.replace(cfg, train=tc, student=dataclasses.replace(cfg.student, peft=PeftConfig()))
    result = train_driver(qcfg, run_name=f"qad-{Path(cfg.run_dir).name}", steps=q.qad_steps,
                          storage_path=str((Path(out_dir) / "ray").resolve()), output_dir=str(out_dir),
                          init_dir=str(init), qad={"bits": 4, "group_size": q.group_size})
    return load_student(result["student_dir"])


def _track(cfg: PipelineConfig, key: str, report: dict, path: Path) -> None:
    """The candidates' rows and the choice in one MLflow run (``workflows.tracking``)."""
    from raydistill.workflows import tracking

    with tracking.start_run(cfg, "quantize", tags={"raydistill.stage": "quantize", "raydistill.stage_key": key}):
        tracking.log_params({"quantize.chosen": report["method"], "quantize.methods": ",".join(report["methods"])})
        tracking.log_metrics({f"{m}.{k}": float(v) for m, row in report["candidates"].items() for k, v in row.items()
                              if isinstance(v, (int, float)) and not isinstance(v, bool)})
        tracking.log_file(path, "quantize")


def heldout_ids(shards: list, windows: int) -> torch.Tensor:
    """The first ``windows`` held-out windows' inputs ``(windows, L)``: what speed is timed on."""
    return torch.cat([torch.as_tensor(s.tokens[:, :-1]).long() for s in shards])[:windows]


def speed_and_memory(cfg: PipelineConfig, models: dict, shards: list) -> dict[str, dict]:
    """``{name: timing fields + rss_mb}`` for ``models`` (``{name: (model, directory)}``): tokens/s over
    ``quantize.speed_rounds`` interleaved rounds on the same held-out batch, resident MB each in a fresh
    process (``quantize.measure_rss``)."""
    from raydistill.tasks.quantize.choice import interleaved_speeds
    from raydistill.tasks.quantize.memory import resident_memory

    q = cfg.quantize
    out = interleaved_speeds({n: m for n, (m, _) in models.items()}, heldout_ids(shards, q.eval_batch_size),
                             q.speed_rounds)
    for name, (_, where) in models.items():
        out[name]["rss_mb"] = resident_memory(where)["rss_mb"] if q.measure_rss else None
    return out


def export_chosen(cfg: PipelineConfig, model_dir: Path, model, shards: list) -> tuple[dict, dict]:
    """``(exports, checks)``: the chosen method's standard exports under ``<run_dir>/export/`` and, for each,
    whether transformers loads it and how far its logits are from raydistill's on two held-out windows."""
    from raydistill.tasks.quantize.export import export_all, verify_exports

    info = export_all(model_dir, Path(cfg.run_dir) / EXPORT_DIR, cfg.registry.model_name)
    checks = verify_exports(model_dir, info, heldout_ids(shards, 2)[:, :64], model=model)
    return info, checks


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """Quantize by each method and score (skipped when done for the same key); ``rerun`` does it again anyway."""
    from transformers import AutoTokenizer

    from raydistill.tasks.quantize import load_quantized, save_quantized
    from raydistill.tasks.students import load_student

    tried = cfg.quantize.tried
    started = stage.start(cfg, "quantize", skip=action != "rerun", ray="qad" in tried)
    if started.done:
        print(f"[quantize] already done for these inputs: {started.done['outputs']['model_dir']}")
        return started.done["outputs"]
    key, train = started.key, started.needs["train"]
    student_dir = Path((train.get("outputs") or {}).get("student_dir") or cfg.stage_dir("train") / "student")
    out_dir = cfg.stage_dir("quantize")
    shards, totals = heldout_shards(cfg)
    tokenizer = AutoTokenizer.from_pretrained(student_dir)
    fp32_model = load_student(student_dir, unmerge_lora=cfg.quantize.lora == "adapter")
    generation = generation_scorer(cfg, shards)
    fp32 = score(cfg, fp32_model, tokenizer, shards, student_dir, generation)
    scored, notes, loaded = {}, {}, {}
    for method in tried:
        t0 = time.perf_counter()
        model, notes[method] = quantized_model(cfg, method, fp32_model, shards, out_dir)
        save_quantized(model, tokenizer, out_dir / method, recipe={"source": str(student_dir), "method": method,
                                                                   "train_stage_key": train.get("key")})
        loaded[method] = load_quantized(out_dir / method)
        scored[method] = {**score(cfg, loaded[method], tokenizer, shards, out_dir / method, generation),
                          "quantize_seconds": time.perf_counter() - t0,
                          "higher_precision": (getattr(loaded[method], "_raydistill_quant", None) or {})
                          .get("higher_precision")}
        print(f"[quantize] {method}: size {scored[method]['size_bytes'] / fp32['size_bytes']:.3f}x, "
              f"KL {scored[method].get('kl_to_teacher')}", flush=True)
    measured = speed_and_memory(cfg, {"fp32": (fp32_model, student_dir),
                                      **{m: (loaded[m], out_dir / m) for m in tried}}, shards)
    fp32.update(measured["fp32"])
    rows = {m: candidate_row(m, {**scored[m], **measured[m]}, fp32, cfg.registry.gate, cfg.quantize.size_budget)
            for m in tried}
    chosen, reason = choose(rows)
    teacher = teacher_metrics(totals)
    if generation is not None:  # the teacher on its own greedy answers: the floor the students are read against
        teacher.update(generation(generation.keywords["teacher"]))
    report = build_report(cfg, fp32, rows, teacher, student_dir, out_dir, chosen, reason, notes)
    paths = [out_dir / m for m in tried]
    if cfg.quantize.export:
        report["exports"], report["export_checks"] = export_chosen(cfg, out_dir / chosen, loaded[chosen], shards)
        paths.append(Path(cfg.run_dir) / EXPORT_DIR)
    path = out_dir / "report.json"
    atomic_write_json(path, report)
    print_report(report)
    _track(cfg, key, report, path)
    outputs = {**report, "report": str(path)}
    stage.record(cfg, "quantize", key, outputs, paths=paths + [path])
    return outputs
