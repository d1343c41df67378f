"""Print where a registered version comes from: runs, cache, shards, corpus, teacher, code, gate verdict.

    raydistill lineage models:/tiny-student/1 --config tiny        # a version
    raydistill lineage models:/tiny-student@champion --config tiny # whatever an alias points at now
    raydistill lineage --config tiny                               # @champion of registry.model_name

Reads only the registry (the version's lineage tags, written by ``register``; its registering run; the run's
``lineage/shards.arrow`` artifact: the cache's index, a row per shard), so it works from any machine that reaches
the tracking server. The shard list is checked against the version's ``cache.shards_sha256`` tag, streamed over
the index: a version's files trace back to exactly these cache shards (each named by its content key and the
sha256 of its file). Versions registered before the index was logged carry ``lineage/shards.json`` instead.
"""

from __future__ import annotations

import hashlib
import json
import tempfile

from raydistill.tasks.config import PipelineConfig, check_name
from raydistill.workflows import tracking

SHARDS_ARTIFACT = "lineage/shards.arrow"  # the cache's index as register logged it
LEGACY_SHARDS_ARTIFACT = "lineage/shards.json"  # versions registered before: a JSON list of every shard


def _shards(tracking_uri: str, run_id: str, tags: dict) -> dict:
    """The shard counts of the run's shard list, and whether its keys match the version's ``cache.shards_sha256``
    tag (recomputed from the logged index, streamed: ``tasks.cache.lineage``)."""
    from raydistill.tasks.cache.index import Index
    from raydistill.tasks.cache.lineage import index_digests

    with tempfile.TemporaryDirectory(prefix="raydistill-lineage-") as tmp:
        try:
            path = tracking.download_run_artifact(tracking_uri, run_id, SHARDS_ARTIFACT, tmp)
        except LookupError:
            return _legacy_shards(tracking_uri, run_id, tags)
        got = index_digests(Index(str(path)), None)  # the keys are what the tag pins
    return _verdict({"shards": got["shards"], "train": got["train"], "heldout": got["heldout"],
                     "artifact": SHARDS_ARTIFACT}, got["shards_sha256"], tags)


def _legacy_shards(tracking_uri: str, run_id: str, tags: dict) -> dict:
    try:
        doc = tracking.load_run_dict(tracking_uri, run_id, LEGACY_SHARDS_ARTIFACT)
    except LookupError:
        return {"shards": 0, "train": 0, "heldout": 0, "verified": False,
                "why": f"run {run_id} has no {SHARDS_ARTIFACT}"}
    entries = doc.get("shards", [])
    counts = {"shards": len(entries), **{s: sum(1 for e in entries if e["split"] == s) for s in ("train", "heldout")},
              "artifact": LEGACY_SHARDS_ARTIFACT}
    digest = hashlib.sha256(json.dumps(sorted(e["key"] for e in entries)).encode()).hexdigest()
    return _verdict(counts, digest, tags)


def _verdict(counts: dict, digest: str, tags: dict) -> dict:
    ok = digest == tags.get("cache.shards_sha256")
    return {**counts, "verified": ok,
            "why": "sha256 of the shard keys matches cache.shards_sha256" if ok else
            f"sha256 of the listed shard keys {digest[:16]} != the version's cache.shards_sha256"}


def chain(cfg: PipelineConfig, uri: str) -> dict:
    """The lineage of the version ``uri`` names, as one dict (see the module doc)."""
    ref = tracking.parse_model_uri(uri)
    check_name("registry.lineage_uri (model name)", ref.name)
    mv = tracking.resolve_version(cfg.tracking_uri, uri)
    tags = dict(mv.tags)
    return {"model_uri": tracking.model_uri(mv.name, version=mv.version), "name": mv.name,
            "version": int(mv.version), "aliases": sorted(getattr(mv, "aliases", []) or []),
            "register_run_id": mv.run_id, "source": mv.source,
            "train_run_id": tags.get("lineage.train_run_id"),
            "tune_parent_run_id": tags.get("lineage.tune_parent_run_id"),
            "init_from": tags.get("lineage.init_from"),
            "train_stage_key": tags.get("train.stage_key"), "quantize_stage_key": tags.get("quantize.stage_key"),
            "quantization": tags.get("raydistill.quantization"), "code_version": tags.get("code.version"),
            "config_sha256": tags.get("raydistill.config_sha256"),
            "cache_key": tags.get("cache.key"), "cache_shards_sha256": tags.get("cache.shards_sha256"),
            "heldout_digest": tags.get("cache.heldout_digest"), "corpus_sha256": tags.get("corpus.sha256"),
            "teacher_source": tags.get("teacher.source"), "teacher_weights_sha256": tags.get("teacher.weights_sha256"),
            "gate": {k[len("gate."):]: v for k, v in tags.items()
                     if k.startswith("gate.") and not k.startswith("gate.eval.")},
            "shards": _shards(cfg.tracking_uri, mv.run_id, tags)}


def render(c: dict) -> str:
    """The chain as text, from the version back to the teacher."""
    s = c["shards"]
    split = {k: s.get(k, 0) for k in ("train", "heldout")}
    lines = [f"{c['model_uri']}" + (f"  (@{', @'.join(c['aliases'])})" if c["aliases"] else ""),
             f"  registered by run   {c['register_run_id']}   code {c['code_version']}",
             f"  quantized           {c['quantization']}   (quantize stage {str(c['quantize_stage_key'])[:16]})",
             f"  trained in run      {c['train_run_id']}   (train stage {str(c['train_stage_key'])[:16]})",
             f"  tune parent run     {c['tune_parent_run_id']}",
             f"  warm-started from   {c['init_from'] or 'none'}",
             f"  cache               {c['cache_key']}",
             f"    shards            {split['train']} train + {split['heldout']} held-out, keys sha256 "
             f"{c['cache_shards_sha256']} ({'verified' if s['verified'] else 'NOT verified'}: {s['why']})",
             f"    held-out set      {c['heldout_digest']}",
             f"  corpus              {c['corpus_sha256']}",
             f"  teacher             {c['teacher_source']}   weights sha256 {c['teacher_weights_sha256']}"]
    g = c["gate"]
    if g:
        lines.append(f"  gate                {g.get('decision', g.get('passed'))} vs champion version "
                     f"{g.get('champion_version')} on held-out set {str(g.get('heldout_digest'))[:16]}")
    if s.get("verified"):  # the list itself stays an artifact: one line per shard would not scale
        lines.append(f"    shard list        {s.get('artifact')} of run {c['register_run_id']} "
                     f"({s.get('shards')} rows: split, name, key, file sha256)")
    return "\n".join(lines)


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """Print the lineage of ``registry.lineage_uri`` (default ``models:/<model_name>@champion``)."""
    uri = cfg.registry.lineage_uri or tracking.model_uri(cfg.registry.model_name, alias="champion")
    c = chain(cfg, uri)
    print(render(c))
    return c
