"""Run the teacher once over the corpus and store its soft targets (resumable, shard by shard).

    raydistill cache --config tiny                       # compute (a rerun performs 0 teacher forwards)
    raydistill cache inspect --config tiny [--verify]    # describe the cache; --verify reads every shard
    raydistill cache gc --config tiny [--dry-run]        # remove shard files no cache references (past a grace)

Rerun of a finished cache: when the corpus files' names, sizes and mtimes and the config are what the cache was
planned from (its fingerprint), the stage lists ``shards/`` once (paged), checks every indexed file is there, and
is done: no Ray, no tokenizing, no shard byte read.

Otherwise the driver (this process) walks the corpus streams (``tasks/corpus.py``) in order and sends each to a
planning Ray task (``plan_task``: tokenize + pack, or the stream's stored plan record when nothing of it needs
computing), a bounded number at once; the tokens stay in Ray's object store. A planned shard whose file is listed
and whose entry an earlier index or log knows goes into the new index as is; a listed file nobody logged is
adopted (its header read); the rest go to ``TeacherActor``s, each loading the teacher once and holding
``cache.shards_in_flight`` shards (a threaded actor: the forward of one under a lock while the previous one is
coded and committed), committing its shards itself (atomic create, never a replace). The driver logs each entry
(append-only segments) and streams it into the new index: O(1) store writes and driver work per shard. An actor
lost with its process or node is replaced and its in-flight shards re-queued (``cluster.max_shard_retries``
times per shard); a store that fails past its retries re-queues the shard, three in a row end the run (rerun to
resume); an exception raised by the teacher code fails the run at once.
"""

from __future__ import annotations

import contextlib
import os
import time
import uuid
from collections import Counter, deque

import ray
from tqdm import tqdm

from raydistill.cluster.ray_init import cluster_device
from raydistill.tasks.cache.formats import format_params
from raydistill.tasks.cache.index import Index, IndexWriter, file64, local_copy
from raydistill.tasks.cache.manifest import (CACHES, PLAN_DIR, SHARD_DIR, CacheCorruptError, CacheLog, Totals,
                                             index_temp_dir, new_manifest, publish_index, read_head, shard_file,
                                             shard_key, write_head)
from raydistill.tasks.cache.resume import KnownEntries, Lease, contains, log_index, pool_files
from raydistill.tasks.cache.shards import entry_from_file
from raydistill.tasks.cache.store import PROCESS_REQUESTS, Store, StoreUnavailableError
from raydistill.tasks.config import CacheConfig, PipelineConfig
from raydistill.tasks.corpus import list_files
from raydistill.tasks.errors import DataError, WorkerLostError
from raydistill.tasks.plan import all_streams, check_plan, estimated_tokens, fingerprint, heldout_threshold
from raydistill.tasks.teacher import load_tokenizer, teacher_identity, tokenizer_hash
from raydistill.workflows import stage

ACTOR_PREFIX = "raydistill-cache-"
# What says an actor was lost (its process, its node, or the way to it), not that the teacher code raised: the
# driver replaces the actor and re-queues its shard. A RayTaskError (an exception in compute) is none of these.
LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
        ray.exceptions.LocalRayletDiedError, ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError)
MAX_STORE_FAILURES = 3  # shards in a row whose commit failed past the store's own retries: the store is down


@ray.remote(num_cpus=0, num_returns=2, max_retries=2)
def plan_task(stream, corpus_cfg, teacher_cfg, threshold: float, max_windows, cache_dir: str, want_tokens: bool):
    """Plan one stream: ``(record, tokens)`` — ``record`` is ``[[name, split, content hash, windows], …]``;
    ``tokens`` the shards' ``(int32 [W, L+1] tokens, uint8 [W, L] loss mask or None)`` pairs, or None when
    ``want_tokens`` is false and the stream's plan record was stored by an earlier run (then nothing is
    tokenized). Requests no CPU: it runs beside the teacher
    actors (tokenizing is ~10³× faster than the teacher forward)."""
    import json

    from raydistill.tasks.plan import plan_record, plan_stream, stat_key

    tok, tok_hash = _tokenizer(teacher_cfg)
    store = Store(cache_dir)
    rel = f"{PLAN_DIR}/{stat_key(stream, corpus_cfg, tok_hash, threshold, max_windows)}.json"
    if not want_tokens:
        try:
            return json.loads(store.read(rel)), None
        except FileNotFoundError:
            pass
    specs = plan_stream(stream, corpus_cfg, tok, threshold, max_windows)
    record = plan_record(specs)
    store.create(rel, json.dumps(record).encode())
    return record, [(s.tokens, s.mask) for s in specs]


_TOKENIZERS: dict = {}


def _tokenizer(teacher_cfg):
    """The teacher's tokenizer and its hash, once per worker process."""
    import json
    from dataclasses import asdict

    ident = json.dumps(asdict(teacher_cfg), sort_keys=True)
    if ident not in _TOKENIZERS:
        tok = load_tokenizer(teacher_cfg)
        _TOKENIZERS[ident] = (tok, tokenizer_hash(tok))
    return _TOKENIZERS[ident]


# No restarts by Ray: a restart waits for resources on a node that may be gone, and a task retried by Ray is
# invisible to the driver; the driver's pool (_Pool) replaces lost actors and bounds the retries itself.
@ray.remote(concurrency_groups={"control": 1}, max_restarts=0, max_task_retries=0)
class TeacherActor:
    """Holds one teacher (loaded once) and encodes + commits whole shards, ``cache.shards_in_flight`` at a time:
    one in the forward (a lock), the others coding and committing."""

    def __init__(self, teacher_cfg, threads: int, device: str = "cpu", store_retry_s: float = 60.0):
        import threading

        import torch

        from raydistill.tasks.device import DeviceError, resolve_device
        from raydistill.tasks.teacher import load_teacher

        os.environ["RAYDISTILL_STORE_RETRY_S"] = str(store_retry_s)
        torch.set_num_threads(threads)
        self.model, self.error, self.lock = None, None, threading.Lock()
        try:  # the driver planned `device` from the cluster's GPUs; this process must really see one
            self.model, _ = load_teacher(teacher_cfg, resolve_device(device))
        except DeviceError as e:  # raised by compute(): a typed error on the driver, not a dead actor
            self.error = e

    @ray.method(concurrency_group="control")
    def pid(self) -> int:
        """The actor's process id (its own thread group: answers while a shard is being computed)."""
        return os.getpid()

    @ray.method(concurrency_group="control")
    def node_id(self) -> str:
        """The Ray node this actor runs on (stage records list them: where the cache was computed)."""
        return ray.get_runtime_context().get_node_id()

    def compute(self, cache_dir: str, name: str, split: str, key: str, tokens, index: int,
                cache_cfg) -> tuple[dict, int, tuple[float, float], bool]:
        """Encode and commit shard ``tokens[index]``; returns (entry, teacher forwards, (start, end) on this
        process's clock, created). A shard another run committed meanwhile is adopted, not computed. The span, not
        its length: with ``cache.shards_in_flight`` > 1 the spans of one actor overlap (a shard waits for the
        forward lock while another is in it), and the driver counts their union as the actor's busy time."""
        from raydistill.tasks.cache.encode import encode_shard
        from raydistill.tasks.cache.shards import write_shard

        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        rel = shard_file(name, key)
        if Store(cache_dir).exists(rel):
            return entry_from_file(cache_dir, rel, key), 0, (t0, time.perf_counter()), False
        params, (shard, mask) = format_params(cache_cfg), tokens[index]
        with self.lock:
            fields, stats, forwards = encode_shard(self.model, shard, split, params, cache_cfg.temperature,
                                                   cache_cfg.batch_size, key, mask)
        entry, created = write_shard(cache_dir, name, split, key, shard, fields, stats, params, mask)
        return entry, forwards, (t0, time.perf_counter()), created


def actor_options(cache_cfg: CacheConfig, device: str) -> dict:
    """Ray resources of one teacher actor: ``cpus_per_actor`` CPUs, and ``num_gpus_per_actor`` GPUs on CUDA."""
    return {"num_cpus": cache_cfg.cpus_per_actor, "num_gpus": cache_cfg.num_gpus_per_actor if device == "cuda" else 0,
            "max_concurrency": cache_cfg.shards_in_flight}


def max_actors(cache_cfg: CacheConfig, device: str) -> int:
    """``cache.num_actors``, or as many as the Ray cluster has room for (one per GPU share, or per CPU share)."""
    if cache_cfg.num_actors is not None:
        return cache_cfg.num_actors
    resources = ray.cluster_resources()
    if device == "cuda":
        return max(1, int(resources.get("GPU", 0) // cache_cfg.num_gpus_per_actor))
    return max(1, int(resources.get("CPU", 1) // cache_cfg.cpus_per_actor))


def lost_actor(error: BaseException) -> bool:
    """Whether ``error`` (from ``ray.get`` on a cache actor's call) means the actor was lost — its process or node
    died, or it cannot be reached — rather than that teacher code raised (``RayTaskError``) or that ``__init__``
    failed (``actor_init_failed``): those fail the run, a retry would fail the same way."""
    if isinstance(error, ray.exceptions.RayTaskError):
        return False
    if isinstance(error, ray.exceptions.RayActorError):
        return not error.actor_init_failed
    return isinstance(error, LOST)


def _cause(error: BaseException) -> BaseException:
    """The exception a Ray task raised (its cause), or ``error`` itself."""
    if isinstance(error, ray.exceptions.RayTaskError):
        cause = error.as_instanceof_cause()
        return getattr(cause, "cause", None) or cause
    return error


class _Pool:
    """The teacher actors of one cache run, started as shards need them (up to :func:`max_actors`). Every actor is
    *probed* (``node_id``). The first actors get shards at once (they wait in the actor while it loads); a
    replacement gets shards only once its probe answers, so one waiting for resources (its node lost, none free)
    holds no shard while the survivors work. At most ``cluster.max_shard_retries`` replacements per planned actor."""

    def __init__(self, cfg: PipelineConfig, device: str):
        self.cfg, self.run_id, self.started, self.replaced = cfg, uuid.uuid4().hex[:8], [], 0
        self.options = actor_options(cfg.cache, device)
        if cfg.cluster.spread:
            self.options["scheduling_strategy"] = "SPREAD"
        self.device, self.limit = device, max_actors(cfg.cache, device)
        self.spare = 0
        self.probes: dict = {}  # probe ref -> actor still starting
        self.node: dict = {}  # actor -> the node it runs on (once its probe answered)
        self.lost: set = set()  # actors already replaced (a probe and a shard can both report one loss)
        self.load: dict = {}  # actor -> shards in flight on it
        self.ready_for_work: set = set()  # actors that take shards (the first ones at once, replacements once probed)

    def start(self, first: bool = True) -> None:
        name = f"{ACTOR_PREFIX}{self.run_id}-{len(self.started)}"
        actor = TeacherActor.options(**self.options, name=name).remote(
            self.cfg.teacher, self.cfg.cache.cpus_per_actor, self.device, self.cfg.cluster.store_retry_s)
        self.started.append(actor)
        self.load[actor] = 0
        self.probes[actor.node_id.remote()] = actor
        if first:
            self.spare += self.cfg.cluster.max_shard_retries
            self.ready_for_work.add(actor)

    def grow(self, queued: int) -> None:
        """Start actors while queued shards exceed what the running ones hold and the limit allows."""
        capacity = len(self.ready_for_work - self.lost) * self.cfg.cache.shards_in_flight
        while queued > capacity and len(self.started) - self.replaced < self.limit:
            self.start()
            capacity += self.cfg.cache.shards_in_flight

    def free(self):
        """An actor with room for one more shard (least loaded first), or None."""
        room = [a for a in self.ready_for_work if a not in self.lost and self.load[a] < self.cfg.cache.shards_in_flight]
        return min(room, key=lambda a: self.load[a]) if room else None

    def lose(self, actor, error: BaseException) -> None:
        """``actor`` is gone (or unreachable): kill it for good (an unreachable one must not hold its resources
        or commit later) and start a replacement while the budget lasts."""
        if actor in self.lost:
            return
        self.lost.add(actor)
        where = f"node {self.node.pop(actor)[:12]}" if actor in self.node else "its way up (not yet ready)"
        ray.kill(actor, no_restart=True)
        replace = self.spare > 0
        if replace:
            self.spare, self.replaced = self.spare - 1, self.replaced + 1
            self.start(first=False)
        print(f"cache: lost a teacher actor on {where} ({type(error).__name__}: {str(error).splitlines()[0]}); "
              f"{'started a replacement' if replace else 'no replacement left: continuing with the others'} "
              f"({self.replaced} replaced so far)")

    def probed(self, ref) -> None:
        """The probe ``ref`` answered: its actor takes shards from now on (or was lost meanwhile)."""
        actor = self.probes.pop(ref)
        if actor in self.lost:
            return
        try:
            self.node[actor] = ray.get(ref)
            self.ready_for_work.add(actor)
        except Exception as e:
            if not lost_actor(e):
                raise
            self.lose(actor, e)

    def node_of(self, actor) -> str | None:
        """The node of ``actor``, which just answered a shard (its probe, answered too, may not be read yet)."""
        probe = next((r for r, a in self.probes.items() if a == actor), None)
        if actor not in self.node and probe is not None:
            self.probed(probe)
        return self.node.get(actor)

    def close(self) -> None:
        for actor in self.started:
            ray.kill(actor, no_restart=True)


class _Run:
    """One cache run's state: what is known, the new index and log, the queues, and the counters."""

    def __init__(self, cfg: PipelineConfig, head: dict, store: Store, known: KnownEntries, present, device: str):
        self.cfg, self.head, self.store, self.known, self.present = cfg, head, store, known, present
        self.device, self.params, self.temperature = device, format_params(cfg.cache), cfg.cache.temperature
        self.index, self.log, self.totals = IndexWriter(index_temp_dir(store)), CacheLog(store, head["id"]), Totals()
        self.queue: deque = deque()  # (name, split, key, tokens ref, index in it)
        self.pending: dict = {}  # compute ref -> (actor, shard tuple)
        self.tries: dict = {}
        self.store_failures = 0
        self.planned = self.windows = 0
        self.short: list[str] = []
        self.splits: set = set()
        self.nodes: set = set()
        self.busy_until: dict = {}  # actor -> the end of its last counted span (see _busy_seconds)
        self.out = {"teacher_forwards": 0, "actor_s": 0.0, "actors_replaced": 0, "shards_requeued": 0,
                    "computed_tokens": 0, "shards_computed": 0, "shards_committed": 0, "shards_adopted": 0,
                    "shards_reused": 0, "streams_tokenized": 0}

    def record(self, entry: dict, log: bool = True) -> None:
        """``entry`` is part of this cache: into the new index (and the log, unless it came from there)."""
        self.totals.add(entry)
        self.index.add(entry)
        if log:
            self.log.add(entry)

    def planned_shard(self, name: str, split: str, content: str, windows: int) -> tuple | None:
        """Account one planned shard: recorded if its file exists (no request when its entry is known), else the
        ``(name, split, key)`` still to compute."""
        self.planned += 1
        self.windows += windows
        self.splits.add(split)
        key = shard_key(self.head["teacher"], self.head["tokenizer_hash"], content, self.params, self.temperature)
        rel = shard_file(name, key)
        fid = file64(rel.rsplit("/", 1)[1])
        if contains(self.present, [fid])[0]:
            entry = self.known.get(fid)
            if entry is not None and entry["key"] == key:
                self.record(entry, log=False)
                self.out["shards_reused"] += 1
                return None
            try:  # committed by a run that died before logging it, or shared with another cache: adopt it
                self.record(entry_from_file(self.cfg.cache_dir, rel, key))
                self.out["shards_adopted"] += 1
                return None
            except (CacheCorruptError, FileNotFoundError) as e:
                print(f"cache: {e}; recomputing it")
                with contextlib.suppress(FileNotFoundError):
                    self.store.remove(rel)
        return name, split, key


# ---------------------------------------------------------------------------------------------- the driver loop

def _plan_streams(run: _Run, files: list, threshold: float, pool: _Pool, bar) -> None:
    """Walk the streams in order through plan tasks (a bounded window of them), queueing the shards to compute and
    dispatching them as actors free up."""
    cfg = run.cfg
    max_windows = None if cfg.corpus.max_tokens is None else cfg.corpus.max_tokens // cfg.corpus.seq_len
    capped = max_windows is not None
    # plan tasks at once: under a cap one (each stream's room depends on the last); else enough to keep the actors
    # fed, at most 16 (each is a worker process holding a tokenizer and one segment's tokens)
    window = 1 if capped else min(16, max(2, 2 * pool.limit))
    streams, inflight = all_streams(cfg.corpus, files), deque()

    def submit(stream, want_tokens: bool, room):
        refs = plan_task.remote(stream, cfg.corpus, cfg.teacher, threshold, room, cfg.cache_dir, want_tokens)
        inflight.append((stream, refs, want_tokens, room))

    exhausted = False
    while True:
        while not exhausted and len(inflight) < window and len(run.queue) < 64 * max(1, pool.limit):
            room = None if not capped else max_windows - run.windows
            if capped and room <= 0:
                exhausted = True
                break
            stream = next(streams, None)
            if stream is None:
                exhausted = True
                break
            submit(stream, False, room)
        if not inflight:
            if run.queue or run.pending:
                _step(run, pool, bar)
                continue
            return
        stream, (record_ref, tokens_ref), want_tokens, room = inflight[0]
        if not ray.wait([record_ref], timeout=0)[0]:
            _step(run, pool, bar, extra=[record_ref])
            continue
        inflight.popleft()
        try:
            record = ray.get(record_ref)
        except ray.exceptions.RayTaskError as e:
            raise _cause(e) from None
        if not _accept(run, record, tokens_ref, want_tokens, stream):
            # shards to compute, but a stored plan has no tokens: plan the stream again, with tokens
            inflight.appendleft((stream, plan_task.remote(stream, cfg.corpus, cfg.teacher, threshold, room,
                                                          cfg.cache_dir, True), True, room))
        pool.grow(len(run.queue))
        _dispatch(run, pool)


def _accept(run: _Run, record: list, tokens_ref, have_tokens: bool, stream):
    """Account a stream's plan; False (nothing accounted) when some shard needs computing but the tokens were not
    produced."""
    if not record:
        run.short.append(stream.id)
    if not have_tokens:
        keys = [(r, shard_key(run.head["teacher"], run.head["tokenizer_hash"], r[2], run.params, run.temperature))
                for r in record]
        fids = [file64(shard_file(r[0], k).rsplit("/", 1)[1]) for r, k in keys]
        ok = contains(run.present, fids)
        if not ok.all() or any(run.known.get(f) is None for f in fids):
            return False
    for i, (name, split, content, windows) in enumerate(record):
        todo = run.planned_shard(name, split, content, windows)
        if todo is not None:
            run.queue.append((*todo, tokens_ref, i))
    if have_tokens:
        run.out["streams_tokenized"] += 1
    return True


def _dispatch(run: _Run, pool: _Pool) -> None:
    while run.queue:
        actor = pool.free()
        if actor is None:
            return
        shard = run.queue.popleft()
        name, split, key, tokens_ref, i = shard
        ref = actor.compute.remote(run.cfg.cache_dir, name, split, key, tokens_ref, i, run.cfg.cache)
        run.pending[ref] = (actor, shard)
        pool.load[actor] += 1


def _step(run: _Run, pool: _Pool, bar, extra: list = ()) -> None:
    """Wait for one result (a shard, an actor probe, or one of ``extra``) and handle it."""
    if not run.pending and not pool.probes and not extra:
        if run.queue and not (pool.ready_for_work - pool.lost):
            raise WorkerLostError(f"cache: every teacher actor was lost and {pool.replaced} replacements are used "
                                  f"up; {len(run.queue)} shards left. Rerun to resume (committed shards are kept), "
                                  f"or raise cluster.max_shard_retries={run.cfg.cluster.max_shard_retries}")
        _dispatch(run, pool)
        return
    done, _ = ray.wait([*run.pending, *pool.probes, *extra], num_returns=1, timeout=60)
    if not done:
        if not run.pending:
            print(f"cache: waiting for cluster resources for {len(pool.probes)} teacher actor(s) {pool.options}")
        return
    ref = done[0]
    if ref in pool.probes:
        pool.probed(ref)
    elif ref in run.pending:
        _finished(run, pool, ref, bar)
    _dispatch(run, pool)


def _busy_seconds(busy_until: dict, actor, span: tuple[float, float]) -> float:
    """The part of ``span`` (one shard's start and end on ``actor``'s clock) not already counted for that actor:
    summed over its shards, the union of their spans — its busy time however many shards it held at once."""
    start, end = span
    last = busy_until.get(actor, start)
    busy_until[actor] = max(last, end)
    return max(0.0, end - max(start, last))


def _finished(run: _Run, pool: _Pool, ref, bar) -> None:
    actor, shard = run.pending.pop(ref)
    pool.load[actor] -= 1
    name, split, key, tokens_ref, i = shard
    try:
        entry, forwards, span, created = ray.get(ref)
    except Exception as e:
        cause = _cause(e)
        if isinstance(cause, StoreUnavailableError):
            run.store_failures += 1
            if run.store_failures >= MAX_STORE_FAILURES:
                raise cause from None
            print(f"cache: {cause}; re-queueing shard {name}")
            run.queue.appendleft(shard)
            return
        if not lost_actor(e):
            raise cause from None  # the teacher code raised: a retry would raise again
        _requeue(run, shard, e)
        run.out["shards_requeued"] += 1
        pool.lose(actor, e)
        return
    run.store_failures = 0
    node = pool.node_of(actor)
    if node:
        run.nodes.add(node)
    run.out["teacher_forwards"] += forwards
    run.out["actor_s"] += _busy_seconds(run.busy_until, actor, span)
    run.out["shards_computed"] += 1 if forwards else 0
    run.out["computed_tokens"] += entry["tokens"] if forwards else 0
    run.out["shards_committed" if created else "shards_adopted"] += 1
    run.record(entry)
    bar.update(1)


def _requeue(run: _Run, shard: tuple, error: BaseException) -> None:
    """Put a lost actor's shard back at the queue's head (nothing of it was committed: the commit is atomic), or
    fail when it was lost ``cluster.max_shard_retries`` times already."""
    name, _, key, _, _ = shard
    run.tries[key] = run.tries.get(key, 0) + 1
    if run.tries[key] > run.cfg.cluster.max_shard_retries:
        raise WorkerLostError(f"cache: shard {name} lost its teacher actor {run.tries[key]} times (last: "
                              f"{type(error).__name__}); cluster.max_shard_retries="
                              f"{run.cfg.cluster.max_shard_retries}: raise it, or rerun to resume (committed "
                              "shards are kept)") from error
    run.queue.appendleft(shard)


# ---------------------------------------------------------------------------------------------------- the verb

def _local_device(cfg: PipelineConfig) -> str | None:
    """The device known without starting Ray: ``cpu`` when asked for, or for ``auto`` on an embedded cluster of a
    machine without CUDA; None when only the Ray cluster can tell."""
    if cfg.cluster.device == "cpu":
        return "cpu"
    if cfg.cluster.device == "auto" and cfg.cluster.address is None and not os.environ.get("RAY_ADDRESS"):
        import torch

        return None if torch.cuda.is_available() else "cpu"
    return None


def _head(cfg: PipelineConfig, device: str) -> dict:
    identity = teacher_identity(cfg.teacher, device)
    _, tok_hash = _tokenizer(cfg.teacher)
    return new_manifest(identity, tok_hash, cfg.cache, cfg.corpus)


def _settings(cfg: PipelineConfig, head: dict, threshold: float) -> dict:
    return {"cache": head["id"], "threshold": threshold, "max_tokens": cfg.corpus.max_tokens,
            "segment_bytes": cfg.corpus.segment_bytes, "seq_len": cfg.corpus.seq_len}


def _finished_cache(store: Store, head: dict, fp: str) -> dict | None:
    """The stored head when the cache is finished for exactly this plan and every indexed file is listed."""
    old = read_head(store, head["id"])
    if not old or not old.get("complete") or old.get("fingerprint") != fp or not old.get("index"):
        return None
    try:
        index = Index(local_copy(store, old["index"], old["index_sha256"]))
    except (FileNotFoundError, CacheCorruptError):
        return None
    present = pool_files(store)
    return old if contains(present, index.column("file64")).all() else None


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """Compute (or complete) the cache; ``inspect`` describes it (``--verify`` reads every shard), ``gc`` removes
    unreferenced shard files. Never skipped as a whole: a finished cache is recognised by its fingerprint, an
    unfinished one resumes shard by shard; its record's key is the cache's content key."""
    if action == "inspect":
        return inspect(cfg)
    if action == "gc":
        return gc(cfg)
    t0, before = time.time(), Counter(PROCESS_REQUESTS)
    stage.start(cfg, "cache", skip=False)
    store = Store(cfg.cache_dir, retry_s=cfg.cluster.store_retry_s)
    files = list_files(cfg.corpus)
    threshold = heldout_threshold(cfg.corpus, estimated_tokens(files, cfg.corpus.max_tokens))
    device = _local_device(cfg)
    if device is None:  # where the teacher runs decides its dtype (part of the cache's identity): ask the cluster
        stage.start(cfg, "cache", skip=False, ray=True)
        device = cluster_device(cfg.cluster)
    head = _head(cfg, device)
    fp = fingerprint(files, _settings(cfg, head, threshold))
    finished = _finished_cache(store, head, fp)
    if finished is not None:
        print(f"cache: {finished['totals']['shards']} shards of {store.url(CACHES + '/' + head['id'])} "
              f"finished for this corpus and config: nothing to do")
        return _outputs(cfg, store, finished, {"teacher_forwards": 0, "actor_s": 0.0, "shards_computed": 0,
                                               "computed_tokens": 0}, time.time() - t0, files, before)
    stage.start(cfg, "cache", skip=False, ray=True)
    return _build(cfg, store, head, files, threshold, fp, device, t0, before)


def _build(cfg, store: Store, head: dict, files: list, threshold: float, fp: str, device: str, t0: float,
           before: Counter) -> dict:
    old = read_head(store, head["id"]) or {}
    store.clean_temps((SHARD_DIR,))
    previous = None
    if old.get("index"):
        with contextlib.suppress(FileNotFoundError, CacheCorruptError):
            previous = Index(local_copy(store, old["index"], old["index_sha256"]))
    known = KnownEntries([previous, log_index(store, head["id"])])
    present = pool_files(store)
    write_head(store, {**head, "complete": False, "planned_shards": None,
                       **{k: old[k] for k in ("index", "index_sha256", "key", "totals") if old.get(k)}})
    run = _Run(cfg, head, store, known, present, device)
    pool = _Pool(cfg, device)
    print(f"cache: planning {len(files)} corpus file(s) into {store.url(CACHES + '/' + head['id'])} "
          f"({len(present)} shard files in the dir, {len(known)} entries known) on {device}")
    bar = tqdm(unit="shard", desc="cache", dynamic_ncols=True)
    rss = [_rss_mb()]
    try:
        with Lease(store, head["id"], run.log.run_id):
            _plan_streams(run, files, threshold, pool, bar)
            while run.queue or run.pending:
                _step(run, pool, bar)
            rss.append(_rss_mb())
            run.log.flush()
            bar.close()
            check_plan(cfg.corpus, run.windows, run.short, run.splits)
            head.update(planned_shards=run.planned, complete=True, fingerprint=fp, totals=run.totals.as_dict(),
                        vocab_size=run.totals.vocab_size, corpus_usage=_usage(cfg, files, run.windows))
            busy = run.out["actor_s"]
            head["teacher_tokens_per_s"] = (run.out["computed_tokens"] / busy if busy
                                            else old.get("teacher_tokens_per_s"))
            publish_index(store, head, run.index)
            write_head(store, head)
            run.log.remove_own()
    except BaseException:
        run.index.abort()
        with contextlib.suppress(Exception):
            run.log.flush()  # what was committed stays known to the next run
        raise
    finally:
        pool.close()
        bar.close()
    run.out.update(actors_replaced=pool.replaced, actor_nodes=sorted(run.nodes), actors=len(pool.started),
                   driver_rss_mb=rss)
    return _outputs(cfg, store, head, run.out, time.time() - t0, files, before)


def _rss_mb() -> float | None:
    """This process's resident memory (MB; Linux), for the stage record: what the driver holds before the first
    shard and after the last."""
    try:
        with open("/proc/self/statm") as f:
            return round(int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20, 1)
    except (OSError, ValueError):
        return None


def _usage(cfg: PipelineConfig, files: list, windows: int) -> dict:
    est = estimated_tokens(files, None)
    used = windows * cfg.corpus.seq_len
    return {"tokens": used, "corpus_tokens_estimate": est, "share": round(used / est, 4) if est else None,
            "max_tokens": cfg.corpus.max_tokens}


def _outputs(cfg: PipelineConfig, store: Store, head: dict, out: dict, wall: float, files: list,
             before: Counter) -> dict:
    """Print the summary line and record the stage; ``store_requests`` are this process's requests since
    ``before`` (the driver's: listing, heads, index, log; ``shard_bytes_read`` counts shard bytes it read)."""
    totals, usage = head["totals"], head.get("corpus_usage") or {}
    cap = f"; corpus.max_tokens={cfg.corpus.max_tokens}: used {usage.get('tokens')} of ≈ " \
          f"{usage.get('corpus_tokens_estimate')} tokens ({100 * (usage.get('share') or 0):.1f} %)" \
        if cfg.corpus.max_tokens is not None else ""
    print(f"cache: {totals['tokens']} tokens in {totals['shards']} shards, {totals['bytes_per_token'] or 0:.1f} "
          f"bytes/token, {wall:.1f} s, {out['teacher_forwards']} teacher forwards; teacher held-out NLL "
          f"{totals['teacher_heldout_nll']}; {out.get('actors_replaced', 0)} teacher actors replaced, "
          f"{out.get('shards_requeued', 0)} shards re-queued{cap}")
    outputs = {**out, "shards_total": head["planned_shards"], "tokens": totals["tokens"], "bytes": totals["bytes"],
               "bytes_per_token": totals["bytes_per_token"], "teacher_heldout_nll": totals["teacher_heldout_nll"],
               "teacher_heldout_top1_acc": totals["teacher_heldout_top1_acc"], "wall_s": wall,
               "teacher_tokens_per_s": head.get("teacher_tokens_per_s"), "cache_dir": cfg.cache_dir,
               "cache_id": head["id"], "cache_key": head["key"], "corpus_usage": usage,
               "corpus_files": len(files), "store_requests": dict(PROCESS_REQUESTS - before)}
    outputs.setdefault("actor_nodes", [])
    outputs.setdefault("actors_replaced", 0)
    outputs.setdefault("shards_requeued", 0)
    stage.record(cfg, "cache", head["key"], outputs, paths=[store.url(f"{CACHES}/{head['id']}/head.json")])
    return outputs


def inspect(cfg: PipelineConfig) -> dict:
    """Print what the cache holds and whether every indexed shard file is listed; with ``cache.verify`` also read
    every shard and check its checksum (:class:`DataError` naming the first bad shard)."""
    from raydistill.tasks.cache.shards import find_cache

    cache = find_cache(cfg.cache_dir, cfg.teacher, cfg.cache, cfg.corpus)
    m, t = cache.manifest, cache.totals
    print(f"cache {cache.where}: format={m['format']} params={m['params']} temperature={m['temperature']} "
          f"version={m['format_version']} complete={m.get('complete')}")
    print(f"  teacher: {m['teacher']['source']} ({m['teacher']['kind']}) weights sha256 "
          f"{m['teacher']['weights_sha256'][:16]}… dtype={m['teacher']['dtype']}")
    print(f"  tokenizer sha256 {m['tokenizer_hash'][:16]}…  vocab={m['vocab_size']}  seq_len={m['seq_len']}")
    print(f"  shards: {len(cache.shards('train'))} train + {len(cache.shards('heldout'))} heldout "
          f"(planned {m.get('planned_shards')}); tokens {t.get('tokens')}; bytes {t.get('bytes')}; "
          f"bytes/token {t.get('bytes_per_token')}; corpus used {m.get('corpus_usage')}")
    print(f"  teacher held-out NLL {t.get('teacher_heldout_nll')}  top-1 acc {t.get('teacher_heldout_top1_acc')}")
    present = pool_files(Store(cfg.cache_dir))
    missing = ~contains(present, cache.index.column("file64"))
    if missing.any():
        first = cache.index.entry(int(missing.nonzero()[0][0]))
        raise DataError(f"inspect: {int(missing.sum())} indexed shard files are missing, e.g. {first['name']} "
                        f"({first['file']}); rerun `raydistill cache` to recompute them")
    print(f"  all {len(cache.index)} indexed shard files are in the store")
    if cfg.cache.verify:
        try:
            names = cache.verify()
        except CacheCorruptError as e:
            raise DataError(f"inspect: {e}") from None
        print(f"  verified {len(names)} shards: all checksums ok")
    return {"verified": len(cache.index) if cfg.cache.verify else 0, "missing": int(missing.sum()), **t}


def gc(cfg: PipelineConfig) -> dict:
    """Remove unreferenced shard files (and stale indexes and logs) older than ``cache.gc_grace_hours``."""
    from raydistill.tasks.cache.gc import collect

    store = Store(cfg.cache_dir, retry_s=cfg.cluster.store_retry_s)
    plan = collect(store, cfg.cache.gc_grace_hours * 3600, cfg.cache.gc_dry_run)
    verb = "would remove" if cfg.cache.gc_dry_run else "removed"
    print(f"cache gc {store.url()}: {verb} {len(plan.remove)} file(s), {plan.bytes} bytes; kept {plan.referenced} "
          f"shard files referenced by {len(plan.caches)} cache(s) and {plan.too_young} unreferenced ones younger "
          f"than cache.gc_grace_hours={cfg.cache.gc_grace_hours}")
    for rel, size in plan.remove[:20]:
        print(f"  {verb}: {rel} ({size} bytes)")
    if len(plan.remove) > 20:
        print(f"  … and {len(plan.remove) - 20} more")
    return {"removed": [r for r, _ in plan.remove], "bytes": plan.bytes, "dry_run": cfg.cache.gc_dry_run,
            "referenced": plan.referenced, "too_young": plan.too_young, "caches": plan.caches}

