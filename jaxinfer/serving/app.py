"""The OpenAI-compatible HTTP server: `make_app(backend, ...)` builds the FastAPI app, `serve(...)` runs
it under uvicorn in this process and drains on SIGTERM/SIGINT.

Routes: POST /v1/completions and /v1/chat/completions (JSON, or server-sent events ending in
`data: [DONE]`), GET /v1/models, /health (200 when every replica is up, else 503) and /metrics
(Prometheus). Requests are checked whole (protocol.py) before anything is queued; a request's
choices run as separate backend requests; a client that goes away cancels them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from jaxinfer.errors import JaxinferError
from jaxinfer.serving import protocol
from jaxinfer.serving.backend import Event, GenRequest, Overloaded, Unavailable
from jaxinfer.serving.metrics import Metrics
from jaxinfer.serving.protocol import ApiError

log = logging.getLogger(__name__)

ROUTES = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/health", "/metrics")
OPEN_ROUTES = ("/health",)  # no API key needed: load balancers and orchestrators probe it
DEFAULT_MAX_BODY_BYTES = 4 * 2**20


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


class _Gate:
    """ASGI middleware: counts every request by route and status, and checks the API key (in constant
    time) on every route but /health."""

    def __init__(self, app, server: _Server):
        self.app, self.server = app, server

    def _authorized(self, scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(
                    token.strip().encode(), self.server.api_key.encode()
                )
        return False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        route = scope["path"] if scope["path"] in ROUTES else "other"
        status = 500  # unless a response starts

        async def send_counted(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            if self.server.api_key and scope["path"] not in OPEN_ROUTES and not self._authorized(scope):
                err = ApiError(
                    401,
                    "a valid API key is needed: send the header 'Authorization: Bearer KEY'",
                    code="invalid_api_key",
                )
                await _error_response(err)(scope, receive, send_counted)
                return
            await self.app(scope, receive, send_counted)
        finally:
            self.server.metrics.requests.labels(route, str(status)).inc()


@dataclasses.dataclass(eq=False)
class _Choice:
    index: int
    prompt: list[int]
    params: object
    text: str = ""
    token_ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    top_logprobs: list[dict[int, float]] = dataclasses.field(default_factory=list)
    finish: str | None = None
    error: str | None = None
    replica: int = 0
    first: float | None = None  # perf_counter of its first token
    last: float | None = None
    offset: int = 0  # characters of its logprob tokens so far (completions' text_offset)


class _Run:
    """One HTTP request's choices, each a backend request pumped by its own task into one queue."""

    def __init__(self, server: _Server, rid: str, parsed: protocol.Parsed, t0: float):
        self.server, self.rid, self.parsed, self.t0 = server, rid, parsed, t0
        self.created = int(time.time())
        self.choices = [_Choice(j, prompt, params) for j, prompt, params in parsed.choices]
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.early: list[tuple[int, Event]] = []  # events read while starting, handed out first
        self.stopped = False
        self.status = 200

    async def _pump(self, j: int, gen) -> None:
        try:
            async for ev in gen:
                self.queue.put_nowait((j, ev))
                if ev.finish_reason is not None:
                    return
            self.queue.put_nowait((j, Event("", [], None, None, "error", error="the backend ended the stream early")))
        except Exception as e:  # a refusal (JaxinferError, Unavailable) or a backend fault
            self.queue.put_nowait((j, e))
        finally:
            await gen.aclose()  # (after a cancel too: closing the backend's iterator cancels the request)

    async def start(self) -> None:
        """Sends every choice to the backend and waits for each one's first event, so that a refusal
        is still an HTTP error status (nothing is streamed before every choice has started)."""
        backend = self.server.backend
        for c in self.choices:
            gen = backend.generate(GenRequest(f"{self.rid}-{c.index}", c.prompt, c.params))
            self.tasks.append(asyncio.create_task(self._pump(c.index, gen)))
        self.server.metrics.prompt_tokens.inc(sum(len(c.prompt) for c in self.choices))
        started = set()
        while len(started) < len(self.choices):
            j, item = await self.queue.get()
            if isinstance(item, JaxinferError):
                raise protocol.bad(str(item), "messages" if self.parsed.chat else "prompt")
            if isinstance(item, Unavailable):  # (Overloaded: the queue is full, 429; else 503)
                full = isinstance(item, Overloaded)
                raise ApiError(429 if full else 503, str(item), code="queue_full" if full else "unavailable")
            if isinstance(item, Exception):
                raise item
            started.add(j)
            self.early.append((j, item))

    async def events(self):
        """(choice index, Event) until every choice has finished; each Event also updates its choice."""
        open_ = {c.index for c in self.choices}
        while open_:
            j, ev = self.early.pop(0) if self.early else await self.queue.get()
            if isinstance(ev, Exception):  # (only after start: a backend fault)
                ev = Event("", [], None, None, "error", error=f"{type(ev).__name__}: {ev}")
            self._update(self.choices[j], ev)
            if ev.finish_reason is not None:
                open_.discard(j)
            yield j, ev

    def _update(self, c: _Choice, ev: Event) -> None:
        now = time.perf_counter()
        metrics = self.server.metrics
        n = len(ev.token_ids)
        if n:
            if c.first is None:
                c.first = now
                metrics.ttft.observe(now - self.t0)
            else:  # the tokens of one event came out of one engine step: they share its time
                for _ in range(n):
                    metrics.itl.observe((now - c.last) / n)
            c.last = now
            metrics.generation_tokens.inc(n)
        c.text += ev.text
        c.token_ids += ev.token_ids
        c.logprobs += ev.logprobs or []
        c.top_logprobs += ev.top_logprobs or []
        c.replica = ev.replica
        if ev.finish_reason is not None:
            c.finish, c.error = ev.finish_reason, ev.error

    async def collect(self) -> None:
        async for _ in self.events():
            pass

    def stop(self) -> None:
        """Cancels whatever still runs (never blocks: it may run inside a cancelled scope), frees the
        request's queue places and writes its log line."""
        if self.stopped:
            return
        self.stopped = True
        for t in self.tasks:
            if not t.done():
                t.cancel()
                self.server.keep(t)
        self.server.in_flight -= len(self.choices)
        done = time.perf_counter()
        firsts = [c.first for c in self.choices if c.first is not None]
        if firsts:
            self.server.metrics.e2e.observe(done - self.t0)
        ttft = f"{min(firsts) - self.t0:.3f}s" if firsts else "-"
        finishes = ",".join(c.finish or ("cancelled" if c.first else "-") for c in self.choices)
        errors = "; ".join(f"choice {c.index}: {c.error}" for c in self.choices if c.error)
        log.info(
            "%s replica=%s status=%s prompt_tokens=%d output_tokens=%d ttft=%s total=%.3fs finish=%s%s",
            self.rid,
            ",".join(sorted({str(c.replica) for c in self.choices})),
            self.status,
            sum(len(p) for p in self.parsed.prompts),
            sum(len(c.token_ids) for c in self.choices),
            ttft,
            done - self.t0,
            finishes,
            f" error={errors}" if errors else "",
        )

    # --- bodies ----------------------------------------------------------------------------------

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.parsed.prompts)  # once per prompt, however many choices
        completion = sum(len(c.token_ids) for c in self.choices)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def logprobs(self, c: _Choice, ids: list[int], lps: list[float] | None, tops: list[dict] | None):
        """The OpenAI logprobs object of some tokens of choice `c` (chat's or completions' shape)."""
        if self.parsed.logprobs is None or lps is None:
            return None
        tok = self.server.backend.tokenizer
        text = lambda t: tok.decode([t]) if tok is not None else str(t)
        strs = [text(t) for t in ids]
        tops = tops if self.parsed.logprobs and tops else [{}] * len(ids)
        if self.parsed.chat:
            entry = lambda s, lp: {"token": s, "logprob": lp, "bytes": list(s.encode())}
            content = []
            for s, lp, top in zip(strs, lps, tops):
                alternatives = [entry(text(t), v) for t, v in top.items()]
                content.append({**entry(s, lp), "top_logprobs": alternatives})
            return {"content": content, "refusal": None}
        offsets = []
        for s in strs:
            offsets.append(c.offset)
            c.offset += len(s)
        top_logprobs = [{text(t): v for t, v in top.items()} for top in tops] if self.parsed.logprobs else None
        return {"tokens": strs, "token_logprobs": lps, "top_logprobs": top_logprobs, "text_offset": offsets}

    def head(self, obj: str) -> dict:
        return {"id": self.rid, "object": obj, "created": self.created, "model": self.server.model_name}

    def full_body(self) -> dict:
        choices = []
        for c in self.choices:
            lp = self.logprobs(c, c.token_ids, c.logprobs, c.top_logprobs)
            if self.parsed.chat:
                message = {"role": "assistant", "content": c.text}
                choices.append({"index": c.index, "message": message, "logprobs": lp, "finish_reason": c.finish})
            else:
                choices.append({"index": c.index, "text": c.text, "logprobs": lp, "finish_reason": c.finish})
        obj = "chat.completion" if self.parsed.chat else "text_completion"
        return {**self.head(obj), "choices": choices, "usage": self.usage()}

    def chunk(self, choices: list[dict], usage: bool = False) -> str:
        obj = "chat.completion.chunk" if self.parsed.chat else "text_completion"
        body = {**self.head(obj), "choices": choices}
        if self.parsed.include_usage:
            body["usage"] = self.usage() if usage else None
        return f"data: {json.dumps(body)}\n\n"

    async def sse(self):
        """The server-sent events of a streamed response; leaving early (the client went away: the
        server cancels this generator) cancels every choice."""
        try:
            if self.parsed.chat:
                yield self.chunk(
                    [
                        {
                            "index": c.index,
                            "delta": {"role": "assistant", "content": ""},
                            "logprobs": None,
                            "finish_reason": None,
                        }
                        for c in self.choices
                    ]
                )
            async for j, ev in self.events():
                c = self.choices[j]
                if ev.finish_reason not in (None, "stop", "length"):
                    self.status = 500
                    err = ApiError(500, _failure(c), code=ev.finish_reason)
                    yield f"data: {json.dumps(err.body())}\n\n"
                    break
                if not ev.text and not ev.token_ids and ev.finish_reason is None:
                    continue
                lp = self.logprobs(c, ev.token_ids, ev.logprobs, ev.top_logprobs)
                if self.parsed.chat:
                    delta = {"content": ev.text} if ev.text else {}
                    piece = {"index": j, "delta": delta, "logprobs": lp, "finish_reason": ev.finish_reason}
                else:
                    piece = {"index": j, "text": ev.text, "logprobs": lp, "finish_reason": ev.finish_reason}
                yield self.chunk([piece])
            else:
                if self.parsed.include_usage:
                    yield self.chunk([], usage=True)
            yield "data: [DONE]\n\n"
        finally:
            self.stop()


def _failure(c: _Choice) -> str:
    if c.finish == "cancelled":
        return f"choice {c.index} was cancelled: the server is shutting down"
    return f"choice {c.index} failed: {c.error}"


async def _disconnected(request: Request) -> None:
    """Returns when the client has gone (the body was read already: only http.disconnect can come)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


class _Server:
    """The state of one app: its backend, limits, counters and metrics."""

    def __init__(self, backend, api_key, model_name, max_queue, max_body_bytes):
        self.backend = backend
        self.api_key = api_key
        self.model_name = model_name
        self.max_queue = max_queue
        self.max_body_bytes = max_body_bytes
        self.metrics = Metrics(backend)
        self.in_flight = 0  # backend requests of this server not finished yet
        self.draining = False
        self.created = int(time.time())
        self._tasks: set[asyncio.Task] = set()

    def keep(self, task: asyncio.Task) -> None:
        """Holds a cancelled pump task until it has closed its backend iterator."""
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def body(self, request: Request) -> dict:
        limit = self.max_body_bytes
        too_big = ApiError(
            413, f"the request body is larger than {limit} bytes (--max_body_bytes)", code="body_too_large"
        )
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > limit:
            raise too_big
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > limit:
                raise too_big
            parts.append(part)
        return protocol.load_json(b"".join(parts))

    async def generate(self, request: Request, chat: bool) -> Response:
        t0 = time.perf_counter()
        if self.draining:
            raise ApiError(503, "the server is shutting down and takes no new requests", code="draining")
        body = await self.body(request)
        model = body.get("model")
        if isinstance(model, str) and model != self.model_name:
            raise ApiError(
                404,
                f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                "model",
                "model_not_found",
            )
        backend = self.backend
        parsed = protocol.parse(
            body, chat=chat, tokenizer=backend.tokenizer, vocab_size=backend.vocab_size, max_seq_len=backend.max_seq_len
        )
        k = len(parsed.params)
        if self.max_queue is not None:
            if k > self.max_queue:
                raise protocol.bad(
                    f"{k} choices are more than this server ever holds at once (--max_queue={self.max_queue}); lower n",
                    "n",
                )
            if self.in_flight + k > self.max_queue:
                raise ApiError(
                    429,
                    f"the server holds {self.in_flight} requests and takes at most {self.max_queue} "
                    "at once (--max_queue); retry later",
                    code="queue_full",
                )
        run = _Run(self, ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex, parsed, t0)
        self.in_flight += k
        try:
            await run.start()
        except BaseException as e:
            run.status = e.status if isinstance(e, ApiError) else 500
            run.stop()
            raise
        if parsed.stream:
            return StreamingResponse(run.sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        collect = asyncio.ensure_future(run.collect())
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not collect.done():  # the client left: its choices are cancelled (in stop)
                run.status = 499
                return Response(status_code=499)
            collect.result()
            failed = [c for c in run.choices if c.finish not in ("stop", "length")]
            if failed:
                c = failed[0]
                run.status = 503 if c.finish == "cancelled" else 500
                return _error_response(ApiError(run.status, _failure(c), code=c.finish))
            return JSONResponse(run.full_body())
        finally:
            gone.cancel()
            collect.cancel()
            run.stop()

    def health(self) -> JSONResponse:
        h = self.backend.health()
        ok = bool(h.get("ok")) and all(r.get("up") for r in h.get("replicas", []))
        status = "draining" if self.draining else "ok" if ok else "unavailable"
        body = {"status": status, "replicas": h.get("replicas", [])}
        return JSONResponse(body, status_code=200 if ok and not self.draining else 503)


def make_app(
    backend,
    *,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_queue: int | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The OpenAI-compatible app over `backend` (a jaxinfer.serving.backend.Backend). api_key: needed on
    every route but /health (default $JAXINFER_API_KEY; None or "" for none). max_queue: an extra
    bound of this app's own on the backend requests (choices) it holds at once, 429 past it (the
    backend's max_queue bounds its waiting requests in any case). The app starts the backend when it
    starts and closes it when it stops."""
    api_key = api_key if api_key is not None else os.environ.get("JAXINFER_API_KEY") or None
    server = _Server(backend, api_key, served_model_name or backend.model_name, max_queue, max_body_bytes)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await backend.start()
        yield
        await backend.close()

    app = FastAPI(title="jaxinfer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    app.add_middleware(_Gate, server=server)

    @app.exception_handler(ApiError)
    async def api_error(request, err: ApiError):
        return _error_response(err)

    @app.exception_handler(HTTPException)
    async def http_error(request, err: HTTPException):
        if err.status_code == 404:
            message = f"no route {request.method} {request.url.path}; routes: {', '.join(ROUTES)}"
        elif err.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        else:
            message = str(err.detail)
        return _error_response(ApiError(err.status_code, message))

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.generate(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.generate(request, chat=True)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": server.model_name,
            "object": "model",
            "created": server.created,
            "owned_by": "jaxinfer",
            "max_model_len": backend.max_seq_len,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health():
        return server.health()

    @app.get("/metrics")
    async def metrics():
        from prometheus_client import CONTENT_TYPE_LATEST

        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return app


def serve(
    backend,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    served_model_name: str | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    drain_timeout_s: float = 30.0,
) -> None:
    """Serves `backend` over HTTP until SIGTERM or SIGINT; then new requests get 503 while the running
    ones finish (at most drain_timeout_s), and it returns. A second signal exits at once. The queue
    bound is the backend's own (its max_queue: 429 past it)."""
    import uvicorn

    app = make_app(backend, api_key=api_key, served_model_name=served_model_name, max_body_bytes=max_body_bytes)
    server: _Server = app.state.server

    class Uvicorn(uvicorn.Server):
        drain_task: asyncio.Task | None = None

        async def serve(self, sockets=None):
            self.loop = asyncio.get_running_loop()
            await super().serve(sockets)

        def handle_exit(self, sig, frame):  # (uvicorn's own re-raises the signal after shutting down)
            if self.drain_task is not None or not hasattr(self, "loop"):
                self.should_exit = self.force_exit = True
                return
            log.info(
                "signal %d: draining (at most %.0fs), then exiting; a second signal exits now", sig, drain_timeout_s
            )
            self.drain_task = True  # (set at once: the next signal must not start a second drain)
            self.loop.call_soon_threadsafe(lambda: setattr(self, "drain_task", self.loop.create_task(self.drain())))

        async def drain(self):
            server.draining = True
            await backend.drain(drain_timeout_s)
            self.should_exit = True

    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        access_log=False,
        log_level="info",
        timeout_graceful_shutdown=5,
        log_config=None,
    )
    log.info("serving %s on http://%s:%d (OpenAI API under /v1)", server.model_name, host, port)
    asyncio.run(Uvicorn(config).serve())
    log.info("server stopped")
