"""The one verb table: what each ``raydistill`` verb is, reads, needs and can do.

``cli`` builds its parser from it without importing a verb module (``raydistill --help`` stays fast; only the
verb that runs is imported), ``submit`` checks the verb it ships against it, ``pipeline`` runs :data:`STAGES`
in order, and ``stage`` builds each stage's content key from ``reads`` and ``needs``. A unit test scans every
verb module for the config fields it reads and fails when one is neither in ``reads`` (or the ``reads`` of a
stage it needs) nor in ``uses``/:data:`LOCATIONS`: a field that changes a stage's outputs must change its key.

This module imports nothing heavy: keep it that way.
"""

from __future__ import annotations

from dataclasses import dataclass

LOCATIONS = ("run_dir", "cache.dir", "cluster", "registry.tracking_uri")
"""Where a run lives, runs and logs. Any verb may read these; no key needs them (the same inputs elsewhere give
the same outputs, and a stage's record lives in ``run_dir`` anyway)."""


@dataclass(frozen=True)
class Verb:
    """One CLI verb."""

    module: str
    """Module with ``run(cfg, args) -> dict``, imported only when the verb runs."""
    help: str
    """One line for ``raydistill --help``."""
    reads: tuple[str, ...] = ()
    """Config sections and single fields (``serve.prompt``) that decide the verb's outputs: its stage key covers
    exactly these, plus the keys of ``needs``."""
    uses: tuple[str, ...] = ()
    """Config read only for how it runs (parallelism, batch sizes that do not change results): never keyed."""
    needs: tuple[str, ...] = ()
    """Stages that must have finished in ``run_dir`` first; their keys enter this verb's key."""
    actions: tuple[str, ...] = ()
    """Bare words saying what to do (``cache inspect``); the first is the default."""
    argument: str | None = None
    """Config field that one bare word which is not an action sets (``lineage models:/m/3`` sets
    ``registry.lineage_uri``)."""
    flags: tuple[tuple[str, str], ...] = ()
    """``(--flag, a.b=c)``: a flag the verb takes as shorthand for a config override (``cache gc --dry-run``)."""

    @property
    def sections(self) -> tuple[str, ...]:
        """Config paths ``--help`` documents: ``reads`` then ``uses``."""
        return tuple(dict.fromkeys((*self.reads, *self.uses)))


_ALL = ("run_dir", "teacher", "corpus", "cache", "student", "train", "tune", "quantize", "registry", "serve",
        "cluster", "pipeline", "generate")

VERBS: dict[str, Verb] = {
    "generate": Verb(
        "raydistill.workflows.generate", "the teacher answers prompts (a chat JSONL for the cache), resumable",
        # its record key hashes the answers' content keys (tasks.answers.plan: prompt, sampling settings, teacher,
        # tokenizer, chat template); batch size and actor count do not change an answer
        reads=("teacher", "generate", "corpus.chat_template", "corpus.max_record_bytes"), uses=("cluster",)),
    "cache": Verb(
        "raydistill.workflows.cache", "run the teacher once over the corpus and store its soft targets",
        # its record key is the cache's content key (sha256 of its shard keys: tasks.cache.manifest.shard_key hashes
        # what a shard's bytes depend on in these sections; batch size and actor count do not change them)
        reads=("teacher", "corpus", "cache"), uses=("cluster",), actions=("run", "inspect", "gc"),
        flags=(("--verify", "cache.verify=true"), ("--dry-run", "cache.gc_dry_run=true"))),
    "train": Verb(
        "raydistill.workflows.train", "train the student from the cache (Ray Train + DeepSpeed)",
        # registry.model_name: train.init_from=champion starts from that model's @champion (workflows/continual.py)
        reads=("teacher", "corpus", "cache", "student", "train", "registry.model_name"), uses=("cluster",),
        needs=("cache",)),
    "tune": Verb(
        "raydistill.workflows.tune", "search alpha, T, lr, loss (LoRA, layers) over the same cache (Tune + ASHA)",
        # registry.gate: the best trial is the lowest held-out loss among trials passing the gate's thresholds
        reads=("teacher", "corpus", "cache", "student", "train", "tune", "registry.model_name", "registry.gate"),
        uses=("cluster",),
        needs=("cache",)),
    "quantize": Verb(
        "raydistill.workflows.quantize",
        "quantize the trained student by each method, score them against the teacher, keep the best",
        reads=("quantize", "serve.prompt", "registry.gate"), needs=("train",),  # the gate decides the choice
        actions=("run", "rerun")),  # rerun: quantize and score again even if done for the same key
    "register": Verb(
        "raydistill.workflows.register", "register the quantized student in MLflow with lineage tags",
        reads=("registry.model_name", "registry.experiment", "registry.tracking_uri"), needs=("quantize",)),
    "promote": Verb(
        "raydistill.workflows.promote", "move @champion to a model version if it passes the quality gate",
        reads=("registry.model_name", "registry.gate", "registry.promote_version", "registry.tracking_uri"),
        uses=("teacher",),  # registry.gate.gen_prompts: the teacher scores the candidate's and champion's answers
        actions=("run", "rollback")),  # rollback: @champion back to the champion before it (no gate)
    "lineage": Verb(
        "raydistill.workflows.lineage", "print a model version's lineage: runs, cache shards, corpus, teacher, code",
        reads=("registry.lineage_uri", "registry.model_name", "registry.tracking_uri"),
        argument="registry.lineage_uri"),  # raydistill lineage models:/NAME/VERSION
    "serve": Verb(
        "raydistill.workflows.serve", "serve models:/<name>@champion over HTTP (OpenAI-style completions)",
        reads=("serve", "registry.model_name", "registry.tracking_uri"), uses=("cluster",),
        actions=("run", "once")),  # once: start, answer one demo request (serve.prompt), stop
    "pipeline": Verb(
        "raydistill.workflows.pipeline", "run every stage in order, skipping finished ones", reads=_ALL),
    "report": Verb(
        "raydistill.workflows.report", "draw run_dir/report/index.html: curves, teacher vs students, trials, cache",
        uses=("registry.gate",)),  # not a stage: redrawn every time from the records of the stages that ran
    "submit": Verb(
        "raydistill.workflows.submit", "submit a verb as a Ray job to a remote cluster (the config travels)",
        reads=("submit",)),
    "job": Verb(
        "raydistill.workflows.jobs", "list submitted jobs, or show the status or logs of one, or stop it",
        reads=("submit",), actions=("status", "logs", "stop", "list")),
}

STAGES = ("cache", "tune", "train", "quantize", "register", "promote")
"""The verbs that leave a stage record in ``run_dir/stages``, in ``pipeline`` order."""
