"""The serving engine: a paged KV cache shared by many requests, continuous batching, chunked prefill
and prefix caching. Python decides what runs; every step is one compiled program.

Each `step()` admits waiting requests into free slots, prefills one chunk of the oldest request still
reading its prompt, then decodes every request whose prompt is in the cache. A request's last known
token always goes through the decode step, so sampling happens in one place. When pages run out, the
newest running request is preempted: its pages are released and it is recomputed later.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import os
import threading

import jax
import numpy as np

from jaxinfer import steps
from jaxinfer.errors import JaxinferError
from jaxinfer.sampling import SamplingParams
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
    id: int
    prompt: list[int]
    params: SamplingParams
    key: np.ndarray
    row: object  # llm._Row: generated ids, logprobs, finish reason, token budget
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # leading tokens whose keys/values are in `pages`
    hashes: list[int] = dataclasses.field(default_factory=list)  # hash chain of the full pages registered
    slot: int | None = None
    stops: object = None  # llm._Stops: this request's end-of-sequence rules

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

    # --- requests --------------------------------------------------------------------------------

    def add(self, prompt: list[int], params: SamplingParams) -> Request:
        from jaxinfer.llm import _Row, _Stops  # the same end-of-sequence bookkeeping as the static path

        budget = min(params.max_tokens, self.llm.max_seq_len - len(prompt))
        # Alone in the cache it must reach its last token, or preemption would only ever restart it.
        need = -(-(len(prompt) + budget + self.decode_steps) // self.page_size)
        if need > self.num_pages - 1:
            raise JaxinferError(
                f"a prompt of {len(prompt)} tokens with max_tokens={budget} needs {need} pages of {self.page_size} "
                f"tokens but the cache has {self.num_pages - 1}; raise num_pages, or lower max_tokens or the prompt"
            )
        seed = params.seed if params.seed is not None else int.from_bytes(os.urandom(4), "little") >> 1
        key = np.asarray(jax.random.key_data(jax.random.key(seed)))
        req = Request(
            next(self.ids), list(prompt), params, key, _Row(list(prompt), budget), stops=_Stops(self.llm, params)
        )
        self.waiting.append(req)
        return req

    def cancel(self, req: Request) -> None:
        if req in self.waiting:
            self.waiting.remove(req)
        if req in self.running:
            self._release(req)
            self.running.remove(req)
        if req.row.finish is None:
            req.row.finish = "cancelled"

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def free_pages(self) -> int:
        return self.pages.available()

    # --- scheduling ------------------------------------------------------------------------------

    def _release(self, req: Request) -> None:
        for page in req.pages:
            self.pages.release(page)
        req.pages, req.hashes, req.computed, req.slot = [], [], 0, None

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

    def _admit(self) -> None:
        used = {r.slot for r in self.running}
        free_slots = [s for s in range(self.slots) if s not in used]
        while self.waiting and free_slots:
            req = self.waiting[0]
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
            if self.pages.available() < -(-first // self.page_size) - len(req.pages):
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

    def _prefill(self) -> None:
        """Prompt chunks of the oldest requests still reading their prompts, up to `prefill_chunk`
        tokens in all, one compiled call per chunk."""
        budget = self.chunk
        for req in sorted((r for r in self.running if not r.in_decode), key=lambda r: r.id):
            if budget <= 0 or req not in self.running:
                break
            end = min(len(req.tokens) - 1, req.computed + budget)
            if not self._ensure_pages(req, end):
                continue
            n = end - req.computed
            budget -= n
            size = min(self.chunk, max(16, _pow2(n)))  # chunk shapes: powers of two up to prefill_chunk
            tokens, positions = np.zeros((1, size), np.int32), np.zeros((1, size), np.int32)
            tokens[0, :n] = req.tokens[req.computed : end]
            positions[0, :n] = np.arange(req.computed, end)
            valid = np.zeros((1, size), bool)
            valid[0, :n] = True
            width = _pow2(-(-end // self.page_size))
            self.cache_k, self.cache_v = steps.prefill_chunk(
                self.graphdef,
                self.llm.state,
                self.cache_k,
                self.cache_v,
                self._tables([req], width),
                valid,
                tokens,
                positions,
            )
            req.computed = end
            self._register_full_pages(req)

    def _decode(self) -> list[Request]:
        n = self.decode_steps
        ready = [r for r in self.running if r.in_decode]
        for r in sorted(ready, key=lambda r: r.id):  # oldest first: preemption takes the newest
            if r in self.running:
                self._ensure_pages(r, len(r.tokens) - 1 + n)
        ready = [r for r in self.running if r.in_decode]
        if not ready:
            return []
        # Slots fill lowest first; compile for a power of two of the slots in use, not all of them.
        dp = self.llm.mesh.shape["dp"]  # the batch splits over dp: keep it a multiple
        s = dp * _pow2(-(-min(self.slots, _pow2(max(r.slot for r in ready) + 1)) // dp))
        tokens, positions = np.zeros(s, np.int32), np.zeros(s, np.int32)
        valid = np.zeros((s, 1), bool)
        temperature, top_k = np.zeros(s, np.float32), np.zeros(s, np.int32)
        top_p, keys = np.ones(s, np.float32), np.zeros((s, 2), np.uint32)
        for r in ready:
            tokens[r.slot], positions[r.slot] = r.tokens[-1], len(r.tokens) - 1
            valid[r.slot] = True
            p = r.params
            temperature[r.slot], top_k[r.slot], top_p[r.slot], keys[r.slot] = p.temperature, p.top_k, p.top_p, r.key
        width = _pow2(max(len(r.pages) for r in ready))
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
        finished = []
        for r in ready:
            for j in range(n):
                r.stops.push(r.row, int(toks[r.slot, j]), float(logprobs[r.slot, j]))
                r.computed += 1
                if r.row.done:
                    break
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
        """One scheduling round; returns the requests that finished in it."""
        self._admit()
        self._prefill()
        return self._decode()


class AsyncLLM:
    """asyncio front of an LLM's engine, for a server to sit on: `generate` streams StreamChunks of one
    request, `cancel` ends one. A background task runs engine steps in a worker thread while any
    request is open, so the event loop stays free."""

    def __init__(self, llm):
        self.llm = llm
        self.engine = llm.engine
        self._lock = threading.Lock()
        self._streams: dict[Request, tuple[asyncio.Queue, list]] = {}
        self._task: asyncio.Task | None = None

    def _locked(self, fn, *args):
        with self._lock:
            return fn(*args)

    async def submit(self, prompt, params: SamplingParams | None = None, chat: bool = False) -> Request:
        ids = self.llm._prompt_ids(prompt if isinstance(prompt, str) else [prompt], chat)[0]
        params = self.llm._params_list(params, 1)[0]
        req = await asyncio.to_thread(self._locked, self.engine.add, ids, params)
        self._streams[req] = (asyncio.Queue(), [0, ""])
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run())
        return req

    async def stream(self, req: Request):
        queue, _ = self._streams[req]
        try:
            while True:
                chunk = await queue.get()
                yield chunk
                if chunk.finish_reason is not None:
                    return
        finally:
            self._streams.pop(req, None)

    async def generate(self, prompt, params: SamplingParams | None = None, chat: bool = False):
        """Async iterator of StreamChunks for one prompt."""
        req = await self.submit(prompt, params, chat)
        async for chunk in self.stream(req):
            yield chunk

    async def cancel(self, req: Request) -> None:
        await asyncio.to_thread(self._locked, self.engine.cancel, req)
        self._publish()

    def _publish(self) -> None:
        from jaxinfer.llm import StreamChunk

        for req, (queue, sent) in list(self._streams.items()):
            done = req.row.done
            if len(req.row.ids) == sent[0] and not done:
                continue
            text = req.stops.completion(req.row).text if self.llm.tokenizer else ""
            queue.put_nowait(
                StreamChunk(text[len(sent[1]) :], req.row.ids[sent[0] :], req.row.finish if done else None)
            )
            sent[0], sent[1] = len(req.row.ids), text
            if done:
                self._streams[req] = (queue, [len(req.row.ids), text, "sent"])

    async def _run(self) -> None:
        while self.engine.has_work():
            await asyncio.to_thread(self._locked, self.engine.step)
            self._publish()
