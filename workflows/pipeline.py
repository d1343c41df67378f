"""Run every stage in order: [generate →] cache → tune → train → quantize → register → promote → serve (one request), then
draw the report (``run_dir/report/index.html``; its path is printed at the end: ``report: PATH``).

    raydistill pipeline                      # SmolLM2-135M → 4-layer student on Shakespeare
    raydistill pipeline --config tiny        # a tiny random teacher, a few minutes
    raydistill pipeline pipeline.tune=false serve.keep_serving=true   # no search; keep serving at the end
    raydistill pipeline pipeline.generate=true generate.prompts=prompts.jsonl   # the teacher's answers as corpus

Each stage is skipped when its outputs for the same inputs already exist in ``run_dir`` (content keys in
``run_dir/stages``); the cache resumes shard by shard, so a rerun performs zero teacher forward passes.

Continual distillation (``train.init_from=champion``, see ``workflows/continual.py``): after corpus files are
added, a rerun computes only the new files' shards and trains a student that starts from the current champion.
Self-distillation (``pipeline.generations=N``, usually with ``student.init=born_again``): the stages run N times;
generation k (k ≥ 1) runs in ``<run_dir>/gen-<k>`` with generation k−1's trained student as its teacher, its own
cache and the first generation's registry (:func:`generation_config`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import time
from pathlib import Path

from raydistill.tasks.config import PipelineConfig, generated_corpus, resolve_paths
from raydistill.tasks.fileio import atomic_write_json
from raydistill.workflows.verbs import STAGES, VERBS


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """Every stage in order (``pipeline.tune``: with the search first), then ``pipeline.serve``'s demo request;
    ``pipeline.generations`` times, each generation taught by the previous one's student."""
    cfg = resolve_paths(cfg)
    if cfg.pipeline.generate:  # prompts → the teacher's answers, which become the corpus of every generation
        cfg = _generate(cfg)
    n = cfg.pipeline.generations
    generations, summary = [], {}
    for g in range(n):
        gcfg = generation_config(cfg, g, generations[-1]["student_dir"] if generations else None)
        if n > 1:
            print(f"\n##### generation {g} of {n}: teacher {gcfg.teacher.source} → {gcfg.run_dir}", flush=True)
        summary = _run_once(gcfg, serve=cfg.pipeline.serve and g == n - 1)
        generations.append({"generation": g, "run_dir": gcfg.run_dir, "teacher": gcfg.teacher.source,
                            "cache_key": summary["cache"].get("cache_key"), "model": summary["model"],
                            "student_dir": summary["student_dir"]})
    if n > 1:
        summary = {**summary, "generations": generations}
        atomic_write_json(Path(cfg.run_dir, "summary.json"), summary, default=str)
    return summary


def _generate(cfg: PipelineConfig) -> PipelineConfig:
    """Run ``generate`` (resumable: only prompts not answered yet are) and read its chat JSONL as the corpus."""
    from raydistill.workflows import generate

    print("\n=== raydistill generate ===", flush=True)
    generate.run(cfg)
    return generated_corpus(cfg)


def generation_config(cfg: PipelineConfig, g: int, teacher_dir: str | None) -> PipelineConfig:
    """Generation ``g``'s config: generation 0 is ``cfg``; generation k ≥ 1 runs in ``<run_dir>/gen-<k>`` (an
    explicit ``cache.dir`` gets ``/gen-<k>`` too: one cache per teacher) with ``teacher_dir`` (generation k−1's
    exported student) as its teacher, logging to generation 0's tracking store and gated on generation 0's
    held-out set (the original teacher's targets: gated on its own teacher's, a generation would be compared
    with the very champion that taught it)."""
    if g == 0:
        return cfg
    tokenizer = cfg.teacher.tokenizer  # None: the exported student carries the teacher's tokenizer files
    gate = dataclasses.replace(cfg.registry.gate, heldout_cache=cfg.registry.gate.heldout_cache or cfg.cache_dir)
    return dataclasses.replace(
        cfg, run_dir=str(Path(cfg.run_dir, f"gen-{g}")),
        teacher=dataclasses.replace(cfg.teacher, source=teacher_dir, tokenizer=tokenizer),
        cache=dataclasses.replace(cfg.cache, dir=cfg.cache.dir and f"{cfg.cache.dir.rstrip('/')}/gen-{g}"),
        registry=dataclasses.replace(cfg.registry, tracking_uri=cfg.tracking_uri, gate=gate))


def _run_once(cfg: PipelineConfig, serve: bool) -> dict:
    """One pass over the stages (and the demo request when ``serve``); the summary, also in ``summary.json``."""
    started = time.time()
    results, timings = {}, {}
    for stage in STAGES:
        if stage == "tune" and not cfg.pipeline.tune:
            continue
        module = importlib.import_module(VERBS[stage].module)
        print(f"\n=== raydistill {stage} ===", flush=True)
        t0 = time.time()
        results[stage] = module.run(cfg)
        timings[stage] = round(time.time() - t0, 1)
        if stage == "tune":
            from raydistill.workflows.tune import apply_params

            cfg = apply_params(cfg, results["tune"]["params"])
            print(f"[pipeline] training the student with the tuned {results['tune']['params']}")

    served = None
    if serve:
        print("\n=== raydistill serve (demo request) ===", flush=True)
        t0 = time.time()
        served = _serve_demo(cfg, keep=cfg.serve.keep_serving)
        timings["serve"] = round(time.time() - t0, 1)
    timings["total"] = round(time.time() - started, 1)
    summary = build_summary(cfg, results, served, timings)
    summary["report"] = str(Path(cfg.run_dir, "report", "index.html").resolve())
    atomic_write_json(Path(cfg.run_dir, "summary.json"), summary, default=str)
    print_summary(summary)
    print("\n=== raydistill report ===", flush=True)
    importlib.import_module(VERBS["report"].module).run(cfg)
    print(f"report: {summary['report']}", flush=True)
    print_exports(summary.get("exports") or {})
    if served and cfg.serve.keep_serving:
        _block_until_interrupt()
    return summary


def _serve_demo(cfg: PipelineConfig, keep: bool) -> dict:
    import requests

    from raydistill.workflows import serve

    base_url = serve.start_app(cfg)
    # a seeded sample (reproducible) rather than greedy: an under-trained student's argmax loops on newlines
    body = {"prompt": cfg.serve.prompt, "max_tokens": min(24, cfg.serve.max_tokens_limit),
            "temperature": 0.7, "seed": 0, "logprobs": 1}
    try:
        resp = requests.post(f"{base_url}/v1/completions", json=body, headers=serve.auth_headers(cfg), timeout=120)
        resp.raise_for_status()
        answer = resp.json()
        choice = answer["choices"][0]
        print(f"POST {base_url}/v1/completions {json.dumps(body)}")
        print(f"→ model {answer.get('model')}: {cfg.serve.prompt!r} + {choice['text']!r}")
        return {"url": base_url, "request": body, "text": choice["text"], "model": answer.get("model"),
                "token_logprobs": choice.get("logprobs", {}).get("token_logprobs")}
    finally:
        if not keep:
            serve.shutdown_app()


def _block_until_interrupt() -> None:
    from raydistill.workflows import serve

    print("serving; Ctrl-C to stop", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.shutdown_app()


def build_summary(cfg: PipelineConfig, results: dict, served: dict | None, timings: dict) -> dict:
    """Teacher vs student vs the quantized student (the method quantize chose) on the held-out split, plus where
    everything is."""
    report = json.loads(Path(cfg.run_dir, "quantize", "report.json").read_text())
    rows = [_row("teacher", {**report.get("teacher", {}), **_teacher_size_speed(cfg)}),
            _row("student fp32", report.get("fp32", {})),
            _row(f"student {report.get('method')}", report.get("quantized", report.get("int8", {})))]
    reg = results.get("register") or {}
    promo = results.get("promote") or {}
    return {
        "rows": rows,
        "quantization": report.get("method"),
        "quantization_reason": report.get("reason"),
        "exports": {k: v.get("path") or f"none: {v.get('error')}" for k, v in (report.get("exports") or {}).items()},
        "run_dir": str(Path(cfg.run_dir).resolve()),
        "mlflow_tracking_uri": cfg.tracking_uri,
        "model": reg.get("model_uri"),  # built by register (tracking.model_uri)
        "champion": promo.get("champion_version"),
        "promoted": promo.get("promoted"),
        "promotion_reason": promo.get("reason"),
        "cache": {k: results.get("cache", {}).get(k) for k in
                  ("teacher_forwards", "shards_total", "shards_computed", "tokens", "bytes_per_token",
                   "cache_key", "corpus_usage")},
        "student_dir": (results.get("train") or {}).get("student_dir"),
        "init_from": (results.get("train") or {}).get("init_from"),
        "tuned": (results.get("tune") or {}).get("params"),
        "served": served,
        "stage_seconds": timings,
    }


def _teacher_size_speed(cfg: PipelineConfig) -> dict:
    """Teacher weights on disk (the GGUF or HF files) and its forward throughput measured by the cache stage."""
    from raydistill.tasks.cache.shards import config_cache

    manifest = config_cache(cfg).manifest
    path = manifest["teacher"].get("path")
    size = None
    if path and Path(path).is_file():
        size = Path(path).stat().st_size
    elif path and Path(path).is_dir():
        size = sum(f.stat().st_size for f in Path(path).glob("*.safetensors")) or None
    return {"size_bytes": size, "tokens_per_s": manifest.get("teacher_tokens_per_s")}


def _row(name: str, m: dict) -> dict:
    return {"model": name, "heldout_loss": m.get("heldout_loss"), "perplexity": m.get("perplexity"),
            "top1_agreement": m.get("top1_agreement"), "size_mb": _mb(m.get("size_bytes")),
            "rss_mb": None if m.get("rss_mb") is None else round(m["rss_mb"], 1), "tokens_per_s": m.get("tokens_per_s"),
            "gen_teacher_nll": m.get("gen_teacher_nll"), "gen_length": m.get("gen_length")}


def print_exports(exports: dict) -> None:
    """Where the chosen student's standard exports are, and the plain-transformers line that loads each."""
    if not exports:
        return
    print("\n=== raydistill exports (the quantized student, loadable without raydistill) ===")
    hf, gguf = exports.get("hf"), exports.get("gguf")
    if hf:
        print(f"hf:   {hf}\n      AutoModelForCausalLM.from_pretrained({hf!r})   # compressed-tensors; vLLM reads it too")
    if gguf:
        where = Path(gguf)
        print(f"gguf: {gguf}\n      AutoModelForCausalLM.from_pretrained({str(where.parent)!r}, gguf_file={where.name!r})"
              "   # or llama.cpp")


def _mb(n):
    return None if n is None else round(n / 2**20, 1)


def _fmt(v, spec):
    return "-" if v is None else format(v, spec)


def print_summary(summary: dict) -> None:
    print("\n=== raydistill summary (held-out split) ===")
    gen = any(r.get("gen_teacher_nll") is not None for r in summary["rows"])  # registry.gate.gen_prompts
    header = f"{'model':<26}{'loss':>9}{'ppl':>10}{'top1 agree':>12}{'size MB':>10}{'RSS MB':>9}{'tokens/s':>10}"
    header += f"{'gen NLL':>9}{'gen len':>9}" if gen else ""
    print(header)
    print("-" * len(header))
    for r in summary["rows"]:
        print(f"{r['model']:<26}{_fmt(r['heldout_loss'], '.3f'):>9}{_fmt(r['perplexity'], '.1f'):>10}"
              f"{_fmt(r['top1_agreement'], '.1%'):>12}{_fmt(r['size_mb'], '.1f'):>10}"
              f"{_fmt(r.get('rss_mb'), '.1f'):>9}{_fmt(r['tokens_per_s'], '.0f'):>10}"
              + (f"{_fmt(r.get('gen_teacher_nll'), '.3f'):>9}{_fmt(r.get('gen_length'), '.1f'):>9}" if gen else ""))
    if summary.get("quantization_reason"):
        print(f"\nquantization: {summary['quantization']}: {summary['quantization_reason']}")
    c = summary["cache"]
    usage = c.get("corpus_usage") or {}
    capped = f" ({usage['share']:.1%} of the corpus' ≈ {usage['corpus_tokens_estimate']} tokens: corpus.max_tokens=" \
             f"{usage['max_tokens']})" if usage.get("max_tokens") is not None and usage.get("share") is not None else ""
    print(f"\ncache: {c['shards_total']} shards, {c['tokens']} tokens{capped}, {_fmt(c['bytes_per_token'], '.1f')} "
          f"B/token, teacher forwards this run: {c['teacher_forwards']}")
    if summary.get("tuned"):
        print(f"tuned: {summary['tuned']}")
    promoted = "promoted to @champion" if summary["promoted"] else "NOT promoted"
    print(f"model version: {summary['model']} ({promoted}; {summary['promotion_reason']})")
    print(f"run dir: {summary['run_dir']}\nMLflow: {summary['mlflow_tracking_uri']}  "
          f"(mlflow ui --backend-store-uri {summary['mlflow_tracking_uri']})")
    if summary.get("served"):
        s = summary["served"]
        print(f"served: {s['url']}/v1/completions → {s['text']!r}")
    print(f"stage seconds: {summary['stage_seconds']}")

