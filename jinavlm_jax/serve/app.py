"""The OpenAI-compatible HTTP server over an `inference.engine.Engine` (Starlette; run by uvicorn).

Endpoints: `POST /v1/chat/completions` (JSON or a `text/event-stream` of `data: {...}` lines ending
with `data: [DONE]`), `GET /v1/models`, `GET /health`, `GET /metrics` (Prometheus text).

Bad requests get a 400 with the OpenAI error object naming the field; a full queue 429; a server
that is shutting down 503; a request the engine failed 500. None of them stops the server. A
client that disconnects (mid-stream or while waiting) cancels its request and frees its slot.
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Sequence

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from ..inference.engine import Engine, EngineStopped, Output, QueueFull, RequestError
from ..inference.sampling import GenerateError, Sampling
from .metrics import ServerMetrics
from .protocol import APIError, ChatRequest, chunk, completion, parse_chat_request, usage

FINISH = {"stop": "stop", "length": "length"}


def error_response(e: APIError) -> JSONResponse:
    return JSONResponse(e.body(), status_code=e.status)


class _Stream:
    """Engine outputs of one request, handed from the engine thread to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def __call__(self, out: Output) -> None:  # the engine thread
        self.loop.call_soon_threadsafe(self.queue.put_nowait, out)

    async def get(self, request: Request, poll: float = 0.25) -> Output:
        """The next output; raises ClientGone when the client disconnects while we wait."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), poll)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone() from None


class ClientGone(Exception):
    pass


def create_app(engine: Engine, model_name: str, allowed_media: Sequence[str | Path] = (),
               metrics: ServerMetrics | None = None) -> Starlette:
    """The ASGI app. The engine must be started (and is stopped on shutdown, `shutdown_timeout`
    seconds for running requests to finish, set as `app.state.shutdown_timeout`)."""
    allowed = [Path(p).resolve() for p in allowed_media]
    metrics = metrics or ServerMetrics(engine)
    created = int(time.time())

    async def chat_completions(request: Request) -> Response:
        t0 = time.monotonic()
        try:
            try:
                body = json.loads(await request.body())
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                raise APIError(400, f"the request body is not valid JSON: {e}", None, "invalid_json") from None
            req = parse_chat_request(body, allowed)
            prompt = engine.processor.apply_chat_template(req.messages)
            sampling = Sampling(req.temperature, req.top_k, req.top_p)
            stream = _Stream(asyncio.get_running_loop())
            handle = await run_in_threadpool(_submit, engine, prompt, req, sampling, stream)
        except APIError as e:
            metrics.request_done(str(e.status))
            return error_response(e)
        if req.stream:
            return StreamingResponse(_sse(engine, req, model_name, handle, stream, request, metrics, t0),
                                     media_type="text/event-stream")
        return await _complete(engine, req, model_name, handle, stream, request, metrics, t0)

    async def models(request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{
            "id": model_name, "object": "model", "created": created, "owned_by": "jinavlm-jax",
            "max_model_len": engine.max_model_len}]})

    async def health(request: Request) -> Response:
        if engine.running:
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "stopping"}, status_code=503)

    async def prometheus(request: Request) -> Response:
        body, content_type = metrics.render()
        return Response(body, media_type=content_type)

    async def not_found(request: Request, exc) -> Response:
        return error_response(APIError(404, f"no route {request.method} {request.url.path}", None, "not_found"))

    async def bad_method(request: Request, exc) -> Response:
        return error_response(APIError(405, f"{request.method} is not allowed on {request.url.path}", None,
                                       "method_not_allowed"))

    async def crash(request: Request, exc: Exception) -> Response:
        print(f"jinavlm serve: {request.url.path}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return error_response(APIError(500, f"internal error: {type(exc).__name__}: {exc}", None,
                                       "internal_error", "server_error"))

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(engine.stop, app.state.shutdown_timeout)

    app = Starlette(routes=[
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/metrics", prometheus, methods=["GET"]),
    ], exception_handlers={404: not_found, 405: bad_method, Exception: crash}, lifespan=lifespan)
    app.state.shutdown_timeout = 30.0
    app.state.engine, app.state.metrics = engine, metrics
    return app


def _submit(engine: Engine, prompt: str, req: ChatRequest, sampling: Sampling, sink):
    """engine.submit with its errors as API errors (runs in a worker thread: images are decoded here).
    Without max_tokens a request may use the rest of the context, as vLLM does."""
    try:
        return engine.submit(prompt, req.images, max_tokens=req.max_tokens, sampling=sampling, seed=req.seed,
                             stop=req.stop, sink=sink, request_id=req.id)
    except QueueFull as e:
        raise APIError(429, str(e), None, "queue_full", "rate_limit_error") from None
    except EngineStopped as e:
        raise APIError(503, str(e), None, "unavailable", "server_error") from None
    except RequestError as e:
        raise APIError(400, str(e), e.param, "invalid_request") from None
    except (GenerateError, ValueError) as e:  # processing errors: the prompt or its images
        raise APIError(400, str(e), "messages", "invalid_request") from None


def _failure(out: Output) -> APIError:
    if out.finish_reason == "cancelled":
        return APIError(503, "the request was cancelled (the server is shutting down)", None, "cancelled",
                        "server_error")
    return APIError(500, f"the engine failed this request: {type(out.error).__name__}: {out.error}", None,
                    "engine_error", "server_error")


async def _complete(engine, req, model_name, handle, stream: _Stream, request, metrics, t0) -> Response:
    text, last = [], None
    try:
        while True:
            out = await stream.get(request)
            if last is None:
                metrics.first_token(time.monotonic() - t0)
            last = out
            text.append(out.text)
            if out.finish_reason:
                break
    except ClientGone:
        engine.cancel(handle)
        metrics.request_done("499")
        return Response(status_code=499)
    if last.finish_reason not in FINISH:
        e = _failure(last)
        metrics.request_done(str(e.status))
        return error_response(e)
    metrics.request_done("200", last, time.monotonic() - t0)
    return JSONResponse(completion(req, model_name, "".join(text), FINISH[last.finish_reason], last.prompt_tokens,
                                   last.completion_tokens))


async def _sse(engine, req, model_name, handle, stream: _Stream, request, metrics, t0):
    def event(obj) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    done = False
    try:
        yield event(chunk(req, model_name, {"role": "assistant", "content": ""}))
        first, prev = True, time.monotonic()
        while True:
            out = await stream.get(request)
            now = time.monotonic()
            if first:
                metrics.first_token(now - t0)
                first = False
            elif out.token_ids:
                metrics.inter_token(now - prev, len(out.token_ids))
            prev = now
            if out.finish_reason and out.finish_reason not in FINISH:
                e = _failure(out)
                metrics.request_done(str(e.status))
                yield event(e.body())
                break
            if out.text:
                yield event(chunk(req, model_name, {"content": out.text}))
            if out.finish_reason:
                yield event(chunk(req, model_name, {}, FINISH[out.finish_reason]))
                if req.include_usage:
                    yield event(chunk(req, model_name, None, usage_=usage(out.prompt_tokens, out.completion_tokens)))
                metrics.request_done("200", out, now - t0)
                break
        yield "data: [DONE]\n\n"
        done = True
    except ClientGone:
        metrics.request_done("499")
    finally:
        if not done:  # the client went away (or the response was cancelled): free the slot
            engine.cancel(handle)
