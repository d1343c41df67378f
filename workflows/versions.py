"""What a Serve replica serves, and how every replica moves to a new version together (the Ray side of
``tasks.swap``). Used by ``workflows/serve.py``.

    loader = RegistryLoader(tracking_uri, "tiny-student", alias="champion")   # or DirectoryLoader(model_dir)
    loader()                  # (model, tokenizer, info) of what the alias names now
    loader.latest()           # the version it names now (registry read only)
    loader.load(3)            # (model, tokenizer, info) of version 3

A loader is ``loader() -> (model, tokenizer, info) | None``. One that follows a moving alias (``follows_alias``)
also has ``latest()`` and ``load(version)``, and its app gets a :class:`VersionWatcher` deployment (one replica,
no CPUs): it reads ``latest()`` every ``serve.alias_poll_s`` seconds and holds the ``tasks.swap`` coordinator.
Each serving replica runs a :class:`Follower` on its event loop: a long poll to the watcher (answered at once
when the view changes, else after ``POLL_WAIT_S``; it is also the replica's heartbeat), loading the next version
in a thread beside the one served, and switching its scheduler when the watcher commits it. All replicas get the
commit at the same moment, so they serve different versions only for the time the answer takes to reach them.
"""

import asyncio
import logging
import os
import time

from ray import serve

WATCHER = "VersionWatcher"
LEASE_S = 10.0  # a replica silent this long no longer holds a switch back (a live one polls every POLL_WAIT_S)
POLL_WAIT_S = 1.0
logger = logging.getLogger("ray.serve")


class RegistryLoader:
    """Loads ``models:/name@alias`` (``follows_alias``: the app watches the alias) or a pinned ``version``."""

    def __init__(self, tracking_uri: str, name: str, alias: str | None = None, version: int | None = None):
        self.tracking_uri, self.name, self.alias, self.version = tracking_uri, name, alias, version
        self.follows_alias = version is None

    def latest(self) -> int:
        """The version the alias (or the pin) names now; reads the registry, loads nothing."""
        from raydistill.workflows import tracking

        if self.version is not None:
            return self.version
        uri = tracking.model_uri(self.name, alias=self.alias)
        return int(tracking.resolve_version(self.tracking_uri, uri).version)

    def load(self, version: int):
        """``(model, tokenizer, info)`` of exactly ``version`` (always the quantized loader)."""
        from raydistill.workflows import tracking
        from raydistill.workflows.register import load_registered

        model, tokenizer, info = load_registered(self.tracking_uri, tracking.model_uri(self.name, version=version))
        method = info.get("tags", {}).get("raydistill.quantization") or "int8"
        return model, tokenizer, {**info, "alias": self.alias, "quantized": True, "quantization": method}

    def __call__(self):
        return self.load(self.latest())


class DirectoryLoader:
    """Loads a model directory: quantized (``tasks.quantize.load_quantized``) when it holds quantization
    metadata, else a Hugging Face fp32 model (e.g. ``<run_dir>/train/student``). Never swaps."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir

    def __call__(self):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from raydistill.tasks import quantize

        method = None
        if os.path.exists(os.path.join(self.model_dir, quantize.META_FILE)):
            method = quantize.read_quantization_info(self.model_dir)["method"]
            model = quantize.load_quantized(self.model_dir)
        else:
            from raydistill.tasks.guard import refuse_pickle

            model = AutoModelForCausalLM.from_pretrained(refuse_pickle(self.model_dir), dtype="float32",
                                                         use_safetensors=True).eval()
        info = {"name": os.path.basename(os.path.normpath(self.model_dir)), "version": None,
                "model_uri": os.path.abspath(self.model_dir), "quantized": method is not None,
                "quantization": method}
        return model, AutoTokenizer.from_pretrained(self.model_dir), info


@serve.deployment(name=WATCHER, num_replicas=1, max_ongoing_requests=1000, ray_actor_options={"num_cpus": 0},
                  health_check_period_s=5, logging_config={"enable_access_log": False})  # no line per long poll
class VersionWatcher:
    """One per app: reads the version the loader's alias names every ``alias_poll_s`` seconds and tells the
    replicas (long polls: :meth:`poll` answers as soon as the view changes) what to load and when to switch."""

    async def __init__(self, loader, settings: dict):
        from raydistill.tasks.swap import SwapCoordinator

        self._loader, self._poll_s = loader, settings["alias_poll_s"]
        self._coord = SwapCoordinator(lease_s=LEASE_S, prepare_timeout_s=settings["swap_timeout_s"])
        self._changed, self._error = asyncio.Event(), None
        await self._observe()  # the first version, before any replica asks
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def _observe(self) -> None:
        before = self._coord.epoch
        try:
            self._coord.observe(await asyncio.to_thread(self._loader.latest))
            self._error = None
        except Exception as e:  # a registry hiccup: keep the view, say so in status()
            self._error = f"{type(e).__name__}: {e}"
            logger.warning(f"reading the alias failed: {self._error}")
        self._wake_if(before)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._poll_s)
            await self._observe()

    def _wake_if(self, before: int) -> None:
        if self._coord.epoch != before:
            view = self._coord.view()
            logger.info(f"versions: target {view['target']}, committed {view['committed']}")
            self._changed.set()
            self._changed = asyncio.Event()

    async def poll(self, replica: str, serving=None, prepared=None, since: float | None = None,
                   error: str | None = None, epoch: int | None = None, wait_s: float = 0.0) -> dict:
        """A replica's report; answers the view once its epoch differs from ``epoch``, or after ``wait_s``."""
        before = self._coord.epoch
        self._coord.report(replica, serving, prepared, since, error)
        self._wake_if(before)
        deadline = time.monotonic() + wait_s
        while self._coord.epoch == epoch and (left := deadline - time.monotonic()) > 0:
            try:
                await asyncio.wait_for(self._changed.wait(), left)
            except asyncio.TimeoutError:
                break
        return self._coord.view()

    async def status(self) -> dict:
        """``tasks.swap.SwapCoordinator.status`` plus the last registry error."""
        return {**self._coord.status(), "last_error": self._error, "alias_poll_s": self._poll_s}


class Follower:
    """A serving replica's side of the swap: reports to the watcher, loads the next version beside the served
    one (in a thread), switches ``sched`` when the watcher commits it. Runs on the replica's event loop."""

    def __init__(self, watcher, loader, sched, replica: str):
        self.watcher, self.loader, self.sched, self.replica = watcher, loader, sched, replica
        self.serving = self.prepared_key = self.error = self.switched_at = None
        self._prepared = self._loading = self._task = None

    async def first(self):
        """``(model, tokenizer, info)`` of the version every other replica serves (to serve before anything)."""
        committed = (await self.watcher.poll.remote(self.replica))["committed"]
        loaded = await asyncio.to_thread(self.loader.load, committed)
        self.serving = committed
        return loaded

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._follow())

    async def _report(self, epoch=None, wait_s: float = 0.0) -> dict:
        view = await self.watcher.poll.remote(self.replica, self.serving, self.prepared_key, self.switched_at,
                                              self.error, epoch, wait_s)
        self._apply(view)
        return view

    async def _follow(self) -> None:
        epoch = None
        while True:
            try:
                epoch = (await self._report(epoch, POLL_WAIT_S))["epoch"]
            except Exception as e:  # the watcher is restarting: keep serving, ask again
                self.error, epoch = f"version watcher: {type(e).__name__}: {e}", None
                await asyncio.sleep(POLL_WAIT_S)

    def _apply(self, view: dict) -> None:
        """Switch to the prepared version once it is committed, or start loading the one to prepare (no await
        in here: one decision at a time on the event loop)."""
        from raydistill.tasks.swap import replica_action

        action = replica_action(view, self.serving, self.prepared_key)
        if action and action[0] == "switch":
            old = self.serving
            self.sched.swap(self._prepared)
            self.serving, self._prepared, self.prepared_key, self.error = action[1], None, None, None
            self.switched_at = self.sched.serving_since
            logger.info(f"alias moved: now serving version {self.serving} (was {old})")
        elif action and self._loading is None:
            self._loading = asyncio.get_running_loop().create_task(self._prepare(action[1]))

    async def _prepare(self, version) -> None:
        """Load ``version`` beside the served model, then tell the watcher at once (a switch may wait on it)."""
        try:
            self._prepared = await asyncio.to_thread(self.loader.load, version)
            self.prepared_key, self.error = version, None
        except Exception as e:  # reported to the watcher; the next view retries
            self.error = f"loading version {version}: {type(e).__name__}: {e}"
            logger.warning(self.error)
        finally:
            self._loading = None
        try:
            await self._report()
        except Exception:
            pass  # the follow loop reports on its next turn
