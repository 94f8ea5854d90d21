"""The serving engine's executor: runs the compiled steps on the mesh for a scheduler's plan and owns
the page pool (cache_k/cache_v, donated to every step; each a models.kv_cache.QuantKV of values and
scales when kv_cache_dtype is fp8 or int8). Host arrays go in, host numpy comes out.

Also `decode_chunks`, the one host loop over `steps.decode` calls that the static path and the
benchmark share.
"""

from __future__ import annotations

import itertools

import jax
import numpy as np

from jaxinfer import steps
from jaxinfer.sampling import SamplingParams
from jaxinfer.scheduler import DecodeBatch, PrefillChunk, Scheduler
from models import kv_cache
from models.kv_cache import PAGE_AXES, PagedKVCache


def pool_layout(llm, num_pages: int, page_size: int) -> tuple:
    """The abstract page pool (k, v) as llm's kv_cache_dtype stores it, shardings included."""
    return llm.setup.cache_layout(llm.setup.page_shape(num_pages, page_size), PAGE_AXES)


def pool_bytes(llm, num_pages: int, page_size: int) -> int:
    """Bytes of the k and v pages one device holds, with their scales when quantized."""
    return kv_cache.device_bytes(pool_layout(llm, num_pages, page_size))


def default_num_pages(llm, page_size: int, fraction: float, needed: int) -> int:
    """Pages that fit in `fraction` of the memory one device has left after the weights (on CPU, of
    the host's available memory shared by the simulated devices), at most `needed`; a multiple of sp
    (the pool splits over the sp devices, so a page costs each of them 1/sp of its bytes)."""
    dev = next(d for d in llm.mesh.devices.flat if d.process_index == jax.process_index())
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    if stats and "bytes_limit" in stats:
        free = stats["bytes_limit"] - stats.get("bytes_in_use", 0)
    else:
        with open("/proc/meminfo") as f:
            meminfo = dict(line.split(":", 1) for line in f)
        free = int(meminfo["MemAvailable"].split()[0]) * 1024 // max(1, len(jax.local_devices()))
    sp = llm.mesh.shape["sp"]
    per_rank_page = pool_bytes(llm, sp, page_size)  # values and scales: fp8/int8 take 1 byte + 4 per token and head
    pages = min(-(-needed // sp), int(fraction * free) // per_rank_page) * sp
    return max(pages, 2 if sp == 1 else 2 * sp)


def decode_chunks(graphdef, state, cache, tokens, positions: np.ndarray, sampling, *, put, n_steps, greedy_only):
    """Successive `steps.decode` calls of `n_steps` steps each from tokens [B] (host or device) at host
    positions [B]: yields each call's device (tokens, logprobs) [B, n_steps]; the last token of each
    call feeds the next without leaving the device. The caller stops iterating when its rows are done."""
    positions = np.asarray(positions, np.int32)
    tokens = put(tokens)  # every call's tokens laid out alike (a slice's own layout would compile again)
    while True:
        toks, logprobs, cache = steps.decode(
            graphdef, state, cache, tokens, put(positions), sampling, n_steps=n_steps, greedy_only=greedy_only
        )
        # Dispatched before the caller waits on this call, so it overlaps the call running on the device.
        tokens, positions = put(toks[:, -1]), positions + n_steps
        yield toks, logprobs


class Executor:
    """Runs `PrefillChunk`s and `DecodeBatch`es on `llm`'s mesh with the paged decode graph."""

    def __init__(self, llm, num_pages: int, page_size: int):
        self.llm, self.num_pages, self.page_size = llm, num_pages, page_size
        self.graphdef = llm.paged_graphdef()
        self.split = llm.setup.page_split  # sp > 1: the pool's pages are split over sp (models/kv_cache.PagedKVCache)
        self._split_arg = {} if self.split is None else {"split": self.split}  # (jit keys an explicit None apart)
        self.cache_k = self.cache_v = None
        self.new_cache()

    def new_cache(self) -> None:
        """A fresh, empty page pool (cache_k stays None when making it fails: the next step retries)."""
        self.cache_k = self.cache_v = None
        self.cache_k, self.cache_v = kv_cache.empty(pool_layout(self.llm, self.num_pages, self.page_size))

    def ring_chunk(self, chunk: PrefillChunk) -> bool:
        """Whether `chunk` runs split over sp with ring attention: sp > 1, the prompt's first chunk (no
        cached prefix to read) and at least 2·sp tokens. The others (later chunks, a first new chunk
        after a cached prefix, a short one) split their tokens over sp too and attend to the split pool
        (`steps.prefill_chunk`)."""
        return self.split is not None and chunk.positions[0, 0] == 0 and chunk.valid.sum() >= 2 * self.split.size

    def prefill(self, chunk: PrefillChunk) -> None:
        """Writes one prompt chunk's keys/values into its pages."""
        step = steps.prefill_chunk_ring if self.ring_chunk(chunk) else steps.prefill_chunk
        self.cache_k, self.cache_v = step(
            self.graphdef,
            self.llm.state,
            self.cache_k,
            self.cache_v,
            chunk.block_tables,
            chunk.valid,
            chunk.tokens,
            chunk.positions,
            **self._split_arg,
        )

    def decode(self, batch: DecodeBatch) -> tuple[np.ndarray, np.ndarray]:
        """Runs the decode call; returns host tokens and logprobs [S, n_steps] (and sets `batch.top` to
        the most likely alternatives when the batch asks for them)."""
        put = self.llm.setup.put
        cache = PagedKVCache(self.cache_k, self.cache_v, batch.block_tables, batch.valid, self.split)
        sampling = tuple(put(a) for a in (batch.temperature, batch.top_k, batch.top_p, batch.keys))
        toks, logprobs, cache, *top = steps.decode(
            self.graphdef,
            self.llm.state,
            cache,
            put(batch.tokens),
            put(batch.positions),
            sampling,
            n_steps=batch.n_steps,
            greedy_only=batch.greedy_only,
            # (only when asked: jit keys an explicit default apart from an omitted one, and warmup omits it)
            **({"top_logprobs": batch.top_logprobs} if batch.top_logprobs else {}),
        )
        self.cache_k, self.cache_v = cache.k, cache.v
        if top:
            batch.top = tuple(np.asarray(a) for a in top)
        return np.asarray(toks), np.asarray(logprobs)

    def cache_intact(self) -> bool:
        """After a failed call: whether the pool survived it (it was donated; it may hold the error)."""
        try:
            if any(a.is_deleted() for a in jax.tree.leaves((self.cache_k, self.cache_v))):
                return False
            jax.block_until_ready((self.cache_k, self.cache_v))  # raises when they hold the error
            return True
        except Exception:
            return False

    def warmup(self, scheduler: Scheduler) -> int:
        """Compiles every prefill-chunk and decode shape `scheduler` can plan, with inputs that only
        touch the null page. Returns the number of shapes."""
        sizes, widths, rows = scheduler.shapes(self.llm.max_seq_len)
        put, zeros, state = self.llm.setup.put, np.zeros, self.llm.state
        chunk_steps = [steps.prefill_chunk] + ([steps.prefill_chunk_ring] if self.split is not None else [])
        for size, w, step in itertools.product(sizes, widths, chunk_steps):
            self.cache_k, self.cache_v = step(
                self.graphdef,
                state,
                self.cache_k,
                self.cache_v,
                zeros((1, w), np.int32),
                zeros((1, size), bool),
                zeros((1, size), np.int32),
                zeros((1, size), np.int32),
                **self._split_arg,
            )
        params = SamplingParams(temperature=0)
        for s in rows:
            sampling, _ = self.llm.setup.sampling_arrays(params, s, s)
            for w in widths:
                for greedy in (True, False):
                    tables, valid = zeros((s, w), np.int32), zeros((s, 1), bool)
                    cache = PagedKVCache(self.cache_k, self.cache_v, tables, valid, self.split)
                    _, _, cache = steps.decode(
                        self.graphdef,
                        state,
                        cache,
                        put(zeros(s, np.int32)),
                        put(zeros(s, np.int32)),
                        sampling,
                        n_steps=scheduler.decode_steps,
                        greedy_only=greedy,
                    )
                    self.cache_k, self.cache_v = cache.k, cache.v
        return len(sizes) * len(widths) * len(chunk_steps) + 2 * len(rows) * len(widths)
