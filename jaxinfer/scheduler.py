"""The serving engine's scheduler: pure Python and numpy, no device. It decides; the executor runs.

Each `schedule()` admits waiting requests into free slots (reusing cached prefix pages), plans prompt
chunks of the oldest requests still reading their prompts, then plans one decode call over every
request whose prompt is in the cache, and returns all of it as a `SchedulerOutput` of host arrays.
`update_from_output` applies the sampled tokens (stop rules, finishing, freeing pages). When pages run
out the newest running request is preempted: its pages are released and it is recomputed later.

Page decisions are made in the order the steps run (prefill chunks, then decode), so a plan is what
running the steps one after another would have decided. A planned chunk counts as computed, and its
full pages as cached, from the moment it is planned: nothing reads either before the chunk has run
(prefix lookups happen at admission, in a later step); a chunk that fails is taken back (`chunk_failed`).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging

import numpy as np

from jaxinfer.errors import JaxinferError
from jaxinfer.outputs import Row, Stops
from jaxinfer.sampling import MAX_TOP_LOGPROBS, SamplingParams

log = logging.getLogger(__name__)


class PageAllocator:
    """Pages 1..num_pages-1 (page 0 is the null page idle slots write to). Full pages of computed
    prompt blocks are registered under the hash chain of their tokens; when their last user leaves
    they stay cached, least recently used first out, until an allocation needs them.

    With `ranks` > 1 (sp > 1) the pool is split over the sp devices by page id: rank r holds pages
    [r*num_pages/ranks, (r+1)*num_pages/ranks) (the sharding of the pool's page axis), and each rank
    has its own free list and its own least-recently-used cached pages. `allocate(rank)` takes a page
    of that rank only: the scheduler deals a sequence's pages round robin (block i on rank i % ranks),
    which balances memory and decode work across the ranks as a sequence grows, and lets each rank
    read just every ranks-th entry of a block table (models/ring_attention.Ring.paged_attend). A prefix
    cache hit keeps the dealing: block i of a prompt is always block i, so its cached page is on rank
    i % ranks."""

    def __init__(self, num_pages: int, ranks: int = 1):
        if num_pages % ranks:
            raise JaxinferError(
                f"num_pages={num_pages} does not split over {ranks} sp ranks; use a multiple of {ranks}"
            )
        self.ranks, self.per_rank = ranks, num_pages // ranks
        self.free = [collections.deque(range(max(1, r * self.per_rank), (r + 1) * self.per_rank)) for r in range(ranks)]
        self.refs = [0] * num_pages
        self.hash_of: dict[int, int] = {}
        self.page_of: dict[int, int] = {}
        self.unused = [collections.OrderedDict() for _ in range(ranks)]  # per rank: cached pages no one uses
        self.hits = 0  # prefix pages reused

    def rank(self, page: int) -> int:
        return page // self.per_rank

    def available(self, rank: int | None = None) -> int:
        """Pages an allocation could take (free or cached but unused), of one rank or of all."""
        ranks = range(self.ranks) if rank is None else (rank,)
        return sum(len(self.free[r]) + len(self.unused[r]) for r in ranks)

    def allocate(self, rank: int = 0) -> int | None:
        """A page of `rank` (evicting its least recently used cached page when none is free), or None."""
        if self.free[rank]:
            page = self.free[rank].popleft()
        elif self.unused[rank]:
            page, _ = self.unused[rank].popitem(last=False)
            del self.page_of[self.hash_of.pop(page)]
        else:
            return None
        self.refs[page] = 1
        return page

    def release(self, page: int) -> None:
        self.refs[page] -= 1
        if self.refs[page] == 0:
            if page in self.hash_of:
                self.unused[self.rank(page)][page] = None
            else:
                self.free[self.rank(page)].append(page)

    def lookup(self, block_hash: int) -> int | None:
        page = self.page_of.get(block_hash)
        if page is not None:
            if self.refs[page] == 0:
                del self.unused[self.rank(page)][page]
            self.refs[page] += 1
            self.hits += 1
        return page

    def register(self, page: int, block_hash: int) -> bool:
        """Caches `page` under `block_hash`; False when either is cached already."""
        if block_hash in self.page_of or page in self.hash_of:
            return False
        self.page_of[block_hash] = page
        self.hash_of[page] = block_hash
        return True

    def unregister(self, page: int, block_hash: int) -> None:
        """Forgets `page` as the cache of `block_hash` (its contents were never written)."""
        if self.hash_of.get(page) == block_hash and self.page_of.get(block_hash) == page:
            del self.hash_of[page], self.page_of[block_hash]
            unused = self.unused[self.rank(page)]
            if page in unused:
                del unused[page]
                self.free[self.rank(page)].append(page)


@dataclasses.dataclass(eq=False)
class Request:
    prompt: list[int]
    params: SamplingParams
    row: Row  # generated ids, logprobs, finish reason (or error), token budget
    stops: Stops  # this request's end-of-sequence rules
    id: int = -1  # set when queued; older requests prefill first and are preempted last
    key: np.ndarray | None = None  # threefry key data, set when queued
    pages: list[int] = dataclasses.field(default_factory=list)
    computed: int = 0  # leading tokens whose keys/values are in `pages` (or planned into them)
    hashes: list[int] = dataclasses.field(default_factory=list)  # hash chain of the full pages registered
    slot: int | None = None
    feed: object = None  # AsyncLLM's queue of this request's chunks

    @property
    def tokens(self) -> list[int]:
        return self.prompt + self.row.ids

    @property
    def in_decode(self) -> bool:
        return self.computed == len(self.tokens) - 1


@dataclasses.dataclass(eq=False)
class PrefillChunk:
    """One compiled prefill call: `req`'s prompt tokens at `positions` written into its pages."""

    req: Request
    tokens: np.ndarray  # [1, size] int32, size a power of two up to prefill_chunk
    positions: np.ndarray  # [1, size] int32
    valid: np.ndarray  # [1, size] bool: the first n are real
    block_tables: np.ndarray  # [1, width] int32
    registered: list[tuple[int, int]]  # (page, hash) cached by this chunk, taken back if it fails


@dataclasses.dataclass(eq=False)
class DecodeBatch:
    """One compiled decode call of `n_steps` steps: request r in row r.slot, other rows idle."""

    reqs: list[Request]
    tokens: np.ndarray  # [S] int32, each request's last token
    positions: np.ndarray  # [S] int32
    valid: np.ndarray  # [S, 1] bool
    temperature: np.ndarray  # [S] float32
    top_k: np.ndarray  # [S] int32
    top_p: np.ndarray  # [S] float32
    keys: np.ndarray  # [S, 2] uint32
    block_tables: np.ndarray  # [S, width] int32
    n_steps: int
    top_logprobs: int = 0  # alternatives per token to compute: MAX_TOP_LOGPROBS when a request wants some
    top: tuple | None = None  # set by the executor then: host (ids, logprobs) [S, n_steps, top_logprobs]

    @property
    def greedy_only(self) -> bool:
        return bool(np.all(self.temperature == 0))


@dataclasses.dataclass(eq=False)
class SchedulerOutput:
    """What one step runs, in order: `prefills`, then `decode`. `failed` collects the requests that
    failed in this step (while scheduling, running or updating)."""

    prefills: list[PrefillChunk]
    decode: DecodeBatch | None
    failed: list[Request]


def pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


class Scheduler:
    """Admission, pages, prefix cache, preemption and slots of one engine (not thread-safe: the
    engine's lock guards it)."""

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        max_num_seqs: int,
        prefill_chunk: int,
        decode_steps: int,
        batch_multiple: int = 1,
        page_ranks: int = 1,
    ):
        self.num_pages, self.page_size, self.slots = num_pages, page_size, max_num_seqs
        self.chunk, self.decode_steps, self.batch_multiple = prefill_chunk, decode_steps, batch_multiple
        self.page_ranks = page_ranks  # sp: the pool's pages are split over this many devices
        self.pages = PageAllocator(num_pages, page_ranks)
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []
        self.ids = itertools.count()
        self.preemptions = 0
        self.failures = 0  # requests ended by an error

    # --- requests --------------------------------------------------------------------------------

    def check_fits(self, prompt_len: int, budget: int) -> None:
        """Raises JaxinferError for a request the cache could never hold alone (preemption would only
        ever restart it)."""
        need = -(-(prompt_len + budget + self.decode_steps) // self.page_size)
        sp = self.page_ranks
        if -(-need // sp) > self.num_pages // sp - 1:  # rank 0 holds the first of every sp blocks and the null page
            split = f" ({-(-need // sp)} on the first of the sp={sp} ranks, which holds {self.num_pages // sp - 1})"
            raise JaxinferError(
                f"a prompt of {prompt_len} tokens with max_tokens={budget} needs {need} pages of {self.page_size} "
                f"tokens{split if sp > 1 else ''} but the cache has {self.num_pages - 1}; raise num_pages, or "
                "lower max_tokens or the prompt"
            )

    def add(self, req: Request) -> None:
        """Queues `req` (its key set) behind the waiting ones."""
        req.id = next(self.ids)
        self.waiting.append(req)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def free_pages(self) -> int:
        return self.pages.available()

    def remove(self, req: Request) -> None:
        """Takes `req` out of this scheduler (only: its pages are this one's) and frees its pages."""
        if req in self.waiting:
            self.waiting.remove(req)
        elif req in self.running:
            self.running.remove(req)
        else:
            return
        self._release(req)

    def cancel(self, req: Request) -> None:
        self.remove(req)
        if req.row.finish is None:
            req.row.finish = "cancelled"

    def fail(self, req: Request, error: BaseException, failed: list[Request] | None = None) -> None:
        """Ends `req` with finish_reason "error" and the message, and frees its pages; appends it to
        `failed` (a step's list of failed requests) when given."""
        if failed is not None:
            failed.append(req)
        self.remove(req)
        if req.row.error is None:
            log.error("request %d failed: %s: %s", req.id, type(error).__name__, error, exc_info=error)
            req.row.error = str(error) if isinstance(error, JaxinferError) else f"{type(error).__name__}: {error}"
            req.row.finish = "error"
            self.failures += 1

    def cache_lost(self) -> None:
        """The page pool's contents are gone: every running request goes back to wait (oldest first),
        and the cached prefixes are forgotten."""
        for r in sorted(self.running, key=lambda r: r.id, reverse=True):
            self.running.remove(r)
            self._release(r)
            self.waiting.appendleft(r)
        self.pages = PageAllocator(self.num_pages, self.page_ranks)

    # --- pages -----------------------------------------------------------------------------------

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
            page = self.pages.allocate(len(req.pages) % self.page_ranks)  # dealt round robin over the sp ranks
            if page is None:
                if self._preempt_newest() is req:
                    return False
                continue
            req.pages.append(page)
        return True

    def _fits(self, req: Request, pages: int) -> bool:
        """Whether `req` could grow to `pages` pages now: on each sp rank, its blocks there against the
        pages that rank can give."""
        blocks = range(len(req.pages), pages)
        sp = self.page_ranks
        return all(self.pages.available(r) >= sum(1 for i in blocks if i % sp == r) for r in range(sp))

    def _block_hashes(self, tokens: list[int]) -> list[int]:
        out, h = [], 0
        for i in range(len(tokens) // self.page_size):
            h = hash((h, tuple(tokens[i * self.page_size : (i + 1) * self.page_size])))
            out.append(h)
        return out

    def _register_full_pages(self, req: Request) -> list[tuple[int, int]]:
        hashes, new = self._block_hashes(req.tokens[: req.computed]), []
        for i in range(len(req.hashes), len(hashes)):
            if self.pages.register(req.pages[i], hashes[i]):
                new.append((req.pages[i], hashes[i]))
        req.hashes = hashes
        return new

    # --- scheduling ------------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Admits, plans the prefill chunks and the decode call of one step."""
        out = SchedulerOutput([], None, [])
        self._admit(out.failed)
        self._plan_prefills(out)
        out.decode = self.schedule_decode(out.failed)
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
                fits = self._fits(req, -(-first // self.page_size))
            except Exception as e:
                self.fail(req, e, failed)
                continue
            if not fits:
                self._release(req)
                break
            self.waiting.popleft()
            req.slot = free_slots.pop(0)
            self.running.append(req)

    def _plan_prefills(self, out: SchedulerOutput) -> None:
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
                size = min(self.chunk, max(16, pow2(n)))  # chunk shapes: powers of two up to prefill_chunk
                tokens, positions = np.zeros((1, size), np.int32), np.zeros((1, size), np.int32)
                tokens[0, :n] = req.tokens[req.computed : end]
                positions[0, :n] = np.arange(req.computed, end)
                valid = np.zeros((1, size), bool)
                valid[0, :n] = True
                tables = np.zeros((1, pow2(-(-end // self.page_size))), np.int32)
                tables[0, : len(req.pages)] = req.pages
                budget -= n
                req.computed = end
                out.prefills.append(PrefillChunk(req, tokens, positions, valid, tables, self._register_full_pages(req)))
            except Exception as e:
                self.fail(req, e, out.failed)

    def chunk_failed(self, chunk: PrefillChunk, error: BaseException, out: SchedulerOutput) -> None:
        """A planned chunk did not run: its request fails and the pages it cached are forgotten."""
        for page, block_hash in chunk.registered:
            self.pages.unregister(page, block_hash)
        self.fail(chunk.req, error, out.failed)

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

    def schedule_decode(self, failed: list[Request]) -> DecodeBatch | None:
        """The decode call over every running request whose prompt is in the cache (None when none
        is), pages for its `decode_steps` new tokens allocated (oldest first: preemption takes the newest)."""
        n = self.decode_steps
        for r in sorted((r for r in self.running if r.in_decode), key=lambda r: r.id):
            if r in self.running:
                try:
                    self._ensure_pages(r, len(r.tokens) - 1 + n)
                except Exception as e:
                    self.fail(r, e, failed)
        ready, inputs = [], []
        for r in [r for r in self.running if r.in_decode]:
            try:
                inputs.append(self._inputs(r))
                ready.append(r)
            except Exception as e:
                self.fail(r, e, failed)
        if not ready:
            return None
        s = self.decode_rows(max(r.slot for r in ready) + 1)
        tokens, positions = np.zeros(s, np.int32), np.zeros(s, np.int32)
        valid = np.zeros((s, 1), bool)
        temperature, top_k = np.zeros(s, np.float32), np.zeros(s, np.int32)
        top_p, keys = np.ones(s, np.float32), np.zeros((s, 2), np.uint32)
        tables = np.zeros((s, pow2(max(len(r.pages) for r in ready))), np.int32)
        for r, row in zip(ready, inputs):
            i = r.slot
            tokens[i], positions[i], temperature[i], top_k[i], top_p[i], keys[i] = row
            valid[i] = True
            tables[i, : len(r.pages)] = r.pages
        top = MAX_TOP_LOGPROBS if any(r.params.top_logprobs for r in ready) else 0  # one more shape, not 20
        return DecodeBatch(ready, tokens, positions, valid, temperature, top_k, top_p, keys, tables, n, top)

    def decode_rows(self, slots_in_use: int) -> int:
        """Rows of a decode call: slots fill lowest first, so a power of two of the slots in use (not all
        of them), a multiple of `batch_multiple` (the batch splits over dp)."""
        m = self.batch_multiple
        return m * pow2(-(-min(self.slots, pow2(slots_in_use)) // m))

    def update_from_output(self, out: SchedulerOutput, tokens: np.ndarray | None, logprobs: np.ndarray | None):
        """Applies the decode call's sampled tokens and logprobs [S, n_steps] (None: no decode ran):
        stop rules per token; finished requests leave and free their pages. Returns the step's failed,
        then its finished requests."""
        finished = []
        top = out.decode.top if out.decode is not None else None
        for r in out.decode.reqs if out.decode is not None and tokens is not None else ():
            if r not in self.running:
                continue
            try:
                for j in range(out.decode.n_steps):
                    token, logprob = int(tokens[r.slot, j]), float(logprobs[r.slot, j])
                    if top is None:
                        r.stops.push(r.row, token, logprob)
                    else:
                        r.stops.push(r.row, token, logprob, (top[0][r.slot, j], top[1][r.slot, j]))
                    r.computed += 1
                    if r.row.done:
                        break
            except Exception as e:
                self.fail(r, e, out.failed)
                continue
            if r.row.done:
                finished.append(r)
        for r in finished:
            self.running.remove(r)
            self._release(r)
        return out.failed + finished

    def shapes(self, max_seq_len: int) -> tuple[list[int], list[int], list[int]]:
        """Every (prefill chunk size, block-table width, decode rows) this scheduler can plan."""
        widths = [1 << i for i in range((-(-max_seq_len // self.page_size) - 1).bit_length() + 1)]
        rows = sorted({self.decode_rows(1 << i) for i in range(self.slots.bit_length() + 1)})
        sizes = sorted({min(self.chunk, max(16, 1 << i)) for i in range(self.chunk.bit_length() + 1)})
        return sizes, widths, rows
