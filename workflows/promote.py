"""Move ``@champion`` to a model version only if it passes the quality gate; roll back when needed.

    raydistill promote --config tiny                              # the version `raydistill register` wrote
    raydistill promote --config tiny registry.promote_version=3   # a chosen version
    raydistill promote rollback --config tiny                     # @champion back to the champion before it

Gate (``registry.gate``): the version's int8 held-out loss ≤ ``max_heldout_loss``, its top-1 agreement with the
teacher ≥ ``min_top1_agreement``, optionally KL to the teacher ≤ ``max_kl_to_teacher`` and a lower held-out loss
than the current champion. Metrics come from the version's ``metric.int8.*`` tags (written by ``register``), so
the gate judges exactly what was registered. The verdict is recorded on the version (``gate.*`` tags) whether it
passes or not; a failing version leaves every alias unchanged.

Champion history: the registered model's tag ``raydistill.champion_history`` lists the champions in order and the
alias ``@previous`` points at the one before the current champion; ``rollback`` pops the history.
"""

from __future__ import annotations

import json
import time

from raydistill.tasks.config import ConfigError, GateConfig, PipelineConfig
from raydistill.workflows import stage, tracking

HISTORY_TAG = "raydistill.champion_history"
CHAMPION, PREVIOUS = "champion", "previous"


def version_metrics(mv) -> dict:
    """``{"heldout_loss": …, "top1_agreement": …, …}`` of the int8 student, from the version's tags."""
    prefix = "metric.int8."
    return {k[len(prefix):]: float(v) for k, v in mv.tags.items() if k.startswith(prefix)}


def check_gate(metrics: dict, gate: GateConfig, champion: dict | None = None) -> tuple[bool, list[str]]:
    """``(passed, reasons)``; each reason says which check failed or passed and with what numbers."""
    reasons, passed = [], True

    def need(name: str, ok, text: str):
        nonlocal passed
        value = metrics.get(name)
        if value is None:
            passed = False
            reasons.append(f"{name} missing from the version's metrics")
        elif ok(value):
            reasons.append(f"{name} {value:.4g} {text}")
        else:
            passed = False
            reasons.append(f"FAILED: {name} {value:.4g} not {text}")

    need("heldout_loss", lambda v: v <= gate.max_heldout_loss, f"<= {gate.max_heldout_loss}")
    need("top1_agreement", lambda v: v >= gate.min_top1_agreement, f">= {gate.min_top1_agreement}")
    if gate.max_kl_to_teacher is not None:
        need("kl_to_teacher", lambda v: v <= gate.max_kl_to_teacher, f"<= {gate.max_kl_to_teacher}")
    if gate.require_better_than_champion and champion and champion.get("heldout_loss") is not None:
        best = champion["heldout_loss"]
        need("heldout_loss", lambda v: v < best, f"< champion's {best:.4g}")
    return passed, reasons


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


def promote(client, name: str, version: int, gate: GateConfig) -> dict:
    """Gate ``version`` of ``name`` and, if it passes, make it ``@champion`` (the old one becomes ``@previous``)."""
    try:
        mv = tracking.get_version(client, name, version)
    except LookupError:
        raise ConfigError(f"promote: {name} has no version {version}") from None
    champion = tracking.alias_version(client, name, CHAMPION)
    if champion is not None and int(champion.version) == version:
        return {"promoted": True, "version": version, "champion_version": version, "reason": "already @champion"}
    passed, reasons = check_gate(version_metrics(mv), gate, version_metrics(champion) if champion else None)
    verdict = {"gate.passed": str(passed).lower(), "gate.reasons": "; ".join(reasons)[:5000],
               "gate.checked_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
               "gate.config": json.dumps(vars(gate), sort_keys=True),
               "gate.champion_version": str(champion.version) if champion else "none"}
    for k, v in verdict.items():
        client.set_model_version_tag(name, str(version), k, v)
    if not passed:
        return {"promoted": False, "version": version, "reasons": reasons,
                "champion_version": int(champion.version) if champion else None,
                "reason": "gate failed: " + "; ".join(r for r in reasons if r.startswith("FAILED") or "missing" in r)}
    history = _history(client, name)
    if champion is not None and (not history or history[-1] != int(champion.version)):
        history.append(int(champion.version))  # the alias was moved by hand: keep it rollback-able
    _set_champion(client, name, history + [version])
    client.set_model_version_tag(name, str(version), "raydistill.promoted_at", verdict["gate.checked_at"])
    return {"promoted": True, "version": version, "champion_version": version, "reasons": reasons,
            "previous_version": int(champion.version) if champion else None, "reason": "gate passed"}


def rollback(client, name: str) -> dict:
    """Move ``@champion`` back to the champion before it."""
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
    client.set_model_version_tag(name, str(current), "raydistill.rolled_back_at", time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    return {"promoted": True, "rolled_back_from": current, "champion_version": history[-1],
            "version": history[-1], "reason": f"rolled back from version {current}"}


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """Gate and promote a version; ``rollback`` moves ``@champion`` back instead. Never skipped."""
    stage.start(cfg, "promote", skip=False)
    name = cfg.registry.model_name
    if action == "rollback":
        result = rollback(tracking.client(cfg), name)
    else:
        version = _target_version(cfg)  # before touching the registry: a wrong run_dir creates nothing
        result = promote(tracking.client(cfg), name, version, cfg.registry.gate)
    if result.get("promoted"):
        print(f"[promote] {name}@champion = version {result['champion_version']} ({result['reason']})")
    else:
        print(f"[promote] version {result['version']} NOT promoted: {result['reason']}; "
              f"@champion stays at {result['champion_version']}")
        for r in result["reasons"]:
            print(f"  - {r}")
    stage.record(cfg, "promote", stage.key(cfg, "promote", extra={"version": result.get("version")}), result)
    return result
