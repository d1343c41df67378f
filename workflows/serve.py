"""Serve ``models:/<registry.model_name>@<serve.alias>`` over HTTP, OpenAI style (Ray Serve + FastAPI ingress).

    raydistill serve --config tiny            # blocks until Ctrl-C or SIGTERM
    raydistill serve once --config tiny       # start, answer one demo request (serve.prompt), stop
    serve run cluster/serve/champion.yaml     # the same app from a Serve config file (also `serve deploy`)
    curl -s http://127.0.0.1:8123/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "ROMEO.\\nBut soft", "max_tokens": 16, "temperature": 0, "logprobs": 2}'

Routes: ``POST /v1/completions``, ``POST /v1/chat/completions`` (the tokenizer's chat template), both with ``stream:
true`` (server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``), ``stop``, ``logprobs``; ``GET
/v1/models``, ``GET /healthz``. With API keys (``RAYDISTILL_API_KEYS`` or ``serve.api_keys_file`` where the app is
built: ``tasks.apikeys``) every route but ``/healthz`` needs ``Authorization: Bearer <key>`` and answers 401 in
OpenAI's error shape without one, before reading the body. Bad requests get HTTP 400 with an OpenAI-style
``{"error": {"message", "type", "param", "code"}}`` body; a body over ``serve.max_body_bytes`` gets 413 before it
is read. Ray Serve itself answers 503 + ``Retry-After`` when more than ``serve.max_queued_requests`` wait, and 408
past ``serve.request_timeout_s``; a timed-out or disconnected request's generation stops at its next token.

This module is the Ray shell of serving: the routes, the app and the driver. A replica's generation (one thread,
continuous batching, cancellation, failures, swaps) is ``tasks.scheduler``; what it serves and how all replicas
move to a new version together is ``workflows.versions`` (over ``tasks.swap``). The deployment takes its
``loader`` as an argument (``loader() -> (model, tokenizer, info) | None``); with :class:`RegistryLoader` on an
alias the app also runs a :class:`VersionWatcher` that checks the alias every ``serve.alias_poll_s`` seconds:
every replica loads the new version beside the one it serves, and all switch together once all have it (rows
already running finish on the old model). :class:`DirectoryLoader` serves a model directory (fp32 or quantized).
Until a model is loaded, ``check_health`` fails (Serve restarts the replica) and ``/healthz`` answers 503.
"""


import asyncio
import json
import logging
import os
import socket
import time
import uuid

from fastapi import FastAPI
from ray import serve
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse

from raydistill.tasks.config import ConfigError, PipelineConfig, to_dict
from raydistill.tasks.errors import StageMissingError
from raydistill.workflows.versions import WATCHER, DirectoryLoader, Follower, RegistryLoader, VersionWatcher

APP_NAME = "raydistill"
DEPLOYMENT = "CompletionServer"
logger = logging.getLogger("ray.serve")


class ApiError(Exception):
    """An HTTP error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code
        self.headers = headers


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
           code: str | None = None, headers: dict | None = None):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}},
                        status_code=status, headers=headers)


api = FastAPI(title="raydistill", docs_url=None, redoc_url=None, openapi_url=None)


@api.exception_handler(ApiError)
async def _api_error(request: Request, e: ApiError):
    return _error(e.status, e.message, e.param, e.kind, e.code, e.headers)


@api.exception_handler(HTTPException)
async def _http_error(request: Request, e: HTTPException):  # FastAPI's own 404/405 in the same shape
    hint = "; routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /healthz"
    kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
    return _error(e.status_code, f"{request.method} {request.url.path}: {e.detail}{hint}", kind=kind)


def _sse(obj: dict) -> str:
    """One server-sent event (defined above the deployment: Serve pickles its class by value)."""
    return f"data: {json.dumps(obj)}\n\n"


def _failure(e: Exception) -> ApiError:
    """The HTTP error for a job the scheduler failed: its settings (400) or the forward (500)."""
    from raydistill.tasks.openai_api import RequestError

    if isinstance(e, RequestError):
        return ApiError(400, str(e), e.param)
    return ApiError(500, str(e), kind="server_error")


@serve.deployment(name=DEPLOYMENT, health_check_period_s=5, health_check_timeout_s=30)
@serve.ingress(api)
class CompletionServer:
    async def __init__(self, loader, settings: dict, watcher=None, key_digests: tuple = ()):
        import torch

        from raydistill.tasks.scheduler import Scheduler

        torch.set_num_threads(max(1, int(settings["num_cpus"])))
        self._s, self._digests = settings, tuple(key_digests)
        self._sched = Scheduler(settings["max_batch_size"], settings["batch_wait_timeout_s"])
        self._id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self._follower = None if watcher is None else Follower(watcher, loader, self._sched, self._id)
        self._error = None
        try:  # with a watcher: the version every other replica serves
            loaded = await (self._follower.first() if self._follower else asyncio.to_thread(loader))
            if loaded is not None:
                self._sched.swap(loaded)
        except Exception as e:  # keep the replica up without a model: check_health says why (the follower retries)
            self._error = f"{type(e).__name__}: {e}"
            logger.exception("no model loaded")
        self._sched.start()
        if self._follower:
            self._follower.start()
        logger.info(f"serving {self._model_id() if self._sched.current else 'nothing yet'}")

    def __del__(self):
        if hasattr(self, "_sched"):
            self._sched.stop(timeout=0)

    @property
    def _last_error(self) -> str | None:
        return (self._follower.error if self._follower else None) or \
            (self._error if self._sched.current is None else None)

    def check_health(self) -> None:
        """Ray Serve's health check: fails (and Serve replaces the replica) while no model is loaded."""
        if self._sched.current is None:
            raise RuntimeError(f"no model loaded (last error: {self._last_error})")
        if not self._sched.alive:
            raise RuntimeError("the generating thread has stopped")

    def _model_id(self, info: dict | None = None) -> str:
        info = info or self._sched.current[2]
        name = info.get("name", "model")  # a model directory has no version
        return name if info.get("version") is None else f"{name}/{info['version']}"

    @staticmethod
    def _identity(info: dict) -> dict:
        return {k: info.get(k) for k in ("name", "version", "alias", "quantized", "quantization")}

    def _loaded(self):
        if self._sched.current is None:
            raise ApiError(503, f"no model loaded yet (last error: {self._last_error})", kind="server_error")
        return self._sched.current

    def _authorize(self, request: Request) -> None:
        """401 unless the request carries one of the API keys (when the app has any)."""
        from raydistill.tasks.apikeys import authorized, bearer_key

        header = request.headers.get("authorization")
        if self._digests and not authorized(header, self._digests):
            why = "invalid API key" if bearer_key(header) else "no API key: send 'Authorization: Bearer <key>'"
            raise ApiError(401, f"{why} (the server's keys: RAYDISTILL_API_KEYS or serve.api_keys_file)",
                           code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    # ---- routes -----------------------------------------------------------------------------------------------

    @api.get("/v1/models")
    async def models(self, request: Request):
        self._authorize(request)
        info = self._loaded()[2]
        return {"object": "list", "data": [{
            "id": self._model_id(), "object": "model", "owned_by": "raydistill", "version": info.get("version"),
            "alias": info.get("alias"), "source": info.get("model_uri"), "quantized": info.get("quantized"),
            "quantization": info.get("quantization")}]}

    @api.get("/healthz")
    async def health(self):
        current = self._sched.current
        body = {"status": "ok" if current else "no model", "last_error": self._last_error, "pid": os.getpid(),
                "replica": self._id, "serving_since": self._sched.serving_since, **self._sched.stats()}
        if current is not None:
            body.update(model=self._model_id(), **{k: v for k, v in self._identity(current[2]).items()
                                                   if k not in ("name",)})
        return JSONResponse(body, status_code=200 if current else 503)

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

        self._authorize(request)
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

        self._authorize(request)
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
        from raydistill.tasks.scheduler import Job

        ids, tokenizer = self._check_lengths(req, prompts)
        if req.stream:
            return StreamingResponse(self._stream(req, prompts, ids, tokenizer), media_type="text/event-stream")
        job = self._sched.submit(Job(req, prompts, ids, tokenizer))
        try:
            outs, info = await asyncio.wrap_future(job.future)
        except asyncio.CancelledError:  # timed out (408) or the client went away: stop its generation
            self._sched.cancel(job)
            raise
        except Exception as e:
            raise _failure(e) from None
        if req.messages:
            return chat_response(req, outs[0], self._model_id(info), self._identity(info))
        return completion_response(req, outs, self._model_id(info), self._identity(info))

    async def _stream(self, req, prompts: tuple, ids: list, tokenizer):
        """Server-sent events: one chunk per generated token (the scheduler's ``on_token``, called on the
        generating thread), a last chunk with ``finish_reason``, then ``data: [DONE]``."""
        from raydistill.tasks.openai_api import stream_chunk, stream_head, usage_chunk
        from raydistill.tasks.scheduler import Job

        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        job = Job(req, prompts, ids, tokenizer, on_token=lambda e: loop.call_soon_threadsafe(events.put_nowait, e))
        done = asyncio.wrap_future(self._sched.submit(job).future)
        done.add_done_callback(lambda _: events.put_nowait(None))
        head = stream_head(req, self._model_id(), self._identity(self._sched.current[2]))
        try:
            if req.messages:
                yield _sse(stream_chunk(req, head, None))
            while (event := await events.get()) is not None:
                if event["token"] is not None or event["delta"]:
                    yield _sse(stream_chunk(req, head, event))
            try:
                outs, _ = done.result()
            except Exception as e:
                e = _failure(e)
                yield _sse({"error": {"message": e.message, "type": e.kind, "param": e.param, "code": None}})
                return
            yield _sse(stream_chunk(req, head, {"delta": "", "token": None}, outs[0]["finish_reason"]))
            if req.include_usage:
                yield _sse(usage_chunk(req, head, outs[0]))
            yield "data: [DONE]\n\n"
        finally:
            if not done.done():  # the client disconnected (or timed out) mid-stream
                self._sched.cancel(job)


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


def api_keys(cfg: PipelineConfig) -> tuple[str, ...]:
    """The API keys this process sees (``RAYDISTILL_API_KEYS``, ``serve.api_keys_file``); never logged."""
    from raydistill.tasks.apikeys import read_api_keys

    return read_api_keys(os.environ, cfg.serve.api_keys_file)


def auth_headers(cfg: PipelineConfig) -> dict:
    """``{"Authorization": "Bearer <the first key>"}`` for this process's own requests, ``{}`` without keys."""
    keys = api_keys(cfg)
    return {"Authorization": f"Bearer {keys[0]}"} if keys else {}


def build_app(cfg: PipelineConfig, loader=None):
    """The Serve application (:func:`default_loader` unless ``loader``), with a :class:`VersionWatcher` when the
    loader follows an alias; a Serve config file's ``deployments:`` entries override these options. The API keys
    are read here (where the app is built) and only their digests go to the replicas."""
    from ray.serve.config import BackpressureConfig

    from raydistill.tasks.apikeys import ENV, key_digests

    s, loader = cfg.serve, loader or default_loader(cfg)
    digests = key_digests(api_keys(cfg))
    if s.require_api_keys and not digests:
        raise ConfigError(f"serve.require_api_keys is true but no API key is set: set {ENV} (comma-separated keys) "
                          "or serve.api_keys_file where the app is built (in Kubernetes, from a Secret)")
    settings = to_dict(s)
    watcher = None
    if getattr(loader, "follows_alias", False) and s.alias_poll_s > 0:
        watcher = VersionWatcher.bind(loader, settings)
    return CompletionServer.options(
        num_replicas=s.num_replicas, ray_actor_options={"num_cpus": s.num_cpus},
        max_ongoing_requests=s.max_ongoing_requests, max_queued_requests=s.max_queued_requests,
        backpressure_config=BackpressureConfig(retry_after_s=s.retry_after_s),
    ).bind(loader, settings, watcher, digests)


def watcher_status(app_name: str = APP_NAME) -> dict:
    """The app's :class:`VersionWatcher` state: target and committed versions, each live replica's, ``mixed_s``."""
    return serve.get_deployment_handle(WATCHER, app_name=app_name).status.remote().result(timeout_s=60)


APP_ARGS = ("model_uri", "tracking_uri", "preset", "overrides")


def application(args: dict | None = None):
    """Application builder for Serve config files (``cluster/serve/champion.yaml``: ``serve run``/``serve
    deploy``, and the KubeRay RayService that embeds it).

    ``args``: ``model_uri`` (``models:/<name>@<alias>`` or ``models:/<name>/<version>``), ``tracking_uri``,
    ``preset`` and dotted ``overrides`` (``["serve.max_batch_size=16"]``). The environment fills what they leave
    out: ``MLFLOW_TRACKING_URI``, ``RAYDISTILL_MODEL_NAME``, ``RAYDISTILL_MODEL_ALIAS`` (and the API keys:
    ``RAYDISTILL_API_KEYS``).
    """
    import difflib

    from raydistill.tasks.config import load_config
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
    app = build_app(cfg, loader)  # before Ray starts: a missing key file is a config error, not a dead replica
    stage.start(cfg, "serve", skip=False, ray=True)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port,
                              "request_timeout_s": cfg.serve.request_timeout_s})
    serve.run(app, name=APP_NAME, route_prefix="/")
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
    import requests

    url = start_app(cfg)
    body = {"prompt": cfg.serve.prompt, "max_tokens": min(16, cfg.serve.max_tokens_limit), "temperature": 0,
            "logprobs": 1}
    from raydistill.workflows.tracking import model_uri

    source = cfg.serve.model_dir or model_uri(cfg.registry.model_name, alias=None if cfg.serve.version else
                                              cfg.serve.alias, version=cfg.serve.version)
    headers = auth_headers(cfg)
    auth = " -H 'Authorization: Bearer <one of your API keys>'" if headers else ""
    print(f"[serve] {source} at {url}/v1/completions{' (API keys required)' if headers else ''}\n"
          f"  curl -s {url}/v1/completions{auth} -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
    if action == "once":
        try:
            answer = requests.post(f"{url}/v1/completions", json=body, headers=headers, timeout=120).json()
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
