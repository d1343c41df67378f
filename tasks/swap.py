"""Moving every replica of a server to a new model version together: prepare, then commit (pure, no Ray).

    coord = SwapCoordinator(lease_s=10, prepare_timeout_s=300)
    coord.observe(7)                                    # the registry alias names version 7 now
    view = coord.report("replica-a", serving=6, prepared=7, since=t)   # what a replica holds
    replica_action(view, serving=6, prepared=7)         # ("switch", 7) once 7 is committed

Each replica loads the version the source names (the *target*) beside the one it serves, and says so; the
coordinator *commits* the target once every live replica has it loaded, and every replica then switches at the
same moment (a pointer swap, no loading left to do). So two replicas serve different versions only for the
time the commit takes to reach them, not for the difference between their load times. A replica is live while
it reported within ``lease_s``; one that died stops holding the commit back when its lease runs out. A target
that some replicas cannot load within ``prepare_timeout_s`` is committed anyway if at least one replica has it
(the others switch as soon as they load it), and never while no replica could load it: then everyone keeps
serving the committed version and ``status()`` says why.

The first version observed is committed at once (nothing serves anything else yet); a replica that starts later
loads the committed version before it serves.
"""

from __future__ import annotations

import time


def replica_action(view: dict, serving, prepared) -> tuple[str, object] | None:
    """What a replica serving ``serving`` with ``prepared`` loaded beside it does next: ``("switch", v)``
    (``prepared`` is committed), ``("load", v)`` (load ``v`` beside what it serves) or ``None``."""
    committed, target = view.get("committed"), view.get("target")
    if committed is not None and committed != serving and prepared == committed:
        return "switch", committed
    want = target if target is not None and target != committed else committed
    if want is not None and want not in (serving, prepared):
        return "load", want
    return None


class SwapCoordinator:
    """The shared state of one served source's versions (see the module doc). ``clock``: seconds, monotonic."""

    def __init__(self, lease_s: float, prepare_timeout_s: float, clock=time.monotonic):
        self.lease_s, self.prepare_timeout_s, self.clock = lease_s, prepare_timeout_s, clock
        self.target = self.committed = None
        self.target_since = self.committed_at = None  # clock times
        self.replicas: dict[str, dict] = {}  # id -> {serving, prepared, since (wall), error, seen (clock)}
        self.epoch = 0  # bumped on every change of target or committed (long polls wait for it)
        self.note = None  # why a target is not committed yet, when it is stuck

    def observe(self, version) -> None:
        """The source names ``version`` now."""
        if version != self.target:
            self.target, self.target_since, self.note = version, self.clock(), None
            if self.committed is None:
                self._commit()
            self.epoch += 1
        self._maybe_commit()

    def report(self, replica: str, serving, prepared, since: float | None = None, error: str | None = None) -> dict:
        """A replica's state (``since``: the wall time it switched to ``serving``, ``None`` if it started on
        it); returns :meth:`view`."""
        self.replicas[replica] = {"serving": serving, "prepared": prepared, "since": since, "error": error,
                                  "seen": self.clock()}
        self._maybe_commit()
        return self.view()

    def leave(self, replica: str) -> None:
        self.replicas.pop(replica, None)
        self._maybe_commit()

    def view(self) -> dict:
        return {"target": self.target, "committed": self.committed, "epoch": self.epoch}

    def live(self) -> dict[str, dict]:
        now = self.clock()
        return {r: s for r, s in self.replicas.items() if now - s["seen"] <= self.lease_s}

    def status(self) -> dict:
        """The view, the live replicas and ``mixed_s``: how far apart in time the live replicas switched to the
        committed version (``None`` until all of them serve it, or when none switched: they started on it)."""
        live = self.live()
        since = [s["since"] for s in live.values() if s["serving"] == self.committed and s["since"] is not None]
        serve_it = all(s["serving"] == self.committed for s in live.values())
        mixed = max(since) - min(since) if live and serve_it and since else None
        replicas = {r: {k: s[k] for k in ("serving", "prepared", "since", "error")} for r, s in live.items()}
        return {**self.view(), "replicas": replicas, "mixed_s": mixed, "note": self.note}

    def _commit(self) -> None:
        self.committed, self.committed_at, self.note = self.target, self.clock(), None
        self.epoch += 1

    def _maybe_commit(self) -> None:
        if self.target is None or self.target == self.committed:
            return
        live = self.live()
        have = [r for r, s in live.items() if self.target in (s["serving"], s["prepared"])]
        if len(have) == len(live):  # (no live replica: nothing can be mixed, whoever starts loads it)
            self._commit()
        elif self.clock() - self.target_since >= self.prepare_timeout_s:
            if have:
                self._commit()  # the slow ones switch when they have loaded it
            else:
                errors = sorted({s["error"] for s in live.values() if s["error"]})
                self.note = (f"no replica could load version {self.target} within {self.prepare_timeout_s} s; "
                             f"still serving {self.committed}" + (f" ({'; '.join(errors)})" if errors else ""))
