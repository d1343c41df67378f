"""Move ``@champion`` to a model version only if it passes the quality gate; roll back when needed.

    raydistill promote --config tiny                              # the version `raydistill register` wrote
    raydistill promote --config tiny registry.promote_version=3   # a chosen version
    raydistill promote rollback --config tiny                     # @champion back to the champion before it

Fair gate (``registry.gate``): the candidate and the current ``@champion`` are evaluated
(``tasks.evaluate.evaluate``) on the same *frozen* held-out set — the cache's held-out shards, sorted by shard
key, the first ``gate.max_windows`` windows — named by :func:`~raydistill.tasks.evaluate.heldout_digest`.
The candidate must pass the absolute thresholds (held-out loss ≤ ``max_heldout_loss``, top-1 agreement with
the teacher ≥ ``min_top1_agreement``, optionally KL ≤ ``max_kl_to_teacher``) **and** be no worse than the
champion beyond ``max_loss_regression`` / ``max_agreement_regression`` / ``max_ece_regression`` (optionally
strictly better on loss: ``require_better_than_champion``). With ``gate.gen_prompts`` both are also scored on
the teacher's NLL of their greedy answers to held-out prompts (``gen_teacher_nll``; gated by
``max_gen_teacher_nll`` / ``max_gen_nll_regression`` when set). A version's numbers on a set are cached in its
tag ``gate.eval.<digest16>`` (``….gen.<settings8>`` with the generation metric), so a champion is evaluated once
per held-out set. With
``gate.compare_to_champion=false`` the gate reads the ``metric.int8.*`` tags ``register`` wrote instead (each
version's own held-out split: not comparable across runs, so no champion comparison is made then).

Recorded on the version whether it passes or not: ``gate.heldout_digest``, ``gate.candidate.<metric>``,
``gate.champion.<metric>``, ``gate.champion_version``, ``gate.passed``, ``gate.reasons``, ``gate.decision``.

Compare-and-set: the alias moves inside :func:`tracking.registry_lock` and only if ``@champion`` is still the
version the gate compared against; a promotion that lost a race is refused (``gate.decision=lost-race``) and
leaves every alias as the winner set it. Champion history: the registered model's tag
``raydistill.champion_history`` lists the champions in order and ``@previous`` points at the one before the
current champion; ``rollback`` pops the history and says which version it restored.
"""

from __future__ import annotations

import hashlib
import json
import time

from raydistill.tasks.config import ConfigError, GateConfig, PipelineConfig
from raydistill.tasks.errors import DataError
from raydistill.tasks.evaluate import heldout_digest
from raydistill.tasks.gate import check as gate_check
from raydistill.workflows import stage, tracking

HISTORY_TAG = "raydistill.champion_history"
CHAMPION, PREVIOUS = "champion", "previous"


def version_metrics(mv) -> dict:
    """``{"heldout_loss": …, "top1_agreement": …, …}`` of the int8 student, from the version's tags."""
    prefix = "metric.int8."
    return {k[len(prefix):]: float(v) for k, v in mv.tags.items() if k.startswith(prefix)}


def check_gate(metrics: dict, gate: GateConfig, champion: dict | None = None) -> tuple[bool, list[str]]:
    """``(passed, reasons)`` of :func:`raydistill.tasks.gate.check` — the one gate Tune's best-trial choice and
    the quantize stage's choice use too. ``champion``: the champion's metrics *on the same held-out set* (None:
    no champion, absolute checks only)."""
    return gate_check(metrics, gate, champion)


# -------------------------------------------------------------------------------- the frozen held-out set

EVAL_KEYS = ("heldout_loss", "top1_agreement", "ece", "kl_to_teacher", "tokens")


class FrozenHeldout:
    """The first ``gate.max_windows`` held-out windows of the cache in shard-key order (streamed, one shard at a
    time), named by the digest of the shards they come from; evaluates registry versions."""

    def __init__(self, cfg: PipelineConfig):
        from raydistill.tasks.cache.shards import config_cache, open_cache
        from raydistill.tasks.data import HeldoutSet

        where = cfg.registry.gate.heldout_cache
        self.cfg, self.cache = cfg, open_cache(where) if where else config_cache(cfg)
        self.max_windows = cfg.registry.gate.max_windows
        self._shards = HeldoutSet(self.cache, self.max_windows)
        if not len(self._shards):
            raise DataError(f"promote: the cache at {self.cache.where} has no held-out shards to gate on; rebuild "
                            "it with corpus.heldout_fraction > 0, or set registry.gate.compare_to_champion=false")
        self.digest = heldout_digest(self._shards.entries.keys(), self.max_windows)
        g = cfg.registry.gate
        # the generation metric's settings name the tag too: a champion scored on other prompts is scored again
        self.generation = (None if not g.gen_prompts else
                           json.dumps([g.gen_prompts, g.gen_prompt_tokens, g.gen_max_tokens, cfg.teacher.source]))
        self._scorer = None

    def metrics(self, client, mv) -> dict:
        """The version's metrics on this set (from its ``gate.eval.<digest16>`` tag when evaluated before)."""
        tag = f"gate.eval.{self.digest[:16]}"
        if self.generation:
            tag += ".gen." + hashlib.sha256(self.generation.encode()).hexdigest()[:8]
        if tag in mv.tags:
            return json.loads(mv.tags[tag])
        from raydistill.tasks.evaluate import evaluate
        from raydistill.workflows.quantize import generation_scorer
        from raydistill.workflows.register import load_registered

        model, _, _ = load_registered(self.cfg.tracking_uri, tracking.model_uri(mv.name, version=mv.version))
        found = evaluate(model, self._shards, max_windows=self.max_windows)
        found = {k: found[k] for k in EVAL_KEYS}
        if self.generation:
            self._scorer = self._scorer or generation_scorer(self.cfg, self._shards)
            scored = self._scorer(model)
            found.update({k: scored[k] for k in ("gen_teacher_nll", "gen_length")})
        client.set_model_version_tag(mv.name, str(mv.version), tag, json.dumps(found, sort_keys=True))
        return found


def _history(client, name: str) -> list[int]:
    return [int(v) for v in json.loads(client.get_registered_model(name).tags.get(HISTORY_TAG, "[]"))]


def _set_champion(client, name: str, history: list[int]) -> None:
    """Point @champion at ``history[-1]`` and @previous at ``history[-2]`` (or remove it)."""
    client.set_registered_model_tag(name, HISTORY_TAG, json.dumps(history[-100:]))
    tracking.set_alias(client, name, CHAMPION, history[-1])
    tracking.set_alias(client, name, PREVIOUS, history[-2] if len(history) > 1 else None)


def _target_version(cfg: PipelineConfig) -> int:
    """``registry.promote_version``, else the version the ``register`` stage of this run wrote."""
    if cfg.registry.promote_version is not None:
        return cfg.registry.promote_version
    registered = stage.require(cfg, "register", "promote", alternative="set registry.promote_version=N")
    return int(registered["outputs"]["version"])


def _verdict_tags(gate: GateConfig, passed: bool, reasons: list, candidate: dict, champion_mv, champion: dict | None,
                  digest: str | None) -> dict:
    tags = {"gate.passed": str(passed).lower(), "gate.reasons": "; ".join(reasons)[:5000],
            "gate.checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "gate.config": json.dumps(vars(gate), sort_keys=True),
            "gate.champion_version": str(champion_mv.version) if champion_mv else "none",
            "gate.heldout_digest": digest or "none (each version's own metric.int8.* tags)",
            "gate.decision": "promoted" if passed else "rejected"}
    for side, numbers in (("candidate", candidate), ("champion", champion or {})):
        tags.update({f"gate.{side}.{k}": repr(float(v)) for k, v in numbers.items() if v is not None})
    return tags


def promote(client, name: str, version: int, gate: GateConfig, heldout: FrozenHeldout | None = None) -> dict:
    """Gate ``version`` of ``name`` and, if it passes, make it ``@champion`` (the old one becomes ``@previous``).

    ``heldout``: the frozen set both are evaluated on; None = the versions' ``metric.int8.*`` tags, no champion
    comparison (see the module doc).
    """
    try:
        mv = tracking.get_version(client, name, version)
    except LookupError:
        raise ConfigError(f"promote: {name} has no version {version}") from None
    champion_mv = tracking.alias_version(client, name, CHAMPION)
    if champion_mv is not None and int(champion_mv.version) == version:
        return {"promoted": True, "version": version, "champion_version": version, "reason": "already @champion"}
    if heldout is None:
        candidate, champion = version_metrics(mv), None
    else:
        candidate = heldout.metrics(client, mv)
        champion = heldout.metrics(client, champion_mv) if champion_mv is not None else None
    passed, reasons = check_gate(candidate, gate, champion)
    verdict = _verdict_tags(gate, passed, reasons, candidate, champion_mv, champion, heldout and heldout.digest)
    expected = int(champion_mv.version) if champion_mv else None
    base = {"version": version, "reasons": reasons, "candidate": candidate, "champion": champion,
            "heldout_digest": heldout.digest if heldout else None}
    if not passed:
        _tag_version(client, name, version, verdict)
        return {**base, "promoted": False, "champion_version": expected,
                "reason": "gate failed: " + "; ".join(r for r in reasons if r.startswith("FAILED") or "missing" in r)}
    with tracking.registry_lock(client, name, gate.lock_timeout_s):
        now = tracking.alias_version(client, name, CHAMPION)
        now = int(now.version) if now else None
        if now != expected:  # compare-and-set: another promotion moved @champion while this gate ran
            _tag_version(client, name, version, {**verdict, "gate.decision": "lost-race"})
            return {**base, "promoted": False, "champion_version": now,
                    "reason": f"@champion moved from {expected} to {now} while the gate ran (another promotion "
                              "won the race); rerun promote to gate against the new champion"}
        history = _history(client, name)
        if expected is not None and (not history or history[-1] != expected):
            history.append(expected)  # the alias was moved by hand: keep it rollback-able
        _set_champion(client, name, history + [version])
        _tag_version(client, name, version, {**verdict, "raydistill.promoted_at": verdict["gate.checked_at"]})
    return {**base, "promoted": True, "champion_version": version, "previous_version": expected,
            "reason": "gate passed"}


def _tag_version(client, name: str, version: int, tags: dict) -> None:
    for k, v in tags.items():
        client.set_model_version_tag(name, str(version), k, v)


def rollback(client, name: str, lock_timeout_s: float = 60.0) -> dict:
    """Move ``@champion`` back to the champion before it (under the registry lock); says which it restored."""
    with tracking.registry_lock(client, name, lock_timeout_s):
        champion = tracking.alias_version(client, name, CHAMPION)
        if champion is None:
            raise ConfigError(f"rollback: {name} has no @champion")
        current = int(champion.version)
        history = _history(client, name)
        if current in history:
            history = history[:len(history) - history[::-1].index(current)]  # up to its last promotion
        else:
            history.append(current)
        if len(history) < 2:
            raise ConfigError(f"rollback: {name}@champion (version {current}) has no previous champion")
        history.pop()
        _set_champion(client, name, history)
        _tag_version(client, name, current, {"raydistill.rolled_back_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                             "raydistill.rolled_back_to": str(history[-1])})
    return {"promoted": True, "rolled_back_from": current, "champion_version": history[-1],
            "restored_version": history[-1], "version": history[-1],
            "reason": f"rolled back from version {current}; restored version {history[-1]}"}


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """Gate and promote a version; ``rollback`` moves ``@champion`` back instead. Never skipped."""
    stage.start(cfg, "promote", skip=False)
    name = cfg.registry.model_name
    gate = cfg.registry.gate
    if action == "rollback":
        result = rollback(tracking.client(cfg), name, gate.lock_timeout_s)
    else:
        version = _target_version(cfg)  # before touching the registry: a wrong run_dir creates nothing
        client = tracking.client(cfg)
        try:
            tracking.get_version(client, name, version)  # a wrong version says so before the cache is opened
        except LookupError:
            raise ConfigError(f"promote: {name} has no version {version}") from None
        heldout = FrozenHeldout(cfg) if gate.compare_to_champion else None
        result = promote(client, name, version, gate, heldout)
    if result.get("promoted"):
        print(f"[promote] {name}@champion = version {result['champion_version']} ({result['reason']})")
    else:
        print(f"[promote] version {result['version']} NOT promoted: {result['reason']}; "
              f"@champion stays at {result['champion_version']}")
    for r in result.get("reasons", []):
        print(f"  - {r}")
    if result.get("heldout_digest"):
        print(f"[promote] frozen held-out set {result['heldout_digest'][:16]}: candidate {_fmt(result['candidate'])}"
              + (f"; champion {_fmt(result['champion'])}" if result.get("champion") else ""))
    stage.record(cfg, "promote", stage.key(cfg, "promote", extra={"version": result.get("version")}), result)
    return result


def _fmt(m: dict) -> str:
    return ", ".join(f"{k} {m[k]:.4g}" for k in ("heldout_loss", "top1_agreement", "ece", "gen_teacher_nll")
                     if m.get(k) is not None)
