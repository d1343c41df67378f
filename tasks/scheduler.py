"""A server replica's generating thread, without Ray: continuous batching of requests over a model that can be
swapped while it serves. ``workflows/serve.py`` keeps the HTTP routes and hands each request to one of these.

    sched = Scheduler(max_batch_size=8, batch_wait_timeout_s=0.02)
    sched.swap((model, tokenizer, {"name": "student", "version": 1}))   # what it serves
    sched.start()
    job = sched.submit(Job(req, prompts=("ROMEO.",)))   # req: tasks.openai_api.CompletionRequest (its settings)
    outs, info = job.future.result()    # one ``tasks.generate.complete`` dict per prompt; info: the model's
    sched.cancel(job)                   # the client went away: its prompts leave the batch at the next token
    sched.stop()

Batching: one thread runs a :class:`~raydistill.tasks.generate.Engine`; a job's prompts join the running decode
batch at the next token (whole jobs, up to ``max_batch_size`` prompts in all) and each leaves it when it
finishes. An idle scheduler waits at most ``batch_wait_timeout_s`` for company before its first forward.

Swap: :meth:`Scheduler.swap` names the model to serve from now on. Rows already running finish on the old model
(their answers carry the old ``info``); every job admitted after the swap runs on the new one, re-tokenized if
its ids came from another tokenizer. A job submitted before any model is set waits for one.

Failures: a job whose settings the model cannot take (``logprobs`` over its vocabulary) fails alone with
:class:`~raydistill.tasks.openai_api.RequestError`; an exception in a forward (out of memory, a broken model)
fails every job the engine held with :class:`GenerationError` and the thread goes on with a fresh engine.
Jobs are answered through ``job.future`` (a ``concurrent.futures.Future``: ``asyncio.wrap_future`` awaits it).
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from dataclasses import dataclass, field

from raydistill.tasks.generate import Engine
from raydistill.tasks.openai_api import RequestError


class GenerationError(RuntimeError):
    """A forward failed; the jobs it held are failed with this (a server answers 500)."""


@dataclass(eq=False)
class Job:
    """One request's prompts and settings, and where its answer goes."""

    req: object
    """The settings: ``max_tokens``, ``temperature``, ``logprobs``, ``seed``, ``stop`` (a ``CompletionRequest``)."""
    prompts: tuple
    """The prompt texts."""
    ids: list | None = None
    """Their token ids when the caller has them (``tokenizer``'s); ``None``: tokenized at admission."""
    tokenizer: object = None
    """The tokenizer that made ``ids`` (a job admitted to a swapped-in model with another one is re-tokenized)."""
    on_token: object = None
    """Called on the generating thread after each token (streaming; ``tasks.generate``'s event dict)."""
    cancel: threading.Event = field(default_factory=threading.Event)
    """Set: the job's prompts leave the batch at the next token (``finish_reason: "cancelled"``)."""
    future: concurrent.futures.Future = field(default_factory=concurrent.futures.Future)
    """Resolved with ``(outs, info)``, or failed with ``RequestError`` / ``GenerationError``."""
    outs: list = field(default_factory=list)
    done: bool = False


def _settle(future: concurrent.futures.Future, value=None, error: Exception | None = None) -> None:
    """Answer ``future`` unless it is settled already (a waiter that went away may have cancelled it)."""
    try:
        future.set_exception(error) if error is not None else future.set_result(value)
    except concurrent.futures.InvalidStateError:
        pass


class Scheduler:
    """The generating thread and its queue (see the module doc). ``stats()`` are counters for a health page."""

    def __init__(self, max_batch_size: int, batch_wait_timeout_s: float):
        self.max_batch_size, self.batch_wait_timeout_s = max_batch_size, batch_wait_timeout_s
        self.current = None  # (model, tokenizer, info) served from now on
        self.serving_since = None  # time.time() of the last swap
        self._jobs, self._lock, self._stop = queue.SimpleQueue(), threading.Lock(), threading.Event()
        self._engine, self._backlog, self._owners = None, [], {}
        self._thread = None
        self._counts = {"batches": 0, "prompts": 0, "cancelled": 0, "generated_tokens": 0, "active": 0,
                        "steps": 0, "rows_stepped": 0, "busy_s": 0.0, "swaps": 0}

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="generate", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def swap(self, loaded: tuple) -> None:
        """Serve ``(model, tokenizer, info)`` from now on (the first call sets the model; see the module doc)."""
        if not (isinstance(loaded, tuple) and len(loaded) == 3 and isinstance(loaded[2], dict)):
            raise TypeError("a model to serve is (model, tokenizer, info: dict)")
        self._counts["swaps"] += self.current is not None
        self.current, self.serving_since = loaded, time.time()

    def submit(self, job: Job) -> Job:
        with self._lock:
            self._counts["active"] += 1  # until the generating thread is done with it (cancelled ones too)
        self._jobs.put(job)
        return job

    def cancel(self, job: Job) -> None:
        """The job's client went away (disconnect, timeout): its rows leave at the next token."""
        if not job.done:
            job.cancel.set()
            self._counts["cancelled"] += 1

    def stats(self) -> dict:
        return dict(self._counts)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self._once()
            except Exception as e:  # e.g. out of memory: fail the jobs it held, keep serving
                held = {id(j): j for j in [*self._owners.values(), *self._backlog]}
                self._fail(held.values(), GenerationError(f"generation failed: {type(e).__name__}: {e}"))
                self._engine, self._owners, self._backlog = None, {}, []
                self._stop.wait(0.1)  # an error that repeats (a broken model) must not spin

    def _once(self) -> None:
        engine, current = self._engine, self.current
        idle = engine is None or engine.idle
        self._backlog += self._take(block=idle and not self._backlog)
        if not self._backlog and idle:
            return
        if idle and current is not None and (engine is None or engine.model is not current[0]):
            engine = self._engine = Engine(current[0], current[1], max_rows=self.max_batch_size)
            engine.info = current[2]
        if engine is None:  # jobs but no model yet: they wait
            self._stop.wait(0.1)
            return
        if current is not None and engine.model is current[0]:  # else a swap: the old model's rows drain first
            self._admit(engine)
        joins, steps, rows = engine.joins, engine.steps, engine.row_steps
        t0 = time.perf_counter()
        finished = engine.step()
        self._counts["busy_s"] += time.perf_counter() - t0  # seconds spent generating (the rest is idle)
        self._counts["batches"] += engine.joins - joins
        self._counts["steps"] += engine.steps - steps  # forwards; rows per forward = rows_stepped / steps
        self._counts["rows_stepped"] += engine.row_steps - rows
        self._finish(engine, finished)

    def _take(self, block: bool) -> list:
        """The jobs waiting in the queue: blocking (at most 0.5 s) for the first one when asked, then up to
        ``batch_wait_timeout_s`` for a fuller first batch."""
        jobs = []
        try:
            jobs.append(self._jobs.get(timeout=0.5) if block else self._jobs.get_nowait())
        except queue.Empty:
            return jobs
        deadline = time.monotonic() + (self.batch_wait_timeout_s if block else 0)
        while sum(len(j.prompts) for j in jobs) < self.max_batch_size:
            try:
                left = deadline - time.monotonic()
                jobs.append(self._jobs.get(timeout=left) if left > 0 else self._jobs.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _admit(self, engine: Engine) -> None:
        """Add whole jobs from the backlog while the engine has rows for them."""
        while self._backlog and (engine.idle or len(engine.running) + len(engine.waiting)
                                 + len(self._backlog[0].prompts) <= engine.max_rows):
            job = self._backlog.pop(0)
            job.outs = [None] * len(job.prompts)
            same = job.ids is not None and job.tokenizer is engine.tokenizer  # else tokenize again
            r = job.req
            try:
                for i, prompt in enumerate(job.prompts):
                    c = engine.add(prompt, max_tokens=r.max_tokens, temperature=r.temperature, logprobs=r.logprobs,
                                   seed=r.seed, stop=list(r.stop), cancel=job.cancel, on_token=job.on_token,
                                   tag=(job, i), ids=job.ids[i] if same else None)
                    self._owners[id(c)] = job
            except ValueError as e:  # settings the model cannot take (e.g. logprobs over its vocabulary)
                job.cancel.set()  # its prompts already added leave at the next step
                self._fail([job], RequestError(str(e)))
            self._counts["prompts"] += len(job.prompts)

    def _finish(self, engine: Engine, finished: list) -> None:
        for c in finished:
            job, i = c.tag
            self._owners.pop(id(c), None)
            job.outs[i] = c.result
            self._counts["generated_tokens"] += c.result["usage"]["completion_tokens"]
            if not job.done and all(o is not None for o in job.outs):
                self._close(job)
                _settle(job.future, (job.outs, engine.info))

    def _fail(self, jobs, error: Exception) -> None:
        for job in [j for j in jobs if not j.done]:
            self._close(job)
            _settle(job.future, error=error)

    def _close(self, job: Job) -> None:
        job.done = True
        with self._lock:
            self._counts["active"] -= 1
