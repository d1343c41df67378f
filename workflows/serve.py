"""Serve ``models:/<registry.model_name>@<serve.alias>`` over HTTP, OpenAI style (Ray Serve + FastAPI ingress).

    raydistill serve --config tiny            # blocks until Ctrl-C or SIGTERM
    raydistill serve once --config tiny       # start, answer one demo request (serve.prompt), stop
    serve run cluster/serve/champion.yaml     # the same app from a Serve config file (also `serve deploy`)
    curl -s http://127.0.0.1:8123/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "ROMEO.\\nBut soft", "max_tokens": 16, "temperature": 0, "logprobs": 2}'

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template), both with ``stream:
true`` (server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``stop``, ``logprobs``; ``GET
/v1/models``, ``GET /healthz``. Requests from all clients are batched continuously: one generating thread per
replica runs ``tasks.generate.Engine``, where a request joins the running decode batch at the next token (up to
``serve.max_batch_size`` prompts) and leaves it when it finishes, so nobody waits for a batch to drain; an idle
replica waits at most ``serve.batch_wait_timeout_s`` for company before its first forward. Bad requests get HTTP 400
with an OpenAI-style ``{"error": {"message", "type", "param"}}`` body; a body over ``serve.max_body_bytes`` gets 413
before it is read. Ray Serve itself answers 503 + ``Retry-After`` when more than ``serve.max_queued_requests`` wait,
and 408 past ``serve.request_timeout_s``; a timed-out or disconnected request's generation stops at its next token
(a cancel event per request, checked between tokens).

The deployment takes its ``loader`` as an argument: ``loader(current_info) -> (model, tokenizer, info) | None``.
It is called once with ``None`` at start-up, then every ``serve.alias_poll_s`` seconds with the loaded version's
info; returning a new triple swaps the model (in-flight batches finish on the old one), ``None`` keeps it. The
default, :class:`RegistryLoader`, reloads when the alias moves to another version; :class:`DirectoryLoader`
serves a model directory (fp32 or quantized). Until a model is loaded, ``check_health`` fails (Serve restarts
the replica) and ``/healthz`` answers 503.
"""


import asyncio
import json
import logging
import os
import queue
import threading
import time
from dataclasses import dataclass, field

from fastapi import FastAPI
from ray import serve
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from raydistill.tasks.config import PipelineConfig, to_dict
from raydistill.tasks.errors import StageMissingError

APP_NAME = "raydistill"
DEPLOYMENT = "CompletionServer"
logger = logging.getLogger("ray.serve")


class RegistryLoader:
    """Loads ``models:/name@alias`` (or a pinned ``version``) from the registry; ``None`` while the alias still
    names the loaded version (a pinned version never reloads)."""

    def __init__(self, tracking_uri: str, name: str, alias: str | None = None, version: int | None = None):
        self.tracking_uri, self.name, self.alias, self.version = tracking_uri, name, alias, version

    def __call__(self, current: dict | None):
        from raydistill.workflows import tracking
        from raydistill.workflows.register import load_registered

        if self.version is not None:
            if current is not None:
                return None
            uri = tracking.model_uri(self.name, version=self.version)
        else:
            uri = tracking.model_uri(self.name, alias=self.alias)
        if current is not None:
            version = int(tracking.resolve_version(self.tracking_uri, uri).version)
            if version == current.get("version"):
                return None
            uri = tracking.model_uri(self.name, version=version)  # exactly the version just seen
        model, tokenizer, info = load_registered(self.tracking_uri, uri)  # always the quantized loader
        method = info.get("tags", {}).get("raydistill.quantization") or "int8"
        return model, tokenizer, {**info, "alias": self.alias, "quantized": True, "quantization": method}


class DirectoryLoader:
    """Loads a model directory once: quantized (``tasks.quantize.load_quantized``) when it holds quantization
    metadata, else a Hugging Face fp32 model (e.g. ``<run_dir>/train/student``)."""

    def __init__(self, model_dir: str):
        self.model_dir = model_dir

    def __call__(self, current: dict | None):
        if current is not None:
            return None
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


class ApiError(Exception):
    """An HTTP error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


api = FastAPI(title="raydistill", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    return _error(e.status, e.message, e.param, e.kind)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException):  # FastAPI's own 404/405 in the same shape
    hint = "; routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /healthz"
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}{hint}", kind=kind)


def _sse(obj: dict) -> str:
    """One server-sent event (defined above the deployment: Serve pickles its class by value)."""
    return f"data: {json.dumps(obj)}\n\n"


@dataclass
class _Job:
    """One request's prompts and settings, its cancel event, its token callback, and where its answer goes: the
    asyncio future (on the replica's event loop) that the generating thread resolves."""

    req: object
    prompts: tuple
    ids: list = field(default_factory=list)  # the prompts' token ids, from the length check
    tokenizer: object = None  # ... made by this tokenizer (a swapped-in model re-tokenizes)
    cancel: threading.Event = field(default_factory=threading.Event)
    on_token: object = None
    future: object = None
    loop: object = None
    outs: list = field(default_factory=list)
    done: bool = False

    def resolve(self, value, error: Exception | None = None) -> None:
        """Answer the waiting request (from any thread); a request that went away is left alone."""
        def settle():
            if not self.future.done():
                self.future.set_exception(error) if error is not None else self.future.set_result(value)
        self.loop.call_soon_threadsafe(settle)


@serve.deployment(name=DEPLOYMENT, health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress(api)
class CompletionServer:
    def __init__(self, loader, settings: dict):
        import torch

        torch.set_num_threads(max(1, int(settings["num_cpus"])))
        self._loader, self._s = loader, settings
        self._swaps, self._poll_error, self._batches, self._prompts = 0, None, 0, 0
        self._counts = {"cancelled": 0, "generated_tokens": 0, "active": 0, "steps": 0, "rows_stepped": 0,
                        "busy_s": 0.0}
        self._current = None
        try:
            loaded = loader(None)
            self._current = self._check(loaded) if loaded is not None else None
        except Exception as e:  # keep the replica up without a model: check_health says why, the poll retries
            self._poll_error = f"{type(e).__name__}: {e}"
            logger.exception("no model loaded")
        self._stop, self._jobs, self._lock = threading.Event(), queue.SimpleQueue(), threading.Lock()
        self._generator = threading.Thread(target=self._generate_loop, name="generate", daemon=True)
        self._generator.start()
        if settings["alias_poll_s"] > 0:
            threading.Thread(target=self._poll, name="alias-poll", daemon=True).start()
        logger.info(f"serving {self._model_id() if self._current else 'nothing yet'}")

    @staticmethod
    def _check(loaded):
        if not (isinstance(loaded, tuple) and len(loaded) == 3 and isinstance(loaded[2], dict)):
            raise TypeError("loader must return (model, tokenizer, info: dict)")
        return loaded

    def _model_id(self, info: dict | None = None) -> str:
        info = info or self._current[2]
        name = info.get("name", "model")  # a model directory has no version
        return name if info.get("version") is None else f"{name}/{info['version']}"

    @staticmethod
    def _identity(info: dict) -> dict:
        return {k: info.get(k) for k in ("name", "version", "alias", "quantized", "quantization")}

    def _poll(self) -> None:
        while not self._stop.wait(self._s["alias_poll_s"]):
            try:
                new = self._loader(self._current[2] if self._current else None)
                if new is not None:
                    old = self._model_id() if self._current else "nothing"
                    self._current = self._check(new)
                    self._swaps += 1
                    logger.info(f"alias moved: now serving {self._model_id()} (was {old})")
                self._poll_error = None
            except Exception as e:  # keep serving the loaded model; report the problem on /healthz
                self._poll_error = f"{type(e).__name__}: {e}"
                logger.warning(f"alias poll failed: {self._poll_error}")

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()

    def check_health(self) -> None:
        """Ray Serve's health check: fails (and Serve replaces the replica) while no model is loaded."""
        if self._current is None:
            raise RuntimeError(f"no model loaded (last error: {self._poll_error})")
        if not self._generator.is_alive():
            raise RuntimeError("the generating thread has stopped")

    def _loaded(self):
        if self._current is None:
            raise ApiError(503, f"no model loaded yet (last error: {self._poll_error})", kind="server_error")
        return self._current

    @api.get("/v1/models")
    async def models(self):
        info = self._loaded()[2]
        return {"object": "list", "data": [{
            "id": self._model_id(), "object": "model", "owned_by": "raydistill", "version": info.get("version"),
            "alias": info.get("alias"), "source": info.get("model_uri"), "quantized": info.get("quantized"),
            "quantization": info.get("quantization")}]}

    @api.get("/healthz")
    async def health(self):
        body = {"status": "ok" if self._current else "no model", "swaps": self._swaps,
                "last_poll_error": self._poll_error, "batches": self._batches, "prompts": self._prompts,
                "pid": os.getpid(), **self._counts}
        if self._current is not None:
            body.update(model=self._model_id(), **{k: v for k, v in self._identity(self._current[2]).items()
                                                   if k not in ("name",)})
        return JSONResponse(body, status_code=200 if self._current else 503)

    async def _read_json(self, request: Request):
        """The JSON body, refused with 413 past ``max_body_bytes``: by its Content-Length before reading
        anything, or while reading a chunked body (never holding more than the limit)."""
        limit = self._s["max_body_bytes"]
        too_big = f"the request body is larger than serve.max_body_bytes = {limit} bytes"
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise ApiError(413, too_big)
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise ApiError(413, too_big)
            chunks.append(chunk)
        try:
            return json.loads(b"".join(chunks))
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None

    @api.post("/v1/completions")
    async def completions(self, request: Request):
        from raydistill.tasks.openai_api import RequestError, parse_completion_request

        body, s = await self._read_json(request), self._s
        try:
            req = parse_completion_request(body, max_tokens_limit=s["max_tokens_limit"],
                                           max_prompts=s["max_batch_size"],  # one request fits one batch
                                           max_prompt_chars=s["max_prompt_tokens"] * 16,  # cheap pre-check
                                           max_logprobs=s["max_logprobs"])
        except RequestError as e:
            raise ApiError(400, str(e), e.param) from None
        return await self._answer(req, req.prompts)

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request):
        from raydistill.tasks.openai_api import RequestError, chat_prompt, parse_chat_request

        body, s = await self._read_json(request), self._s
        try:
            req = parse_chat_request(body, max_tokens_limit=s["max_tokens_limit"],
                                     max_prompt_chars=s["max_prompt_tokens"] * 16, max_logprobs=s["max_logprobs"])
            prompt = chat_prompt(self._loaded()[1], req.messages)
        except RequestError as e:
            raise ApiError(400, str(e), e.param) from None
        return await self._answer(req, (prompt,))

    def _check_lengths(self, req, prompts: tuple) -> tuple[list, object]:
        """The prompts' token ids and the tokenizer that made them; 400 past the prompt or context limit."""
        from raydistill.tasks.generate import encode_prompts

        model, tokenizer, _ = self._loaded()
        limit, context = self._s["max_prompt_tokens"], getattr(model.config, "max_position_embeddings", None)
        encoded = encode_prompts(tokenizer, prompts)
        for ids in encoded:
            if len(ids) > limit:
                raise ApiError(400, f"a prompt has {len(ids)} tokens; serve.max_prompt_tokens is {limit}", "prompt")
            if context and len(ids) + req.max_tokens > context:
                raise ApiError(400, f"the prompt ({len(ids)} tokens) + max_tokens ({req.max_tokens}) is over the "
                                    f"model's context of {context} tokens; ask for max_tokens <= "
                                    f"{max(0, context - len(ids))}", "max_tokens")
        return encoded, tokenizer

    async def _answer(self, req, prompts: tuple):
        from raydistill.tasks.openai_api import chat_response, completion_response

        ids, tokenizer = self._check_lengths(req, prompts)
        if req.stream:
            return StreamingResponse(self._stream(req, prompts, ids, tokenizer), media_type="text/event-stream")
        job = _Job(req, prompts, ids, tokenizer)
        try:
            outs, info = await self._run(job)
        except asyncio.CancelledError:  # timed out (408) or the client went away: stop its generation
            job.cancel.set()
            self._counts["cancelled"] += 1
            raise
        if req.messages:
            return chat_response(req, outs[0], self._model_id(info), self._identity(info))
        return completion_response(req, outs, self._model_id(info), self._identity(info))

    async def _run(self, job: _Job):
        """Hand the job to the generating thread and wait for its ``(outs, info)``."""
        loop = asyncio.get_running_loop()
        job.future, job.loop = loop.create_future(), loop
        with self._lock:
            self._counts["active"] += 1  # until the generating thread is done with it (cancelled ones too)
        self._jobs.put(job)
        return await job.future

    async def _stream(self, req, prompts: tuple, ids: list, tokenizer):
        """Server-sent events: one chunk per generated token (fed by ``complete``'s ``on_token`` on the
        generating thread), a last chunk with ``finish_reason``, then ``data: [DONE]``."""
        from raydistill.tasks.openai_api import stream_chunk, stream_head, usage_chunk

        loop, queue = asyncio.get_running_loop(), asyncio.Queue()
        job = _Job(req, prompts, ids, tokenizer, on_token=lambda e: loop.call_soon_threadsafe(queue.put_nowait, e))
        task = asyncio.ensure_future(self._run(job))
        task.add_done_callback(lambda _: queue.put_nowait(None))
        head = stream_head(req, self._model_id(), self._identity(self._current[2]))
        try:
            if req.messages:
                yield _sse(stream_chunk(req, head, None))
            while (event := await queue.get()) is not None:
                if event["token"] is not None or event["delta"]:
                    yield _sse(stream_chunk(req, head, event))
            try:
                outs, _ = task.result()
            except ApiError as e:
                yield _sse({"error": {"message": e.message, "type": e.kind, "param": None, "code": None}})
                return
            yield _sse(stream_chunk(req, head, {"delta": "", "token": None}, outs[0]["finish_reason"]))
            if req.include_usage:
                yield _sse(usage_chunk(req, head, outs[0]))
            yield "data: [DONE]\n\n"
        finally:
            if not task.done():  # the client disconnected (or timed out) mid-stream
                job.cancel.set()
                self._counts["cancelled"] += 1

    def _generate_loop(self) -> None:
        """The generating thread: continuous batching (``tasks.generate.Engine``) of the model loaded now. Jobs
        join the running batch at token boundaries (up to ``max_batch_size`` prompts); an idle engine waits at
        most ``batch_wait_timeout_s`` for more before its first forward. When the alias moves, the rows running
        finish on the old model and the next jobs start on the new one. An error fails the requests it touched
        (HTTP 500), never the thread."""
        state = {"engine": None, "backlog": [], "owners": {}}
        while not self._stop.is_set():
            try:
                self._generate_once(state)
            except Exception as e:  # e.g. out of memory: fail the requests it held, keep the replica serving
                logger.exception("generation failed")
                held = {id(j): j for j in [*state["owners"].values(), *state["backlog"]]}
                self._fail(held.values(), e)
                state.update(engine=None, owners={}, backlog=[])
                self._stop.wait(0.1)  # an error that repeats (a broken model) must not spin

    def _generate_once(self, state: dict) -> None:
        engine = state["engine"]
        idle = engine is None or engine.idle
        state["backlog"] += self._take(block=idle and not state["backlog"])
        if not state["backlog"] and idle:
            return
        if idle and self._current is not None and (engine is None or engine.model is not self._current[0]):
            engine = state["engine"] = self._new_engine()
        if engine is None:  # jobs but no model yet: they wait (new requests get 503 meanwhile)
            self._stop.wait(0.1)
            return
        if engine.model is self._current[0]:  # else the alias moved: let the old model's rows drain first
            state["backlog"] = self._admit(engine, state["backlog"], state["owners"])
        joins, steps, rows = engine.joins, engine.steps, engine.row_steps
        t0 = time.perf_counter()
        finished = engine.step()
        self._counts["busy_s"] += time.perf_counter() - t0  # seconds spent generating (the rest is idle)
        self._batches += engine.joins - joins
        self._counts["steps"] += engine.steps - steps  # forwards; rows per forward = rows_stepped / steps
        self._counts["rows_stepped"] += engine.row_steps - rows
        self._finish(engine, finished, state["owners"])

    def _take(self, block: bool) -> list:
        """The jobs waiting in the queue: blocking (at most 0.5 s) for the first one when asked, then up to
        ``batch_wait_timeout_s`` for a fuller first batch."""
        jobs = []
        try:
            jobs.append(self._jobs.get(timeout=0.5) if block else self._jobs.get_nowait())
        except queue.Empty:
            return jobs
        deadline = time.monotonic() + (self._s["batch_wait_timeout_s"] if block else 0)
        while sum(len(j.prompts) for j in jobs) < self._s["max_batch_size"]:
            try:
                jobs.append(self._jobs.get(timeout=max(0.0, deadline - time.monotonic()))
                            if deadline > time.monotonic() else self._jobs.get_nowait())
            except queue.Empty:
                break
        return jobs

    def _new_engine(self):
        from raydistill.tasks.generate import Engine

        model, tokenizer, info = self._current
        engine = Engine(model, tokenizer, max_rows=self._s["max_batch_size"])
        engine.info = info
        return engine

    def _admit(self, engine, backlog: list, owners: dict) -> list:
        """Add whole jobs from ``backlog`` while the engine has rows for them; returns the jobs left."""
        while backlog and (engine.idle or len(engine.running) + len(engine.waiting) + len(backlog[0].prompts)
                           <= engine.max_rows):
            job = backlog.pop(0)
            job.outs = [None] * len(job.prompts)
            try:
                same = job.tokenizer is engine.tokenizer  # else the alias moved since: tokenize again
                for i, prompt in enumerate(job.prompts):
                    r = job.req
                    c = engine.add(prompt, max_tokens=r.max_tokens, temperature=r.temperature, logprobs=r.logprobs,
                                   seed=r.seed, stop=list(r.stop), cancel=job.cancel, on_token=job.on_token,
                                   tag=(job, i), ids=job.ids[i] if same else None)
                    owners[id(c)] = job
            except ValueError as e:  # settings the model cannot take (e.g. logprobs over its vocabulary)
                job.cancel.set()  # its prompts already added leave at the next step
                self._fail([job], ApiError(400, str(e)))
            self._prompts += len(job.prompts)
        return backlog

    def _finish(self, engine, finished: list, owners: dict) -> None:
        for c in finished:
            job, i = c.tag
            owners.pop(id(c), None)
            job.outs[i] = c.result
            self._counts["generated_tokens"] += c.result["usage"]["completion_tokens"]
            if not job.done and all(o is not None for o in job.outs):
                job.done = True
                job.resolve((job.outs, engine.info))
                with self._lock:
                    self._counts["active"] -= 1

    def _fail(self, jobs, error: Exception) -> None:
        for job in [j for j in jobs if not j.done]:
            job.done = True
            job.resolve(None, error if isinstance(error, ApiError) else
                        ApiError(500, f"generation failed: {type(error).__name__}: {error}", kind="server_error"))
            with self._lock:
                self._counts["active"] -= 1


# -------------------------------------------------------------------------------------------------------
# driver side
# -------------------------------------------------------------------------------------------------------

def default_loader(cfg: PipelineConfig):
    """``serve.model_dir`` if set, else the registry: version ``serve.version`` if set, else ``@serve.alias``."""
    s = cfg.serve
    if s.model_dir:
        return DirectoryLoader(s.model_dir)
    if s.version is not None:
        return RegistryLoader(cfg.tracking_uri, cfg.registry.model_name, version=s.version)
    return RegistryLoader(cfg.tracking_uri, cfg.registry.model_name, alias=s.alias)


def build_app(cfg: PipelineConfig, loader=None):
    """The Serve application (:func:`default_loader` unless ``loader``); a Serve config file's ``deployments:``
    entry for ``CompletionServer`` overrides these options."""
    from ray.serve.config import BackpressureConfig

    s = cfg.serve
    return CompletionServer.options(
        num_replicas=s.num_replicas, ray_actor_options={"num_cpus": s.num_cpus},
        max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        backpressure_config=BackpressureConfig(retry_after_s=s.retry_after_s),
    ).bind(loader or default_loader(cfg), to_dict(s))


APP_ARGS = ("model_uri", "tracking_uri", "preset", "overrides")


def application(args: dict | None = None):
    """Application builder for Serve config files (``cluster/serve/champion.yaml``: ``serve run``/``serve
    deploy``, and the KubeRay RayService that embeds it).

    ``args``: ``model_uri`` (``models:/<name>@<alias>`` or ``models:/<name>/<version>``), ``tracking_uri``,
    ``preset`` and dotted ``overrides`` (``["serve.max_batch_size=16"]``). The environment fills what they leave
    out: ``MLFLOW_TRACKING_URI``, ``RAYDISTILL_MODEL_NAME``, ``RAYDISTILL_MODEL_ALIAS``.
    """
    import difflib

    from raydistill.tasks.config import ConfigError, load_config
    from raydistill.workflows import tracking

    args = dict(args or {})
    for key in args:
        if key not in APP_ARGS:
            close = difflib.get_close_matches(key, APP_ARGS, n=1)
            raise ConfigError(f"unknown Serve application arg {key!r}"
                              f"{f'; did you mean {close[0]!r}?' if close else ''} (valid: {', '.join(APP_ARGS)})")
    env = {"registry.tracking_uri": args.get("tracking_uri") or os.environ.get("MLFLOW_TRACKING_URI"),
           "registry.model_name": os.environ.get("RAYDISTILL_MODEL_NAME"),
           "serve.alias": os.environ.get("RAYDISTILL_MODEL_ALIAS")}
    if args.get("model_uri"):
        ref = tracking.parse_model_uri(args["model_uri"])
        env["registry.model_name"] = ref.name
        env["serve.alias" if ref.alias else "serve.version"] = ref.alias or ref.version
    overrides = [f"{k}={v}" for k, v in env.items() if v] + list(args.get("overrides", []))
    return build_app(load_config(args.get("preset"), overrides))


def app_from_env(args: dict | None = None):
    """The builder the earlier RayService manifest named; the same as :func:`application`."""
    return application(args)


def base_url(cfg: PipelineConfig) -> str:
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}"


def start_app(cfg: PipelineConfig, loader=None) -> str:
    """Start Ray (if needed) and Serve, deploy the app, wait until it answers; returns the base URL."""
    import requests

    from raydistill.workflows import stage

    if loader is None and not cfg.serve.model_dir:  # fail here, clearly, rather than in a restarting replica
        from raydistill.workflows import tracking

        uri = tracking.model_uri(cfg.registry.model_name, alias=None if cfg.serve.version else cfg.serve.alias,
                                 version=cfg.serve.version)
        try:
            tracking.resolve_version(cfg.tracking_uri, uri)
        except LookupError as e:
            raise StageMissingError(f"{e}; register and promote a model first "
                                    "(`raydistill register`, `raydistill promote`)") from None
    stage.start(cfg, "serve", skip=False, ray=True)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port,
                              "request_timeout_s": cfg.serve.request_timeout_s})
    serve.run(build_app(cfg, loader), name=APP_NAME, route_prefix="/")
    url = base_url(cfg)
    deadline = time.time() + 60
    while True:  # the proxy can lag the replica by a moment
        try:
            if requests.get(f"{url}/healthz", timeout=5).status_code == 200:
                return url
        except requests.RequestException:
            pass
        if time.time() > deadline:
            raise RuntimeError(f"Serve app deployed but {url}/healthz does not answer")
        time.sleep(0.2)


def shutdown_app() -> None:
    """Remove the app and stop Serve (Ray itself keeps running)."""
    import ray

    if ray.is_initialized():
        serve.shutdown()


def run(cfg: PipelineConfig, action: str | None = None) -> dict:
    """Serve until Ctrl-C; ``once``: answer one demo request, then stop."""
    import json

    import requests

    url = start_app(cfg)
    body = {"prompt": cfg.serve.prompt, "max_tokens": min(16, cfg.serve.max_tokens_limit), "temperature": 0,
            "logprobs": 1}
    from raydistill.workflows.tracking import model_uri

    source = cfg.serve.model_dir or model_uri(cfg.registry.model_name, alias=None if cfg.serve.version else
                                              cfg.serve.alias, version=cfg.serve.version)
    print(f"[serve] {source} at {url}/v1/completions\n"
          f"  curl -s {url}/v1/completions -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
    if action == "once":
        try:
            answer = requests.post(f"{url}/v1/completions", json=body, timeout=120).json()
            print(f"[serve] {answer.get('model')}: {cfg.serve.prompt!r} → {answer['choices'][0]['text']!r}")
            return {"url": url, "response": answer}
        finally:
            shutdown_app()
    import signal

    def stop(signum, frame):  # SIGTERM (kill, Kubernetes, a background job) stops it as Ctrl-C does
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("[serve] stopping", flush=True)
        shutdown_app()
    return {"url": url}
