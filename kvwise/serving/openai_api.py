"""The OpenAI-compatible HTTP app (FastAPI) over an `AsyncEngine`.

Owns: routes, the API-key guard, the mapping of every failure to the OpenAI error envelope
`{"error": {"message", "type", "param", "code"}}`, server-sent-event streaming, and watching for
clients that leave (their requests are aborted and their KV blocks freed).

Routes: GET /health, GET /metrics (unguarded); GET /v1/models, POST /v1/completions,
POST /v1/chat/completions, POST /tokenize, POST /detokenize, GET /v1/kvwise/stats,
POST /v1/kvwise/pin_prefix, POST /v1/kvwise/unpin_prefix.

Invariants:
- Bad input is a 4xx in the envelope, never a 500: FastAPI's 422 becomes 400, engine validation
  errors (`InvalidRequestError`) become 400 naming the field, a full queue or a stopping engine 503.
- Once a stream has started, an error is sent as one `data: {"error": ...}` event, then
  `data: [DONE]`; the HTTP status stays 200.
- Every request stream a handler opens is closed on every path (finish, error, disconnect), so no
  request outlives its client.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kvwise.engine.async_engine import (
    AsyncEngine,
    EngineStepError,
    EngineUnavailableError,
    NewRequest,
    QueueFullError,
    RequestStream,
)
from kvwise.errors import InvalidRequestError, KvwiseError, OutOfBlocksError
from kvwise.outputs import CompletionOutput, RequestOutput
from kvwise.sampling_params import SamplingParams
from kvwise.serving import protocol as P
from kvwise.serving.metrics import CONTENT_TYPE, RequestTracker, ServingMetrics

logger = logging.getLogger(__name__)
UNGUARDED_PATHS = frozenset({"/health", "/metrics"})
_ERR = {"model": P.ErrorResponse}
_ERRORS: dict[Union[int, str], dict[str, Any]] = {400: _ERR, 401: _ERR, 404: _ERR, 503: _ERR}
_STREAMING = {**_ERRORS, 200: {"content": {"text/event-stream": {}}}}


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (
            status, message, type_, param, code)


def error_body(message: str, type_: str, param: Optional[str] = None,
               code: Optional[str] = None) -> dict[str, Any]:
    return P.ErrorResponse(error=P.ErrorInfo(message=message, type=type_, param=param,
                                             code=code)).model_dump()


def _as_api_error(exc: BaseException) -> APIError:
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequestError):
        return APIError(400, exc.message, param=exc.param, code="invalid_value")
    if isinstance(exc, QueueFullError):
        return APIError(503, str(exc), "service_unavailable_error", code="queue_full")
    if isinstance(exc, EngineUnavailableError):
        return APIError(503, str(exc), "service_unavailable_error", code="engine_unavailable")
    if isinstance(exc, OutOfBlocksError):
        return APIError(400, str(exc), param="max_tokens", code="invalid_value")
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc), "internal_error", code="engine_error")
    return APIError(500, f"internal server error: {type(exc).__name__}", "internal_error",
                    code="internal_error")


def _error_response(exc: BaseException) -> JSONResponse:
    e = _as_api_error(exc)
    if e.status >= 500:
        logger.error("internal error", exc_info=exc)
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


class _AuthMiddleware:
    """Pure ASGI guard (BaseHTTPMiddleware would break streaming and disconnect detection)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.digest = hashlib.sha256(api_key.encode("utf-8")).digest()

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"] not in UNGUARDED_PATHS:
            auth = dict(scope["headers"]).get(b"authorization", b"")
            token = auth[7:].strip() if auth[:7].lower() == b"bearer " else b""
            # constant time: compare fixed-length digests, so not even the length leaks
            if not hmac.compare_digest(hashlib.sha256(token).digest(), self.digest):
                response = JSONResponse(
                    error_body("invalid or missing API key (send 'Authorization: Bearer <key>')",
                               "invalid_request_error", code="invalid_api_key"),
                    status_code=401, headers={"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


@dataclass
class ServerSettings:
    served_model_names: list[str]
    api_key: Optional[str] = None
    shutdown_timeout: float = 30.0
    watchdog_timeout: float = 600.0


class _Server:
    """State shared by the routes: the engine, the settings and the metrics."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.names = settings.served_model_names
        self.max_model_len = int(engine.engine.max_model_len)
        self.vocab_size = int(engine.engine.tokenizer.vocab_size)
        self.metrics = ServingMetrics(self.names[0], lambda: engine.stats)

    def model_name(self, requested: Optional[str]) -> str:
        if requested is None:
            return self.names[0]
        if requested not in self.names:
            raise APIError(404, f"model {requested!r} not found; this server serves "
                                f"{', '.join(self.names)}", param="model", code="model_not_found")
        return requested

    async def add(self, requests: list[NewRequest]) -> list[RequestStream]:
        try:
            return await self.engine.add_requests(requests)
        except QueueFullError:
            self.metrics.reject("queue_full")
            raise
        except EngineUnavailableError:
            self.metrics.reject("unavailable")
            raise


def chat_prompt(messages: list[dict[str, str]], add_generation_prompt: bool = True) -> Any:
    """A prompt function (run in the engine thread): chat template, then token ids."""

    def build(tokenizer: Any) -> list[int]:
        try:
            text = tokenizer.apply_chat_template(messages,
                                                 add_generation_prompt=add_generation_prompt)
        except Exception as e:  # jinja errors (e.g. roles not alternating) are bad input
            raise InvalidRequestError(f"messages: the chat template rejected them: {e}",
                                      "messages") from None
        # the template already holds any BOS/special tokens the model needs
        return list(tokenizer.encode(text, add_special_tokens=False))

    return build


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Outputs of several streams as (stream index, output), as they come; closes them all."""
    try:
        if len(streams) == 1:
            async for out in streams[0]:
                yield 0, out
            return
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, s: RequestStream) -> None:
            try:
                async for out in s:
                    q.put_nowait((i, out))
                q.put_nowait((i, None))
            except Exception as e:
                q.put_nowait((i, e))

        tasks = [asyncio.ensure_future(pump(i, s)) for i, s in enumerate(streams)]
        try:
            remaining = len(streams)
            while remaining:
                i, item = await q.get()
                if item is None:
                    remaining -= 1
                elif isinstance(item, BaseException):
                    raise item
                else:
                    yield i, item
        finally:
            for t in tasks:
                t.cancel()
    finally:
        for s in streams:
            s.close()


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect(streams: list[RequestStream], trackers: list[RequestTracker],
                   request: Request) -> Optional[list[RequestOutput]]:
    """Final outputs of all streams, or None if the client left first (requests aborted)."""
    finals: list[Optional[RequestOutput]] = [None] * len(streams)

    async def gather() -> None:
        async for i, out in _merged(streams):
            trackers[i].update(out)
            finals[i] = out

    task = asyncio.ensure_future(gather())
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for t in trackers:
                t.finish("abort")
    task.result()
    for t in trackers:
        t.finish()
    return [f for f in finals if f is not None]


def _stream_error_event(exc: BaseException) -> str:
    e = _as_api_error(exc)
    if e.status >= 500 and not isinstance(exc, (EngineStepError, EngineUnavailableError)):
        logger.error("error while streaming", exc_info=exc)
    return _sse(error_body(e.message, e.type, e.param, e.code))


async def _stream(streams: list[RequestStream], trackers: list[RequestTracker], n: int,
                  envelope: Any, choice: Any, include_usage: bool,
                  first: Optional[list[dict[str, Any]]] = None) -> AsyncIterator[str]:
    """The SSE loop shared by both endpoints.

    `choice(index, completion, state)` returns one choice dict (or None when there is nothing
    new) and advances `state`; `envelope(choices, usage)` wraps choices into a chunk.
    """
    sent: dict[int, P.StreamState] = {}
    prompt_tokens = [0] * len(streams)
    try:
        if first:
            yield _sse(envelope(first, None))
        async for i, out in _merged(streams):
            trackers[i].update(out)
            prompt_tokens[i] = len(out.prompt_token_ids)
            choices = []
            for c in out.outputs:
                s = sent.setdefault(i * n + c.index, P.StreamState())
                if not s.done:
                    ch = choice(i * n + c.index, c, s)
                    if ch is not None:
                        choices.append(ch)
            if out.finished:
                trackers[i].finish()
            if choices:
                yield _sse(envelope(choices, None))
        if include_usage:
            completion = sum(s.tokens for s in sent.values())
            chunk = envelope([], P.usage(sum(prompt_tokens), completion).model_dump())
            yield _sse(chunk)
    except Exception as e:
        yield _stream_error_event(e)
    finally:
        for t in trackers:
            t.finish("abort")  # no-op for requests that finished
    yield "data: [DONE]\n\n"


def build_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine thread and drains it on shutdown."""
    server = _Server(engine, settings)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        await engine.shutdown(settings.shutdown_timeout)

    app = FastAPI(title="kvwise", version="0.1", lifespan=lifespan)
    app.state.server = server
    async def _handle(_r: Request, exc: Exception) -> JSONResponse:
        return _error_response(exc)

    for exc_type in (APIError, KvwiseError, Exception):
        app.add_exception_handler(exc_type, _handle)

    @app.exception_handler(RequestValidationError)
    async def _validation(_r: Request, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        if first.get("type") == "json_invalid":
            return JSONResponse(error_body(f"invalid JSON body: {first.get('msg')}",
                                           "invalid_request_error", code="invalid_json"), 400)
        # loc carries pydantic's union-branch tags ("list[int]"); the field is the first item
        param = loc[0] if loc else None
        msg = f"{'.'.join(loc) or 'body'}: {first.get('msg', 'invalid request')}"
        if len(errs) > 1:
            msg += f" (and {len(errs) - 1} more error(s))"
        return JSONResponse(error_body(msg, "invalid_request_error", param, "invalid_value"), 400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_r: Request, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error"),
                            status_code=exc.status_code, headers=exc.headers)

    if settings.api_key:
        app.add_middleware(_AuthMiddleware, api_key=settings.api_key)

    _add_routes(app, server)
    return app


def _add_routes(app: FastAPI, server: _Server) -> None:
    engine = server.engine

    @app.get("/health", responses={503: _ERR})
    async def health() -> Response:
        started = engine.step_started
        if not engine.is_alive():
            raise APIError(503, "engine is not running", "service_unavailable_error",
                           code="engine_unavailable")
        if started is not None and time.monotonic() - started > server.settings.watchdog_timeout:
            raise APIError(503, f"engine step running for over "
                                f"{server.settings.watchdog_timeout:.0f}s",
                           "service_unavailable_error", code="engine_stuck")
        return JSONResponse({"status": "ok"})

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics() -> Response:
        return Response(server.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models", response_model=P.ModelList, responses=_ERRORS)
    async def models() -> P.ModelList:
        return P.ModelList(data=[P.ModelCard(id=name, root=server.names[0],
                                             max_model_len=server.max_model_len)
                                 for name in server.names])

    @app.get("/v1/kvwise/stats", responses=_ERRORS)
    async def kvwise_stats() -> dict[str, Any]:
        return await engine.call(lambda e: dict(e.stats()))

    @app.post("/v1/kvwise/pin_prefix", response_model=P.PrefixResponse, responses=_ERRORS)
    async def pin_prefix(body: P.PrefixRequest) -> P.PrefixResponse:
        """Pin the prompt's full blocks in the prefix cache; a prefix not cached yet is first
        computed by a 1-token greedy request. Under memory pressure its chunks may be evicted
        between that request and the pin: `num_tokens` says what was pinned."""
        server.model_name(body.model)
        prompt = body.prompt
        pinned = await engine.call(lambda e: e.pin_prefix(prompt, only_if_cached=True))
        if pinned is None:
            params = SamplingParams(max_tokens=1, temperature=0.0)
            (stream,) = await server.add([NewRequest(f"pin-{uuid.uuid4().hex}", prompt, params)])
            try:
                async for _ in stream:
                    pass
            finally:
                stream.close()
            pinned = await engine.call(lambda e: e.pin_prefix(prompt))
        return P.PrefixResponse(num_tokens=pinned)

    @app.post("/v1/kvwise/unpin_prefix", response_model=P.PrefixResponse, responses=_ERRORS)
    async def unpin_prefix(body: P.PrefixRequest) -> P.PrefixResponse:
        server.model_name(body.model)
        prompt = body.prompt
        return P.PrefixResponse(num_tokens=await engine.call(lambda e: e.unpin_prefix(prompt)))

    @app.post("/v1/completions", response_model=P.CompletionResponse, responses=_STREAMING)
    async def completions(body: P.CompletionRequest, request: Request) -> Any:
        model = server.model_name(body.model)
        prompts = body.prompts()
        params = body.engine_params(server.vocab_size)
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        streams = await server.add([NewRequest(f"{rid}-{i}", p, params)
                                    for i, p in enumerate(prompts)])
        trackers = [server.metrics.tracker() for _ in streams]
        k = body.logprobs

        def choice(index: int, c: CompletionOutput, st: P.StreamState) -> Optional[dict]:
            return P.completion_chunk_choice(index, c, st, k)

        def envelope(choices: list, usage: Optional[dict]) -> dict[str, Any]:
            return P.chunk(rid, "text_completion", created, model, choices,
                           body.include_usage, usage)

        if body.stream:
            return StreamingResponse(
                _stream(streams, trackers, body.n, envelope, choice, body.include_usage),
                media_type="text/event-stream")
        finals = await _collect(streams, trackers, request)
        if finals is None:
            return Response(status_code=499)
        echo = None
        if body.echo:
            done = finals  # the tokenizer is used on the engine thread only

            def build_echo(e: Any) -> P.Echo:
                def decode(ids: list[int]) -> str:
                    return e.tokenizer.decode(ids, skip_special_tokens=False)

                return P.Echo.build(done, decode, body.echo_only)

            echo = await engine.call(build_echo)
        return P.completion_response(rid, created, model, finals, body.n, k, echo)

    @app.post("/v1/chat/completions", response_model=P.ChatCompletionResponse,
              responses=_STREAMING)
    async def chat_completions(body: P.ChatCompletionRequest, request: Request) -> Any:
        model = server.model_name(body.model)
        top_k = body.chat_logprobs()
        max_tokens = (body.max_completion_tokens if body.max_completion_tokens is not None
                      else body.max_tokens)
        params = body.sampling_params(max_tokens, top_k, server.vocab_size)
        prompt = chat_prompt(body.template_messages(), body.add_generation_prompt)
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        streams = await server.add([NewRequest(rid, prompt, params)])
        trackers = [server.metrics.tracker()]

        def choice(index: int, c: CompletionOutput, st: P.StreamState) -> Optional[dict]:
            return P.chat_chunk_choice(index, c, st, top_k)

        def envelope(choices: list, usage: Optional[dict]) -> dict[str, Any]:
            return P.chunk(rid, "chat.completion.chunk", created, model, choices,
                           body.include_usage, usage)

        if body.stream:
            return StreamingResponse(
                _stream(streams, trackers, body.n, envelope, choice, body.include_usage,
                        P.chat_role_choices(body.n)),
                media_type="text/event-stream")
        finals = await _collect(streams, trackers, request)
        if finals is None:
            return Response(status_code=499)
        return P.chat_response(rid, created, model, finals[0], top_k)

    @app.post("/tokenize", response_model=P.TokenizeResponse, responses=_ERRORS)
    async def tokenize(body: P.TokenizeRequest) -> P.TokenizeResponse:
        server.model_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise APIError(400, "give exactly one of prompt or messages", param="prompt")
        if body.messages is not None:
            msgs = [m.as_template_dict() for m in body.messages]
            fn = chat_prompt(msgs, body.add_generation_prompt)
        else:
            text, special = body.prompt, body.add_special_tokens

            def fn(tokenizer: Any) -> list[int]:
                return list(tokenizer.encode(text, add_special_tokens=special))

        ids = await engine.call(lambda e: fn(e.tokenizer))
        return P.TokenizeResponse(count=len(ids), max_model_len=server.max_model_len, tokens=ids)

    @app.post("/detokenize", response_model=P.DetokenizeResponse, responses=_ERRORS)
    async def detokenize(body: P.DetokenizeRequest) -> P.DetokenizeResponse:
        server.model_name(body.model)
        bad = [t for t in body.tokens if t >= server.vocab_size]
        if bad:
            raise APIError(400, f"tokens: token id {bad[0]} is outside the vocabulary "
                                f"[0, {server.vocab_size})", param="tokens")
        ids = list(body.tokens)
        text = await engine.call(lambda e: e.tokenizer.decode(ids, skip_special_tokens=False))
        return P.DetokenizeResponse(prompt=text)
