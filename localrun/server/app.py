"""The ASGI app: thin routes over an Engine. Each generation runs in the engine's thread; a pump thread
hands its events to the event loop, and a client that goes away sets the cancel flag at once."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

from localrun.engine.events import GenerationEvent
from localrun.engine.pool import MemoryBusy, keep_alive_seconds
from localrun.errors import UserError, without_paths
from localrun.limits import LimitExceeded, Limits
from localrun.server.engine import CancelWatch, QueueFull, WorkerEngine
from localrun.server.metrics import Metrics, process_gauges
from localrun.server.protocol import ApiError, ChatBody, CompletionBody, parse_body

_DISCONNECT_POLL_S = 0.1
_END = object()
_ROUTE_PATHS = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
_LOG = logging.getLogger("localrun.server")
# What /v1/models tells of a loaded model: these fields of its pool row (localrun.engine.pool_rows), as they are.
LOADED_MODEL_FIELDS = (
    "state",
    "memory_bytes",
    "vram_bytes",
    "planned_bytes",
    "prompt_cache_bytes",
    "prompt_cache_limit_bytes",
    "context_length",
    "context_reason",
    "slots",
    "slots_busy",
    "device",
    "pinned",
    "keep_alive_s",
    "expires_in_s",
    "pid",
)


class ClientGone(Exception):
    pass


class _Pump:
    """Moves one request's events from the engine's thread to the event loop; records metrics at the end."""

    def __init__(
        self,
        events: Iterator[GenerationEvent],
        on_final: Callable[[GenerationEvent, float | None], None],
        on_abort: Callable[[bool], None],
    ):
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.t_first: float | None = None
        self._events, self._on_final, self._on_abort = events, on_final, on_abort
        self._finished = False
        self._sent = False  # an event has gone to the route (after that, it can no longer answer with an error status)
        self._get: asyncio.Future | None = None
        threading.Thread(target=self._run, name="localrun-pump", daemon=True).start()

    def _run(self) -> None:
        answered = False
        try:
            for event in self._events:
                if self.t_first is None and event.token_ids:
                    self.t_first = time.perf_counter()
                if event.summary is not None:
                    self._finished = True
                    self._on_final(event, self.t_first)
                self._put(event)
                self._sent = True
        except BaseException as exc:  # handed to the route, which answers with the right status
            answered = not self._sent  # before any event: the route's error response is what gets counted
            self._put(exc)
        finally:
            if not self._finished:  # e.g. the watchdog ended a model process that was slow to stop
                self._on_abort(answered)
            self._put(_END)

    def _put(self, item: Any) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the loop has shut down
            pass

    async def next(self, request: Any = None) -> Any:
        """The next event (or _END); with request, watch for the client going away meanwhile."""
        if self._get is None:
            self._get = asyncio.ensure_future(self.queue.get())
        while True:
            done, _ = await asyncio.wait({self._get}, timeout=_DISCONNECT_POLL_S if request else None)
            if done:
                item, self._get = self._get.result(), None
                if isinstance(item, BaseException):
                    raise item
                return item
            if await request.is_disconnected():
                raise ClientGone

    def close(self) -> None:
        if self._get is not None:
            self._get.cancel()


class Api:
    """Routes and their shared state: the engine, the key, the metrics."""

    def __init__(
        self,
        engine: WorkerEngine,
        *,
        api_key: str | None = None,
        metrics: Metrics | None = None,
        limits: Limits | None = None,
    ) -> None:
        self.engine = engine
        self.api_key = api_key
        self.metrics = metrics or Metrics()
        self.limits = limits or Limits()
        self._recommended_cache: dict[str | None, Any] = {}
        self._ids: dict[str, str] = {}  # load spec -> the model list's id it was asked for by
        self._seen: dict[str, Any] = {}  # id -> LoadRequest of every model loaded so far (one given by path too)

    # -- helpers ------------------------------------------------------------------------------

    def _authorize(self, request: Any) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise ApiError(401, "No API key: send it as 'Authorization: Bearer KEY'.", code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "Incorrect API key.", code="invalid_api_key")

    def _id_of(self, loaded: Any) -> str:
        """A loaded model's id: the model list's id it was requested by (a store file, loaded by its path,
        keeps its repo:file id rather than showing up twice, under its file name too), else its name."""
        return self._ids.get(loaded.request.model, loaded.name)

    def _loaded_id(self) -> str | None:
        """The id of the model used last (after a crash: the model to reload)."""
        loaded = self.engine.worker.loaded or self.engine.last_loaded
        return self._id_of(loaded) if loaded is not None else None

    def _model_load(self, name: str) -> Any:
        """The LoadRequest for a model id: a loaded one as it was loaded, one seen before, or one on disk;
        404 for anything else."""
        for loaded in self.engine.worker.loads():
            if name == self._id_of(loaded):
                return loaded.request
        if name in self._seen:
            return self._seen[name]
        for row in _local_models():
            if name == row.name:  # by name where the catalog knows it, so the loaded model keeps its name
                spec = str(row.path) if ":" in row.name else row.name
                self._ids[spec] = row.name
                return self.engine.load_request(spec)
        raise ApiError(
            404,
            f"The model {name!r} does not exist on this machine: GET /v1/models lists the ones that do.",
            param="model",
            code="model_not_found",
        )

    def _recommended(self, spec: str | None) -> Any:
        """The catalog's recommended sampling and system prompt for a model (None: it has none)."""
        if spec not in self._recommended_cache:
            from localrun.models.catalog import resolve_model

            try:
                self._recommended_cache[spec] = resolve_model(spec).recommended
            except UserError:
                self._recommended_cache[spec] = None
        return self._recommended_cache[spec]

    # -- routes -------------------------------------------------------------------------------

    async def health(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        return JSONResponse({"status": "ok", **self.engine.status(), "model": self._loaded_id()})

    async def prometheus(self, request: Any) -> Any:
        from starlette.responses import PlainTextResponse

        self._authorize(request)
        text = self.metrics.render(process_gauges(self.engine.worker.status), pool=self.engine.worker)
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    async def models(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        self._authorize(request)
        pool = self.engine.worker
        budget = {"budget_bytes": pool.budget_bytes, "planned_bytes": pool.used_bytes()}
        return JSONResponse({"object": "list", "data": self._model_rows(), "memory": budget})

    async def model(self, request: Any) -> Any:
        from starlette.responses import JSONResponse

        self._authorize(request)
        name = request.path_params["model"]
        self._model_load(name)  # 404 for a model that is not here
        row = next((r for r in self._model_rows() if r["id"] == name), None)
        if row is None:  # listed in the store, but its file does not read as a model
            raise ApiError(
                400, f"The model {name!r} is damaged: delete it and pull it again.", param="model", code="model_corrupt"
            )
        return JSONResponse(row)

    def _model_rows(self) -> list[dict[str, Any]]:
        """Loaded models first, with extension fields (as vLLM's max_model_len, Ollama's ps): what a client,
        `localrun ps` or a remote localrun can plan with; then the other models on disk."""
        pool = self.engine.worker
        rows, listed = [], set()
        for loaded, entry in pool.rows():
            if loaded is None:
                continue
            model_id = self._id_of(loaded)
            if not model_id:  # a remote engine's unnamed first model: the remote's own list names it
                continue
            self._seen[model_id] = loaded.request
            listed.add(model_id)
            row = {"id": model_id, "object": "model", "created": 0, "owned_by": "localrun", "loaded": True}
            row.update({key: entry[key] for key in LOADED_MODEL_FIELDS})
            rows.append(row)
        for row in _local_models():
            if row.name not in listed and row.quant != "corrupt":
                rows.append({"id": row.name, "object": "model", "created": 0, "owned_by": "localrun", "loaded": False})
        return rows

    async def chat(self, request: Any) -> Any:
        from localrun.server.convert import chat_request

        return await self._generate(request, "/v1/chat/completions", ChatBody, chat_request)

    async def completions(self, request: Any) -> Any:
        from localrun.server.convert import completion_request

        return await self._generate(request, "/v1/completions", CompletionBody, completion_request)

    async def _generate(self, request: Any, route: str, body_type: type, convert: Callable) -> Any:
        self._authorize(request)
        body = parse_body(await self._read_body(request), body_type, self.limits)
        load = self._model_load(body.model)
        keep_alive = None
        if body.keep_alive is not None:
            try:
                keep_alive = keep_alive_seconds(body.keep_alive)
            except UserError as exc:
                raise ApiError(400, str(exc), param="keep_alive") from None
        recommended = self._recommended(load.model if load is not None else None)
        # a grammar can take a while to build: off the event loop, so /health and streams keep going
        job, reply = await asyncio.to_thread(
            convert, body, model_name=body.model, load=load, recommended=recommended, limits=self.limits
        )
        t0 = time.perf_counter()
        cancel = CancelWatch()

        def on_final(event: GenerationEvent, t_first: float | None) -> None:
            summary = event.summary
            ttft = t_first - t0 if t_first is not None else None
            latency = time.perf_counter() - t0
            self.metrics.observe(summary, ttft_s=ttft, latency_s=latency, overrun_tokens=cancel.overrun_tokens)
            self.metrics.count_request(route, reply.outcome(summary))

        def on_abort(answered: bool) -> None:
            if answered and not cancel.is_set():
                return  # the route turns the error into a 4xx/5xx, which error_response counts
            self.metrics.count_request(route, "cancelled" if cancel.is_set() else "error")
            if cancel.is_set():
                self.metrics.count_cancel(cancel.overrun_tokens)

        try:
            pump = _Pump(self.engine.submit(job, cancel, keep_alive_s=keep_alive), on_final, on_abort)
        except QueueFull as exc:
            raise ApiError(429, f"The server is busy: {exc}", type="rate_limit_error", code="queue_full") from None
        try:
            first = await pump.next(request)
        except ClientGone:
            cancel.set()
            pump.close()
            return _empty()
        except UserError as exc:
            raise ApiError(400, str(exc)) from None
        except MemoryBusy as exc:
            raise ApiError(503, str(exc), type="server_error", code="memory_busy") from None
        except Exception as exc:  # the model process failed (a crash: it restarts with the next request)
            raise ApiError(503, str(exc), type="server_error", code="model_failed") from None
        if first is not _END and first.summary is not None and first.summary.error:
            raise ApiError(500, f"Generation failed: {first.summary.error}", type="server_error")
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _sse(_stream(pump, first, reply, cancel, include_usage))
        try:
            return await _whole(pump, first, reply, request)
        except ClientGone:
            cancel.set()
            return _empty()
        finally:
            pump.close()

    async def _read_body(self, request: Any) -> bytes:
        """The body, read as it streams in and refused (413) once it passes max_body_bytes."""
        limit = self.limits.max_body_bytes
        encoding = request.headers.get("content-encoding", "identity").strip().lower()
        if encoding not in ("", "identity"):
            raise ApiError(415, f"Content-Encoding {encoding[:40]!r} is not accepted: send the body uncompressed.")
        declared = request.headers.get("content-length")
        if declared is not None and (not declared.strip().isdigit() or int(declared) > limit):
            raise _too_large(limit)
        parts, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise _too_large(limit)
            parts.append(chunk)
        return b"".join(parts)

    def routes(self) -> list[Any]:
        from starlette.routing import Route

        def answering_errors(endpoint: Callable) -> Callable:
            """ApiError -> OpenAI's error JSON, inside the route (a host app's handlers are not ours to add);
            anything unexpected -> a JSON 500, counted in /metrics and logged in one line."""

            async def wrapped(request: Any) -> Any:
                try:
                    return await endpoint(request)
                except ApiError as exc:
                    return self.error_response(request, exc)
                except Exception as exc:
                    return self.error_response(request, self.unexpected(request, exc))

            return wrapped

        table = [
            ("/health", self.health, "GET"),
            ("/metrics", self.prometheus, "GET"),
            ("/v1/models", self.models, "GET"),
            ("/v1/models/{model:path}", self.model, "GET"),
            ("/v1/chat/completions", self.chat, "POST"),
            ("/v1/completions", self.completions, "POST"),
        ]
        return [Route(path, answering_errors(fn), methods=[method]) for path, fn, method in table]

    def unexpected(self, request: Any, exc: BaseException) -> ApiError:
        """A fault of ours: counted, logged once without a traceback, answered as a JSON 500."""
        self.metrics.count_internal_error()
        _LOG.error("localrun: %s %s failed: %s: %s", request.method, request.url.path, type(exc).__name__, exc)
        return ApiError(500, f"The server failed on this request ({type(exc).__name__}).", type="server_error")

    def error_response(self, request: Any, exc: ApiError) -> Any:
        from starlette.responses import JSONResponse

        path = request.url.path
        self.metrics.count_request(path if path in _ROUTE_PATHS else "other", str(exc.status))
        exc.message = without_paths(exc.message)
        return JSONResponse(exc.body(), status_code=exc.status)


def _too_large(limit: int) -> ApiError:
    exc = LimitExceeded(f"The request body is over {limit} bytes", "max_body_bytes", limit)
    return ApiError(413, str(exc), code="limit_exceeded")


def _local_models() -> list[Any]:
    from localrun.models.store import local_models

    return local_models()


def _empty() -> Any:
    from starlette.responses import Response

    return Response(status_code=499)


async def _whole(pump: _Pump, event: Any, reply: Any, request: Any) -> Any:
    from starlette.responses import JSONResponse

    try:
        while event is not _END and event.summary is None:
            event = await pump.next(request)
    except (ClientGone, ApiError):
        raise
    except Exception as exc:  # the model process died mid-generation
        raise ApiError(503, str(exc), type="server_error", code="model_failed") from None
    if event is _END or event.summary is None:
        raise ApiError(500, "The generation ended without a result.", type="server_error")
    if event.summary.error:
        raise ApiError(500, f"Generation failed: {event.summary.error}", type="server_error")
    return JSONResponse(reply.whole(event.summary))


async def _stream(pump: _Pump, event: Any, reply: Any, cancel: CancelWatch, include_usage: bool) -> AsyncIterator[str]:
    """SSE lines; if the client goes away, this generator is cancelled and sets the cancel flag."""
    try:
        first = reply.first_chunk()
        if first is not None:
            yield _data(first)
        while event is not _END:
            if event.summary is not None and event.summary.error:
                yield _data(ApiError(500, f"Generation failed: {event.summary.error}", type="server_error").body())
                break
            for chunk in reply.chunks(event):
                yield _data(chunk)
            if event.summary is not None:
                if include_usage:
                    yield _data(reply.usage_chunk(event.summary))
                break
            try:
                event = await pump.next()  # the model process paces these (worker_child.STREAM_INTERVAL_S)
            except Exception as exc:  # the model process died mid-stream: say so, then end the stream properly
                error = ApiError(503, without_paths(str(exc)), type="server_error", code="model_failed")
                yield _data(error.body())
                break
        yield "data: [DONE]\n\n"
    finally:
        cancel.set()  # a no-op when the generation is over; stops it when the client left mid-stream
        pump.close()


def _data(obj: dict[str, Any]) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _sse(chunks: AsyncIterator[str]) -> Any:
    from starlette.responses import StreamingResponse

    return StreamingResponse(chunks, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def create_app(
    engine: WorkerEngine,
    *,
    api_key: str | None = None,
    metrics: Metrics | None = None,
    app: Any = None,
    limits: Limits | None = None,
) -> Any:
    """A FastAPI app serving the API, or the API's routes added in front of an existing app's (Gradio's)."""
    from fastapi import FastAPI
    from starlette.exceptions import HTTPException

    api = Api(engine, api_key=api_key, metrics=metrics, limits=limits)
    own_app = app is None
    app = app or FastAPI(title="localrun", docs_url=None, redoc_url=None, openapi_url=None)
    app.router.routes[0:0] = api.routes()  # ahead of any catch-all route of a host app
    if own_app:  # unknown paths get OpenAI-style JSON too; a host app keeps its own 404 pages

        async def http_error(request: Any, exc: HTTPException) -> Any:
            code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
            return api.error_response(
                request, ApiError(exc.status_code, f"{exc.detail}: {request.url.path}", code=code)
            )

        app.add_exception_handler(HTTPException, http_error)
    app.state.localrun_api = api
    return app
