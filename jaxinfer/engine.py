"""The serving engine: a paged KV cache shared by many requests, continuous batching, chunked prefill
and prefix caching. Python decides what runs; every step is one compiled program.

Each `step()` admits waiting requests into free slots, prefills one chunk of the oldest request still
reading its prompt, then decodes every request whose prompt is in the cache. A request's last known
token always goes through the decode step, so sampling happens in one place. When pages run out, the
newest running request is preempted: its pages are released and it is recomputed later.

One bad request fails alone: every request is validated before anything is queued, and an exception
while one request is handled (or a failed compiled step) finishes the requests it touched with
finish_reason "error" and frees their pages; the engine and every other request go on. One lock
(`Engine.lock`) serializes whoever drives the engine: `LLM.generate`, `generate_stream`, `AsyncLLM`.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import threading

import jax
import numpy as np

from jaxinfer import distributed, steps
from jaxinfer.errors import JaxinferError
from jaxinfer.outputs import Row, Stops, StreamText
from jaxinfer.sampling import SamplingParams, seed_key
from models.kv_cache import PAGE_AXES, PagedKVCache

log = logging.getLogger(__name__)


class PageAllocator:
    """Pages 1..num_pages-1 (page 0 is the null page idle slots write to). Full pages of computed
    prompt blocks are registered under the hash chain of their tokens; when their last user leaves
    they stay cached, least recently used first out, until an allocation needs them."""

    def __init__(self, num_pages: int):
        self.free = collections.deque(range(1, num_pages))
        self.refs = [0] * num_pages
        self.hash_of: dict[int, int] = {}
        self.page_of: dict[int, int] = {}
        self.unused: collections.OrderedDict[int, None] = collections.OrderedDict()
        self.hits = 0  # prefix pages reused

    def available(self) -> int:
        return len(self.free) + len(self.unused)

    def allocate(self) -> int | None:
        if self.free:
            page = self.free.popleft()
        elif self.unused:
            page, _ = self.unused.popitem(last=False)
            del self.page_of[self.hash_of.pop(page)]
        else:
            return None
        self.refs[page] = 1
        return page

    def release(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            if page in self.hash_of:
                self.unused[page] = None
            else:
                self.free.append(page)

    def lookup(self, block_hash: int) -> int | None:
        page = self.page_of.get(block_hash)
        if page is not None:
            if self.refs[page] == 0:
                del self.unused[page]
            self.refs[page] += 1
            self.hits += 1
        return page

    def register(self, page: int, block_hash: int) -> None:
        if block_hash not in self.page_of and page not in self.hash_of:
            self.page_of[block_hash] = page
            self.hash_of[page] = block_hash


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    row: Row  # generated ids, logprobs, finish reason (or error), token budget
    stops: Stops  # this request's end-of-sequence rules
    id: int = -1  # set when queued; older requests prefill first and are preempted last
    key: np.ndarray | None = None  # threefry key data, set when queued
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # leading tokens whose keys/values are in `pages`
    hashes: list[int] = dataclasses.field(default_factory=list)  # hash chain of the full pages registered
    slot: int | None = None
    feed: object = None  # AsyncLLM's queue of this request's chunks

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.row.ids

    @property
    def in_decode(self) -> bool:
        return self.computed == len(self.tokens) - 1


def _pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def default_num_pages(llm, page_size: int, fraction: float, needed: int) -> int:
    """Pages that fit in `fraction` of the memory one device has left after the weights (on CPU, of
    the host's available memory shared by the simulated devices), at most `needed`."""
    dev = next(d for d in llm.mesh.devices.flat if d.process_index == jax.process_index())
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        with open("/proc/meminfo") as f:
            meminfo = dict(line.split(":", 1) for line in f)
        free = int(meminfo["MemAvailable"].split()[0]) * 1024 // max(1, len(jax.local_devices()))
    shape = llm.setup.page_shape(1, page_size)
    per_page = 2 * int(np.prod(llm.setup.shard_shape(shape, PAGE_AXES))) * np.dtype(llm.dtype).itemsize
    return max(2, min(needed, int(fraction * free) // per_page))


def _key(seed: int | None) -> np.ndarray:
    """A request's key: from its seed, or from one drawn now (process 0's in a multi-process run)."""
    return seed_key(distributed.draw_seed() if seed is None else seed)


class Engine:
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
        self.num_pages = num_pages or default_num_pages(llm, page_size, memory_fraction, needed)
        log.info(
            "paged KV cache: %d pages of %d tokens (%.1f MiB per device)",
            self.num_pages,
            page_size,
            llm.setup.page_bytes(self.num_pages, page_size) / 2**20,
        )
        self.cache_k, self.cache_v = llm.setup.paged_cache(self.num_pages, page_size)
        self.pages = PageAllocator(self.num_pages)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.ids = itertools.count()
        self.graphdef = llm.paged_graphdef()
        self.preemptions = 0
        self.failures = 0  # requests ended by an error
        self.lock = threading.RLock()  # held by whoever drives the engine: add, cancel, step
        self._cancels: collections.deque[Request] = collections.deque()  # from cancel_soon
        self._stepping: int | None = None  # the thread inside step()

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
        # Alone in the cache it must reach its last token, or preemption would only ever restart it.
        need = -(-(len(prompt) + budget + self.decode_steps) // self.page_size)
        if need > self.num_pages - 1:
            raise JaxinferError(
                f"a prompt of {len(prompt)} tokens with max_tokens={budget} needs {need} pages of {self.page_size} "
                f"tokens but the cache has {self.num_pages - 1}; raise num_pages, or lower max_tokens or the prompt"
            )
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
                req.id = next(self.ids)
                req.key = _key(req.params.seed)
                self.waiting.append(req)

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
        self._remove(req)
        if req.row.finish is None:
            req.row.finish = "cancelled"

    def cancel_soon(self, req: Request) -> None:
        """`cancel` at the start of the next step; never blocks (for an event loop, or a finalizer)."""
        self._cancels.append(req)

    def fail(self, req: Request, error: BaseException) -> None:
        """Ends `req` with finish_reason "error" and the message, and frees its pages; nothing else stops."""
        with self.lock:
            self._remove(req)
            if req.row.error is None:
                log.error("request %d failed: %s: %s", req.id, type(error).__name__, error, exc_info=error)
                req.row.error = str(error) if isinstance(error, JaxinferError) else f"{type(error).__name__}: {error}"
                req.row.finish = "error"
                self.failures += 1

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def free_pages(self) -> int:
        return self.pages.available()

    # --- scheduling ------------------------------------------------------------------------------

    def _release(self, req: Request) -> None:
        for page in req.pages:
            self.pages.release(page)
        req.pages, req.hashes, req.computed, req.slot = [], [], 0, None

    def _remove(self, req: Request) -> None:
        """Takes `req` out of this engine (only: its pages are this engine's) and frees its pages."""
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
        else:
            return
        self._release(req)

    def _preempt_newest(self) -> Request:
        victim = max(self.running, key=lambda r: r.id)
        self.running.remove(victim)
        self._release(victim)
        self.waiting.appendleft(victim)
        self.preemptions += 1
        log.info("preempted request %d (pages ran out); it will be recomputed", victim.id)
        return victim

    def _ensure_pages(self, req: Request, positions: int) -> bool:
        """Pages for the first `positions` tokens of `req`, preempting newer requests; False when `req`
        itself had to go."""
        while len(req.pages) * self.page_size < positions:
            page = self.pages.allocate()
            if page is None:
                if self._preempt_newest() is req:
                    return False
                continue
            req.pages.append(page)
        return True

    def _block_hashes(self, tokens: list[int]) -> list[int]:
        out, h = [], 0
        for i in range(len(tokens) // self.page_size):
            h = hash((h, tuple(tokens[i * self.page_size : (i + 1) * self.page_size])))
            out.append(h)
        return out

    def _admit(self, failed: list[Request]) -> None:
        used = {r.slot for r in self.running}
        free_slots = [s for s in range(self.slots) if s not in used]
        while self.waiting and free_slots:
            req = self.waiting[0]
            try:
                # Reuse cached pages of the longest matching prefix of full blocks (never the last token,
                # which must run through the model to produce the next one).
                for h in self._block_hashes(req.tokens[: len(req.tokens) - 1]):
                    page = self.pages.lookup(h)
                    if page is None:
                        break
                    req.pages.append(page)
                    req.hashes.append(h)
                req.computed = len(req.pages) * self.page_size
                first = min(len(req.tokens), req.computed + self.chunk) + self.decode_steps
                fits = self.pages.available() >= -(-first // self.page_size) - len(req.pages)
            except Exception as e:
                self._failed(req, e, failed)
                continue
            if not fits:
                self._release(req)
                break
            self.waiting.popleft()
            req.slot = free_slots.pop(0)
            self.running.append(req)

    def _register_full_pages(self, req: Request) -> None:
        hashes = self._block_hashes(req.tokens[: req.computed])
        for i in range(len(req.hashes), len(hashes)):
            self.pages.register(req.pages[i], hashes[i])
        req.hashes = hashes

    def _tables(self, reqs: list[Request], width: int, rows: int | None = None) -> np.ndarray:
        """Block tables [rows, width]: request r in row r.slot (or row 0 when rows is None)."""
        tables = np.zeros((rows or 1, width), np.int32)
        for r in reqs:
            tables[r.slot if rows else 0, : len(r.pages)] = r.pages
        return tables

    # --- steps -----------------------------------------------------------------------------------

    def _failed(self, req: Request, error: BaseException, failed: list[Request]) -> None:
        self.fail(req, error)
        failed.append(req)

    def _compiled_step_failed(self, reqs: list[Request], error: BaseException, failed: list[Request]) -> None:
        """A compiled call failed: its requests fail; the cache is kept when its buffers are intact, else
        a fresh one replaces it and every other running request is recomputed from its tokens."""
        for r in reqs:
            self._failed(r, error, failed)
        try:
            intact = not (self.cache_k.is_deleted() or self.cache_v.is_deleted())
            if intact:
                jax.block_until_ready((self.cache_k, self.cache_v))  # raises when they hold the error
        except Exception:
            intact = False
        if intact:
            return
        log.warning("the KV cache was lost with the failed step; %d running requests restart", len(self.running))
        for r in sorted(self.running, key=lambda r: r.id, reverse=True):
            self.running.remove(r)
            self._release(r)
            self.waiting.appendleft(r)
        self.cache_k = self.cache_v = None
        self.pages = PageAllocator(self.num_pages)  # the cached prefixes went with the pages
        self._new_cache()

    def _new_cache(self) -> None:
        self.cache_k, self.cache_v = self.llm.setup.paged_cache(self.num_pages, self.page_size)

    def _prefill(self, failed: list[Request]) -> None:
        """Prompt chunks of the oldest requests still reading their prompts, up to `prefill_chunk`
        tokens in all, one compiled call per chunk."""
        budget = self.chunk
        for req in sorted((r for r in self.running if not r.in_decode), key=lambda r: r.id):
            if budget <= 0 or req not in self.running:
                break
            try:
                end = min(len(req.tokens) - 1, req.computed + budget)
                if not self._ensure_pages(req, end):
                    continue
                n = end - req.computed
                size = min(self.chunk, max(16, _pow2(n)))  # chunk shapes: powers of two up to prefill_chunk
                tokens, positions = np.zeros((1, size), np.int32), np.zeros((1, size), np.int32)
                tokens[0, :n] = req.tokens[req.computed : end]
                positions[0, :n] = np.arange(req.computed, end)
                valid = np.zeros((1, size), bool)
                valid[0, :n] = True
                tables = self._tables([req], _pow2(-(-end // self.page_size)))
            except Exception as e:
                self._failed(req, e, failed)
                continue
            budget -= n
            try:
                self.cache_k, self.cache_v = steps.prefill_chunk(
                    self.graphdef, self.llm.state, self.cache_k, self.cache_v, tables, valid, tokens, positions
                )
            except Exception as e:
                self._compiled_step_failed([req], e, failed)
                continue
            try:
                req.computed = end
                self._register_full_pages(req)
            except Exception as e:
                self._failed(req, e, failed)

    @staticmethod
    def _inputs(r: Request) -> tuple:
        """One row of the decode step's inputs, checked to fit its dtypes."""
        p = r.params
        key = np.asarray(r.key)
        if key.shape != (2,) or key.dtype != np.uint32:
            raise JaxinferError(f"request {r.id} has a malformed key {key!r}")
        return (
            np.int32(r.tokens[-1]),
            np.int32(len(r.tokens) - 1),
            np.float32(p.temperature),
            np.int32(p.top_k),
            np.float32(p.top_p),
            key,
        )

    def _decode(self, failed: list[Request]) -> list[Request]:
        n = self.decode_steps
        for r in sorted((r for r in self.running if r.in_decode), key=lambda r: r.id):  # oldest first
            if r in self.running:  # preemption takes the newest
                try:
                    self._ensure_pages(r, len(r.tokens) - 1 + n)
                except Exception as e:
                    self._failed(r, e, failed)
        ready, inputs = [], []
        for r in [r for r in self.running if r.in_decode]:
            try:
                inputs.append(self._inputs(r))
                ready.append(r)
            except Exception as e:
                self._failed(r, e, failed)
        if not ready:
            return []
        # Slots fill lowest first; compile for a power of two of the slots in use, not all of them.
        dp = self.llm.mesh.shape["dp"]  # the batch splits over dp: keep it a multiple
        s = dp * _pow2(-(-min(self.slots, _pow2(max(r.slot for r in ready) + 1)) // dp))
        tokens, positions = np.zeros(s, np.int32), np.zeros(s, np.int32)
        valid = np.zeros((s, 1), bool)
        temperature, top_k = np.zeros(s, np.float32), np.zeros(s, np.int32)
        top_p, keys = np.ones(s, np.float32), np.zeros((s, 2), np.uint32)
        for r, row in zip(ready, inputs):
            i = r.slot
            tokens[i], positions[i], temperature[i], top_k[i], top_p[i], keys[i] = row
            valid[i] = True
        width = _pow2(max(len(r.pages) for r in ready))
        try:
            put = self.llm.setup.put
            cache = PagedKVCache(self.cache_k, self.cache_v, self._tables(ready, width, s), valid)
            sampling = tuple(put(a) for a in (temperature, top_k, top_p, keys))
            toks, logprobs, cache = steps.decode(
                self.graphdef,
                self.llm.state,
                cache,
                put(tokens),
                put(positions),
                sampling,
                n_steps=n,
                greedy_only=bool(np.all(temperature == 0)),
            )
            self.cache_k, self.cache_v = cache.k, cache.v
            toks, logprobs = np.asarray(toks), np.asarray(logprobs)
        except Exception as e:
            self._compiled_step_failed(ready, e, failed)
            return []
        finished = []
        for r in ready:
            try:
                for j in range(n):
                    r.stops.push(r.row, int(toks[r.slot, j]), float(logprobs[r.slot, j]))
                    r.computed += 1
                    if r.row.done:
                        break
            except Exception as e:
                self._failed(r, e, failed)
                continue
            if r.row.done:
                finished.append(r)
        for r in finished:
            self.running.remove(r)
            self._release(r)
        return finished

    def warmup(self) -> int:
        """Compiles every prefill-chunk and decode shape this engine can meet, ahead of traffic, with
        inputs that only touch the null page. Returns the number of shapes."""
        widths = [1 << i for i in range((-(-self.llm.max_seq_len // self.page_size) - 1).bit_length() + 1)]
        dp = self.llm.mesh.shape["dp"]
        slots = sorted({dp * _pow2(-(-min(self.slots, 1 << i) // dp)) for i in range(self.slots.bit_length() + 1)})
        sizes = sorted({min(self.chunk, max(16, 1 << i)) for i in range(self.chunk.bit_length() + 1)})
        put, zeros = self.llm.setup.put, np.zeros
        for size in sizes:
            for w in widths:
                self.cache_k, self.cache_v = steps.prefill_chunk(
                    self.graphdef,
                    self.llm.state,
                    self.cache_k,
                    self.cache_v,
                    zeros((1, w), np.int32),
                    zeros((1, size), bool),
                    zeros((1, size), np.int32),
                    zeros((1, size), np.int32),
                )
        params = SamplingParams(temperature=0)
        for s in slots:
            sampling, _ = self.llm.setup.sampling_arrays(params, s, s)
            for w in widths:
                for greedy in (True, False):
                    cache = PagedKVCache(self.cache_k, self.cache_v, zeros((s, w), np.int32), zeros((s, 1), bool))
                    _, _, cache = steps.decode(
                        self.graphdef,
                        self.llm.state,
                        cache,
                        put(zeros(s, np.int32)),
                        put(zeros(s, np.int32)),
                        sampling,
                        n_steps=self.decode_steps,
                        greedy_only=greedy,
                    )
                    self.cache_k, self.cache_v = cache.k, cache.v
        return len(sizes) * len(widths) + 2 * len(slots) * len(widths)

    def step(self) -> list[Request]:
        """One scheduling round; returns the requests that finished in it (finish_reason "error" for
        those that failed: the others go on)."""
        with self.lock:
            self._stepping = threading.get_ident()
            failed: list[Request] = []
            try:
                while self._cancels:
                    self._cancel(self._cancels.popleft())
                if self.cache_k is None:  # lost with a failed step, and making a new one failed then
                    self._new_cache()
                self._admit(failed)
                self._prefill(failed)
                finished = self._decode(failed)
                return failed + finished
            except Exception as e:  # a fault outside any one request: fail the requests of this step
                # (and, without a cache, the waiting ones too: none could run)
                reqs = list(self.running) + (list(self.waiting) if self.cache_k is None else [])
                log.exception("engine step failed; failing %d requests", len(reqs))
                for r in reqs:
                    self._failed(r, e, failed)
                return failed
            finally:
                self._stepping = None


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
        finished = False
        try:
            while True:
                item = await feed.queue.get()
                if isinstance(item, BaseException):
                    finished = True
                    raise item
                finished = item.finish_reason is not None
                yield item
                if finished:
                    return
        finally:
            if not finished:
                self._abandon(req)

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

    def _advance(self, open_: list[tuple[Request, _Feed]]) -> tuple[list, bool]:
        """In the worker thread, under the engine's lock: one step when there is work, then the next
        chunk (or error) of each open request."""
        with self.engine.lock:
            if self.engine.has_work() or self.engine._cancels:
                self.engine.step()
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
            open_ = list(self._open.items())
            try:
                items, more = await asyncio.to_thread(self._advance, open_)
            except Exception as e:  # not expected (the engine isolates faults): end what is open, loudly
                log.exception("AsyncLLM: engine step failed")
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
