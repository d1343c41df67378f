"""Serve ``models:/<registry.model_name>@<serve.alias>`` over HTTP, OpenAI completions style (Ray Serve).

    raydistill serve --config tiny            # blocks until Ctrl-C
    raydistill serve once --config tiny       # start, answer one demo request (serve.prompt), stop
    curl -s http://127.0.0.1:8123/v1/completions -H 'Content-Type: application/json' \\
         -d '{"prompt": "ROMEO.\\nBut soft", "max_tokens": 16, "temperature": 0, "logprobs": 2}'

Routes: ``POST /v1/completions``, ``GET /v1/models``, ``GET /healthz``. Requests are batched across clients with
``@serve.batch`` (up to ``serve.max_batch_size`` prompts, waiting at most ``serve.batch_wait_timeout_s``) and
generated in one left-padded forward batch (``tasks.generate.complete``). Bad requests get HTTP 400 with an
OpenAI-style ``{"error": {"message", "type", "param"}}`` body.

The deployment takes its ``loader`` as an argument: ``loader(current_info) -> (model, tokenizer, info) | None``.
It is called once with ``None`` at start-up, then every ``serve.alias_poll_s`` seconds with the loaded version's
info; returning a new triple swaps the model (in-flight batches finish on the old one), ``None`` keeps it. The
default, :class:`RegistryLoader`, reloads when the alias moves to another version.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import uuid

from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from raydistill.tasks.config import PipelineConfig, to_dict
from raydistill.tasks.errors import StageMissingError

APP_NAME = "raydistill"
logger = logging.getLogger("ray.serve")


class RegistryLoader:
    """Loads ``models:/name@alias`` from the registry; ``None`` while the alias still names the loaded version."""

    def __init__(self, tracking_uri: str, name: str, alias: str):
        self.tracking_uri, self.name, self.alias = tracking_uri, name, alias

    def __call__(self, current: dict | None):
        from raydistill.workflows import tracking
        from raydistill.workflows.register import load_registered

        uri = tracking.model_uri(self.name, alias=self.alias)
        if current is not None:
            version = int(tracking.resolve_version(self.tracking_uri, uri).version)
            if version == current.get("version"):
                return None
            uri = tracking.model_uri(self.name, version=version)  # exactly the version just seen
        model, tokenizer, info = load_registered(self.tracking_uri, uri)
        return model, tokenizer, {**info, "alias": self.alias}


def _prompt_count(items: list) -> int:
    return sum(len(r.prompts) for r in items)


def _error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": None}},
                        status_code=status)


@serve.deployment(name="CompletionServer")
class CompletionServer:
    def __init__(self, loader, settings: dict):
        import torch

        torch.set_num_threads(max(1, int(settings["num_cpus"])))
        self._loader, self._s = loader, settings
        self._current = self._check(loader(None))
        self._swaps, self._poll_error, self._batches, self._prompts = 0, None, 0, 0
        self._generate.set_max_batch_size(settings["max_batch_size"])
        self._generate.set_batch_wait_timeout_s(settings["batch_wait_timeout_s"])
        self._stop = threading.Event()
        if settings["alias_poll_s"] > 0:
            threading.Thread(target=self._poll, name="alias-poll", daemon=True).start()
        logger.info(f"serving {self._model_id()}")

    @staticmethod
    def _check(loaded):
        if not (isinstance(loaded, tuple) and len(loaded) == 3 and isinstance(loaded[2], dict)):
            raise TypeError("loader must return (model, tokenizer, info: dict)")
        return loaded

    def _model_id(self, info: dict | None = None) -> str:
        info = info or self._current[2]
        return f"{info.get('name', 'model')}/{info.get('version', '?')}"

    def _poll(self) -> None:
        while not self._stop.wait(self._s["alias_poll_s"]):
            try:
                new = self._loader(self._current[2])
                if new is not None:
                    old = self._model_id()
                    self._current = self._check(new)
                    self._swaps += 1
                    logger.info(f"alias moved: now serving {self._model_id()} (was {old})")
                self._poll_error = None
            except Exception as e:  # keep serving the loaded model; report the problem on /healthz
                self._poll_error = f"{type(e).__name__}: {e}"
                logger.warning(f"alias poll failed, still serving {self._model_id()}: {self._poll_error}")

    def __del__(self):
        if hasattr(self, "_stop"):
            self._stop.set()

    async def __call__(self, request: Request):
        path, method = request.url.path.rstrip("/") or "/", request.method
        routes = {"/v1/completions": ("POST", self._completions), "/v1/models": ("GET", self._models),
                  "/healthz": ("GET", self._health)}
        if path not in routes:
            return _error(404, f"no route {path}; try POST /v1/completions, GET /v1/models, GET /healthz",
                          kind="not_found_error")
        want, handler = routes[path]
        if method != want:
            return _error(405, f"{path} accepts {want}, not {method}")
        return await handler(request)

    async def _models(self, request: Request):
        info = self._current[2]
        return JSONResponse({"object": "list", "data": [{
            "id": self._model_id(), "object": "model", "owned_by": "raydistill", "version": info.get("version"),
            "alias": info.get("alias"), "source": info.get("model_uri")}]})

    async def _health(self, request: Request):
        return JSONResponse({"status": "ok", "model": self._model_id(), "version": self._current[2].get("version"),
                             "swaps": self._swaps, "last_poll_error": self._poll_error,
                             "batches": self._batches, "prompts": self._prompts})

    async def _completions(self, request: Request):
        from raydistill.tasks.generate import RequestError, encode_prompts, parse_completion_request

        try:
            body = await request.json()
        except Exception:
            return _error(400, "the request body is not valid JSON")
        s = self._s
        try:
            req = parse_completion_request(body, max_tokens_limit=s["max_tokens_limit"],
                                           max_prompts=s["max_batch_size"],  # one request fits one batch
                                           max_prompt_chars=s["max_prompt_tokens"] * 16,  # cheap pre-check
                                           max_logprobs=s["max_logprobs"])
        except RequestError as e:
            return _error(400, str(e), e.param)
        model, tokenizer, _ = self._current
        context = getattr(model.config, "max_position_embeddings", None) or 1 << 30
        for ids in encode_prompts(tokenizer, req.prompts):
            if len(ids) > s["max_prompt_tokens"] or len(ids) + req.max_tokens > context:
                return _error(400, f"a prompt has {len(ids)} tokens; the limit is {s['max_prompt_tokens']} and "
                                   f"prompt + max_tokens must fit the model's {context}-token context", "prompt")
        try:
            outs, info = await self._generate(req)
        except Exception as e:
            logger.exception("generation failed")
            return _error(500, f"generation failed: {type(e).__name__}: {e}", kind="server_error")
        return JSONResponse(_response(req, outs, self._model_id(info)))

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.02, batch_size_fn=_prompt_count)
    async def _generate(self, reqs: list) -> list:
        from raydistill.tasks.generate import complete

        model, tokenizer, info = self._current  # one model for the whole batch, even if a swap happens now
        prompts, settings = [], {"max_tokens": [], "temperature": [], "logprobs": [], "seed": []}
        for r in reqs:
            for p in r.prompts:
                prompts.append(p)
                for k in settings:
                    settings[k].append(getattr(r, k))
        outs = await asyncio.to_thread(complete, model, tokenizer, prompts, **settings)
        self._batches, self._prompts = self._batches + 1, self._prompts + len(prompts)
        results, start = [], 0
        for r in reqs:
            results.append((outs[start:start + len(r.prompts)], info))
            start += len(r.prompts)
        return results


def _response(req, outs: list[dict], model_id: str) -> dict:
    choices = []
    for i, (prompt, o) in enumerate(zip(req.prompts, outs)):
        logprobs = None
        if req.logprobs is not None:
            offsets, at = [], len(prompt)
            for t in o["tokens"]:
                offsets.append(at)
                at += len(t)
            logprobs = {"tokens": o["tokens"], "token_logprobs": o["token_logprobs"],
                        "top_logprobs": o["top_logprobs"], "text_offset": offsets}
        choices.append({"text": o["text"], "index": i, "logprobs": logprobs, "finish_reason": o["finish_reason"]})
    usage = {k: sum(o["usage"][k] for o in outs) for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    return {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": model_id, "choices": choices, "usage": usage}


# -------------------------------------------------------------------------------------------------------
# driver side
# -------------------------------------------------------------------------------------------------------

def build_app(cfg: PipelineConfig, loader=None):
    """The Serve application; ``loader`` defaults to the registry alias ``serve.alias``."""
    loader = loader or RegistryLoader(cfg.tracking_uri, cfg.registry.model_name, cfg.serve.alias)
    settings = to_dict(cfg.serve)
    return CompletionServer.options(
        ray_actor_options={"num_cpus": cfg.serve.num_cpus},
        max_ongoing_requests=max(16, 4 * cfg.serve.max_batch_size),  # enough queued requests to fill batches
    ).bind(loader, settings)


def app_from_env(args: dict | None = None):
    """Application builder for ``serve run workflows.serve:app_from_env`` and KubeRay RayService.

    Reads ``MLFLOW_TRACKING_URI``, ``RAYDISTILL_MODEL_NAME``, ``RAYDISTILL_MODEL_ALIAS`` (default champion);
    ``args`` (the Serve config's ``args:``) may give ``preset`` and dotted ``overrides`` instead or on top.
    """
    import os

    from raydistill.tasks.config import load_config

    args = dict(args or {})
    overrides = list(args.get("overrides", []))
    env = {"registry.tracking_uri": os.environ.get("MLFLOW_TRACKING_URI"),
           "registry.model_name": os.environ.get("RAYDISTILL_MODEL_NAME"),
           "serve.alias": os.environ.get("RAYDISTILL_MODEL_ALIAS")}
    overrides = [f"{k}={v}" for k, v in env.items() if v] + overrides
    return build_app(load_config(args.get("preset"), overrides))


def base_url(cfg: PipelineConfig) -> str:
    host = "127.0.0.1" if cfg.serve.host in ("0.0.0.0", "::") else cfg.serve.host
    return f"http://{host}:{cfg.serve.port}"


def start_app(cfg: PipelineConfig, loader=None) -> str:
    """Start Ray (if needed) and Serve, deploy the app, wait until it answers; returns the base URL."""
    import requests

    from raydistill.workflows import stage

    if loader is None:  # fail here, with a clear message, rather than in a replica that keeps restarting
        from raydistill.workflows import tracking

        uri = tracking.model_uri(cfg.registry.model_name, alias=cfg.serve.alias)
        try:
            tracking.resolve_version(cfg.tracking_uri, uri)
        except LookupError as e:
            raise StageMissingError(f"{e}; register and promote a model first "
                                    "(`raydistill register`, `raydistill promote`)") from None
    stage.start(cfg, "serve", skip=False, ray=True)
    serve.start(http_options={"host": cfg.serve.host, "port": cfg.serve.port})
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

    print(f"[serve] {model_uri(cfg.registry.model_name, alias=cfg.serve.alias)} at {url}/v1/completions\n"
          f"  curl -s {url}/v1/completions -H 'Content-Type: application/json' -d '{json.dumps(body)}'")
    if action == "once":
        try:
            answer = requests.post(f"{url}/v1/completions", json=body, timeout=120).json()
            print(f"[serve] {answer.get('model')}: {cfg.serve.prompt!r} → {answer['choices'][0]['text']!r}")
            return {"url": url, "response": answer}
        finally:
            shutdown_app()
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        shutdown_app()
    return {"url": url}
