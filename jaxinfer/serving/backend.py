"""What the HTTP server talks to: a Backend takes checked requests (token ids and SamplingParams) and
streams Events back. InProcessBackend is one engine in this process; jaxinfer.serving.replicas holds
K engines in worker processes behind the same interface.

The server validates and tokenizes; a backend only generates. A backend may still refuse a request
with JaxinferError (the engine's own checks, e.g. a request the KV cache could never hold) when
`generate` is first iterated, before anything is queued; `Unavailable` when it takes no requests now.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from collections.abc import AsyncIterator
from typing import Protocol, runtime_checkable

from jaxinfer.errors import JaxinferError
from jaxinfer.sampling import SamplingParams

log = logging.getLogger(__name__)


@dataclasses.dataclass
class GenRequest:
    request_id: str
    prompt_ids: list[int]  # already templated and tokenized by the server
    params: SamplingParams  # already validated


@dataclasses.dataclass
class Event:
    """One streamed piece of one request: the new settled text and the new token ids since the last
    Event (their texts add up to the completion's text: stop strings are never sent, not even a
    partial match), their logprobs when asked for."""

    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    top_logprobs: list[dict[int, float]] | None
    finish_reason: str | None  # "stop" | "length" on the last event; "error" with `error` set
    error: str | None = None
    replica: int = 0


class Unavailable(Exception):
    """The backend takes no request now: draining, closed, or no replica up (HTTP 503)."""


class Overloaded(Unavailable):
    """The backend's queue is full (`max_queue` requests wait already): retry later (HTTP 429)."""


@runtime_checkable
class Backend(Protocol):
    """What the server needs of whatever generates (one engine here, or K replica processes)."""

    tokenizer: object  # jaxinfer.tokenizer.Tokenizer, or None for a checkpoint without one
    max_seq_len: int
    vocab_size: int
    model_name: str
    max_queue: int | None

    async def start(self) -> None: ...

    def generate(self, req: GenRequest) -> AsyncIterator[Event]:
        """Events of one request, the last with its finish_reason. Raises JaxinferError (bad request,
        nothing queued) or Unavailable on first iteration. Closing the iterator early cancels the
        request and frees its pages."""
        ...

    def health(self) -> dict:
        """{"ok": bool, "replicas": [{"id": 0, "up": True, "detail": "..."}]}"""
        ...

    def stats(self) -> list[dict]:
        """Per replica: {"id", "running", "waiting", "kv_pages_used", "kv_pages_total",
        "prefix_cache_hit_rate", "outstanding_tokens"}."""
        ...

    async def drain(self, timeout_s: float) -> None:
        """Stops admitting and waits (at most timeout_s) for the requests in flight to finish."""
        ...

    async def close(self) -> None: ...


class InProcessBackend:
    """One replica: `llm`'s engine driven by jaxinfer.engine.AsyncLLM in this process's event loop.

    max_queue: how many requests may wait beyond the max_num_seqs the engine runs at once; past it
    `generate` raises Overloaded. None: no bound."""

    def __init__(self, llm, *, model_name: str | None = None, max_queue: int | None = None):
        self.llm = llm
        self.tokenizer = llm.tokenizer
        self.max_seq_len = llm.max_seq_len
        self.vocab_size = llm.config.vocab_size
        self.model_name = model_name or "jaxinfer"
        self.max_queue = max_queue
        self._async = None
        self._open: dict[str, object] = {}  # request_id -> engine Request, while its events are read
        self._held = 0  # requests taken and not finished (queued, running, or being submitted)
        self._idle = asyncio.Event()
        self._idle.set()
        self._admitting = True
        self._closed = False

    async def start(self) -> None:
        from jaxinfer.engine import AsyncLLM

        if self._async is None:
            self.llm.engine  # noqa: B018  (creates the engine and its KV pool now, not on the first request)
            self._async = AsyncLLM(self.llm)

    async def generate(self, req: GenRequest) -> AsyncIterator[Event]:
        if not self._admitting:
            raise Unavailable("the server is shutting down and takes no new requests")
        slots = self.llm.engine_options["max_num_seqs"]
        if self.max_queue is not None and self._held >= slots + self.max_queue:
            raise Overloaded(
                f"{self._held} requests are in flight, {slots} running at most and max_queue={self.max_queue} "
                "waiting; retry later"
            )
        self._held += 1
        self._idle.clear()
        try:
            await self.start()
            r = await self._async.submit(req.prompt_ids, req.params)  # JaxinferError: nothing was queued
        except BaseException:
            self._release()
            raise
        self._open[req.request_id] = r
        sent = 0
        try:
            async with contextlib.aclosing(self._async.stream(r)) as chunks:
                try:
                    async for chunk in chunks:
                        n = len(chunk.token_ids)
                        lps = list(r.row.logprobs[sent : sent + n]) if req.params.logprobs else None
                        top = list(r.row.top_logprobs[sent : sent + n]) if req.params.top_logprobs else None
                        sent += n
                        yield Event(chunk.text, list(chunk.token_ids), lps, top, chunk.finish_reason)
                except JaxinferError as e:  # it failed while running; the engine and the others go on
                    yield Event("", [], None, None, "error", error=str(e))
        finally:  # (an early close: leaving the `async with` closed the stream, which cancelled r)
            self._open.pop(req.request_id, None)
            self._release()

    def _release(self) -> None:
        self._held -= 1
        if not self._held:
            self._idle.set()

    def health(self) -> dict:
        up = self._async is not None and not self._closed
        detail = "closed" if self._closed else "serving" if up else "not started"
        if up and not self._admitting:
            detail = "draining"
        return {"ok": up, "replicas": [{"id": 0, "up": up, "detail": detail}]}

    def stats(self) -> list[dict]:
        engine = self.llm._engine
        if engine is None:
            return [
                dict(
                    id=0,
                    running=0,
                    waiting=0,
                    kv_pages_used=0,
                    kv_pages_total=0,
                    prefix_cache_hit_rate=0.0,
                    outstanding_tokens=0,
                )
            ]
        outstanding = 0
        for r in list(self._open.values()):  # read without the engine's lock: a snapshot, good enough
            outstanding += max(0, len(r.prompt) - r.computed) + max(0, r.row.budget - len(r.row.ids))
        return [dict(id=0, **engine.stats(), outstanding_tokens=outstanding)]

    async def drain(self, timeout_s: float) -> None:
        self._admitting = False
        try:
            await asyncio.wait_for(self._idle.wait(), timeout_s)
        except TimeoutError:
            log.warning("drain: %d requests still running after %.1fs; they are cancelled", len(self._open), timeout_s)

    async def close(self) -> None:
        self._admitting = False
        if self._async is not None:
            for r in list(self._open.values()):
                await self._async.cancel(r)  # its stream ends with finish_reason "cancelled"
        self._closed = True
