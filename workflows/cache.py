"""Run the teacher once over the corpus and store its soft targets (resumable, shard by shard).

    raydistill cache --config tiny                  # compute (a rerun performs 0 teacher forwards)
    raydistill cache inspect --config tiny          # describe the cache and verify every checksum

Driver (this process): tokenizer + shards + keys; shards already committed with the same key are skipped.
Workers: ``cache.num_actors`` ``TeacherActor``s, each loading the teacher once and committing its shards
itself (file write + atomic rename); the driver records each entry in the manifest as it arrives, so a
killed run resumes where it stopped. An actor lost with its process or node (or unreachable) is killed and
replaced, and its in-flight shard — uncommitted, the commit is atomic — re-queued (``cluster.max_shard_retries``
times per shard); an exception raised by the teacher code fails the run at once.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid
from collections import deque

import ray
from tqdm import tqdm

from raydistill.cluster.ray_init import cluster_device
from raydistill.tasks.cache.formats import format_params
from raydistill.tasks.cache.manifest import (MANIFEST, SHARD_DIR, CacheCorruptError, add_entry, cache_key, new_manifest,
                                             shard_file, shard_key, write_manifest)
from raydistill.tasks.cache.shards import entry_from_file, open_cache
from raydistill.tasks.cache.store import Store
from raydistill.tasks.config import CacheConfig, PipelineConfig
from raydistill.tasks.corpus import build_shards
from raydistill.tasks.errors import DataError, WorkerLostError
from raydistill.tasks.teacher import load_tokenizer, teacher_identity, tokenizer_hash
from raydistill.workflows import stage

ACTOR_PREFIX = "raydistill-cache-"
# What says an actor was lost (its process, its node, or the way to it), not that the teacher code raised: the
# driver replaces the actor and re-queues its shard. A RayTaskError (an exception in compute) is none of these.
LOST = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
        ray.exceptions.LocalRayletDiedError, ray.exceptions.ObjectLostError, ray.exceptions.OutOfMemoryError)


# No restarts by Ray: a restart waits for resources on a node that may be gone, and a task retried by Ray is
# invisible to the driver; the driver's pool (_Pool) replaces lost actors and bounds the retries itself.
@ray.remote(concurrency_groups={"control": 1}, max_restarts=0, max_task_retries=0)
class TeacherActor:
    """Holds one teacher (loaded once) and encodes + commits whole shards."""

    def __init__(self, teacher_cfg, threads: int, device: str = "cpu"):
        import torch

        from raydistill.tasks.device import DeviceError, resolve_device
        from raydistill.tasks.teacher import load_teacher

        torch.set_num_threads(threads)
        self.model, self.error = None, None
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

    def compute(self, cache_dir: str, name: str, split: str, key: str, tokens, cache_cfg) -> tuple[dict, int, float]:
        """Encode and commit one shard; returns (manifest entry, teacher forwards performed, seconds)."""
        from raydistill.tasks.cache.encode import encode_shard
        from raydistill.tasks.cache.shards import commit_shard

        if self.error is not None:
            raise self.error
        t0 = time.perf_counter()
        params = format_params(cache_cfg)
        fields, stats, forwards = encode_shard(self.model, tokens, split, params, cache_cfg.temperature,
                                               cache_cfg.batch_size, key)
        entry = commit_shard(cache_dir, name, split, key, tokens, fields, stats, params)
        return entry, forwards, time.perf_counter() - t0


def plan(cfg: PipelineConfig, device: str = "cpu") -> tuple[dict, list]:
    """(manifest skeleton, [(ShardSpec, key)]) for ``cfg`` with the teacher on ``device``: everything the driver
    knows before the teacher runs."""
    tok = load_tokenizer(cfg.teacher)
    identity, tok_hash = teacher_identity(cfg.teacher, device), tokenizer_hash(tok)
    specs = build_shards(cfg.corpus, tok)
    params = format_params(cfg.cache)
    keyed = [(s, shard_key(identity, tok_hash, s.content_hash, params, cfg.cache.temperature)) for s in specs]
    manifest = new_manifest(identity, tok_hash, cfg.cache, cfg.corpus)
    manifest["planned_shards"] = len(keyed)
    return manifest, keyed


def _reuse(store: Store, cache_dir: str, manifest: dict, keyed: list) -> list:
    """Put already-committed shards into ``manifest``; return the (spec, key) pairs still to compute."""
    old = {}
    if store.exists(MANIFEST):
        try:
            old = {e["key"]: e for e in open_cache(cache_dir).shards()}
        except (CacheCorruptError, ValueError) as e:
            print(f"cache: ignoring unreadable manifest ({e}); shard files are re-adopted by key")
    todo = []
    for spec, key in keyed:
        rel = shard_file(spec.name, key)
        if not store.exists(rel):
            todo.append((spec, key))
            continue
        try:
            if key in old and old[key]["file"] == rel:
                if hashlib.sha256(store.read(rel)).hexdigest() != old[key]["sha256"]:
                    raise CacheCorruptError(f"shard {spec.name}: sha256 mismatch in {rel}")
                add_entry(manifest, old[key])
            else:  # committed, but the run died before the manifest listed it: adopt the file
                add_entry(manifest, entry_from_file(cache_dir, rel, key))
        except CacheCorruptError as e:
            print(f"cache: {e}; recomputing it")
            store.remove(rel)
            todo.append((spec, key))
    return todo


def actor_options(cache_cfg: CacheConfig, device: str) -> dict:
    """Ray resources of one teacher actor: ``cpus_per_actor`` CPUs, and ``num_gpus_per_actor`` GPUs on CUDA."""
    return {"num_cpus": cache_cfg.cpus_per_actor, "num_gpus": cache_cfg.num_gpus_per_actor if device == "cuda" else 0}


def lost_actor(error: BaseException) -> bool:
    """Whether ``error`` (from ``ray.get`` on a cache actor's call) means the actor was lost — its process or node
    died, or it cannot be reached — rather than that teacher code raised (``RayTaskError``) or that ``__init__``
    failed (``actor_init_failed``): those fail the run, a retry would fail the same way."""
    if isinstance(error, ray.exceptions.RayTaskError):
        return False
    if isinstance(error, ray.exceptions.RayActorError):
        return not error.actor_init_failed
    return isinstance(error, LOST)


class _Pool:
    """The teacher actors of one cache run. Every actor is *probed* (``node_id``). The first actors get a shard
    at once (it waits in the actor while it loads: every planned actor computes); a replacement gets shards only
    once its probe answers, so one waiting for resources (its node lost, none free) holds no shard while the
    survivors work through the queue. At most ``cluster.max_shard_retries`` replacements per planned actor."""

    def __init__(self, cfg: PipelineConfig, device: str, n_actors: int):
        self.cfg, self.run_id, self.started, self.replaced = cfg, uuid.uuid4().hex[:8], [], 0
        self.options = actor_options(cfg.cache, device)
        if cfg.cluster.spread:
            self.options["scheduling_strategy"] = "SPREAD"
        self.device, self.spare = device, cfg.cluster.max_shard_retries * n_actors
        self.probes: dict = {}  # probe ref -> actor still starting
        self.node: dict = {}  # actor -> the node it runs on (once its probe answered)
        self.lost: set = set()  # actors already replaced (a probe and a shard can both report one loss)
        for _ in range(n_actors):
            self.start()

    def start(self) -> None:
        name = f"{ACTOR_PREFIX}{self.run_id}-{len(self.started)}"
        actor = TeacherActor.options(**self.options, name=name).remote(self.cfg.teacher, self.cfg.cache.cpus_per_actor,
                                                                        self.device)
        self.started.append(actor)
        self.probes[actor.node_id.remote()] = actor

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
            self.start()
        print(f"cache: lost a teacher actor on {where} ({type(error).__name__}: {str(error).splitlines()[0]}); "
              f"{'started a replacement' if replace else 'no replacement left: continuing with the others'} "
              f"({self.replaced} replaced so far)")

    def ready(self, ref) -> object | None:
        """The actor whose probe ``ref`` answered, now ready for shards (None if it was lost meanwhile)."""
        actor = self.probes.pop(ref)
        if actor in self.lost:
            return None
        try:
            self.node[actor] = ray.get(ref)
            return actor
        except Exception as e:
            if not lost_actor(e):
                raise
            self.lose(actor, e)
            return None

    def node_of(self, actor) -> str | None:
        """The node of ``actor``, which just answered a shard (its probe, answered too, may not be read yet)."""
        probe = next((r for r, a in self.probes.items() if a == actor), None)
        if actor not in self.node and probe is not None:
            self.ready(probe)
        return self.node.get(actor)

    def close(self) -> None:
        for actor in self.started:
            ray.kill(actor, no_restart=True)


def _compute(cfg: PipelineConfig, todo: list, manifest: dict, device: str = "cpu",
             nodes: set | None = None) -> dict:
    """Run the actor pool over ``todo``; records entries as they finish (and in ``nodes`` the Ray nodes that
    computed them). Returns {teacher_forwards, actor_s (seconds spent encoding + committing: throughput without
    start-up), actors_replaced, shards_requeued}."""
    pool = _Pool(cfg, device, min(cfg.cache.num_actors, len(todo)))
    queue, pending, idle, tries = deque(todo), {}, [], {}
    out = {"teacher_forwards": 0, "actor_s": 0.0, "actors_replaced": 0, "shards_requeued": 0, "tokens": 0}
    nodes = set() if nodes is None else nodes
    bar = tqdm(total=len(todo), unit="shard", desc="cache", dynamic_ncols=True)
    t0 = time.time()
    idle += pool.started  # the first shards wait in the actors while they start: each planned actor computes
    try:
        while queue or pending:
            while idle and queue:  # one shard in flight per actor: its threads are all busy with it
                actor = idle.pop()
                if actor in pool.lost:
                    continue
                spec, key = queue.popleft()
                ref = actor.compute.remote(cfg.cache_dir, spec.name, spec.split, key, spec.tokens, cfg.cache)
                pending[ref] = (actor, spec, key)
            done = _wait(cfg, pool, pending, len(queue))
            if done is None:
                continue
            if done in pool.probes:
                actor = pool.ready(done)
                busy = {a for a, _, _ in pending.values()}
                idle += [actor] if actor is not None and actor not in busy and actor not in idle else []
                continue
            actor, spec, key = pending.pop(done)
            try:
                entry, n, seconds = ray.get(done)
            except Exception as e:
                if not lost_actor(e):
                    raise  # the teacher code raised: a retry would raise again
                _requeue(cfg, tries, spec, key, queue, e)
                out["shards_requeued"] += 1
                pool.lose(actor, e)
                continue
            node = pool.node_of(actor)
            if node:
                nodes.add(node)
            idle.append(actor)
            _record_shard(cfg, manifest, entry, out, n, seconds)
            bar.set_postfix(tok_s=f"{out['tokens'] / max(time.time() - t0, 1e-9):.0f}")
            bar.update(1)
        bar.close()
    finally:
        pool.close()
    out["actors_replaced"] = pool.replaced
    return out


def _wait(cfg: PipelineConfig, pool: _Pool, pending: dict, queued: int):
    """The next shard result or actor probe to answer (None after a minute with neither)."""
    if not pending and not pool.probes:
        raise WorkerLostError(f"cache: every teacher actor was lost and {pool.replaced} replacements are used up; "
                              f"{queued} shards left. Rerun to resume (committed shards are kept), or raise "
                              f"cluster.max_shard_retries={cfg.cluster.max_shard_retries}")
    done, _ = ray.wait([*pending, *pool.probes], num_returns=1, timeout=60)
    if not done and not pending:  # say why nothing moves: no node has room for an actor (yet)
        print(f"cache: waiting for cluster resources for {len(pool.probes)} teacher actor(s) {pool.options}")
    return done[0] if done else None


def _record_shard(cfg: PipelineConfig, manifest: dict, entry: dict, out: dict, forwards: int, seconds: float):
    out["teacher_forwards"] += forwards
    out["actor_s"] += seconds
    out["tokens"] += entry["tokens"]
    add_entry(manifest, entry)
    write_manifest(cfg.cache_dir, manifest)


def _requeue(cfg: PipelineConfig, tries: dict, spec, key: str, queue: deque, error: BaseException) -> None:
    """Put a lost actor's shard back at the queue's head (nothing of it was committed: the commit is atomic), or
    fail when it was lost ``cluster.max_shard_retries`` times already."""
    tries[key] = tries.get(key, 0) + 1
    if tries[key] > cfg.cluster.max_shard_retries:
        raise WorkerLostError(f"cache: shard {spec.name} lost its teacher actor {tries[key]} times (last: "
                           f"{type(error).__name__}); cluster.max_shard_retries={cfg.cluster.max_shard_retries}: "
                           f"raise it, or rerun to resume (committed shards are kept)") from error
    queue.appendleft((spec, key))


def _collect_garbage(store: Store, manifest: dict) -> int:
    """Remove shard files no entry refers to (results of older configs): the cache dir holds one cache."""
    keep = {e["file"].rsplit("/", 1)[1] for e in manifest["shards"]}
    stale = [n for n in store.listdir(SHARD_DIR) if n.endswith(".st") and not n.startswith(".") and n not in keep]
    for name in stale:
        store.remove(f"{SHARD_DIR}/{name}")
    return len(stale)


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """Compute (or complete) the cache; ``raydistill cache inspect`` describes and verifies it instead.

    Never skipped as a whole: it resumes shard by shard, and its record's key is the cache's content key."""
    if action == "inspect":
        return inspect(cfg)
    t0 = time.time()
    stage.start(cfg, "cache", skip=False, ray=True)
    device = cluster_device(cfg.cluster)
    manifest, keyed = plan(cfg, device)
    store = Store(cfg.cache_dir)
    store.clean_temps(("", SHARD_DIR))
    todo = _reuse(store, cfg.cache_dir, manifest, keyed)
    print(f"cache: {len(keyed) - len(todo)}/{len(keyed)} shards cached, computing {len(todo)} on {device}")
    previous = _previous_throughput(cfg.cache_dir)  # read before the planned manifest replaces the old one
    write_manifest(cfg.cache_dir, manifest)
    nodes: set = set()
    pool = _compute(cfg, todo, manifest, device, nodes) if todo else {
        "teacher_forwards": 0, "actor_s": 0.0, "actors_replaced": 0, "shards_requeued": 0, "tokens": 0}
    forwards, busy = pool["teacher_forwards"], pool["actor_s"]
    computed_tokens = sum(spec.tokens.shape[0] * cfg.corpus.seq_len for spec, _ in todo)
    # teacher throughput inside the actors (encode + commit, no start-up): the summary's teacher tokens/s
    manifest["teacher_tokens_per_s"] = computed_tokens / busy if busy else previous
    order = {spec.name: i for i, (spec, _) in enumerate(keyed)}
    manifest["shards"].sort(key=lambda e: order[e["name"]])
    manifest["complete"] = True
    write_manifest(cfg.cache_dir, manifest)
    _collect_garbage(store, manifest)
    totals, wall = manifest["totals"], time.time() - t0
    key = cache_key(manifest)  # every planned shard, in corpus order
    print(f"cache: {totals['tokens']} tokens, {totals['bytes_per_token']:.1f} bytes/token, {wall:.1f} s, "
          f"{forwards} teacher forwards; teacher held-out NLL {totals['teacher_heldout_nll']}; "
          f"{pool['actors_replaced']} teacher actors replaced, {pool['shards_requeued']} shards re-queued")
    outputs = {"teacher_forwards": forwards, "shards_computed": len(todo), "shards_total": len(keyed),
               "tokens": totals["tokens"], "bytes": totals["bytes"], "bytes_per_token": totals["bytes_per_token"],
               "teacher_heldout_nll": totals["teacher_heldout_nll"],
               "teacher_heldout_top1_acc": totals["teacher_heldout_top1_acc"], "wall_s": wall, "actor_s": busy,
               "computed_tokens": computed_tokens, "teacher_tokens_per_s": manifest["teacher_tokens_per_s"],
               "cache_dir": cfg.cache_dir, "cache_key": key, "actor_nodes": sorted(nodes),
               "actors_replaced": pool["actors_replaced"], "shards_requeued": pool["shards_requeued"]}
    stage.record(cfg, "cache", key, outputs, paths=[store.url(MANIFEST)])
    return outputs


def _previous_throughput(cache_dir: str) -> float | None:
    try:
        return open_cache(cache_dir).manifest.get("teacher_tokens_per_s")
    except (CacheCorruptError, ValueError, OSError):
        return None


def inspect(cfg: PipelineConfig) -> dict:
    """Print what the cache holds and verify every shard's checksum (:class:`DataError` naming the first bad
    shard)."""
    cache = open_cache(cfg.cache_dir)
    m, t = cache.manifest, cache.totals
    print(f"cache {Store(cfg.cache_dir).url('')}: format={m['format']} params={m['params']} "
          f"temperature={m['temperature']} version={m['format_version']} complete={m.get('complete')}")
    print(f"  teacher: {m['teacher']['source']} ({m['teacher']['kind']}) weights sha256 "
          f"{m['teacher']['weights_sha256'][:16]}… dtype={m['teacher']['dtype']}")
    print(f"  tokenizer sha256 {m['tokenizer_hash'][:16]}…  vocab={m['vocab_size']}  seq_len={m['seq_len']}")
    print(f"  shards: {len(cache.shards('train'))} train + {len(cache.shards('heldout'))} heldout "
          f"(planned {m.get('planned_shards')}); tokens {t.get('tokens')}; bytes {t.get('bytes')}; "
          f"bytes/token {t.get('bytes_per_token')}")
    print(f"  teacher held-out NLL {t.get('teacher_heldout_nll')}  top-1 acc {t.get('teacher_heldout_top1_acc')}")
    try:
        names = cache.verify()
    except CacheCorruptError as e:
        raise DataError(f"inspect: {e}") from None
    print(f"  verified {len(names)} shards: all checksums ok")
    return {"verified": len(names), **t}
