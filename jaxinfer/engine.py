"""The serving engine: a paged KV cache shared by many requests, continuous batching, chunked prefill
and prefix caching. The scheduler (scheduler.py, host only) decides what runs; the executor
(executor.py) runs it, every step one compiled program; `Engine` is the glue, and `AsyncLLM` its
asyncio front.

One bad request fails alone: every request is validated before anything is queued, and an exception
while one request is handled (or a failed compiled step) finishes the requests it touched with
finish_reason "error" and frees their pages; the engine and every other request go on. One lock
(`Engine.lock`) serializes whoever drives the engine: `LLM.generate`, `generate_stream`, `AsyncLLM`.

An engine whose mesh spans processes runs in one of two ways. SPMD: every process makes the same
calls (`jaxinfer generate` under launch/local.py; unseeded requests agree on process 0's seed).
Lock step (`jaxinfer serve`): process 0 `lead()`s, taking requests as one process would, and before
each step it publishes the step's changes (requests queued with their prompt, SamplingParams and key;
cancels; failures) through jaxinfer.lockstep; every other process `follow()`s, applying them and
running the same step, until process 0's `stop_followers()`.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import dataclasses
import logging
import secrets
import threading

import numpy as np

from jaxinfer import distributed, lockstep
from jaxinfer.errors import JaxinferError
from jaxinfer.executor import Executor, default_num_pages, pool_bytes
from jaxinfer.outputs import Row, Stops, StreamText, drain
from jaxinfer.sampling import SamplingParams, seed_key
from jaxinfer.scheduler import PageAllocator, Request, Scheduler, SchedulerOutput

__all__ = ["AsyncLLM", "Engine", "PageAllocator", "Request", "default_num_pages"]

log = logging.getLogger(__name__)


class Engine:
    """Requests in, finished requests out of each `step()`: the scheduler plans, the executor runs the
    plan on the device, the scheduler applies the sampled tokens, all under `lock`."""

    def __init__(
        self,
        llm,
        max_num_seqs: int,
        page_size: int,
        num_pages: int | None,
        prefill_chunk: int,
        memory_fraction: float = 0.5,
        decode_steps: int = 8,
    ):
        self.llm = llm
        self.slots = max_num_seqs
        self.page_size = page_size
        self.chunk = prefill_chunk
        self.decode_steps = decode_steps
        needed = max_num_seqs * -(-llm.max_seq_len // page_size) + 1
        # (each process measures its own memory; a pool spanning processes needs one size on all)
        self.num_pages = num_pages or distributed.min_over_processes(
            default_num_pages(llm, page_size, memory_fraction, needed)
        )
        log.info(
            "paged KV cache: %d pages of %d tokens, %s (%.1f MiB per device)",
            self.num_pages,
            page_size,
            llm.setup.kv_cache_dtype,
            pool_bytes(llm, self.num_pages, page_size) / 2**20,
        )
        self.executor = Executor(llm, self.num_pages, page_size)
        self.scheduler = Scheduler(
            self.num_pages,
            page_size,
            max_num_seqs,
            prefill_chunk,
            decode_steps,
            batch_multiple=llm.mesh.shape["dp"],
            page_ranks=llm.mesh.shape["sp"],
        )
        self.lock = threading.RLock()  # held by whoever drives the engine: add, cancel, step
        self._cancels: collections.deque[Request] = collections.deque()  # from cancel_soon
        self._stepping: int | None = None  # the thread inside step()
        self.prompt_tokens = 0  # of every request queued: the prefix cache's hit rate is out of these
        self._reused_before = 0  # prefix pages reused by page allocators a lost cache replaced
        self._leader: lockstep.Leader | None = None  # set on process 0 of a lock-step run

    # What the scheduler and the executor own, read through the engine.
    waiting = property(lambda self: self.scheduler.waiting)
    running = property(lambda self: self.scheduler.running)
    pages = property(lambda self: self.scheduler.pages)
    preemptions = property(lambda self: self.scheduler.preemptions)
    failures = property(lambda self: self.scheduler.failures)
    cache_k = property(lambda self: self.executor.cache_k)
    cache_v = property(lambda self: self.executor.cache_v)
    graphdef = property(lambda self: self.executor.graphdef)

    # --- requests --------------------------------------------------------------------------------

    def request(self, prompt, params: SamplingParams) -> Request:
        """A checked request, not queued yet (`queue` it): raises JaxinferError naming the bad value and
        the fix for a bad prompt or SamplingParams, or a request the cache could never hold."""

        if not isinstance(params, SamplingParams):
            raise JaxinferError(f"params must be jaxinfer.SamplingParams, got {type(params).__name__}")
        params.validate(self.llm.config.vocab_size)  # again: the vocabulary bounds top_k and stop_token_ids
        if not isinstance(prompt, (list, tuple, np.ndarray)):
            raise JaxinferError(f"the prompt is a {type(prompt).__name__}; give a list of token ids")
        prompt = list(prompt)
        self.llm._check_ids(prompt, "the prompt")
        prompt = [int(t) for t in prompt]
        budget = min(params.max_tokens, self.llm.max_seq_len - len(prompt))
        self.scheduler.check_fits(len(prompt), budget)
        return Request(prompt, params, Row(prompt, budget), Stops(self.llm.tokenizer, self.llm.eos_token_ids, params))

    def queue(self, reqs: list[Request]) -> None:
        """Queues checked requests (from `request`), in order; one cancelled before it is queued is not."""
        with self.lock:
            for req in reqs:
                if req.id >= 0:
                    raise JaxinferError(f"request {req.id} was queued already; make a new one")
            for req in reqs:
                if req.row.done:
                    continue
                req.key = self._key(req.params.seed)
                self.scheduler.add(req)
                self.prompt_tokens += len(req.prompt)
                if self._leader is not None:
                    self._leader.record(("add", req.id, req.prompt, req.params, req.key))

    def _key(self, seed: int | None) -> np.ndarray:
        """A request's key: from its seed, or from one drawn now. An SPMD run agrees on process 0's draw
        (a collective: every process queues the same requests); a lock-step leader's draw travels with
        the request to its followers."""
        if seed is None:
            seed = secrets.randbits(63) if self._leader is not None else distributed.draw_seed()
        return seed_key(seed)

    def add(self, prompt: list[int], params: SamplingParams) -> Request:
        return self.add_all([(prompt, params)])[0]

    def add_all(self, items) -> list[Request]:
        """Requests for (prompt, params) pairs: all are checked before any is queued."""
        reqs = [self.request(prompt, params) for prompt, params in items]
        self.queue(reqs)
        return reqs

    def cancel(self, req: Request) -> None:
        """Ends `req` now (finish_reason "cancelled" unless it had finished) and frees its pages."""
        if self._stepping == threading.get_ident():  # from inside a step (a generator finalized by the GC)
            self.cancel_soon(req)
            return
        with self.lock:
            self._cancel(req)

    def _cancel(self, req: Request) -> None:
        self.scheduler.cancel(req)
        if self._leader is not None and req.id >= 0:
            self._leader.record(("cancel", req.id))

    def cancel_soon(self, req: Request) -> None:
        """`cancel` at the start of the next step; never blocks (for an event loop, or a finalizer)."""
        self._cancels.append(req)

    def fail(self, req: Request, error: BaseException) -> None:
        """Ends `req` with finish_reason "error" and the message, and frees its pages; nothing else stops."""
        with self.lock:
            self.scheduler.fail(req, error)
            if self._leader is not None and req.id >= 0:
                self._leader.record(("fail", req.id, req.row.error))

    def has_work(self) -> bool:
        return self.scheduler.has_work()

    def free_pages(self) -> int:
        return self.scheduler.free_pages()

    def stats(self) -> dict:
        """What a server reports of this engine (read without the lock: a snapshot). The prefix-cache hit
        rate is prompt tokens found cached (reused pages x page size) over prompt tokens queued; a request
        preempted and readmitted counts its reused pages again, so it is an estimate."""
        total = self.num_pages - 1  # page 0 is the null page
        hits = (self._reused_before + self.pages.hits) * self.page_size
        return {
            "running": len(self.running),
            "waiting": len(self.waiting),
            "kv_pages_used": total - self.free_pages(),  # held by requests (cached, unused pages are free)
            "kv_pages_total": total,
            "page_size": self.page_size,
            "max_num_seqs": self.slots,
            "prefix_cache_hit_rate": min(1.0, hits / self.prompt_tokens) if self.prompt_tokens else 0.0,
        }

    # --- steps -----------------------------------------------------------------------------------

    def _compiled_step_failed(self) -> bool:
        """After a failed compiled call (its requests failed already): keeps the pool when its buffers
        are intact, else a fresh one replaces it and every running request is recomputed from its
        tokens. Returns whether the pool was kept."""
        if self.executor.cache_intact():
            return True
        log.warning("the KV cache was lost with the failed step; %d running requests restart", len(self.running))
        self._reused_before += self.pages.hits
        self.scheduler.cache_lost()  # the cached prefixes went with the pages (and a new allocator counts)
        self.executor.new_cache()
        return False

    def _prefill(self, out: SchedulerOutput) -> None:
        """Runs the planned prompt chunks; a failed one fails its request and re-plans the decode call."""
        for chunk in out.prefills:
            try:
                self.executor.prefill(chunk)
            except Exception as e:
                self.scheduler.chunk_failed(chunk, e, out)
                if not self._compiled_step_failed():
                    out.decode = None  # every running request went back to wait
                    return
                out.decode = self.scheduler.schedule_decode(out.failed)

    def _decode(self, out: SchedulerOutput) -> list[Request]:
        """Runs the planned decode call and applies its tokens; returns the step's ended requests."""
        toks = logprobs = None
        if out.decode is not None:
            try:
                toks, logprobs = self.executor.decode(out.decode)
            except Exception as e:
                for r in out.decode.reqs:
                    self.scheduler.fail(r, e, out.failed)
                self._compiled_step_failed()
        return self.scheduler.update_from_output(out, toks, logprobs)

    def warmup(self) -> int:
        """Compiles every prefill-chunk and decode shape this engine can meet, ahead of traffic, with
        inputs that only touch the null page. Returns the number of shapes."""
        with self.lock:
            if self._leader is not None:  # (its programs would run on process 0 alone, and wait for the rest)
                raise JaxinferError("warm up a lock-step engine before lead(), on every process alike")
            return self.executor.warmup(self.scheduler)

    def step(self) -> list[Request]:
        """One scheduling round; returns the requests that finished in it (finish_reason "error" for
        those that failed: the others go on)."""
        with self.lock:
            self._stepping = threading.get_ident()
            out = SchedulerOutput([], None, [])
            while self._cancels:
                self._cancel(self._cancels.popleft())
            if self._leader is not None:  # (outside the try: a replica that lost a process cannot go on)
                self._leader.publish()
            try:
                if self.executor.cache_k is None:  # lost with a failed step, and making a new one failed then
                    self.executor.new_cache()
                out = self.scheduler.schedule()
                self._prefill(out)
                return self._decode(out)
            except Exception as e:  # a fault outside any one request: fail the requests of this step
                # (and, without a cache, the waiting ones too: none could run)
                reqs = list(self.running) + (list(self.waiting) if self.executor.cache_k is None else [])
                log.exception("engine step failed; failing %d requests", len(reqs))
                for r in reqs:
                    self.scheduler.fail(r, e, out.failed)
                return out.failed
            finally:
                self._stepping = None

    # --- lock step over processes ----------------------------------------------------------------

    def lead(self, leader: lockstep.Leader | None = None) -> None:
        """On process 0 of a multi-process run: from now on this engine takes requests alone and
        publishes each step's changes to the other processes, which `follow()`. `leader`: the channel
        (default: jax.distributed's key-value store)."""
        with self.lock:
            if self.prompt_tokens or self.has_work():
                raise JaxinferError("lead() before any request is queued: the followers start from a new engine")
            self._leader = leader if leader is not None else lockstep.Leader()

    def stop_followers(self) -> None:
        """Ends the other processes' `follow()` (call once this engine runs no more steps)."""
        with self.lock:
            if self._leader is not None:
                self._leader.stop()

    def follow(self, follower: lockstep.Follower | None = None) -> None:
        """On every process but 0: applies process 0's changes and runs its steps, until it stops us.
        `follower`: the channel (default: jax.distributed's key-value store)."""
        follower = follower if follower is not None else lockstep.Follower()
        reqs: dict[int, Request] = {}  # by the id process 0 gave them (the same here: added in its order)
        while True:
            ops = follower.next()
            with self.lock:
                for op in ops:
                    if op == lockstep.STOP:
                        return
                    self._replay(op, reqs)
                self.step()
                for rid in [rid for rid, r in reqs.items() if r.row.done]:
                    del reqs[rid]

    def _replay(self, op: tuple, reqs: dict[int, Request]) -> None:
        kind = op[0]
        if kind == "add":
            _, rid, prompt, params, key = op
            req = self.request(prompt, params)
            req.key = key
            self.scheduler.add(req)
            self.prompt_tokens += len(req.prompt)
            if req.id != rid:
                raise JaxinferError(f"lock step lost: process 0 queued request {rid} where this process has {req.id}")
            reqs[rid] = req
        elif kind == "cancel":
            if op[1] in reqs:
                self.scheduler.cancel(reqs[op[1]])
        elif kind == "fail":
            if op[1] in reqs:
                self.scheduler.fail(reqs[op[1]], JaxinferError(op[2]))
        else:
            raise JaxinferError(f"lock step: unknown change {kind!r} from process 0")


class AsyncLLM:
    """asyncio front of an LLM's engine, for a server to sit on: `generate` streams StreamChunks of one
    request, `cancel` ends one. A background task runs engine steps in a worker thread while any
    request is open, so the event loop stays free.

    A bad request raises JaxinferError at `submit` (nothing is queued); one that fails later raises it
    to its own stream only. A consumer that goes away (its task cancelled, its iterator closed) cancels
    its request. Each request's chunks go to its own queue, published once, the last one with its
    finish_reason; a request that is never streamed leaves nothing behind once it finishes.
    """

    def __init__(self, llm):
        self.llm = llm
        self.engine = llm.engine
        self._open: dict[Request, _Feed] = {}  # requests whose last chunk is not published yet
        self._task: asyncio.Task | None = None

    async def submit(self, prompt, params: SamplingParams | None = None, chat: bool = False) -> Request:
        """Queues one prompt; raises JaxinferError for a bad prompt or params (then nothing is queued)."""

        ids = self.llm._prompt_ids(prompt if isinstance(prompt, str) else [prompt], chat)[0]
        params = self.llm._params_list(params, 1)[0]
        req = self.engine.request(ids, params)
        try:
            await asyncio.to_thread(self.engine.queue, [req])
        except asyncio.CancelledError:  # the caller left while the thread may still queue it
            self._abandon(req)
            raise
        req.feed = _Feed(asyncio.Queue(), StreamText(req))
        self._open[req] = req.feed
        self._wake()
        return req

    async def stream(self, req: Request):
        """The StreamChunks of a submitted request, the last with its finish_reason; raises JaxinferError
        when the request failed. Leaving early (a cancelled task, a closed iterator) cancels it."""
        feed = req.feed
        if not isinstance(feed, _Feed):
            raise JaxinferError(f"request {req.id} was not submitted through AsyncLLM.submit")
        async with contextlib.aclosing(drain(feed.queue, lambda: self._abandon(req))) as items:
            async for item in items:
                yield item

    async def generate(self, prompt, params: SamplingParams | None = None, chat: bool = False):
        """Async iterator of StreamChunks for one prompt."""
        req = await self.submit(prompt, params, chat)
        try:
            async for chunk in self.stream(req):
                yield chunk
        finally:
            self._abandon(req)

    async def cancel(self, req: Request) -> None:
        """Ends `req` (finish_reason "cancelled"); its stream gets the last chunk."""
        await asyncio.to_thread(self.engine.cancel, req)
        self._wake()

    def _abandon(self, req: Request) -> None:
        if not req.row.done:
            self.engine.cancel_soon(req)  # the event loop must not wait for a step to end
            self._wake()

    def _wake(self) -> None:
        """Makes sure the background task runs: it steps the engine and publishes until nothing is open."""
        if self._task is None or self._task.done():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # a stream finalized after its loop closed: the next step cancels it
                return
            self._task = loop.create_task(self._run())

    def _advance(self) -> tuple[list, bool]:
        """In the worker thread, under the engine's lock: one step when there is work, then the next
        chunk (or error) of each request open after it, those submitted during the step included (they
        may have run in it: their first chunk goes out now, not a step later)."""
        with self.engine.lock:
            if self.engine.has_work() or self.engine._cancels:
                self.engine.step()
            open_ = list(self._open.items())  # the event loop only adds while this runs
            out = []
            for req, feed in open_:
                try:
                    item = feed.text.next(req.row)
                except Exception as e:  # its text could not be made: it fails, alone
                    self.engine.fail(req, e)
                    item = feed.text.error(req.row)
                out.append((req, feed, item))
            return out, self.engine.has_work()

    async def _run(self) -> None:
        while True:
            try:
                items, more = await asyncio.to_thread(self._advance)
            except Exception as e:  # not expected (the engine isolates faults): end what is open, loudly
                log.exception("AsyncLLM: engine step failed")
                open_ = list(self._open.items())
                for req, _ in open_:
                    self.engine.cancel_soon(req)  # frees their pages at the next step
                items = [(req, feed, JaxinferError(f"request {req.id} failed: {e}")) for req, feed in open_]
                more = False
            for req, feed, item in items:
                if item is None:
                    continue
                feed.queue.put_nowait(item)
                if isinstance(item, BaseException) or item.finish_reason is not None:
                    self._open.pop(req, None)  # published once; the queue lives on with the request
            if not more and not self._open:
                return


@dataclasses.dataclass(eq=False)
class _Feed:
    queue: asyncio.Queue  # StreamChunks, then the last one or a JaxinferError
    text: StreamText  # what was sent so far
