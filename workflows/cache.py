"""Run the teacher once over the corpus and store its soft targets (resumable, shard by shard).

    raydistill cache --config tiny                  # compute (a rerun performs 0 teacher forwards)
    raydistill cache inspect --config tiny          # describe the cache and verify every checksum

Driver (this process): tokenizer + shards + keys; shards already committed with the same key are skipped.
Workers: ``cache.num_actors`` ``TeacherActor``s, each loading the teacher once and committing its shards
itself (file write + atomic rename); the driver records each entry in the manifest as it arrives, so a
killed run resumes where it stopped. Actors restart and retry their task if their process dies.
"""

from __future__ import annotations

import hashlib
import os
import time
import uuid

import ray
from tqdm import tqdm

from raydistill.tasks.cache.formats import format_params
from raydistill.tasks.cache.manifest import (MANIFEST, SHARD_DIR, CacheCorruptError, add_entry, cache_key, new_manifest,
                                             shard_file, shard_key, write_manifest)
from raydistill.tasks.cache.shards import entry_from_file, open_cache
from raydistill.tasks.cache.store import Store
from raydistill.tasks.config import CacheConfig, PipelineConfig
from raydistill.tasks.corpus import build_shards
from raydistill.tasks.device import plan_device
from raydistill.tasks.errors import DataError
from raydistill.tasks.teacher import load_tokenizer, teacher_identity, tokenizer_hash
from raydistill.workflows import stage

ACTOR_PREFIX = "raydistill-cache-"
MAX_RESTARTS = 3


@ray.remote(concurrency_groups={"control": 1}, max_restarts=MAX_RESTARTS, max_task_retries=MAX_RESTARTS)
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


def device_of(cfg: PipelineConfig) -> str:
    """``"cuda"`` or ``"cpu"``: ``cluster.device`` against the GPUs the (started) Ray cluster offers."""
    return plan_device(cfg.cluster.device, ray.cluster_resources().get("GPU", 0))


def actor_options(cache_cfg: CacheConfig, device: str) -> dict:
    """Ray resources of one teacher actor: ``cpus_per_actor`` CPUs, and ``num_gpus_per_actor`` GPUs on CUDA."""
    return {"num_cpus": cache_cfg.cpus_per_actor, "num_gpus": cache_cfg.num_gpus_per_actor if device == "cuda" else 0}


def _compute(cfg: PipelineConfig, todo: list, manifest: dict, device: str = "cpu",
             nodes: set | None = None) -> tuple[int, float]:
    """Run the actor pool over ``todo``; records entries as they finish (and in ``nodes`` the Ray nodes that
    computed them).

    Returns (teacher forwards, actor seconds spent encoding + committing: throughput without start-up)."""
    n_actors = min(cfg.cache.num_actors, len(todo))
    run_id = uuid.uuid4().hex[:8]
    options = actor_options(cfg.cache, device)
    if cfg.cluster.spread:
        options["scheduling_strategy"] = "SPREAD"
    actors = [TeacherActor.options(**options, name=f"{ACTOR_PREFIX}{run_id}-{i}")
              .remote(cfg.teacher, cfg.cache.cpus_per_actor, device) for i in range(n_actors)]
    queue, pending, forwards, busy = list(todo), {}, 0, 0.0
    nodes = set() if nodes is None else nodes

    def submit(actor):
        spec, key = queue.pop(0)
        ref = actor.compute.remote(cfg.cache_dir, spec.name, spec.split, key, spec.tokens, cfg.cache)
        pending[ref] = actor

    try:
        for actor in actors:  # one shard in flight per actor: its threads are all busy with it
            if queue:
                submit(actor)
        bar = tqdm(total=len(todo), unit="shard", desc="cache", dynamic_ncols=True)
        t0, tokens = time.time(), 0
        while pending:
            [ref], _ = ray.wait(list(pending), num_returns=1)
            actor = pending.pop(ref)
            entry, n, seconds = ray.get(ref)
            nodes.add(ray.get(actor.node_id.remote()))
            forwards, busy = forwards + n, busy + seconds
            tokens += entry["tokens"]
            add_entry(manifest, entry)
            write_manifest(cfg.cache_dir, manifest)
            bar.set_postfix(tok_s=f"{tokens / max(time.time() - t0, 1e-9):.0f}")
            bar.update(1)
            if queue:
                submit(actor)
        bar.close()
    finally:
        for actor in actors:
            ray.kill(actor, no_restart=True)
    return forwards, busy


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
    device = device_of(cfg)
    manifest, keyed = plan(cfg, device)
    store = Store(cfg.cache_dir)
    store.clean_temps(("", SHARD_DIR))
    todo = _reuse(store, cfg.cache_dir, manifest, keyed)
    print(f"cache: {len(keyed) - len(todo)}/{len(keyed)} shards cached, computing {len(todo)} on {device}")
    previous = _previous_throughput(cfg.cache_dir)  # read before the planned manifest replaces the old one
    write_manifest(cfg.cache_dir, manifest)
    nodes: set = set()
    forwards, busy = _compute(cfg, todo, manifest, device, nodes) if todo else (0, 0.0)
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
          f"{forwards} teacher forwards; teacher held-out NLL {totals['teacher_heldout_nll']}")
    outputs = {"teacher_forwards": forwards, "shards_computed": len(todo), "shards_total": len(keyed),
               "tokens": totals["tokens"], "bytes": totals["bytes"], "bytes_per_token": totals["bytes_per_token"],
               "teacher_heldout_nll": totals["teacher_heldout_nll"],
               "teacher_heldout_top1_acc": totals["teacher_heldout_top1_acc"], "wall_s": wall, "actor_s": busy,
               "computed_tokens": computed_tokens, "teacher_tokens_per_s": manifest["teacher_tokens_per_s"],
               "cache_dir": cfg.cache_dir, "cache_key": key, "actor_nodes": sorted(nodes)}
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
