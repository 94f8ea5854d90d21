"""The compiled step functions: plain functions over (graphdef, state) pytrees, jitted once per shape.

The model graph is split once at load; each step merges it inside the trace, so no Python object
traversal happens per step. The KV cache is donated to every step and updated in place.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from jaxinfer.sampling import sample
from models.kv_cache import KVCache, PagedKVCache, SeqPagedKVCache
from models.ring_attention import Ring, SeqKV


def forward(graphdef, state, tokens, positions, cache, *, kv_len=0, logit_index=None):
    model = nnx.merge(graphdef, state)
    return model(tokens, positions, cache, kv_len=kv_len, logit_index=logit_index)


def forward_seq(graphdef, state, tokens, positions, cache: KVCache, ring: Ring, *, logit_index=None, write=True):
    """`forward` of a whole prompt with its tokens split over the `sp` mesh axis (models/ring_attention.py):
    zigzag layout, ring attention, and each layer's K/V written into the unsplit contiguous `cache` as
    the ring passes it round (kept when `write`). Returns logits in the prompt's own order ([B, T, V], or [B, 1, V] at
    `logit_index`) and the cache."""
    t = tokens.shape[1]
    tokens, positions, _, inverse = ring.layout(tokens, positions)
    kv = SeqKV.contiguous(ring, cache)
    if logit_index is not None:
        logit_index = jnp.asarray(inverse, jnp.int32)[logit_index]
    logits, kv = forward(graphdef, state, tokens, positions, kv, logit_index=logit_index)
    if logit_index is None:
        logits = logits[:, inverse[:t]]
    return logits, (kv.as_cache() if write else cache)


@functools.partial(jax.jit, static_argnames=("graphdef", "greedy_only", "ring"), donate_argnames=("cache",))
def prefill(graphdef, state, cache, tokens, lengths, sampling, *, greedy_only, ring: Ring | None = None):
    """Right-padded prompts tokens [B, T] with true lengths [B] -> first new token and logprob [B]. With
    a `ring`, the prompt is split over the sp mesh axis (`forward_seq`)."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if ring is None:
        logits, cache = forward(graphdef, state, tokens, positions, cache, kv_len=t, logit_index=lengths - 1)
    else:
        logits, cache = forward_seq(graphdef, state, tokens, positions, cache, ring, logit_index=lengths - 1)
    tok, logprob = sample(logits[:, 0], *sampling, positions=lengths, greedy_only=greedy_only)
    return tok, logprob, cache


@functools.partial(
    jax.jit, static_argnames=("graphdef", "n_steps", "greedy_only", "top_logprobs"), donate_argnames=("cache",)
)
def decode(graphdef, state, cache, tokens, positions, sampling, *, n_steps, greedy_only, top_logprobs=0):
    """`n_steps` decode steps in one program: tokens [B] sit at positions [B]; returns the next
    n_steps tokens and logprobs [B, n_steps] and the cache, and with top_logprobs=k > 0 also each
    step's k most likely tokens: ids and logprobs [B, n_steps, k]."""
    kv_len = cache.k.shape[3] if isinstance(cache, KVCache) else 0  # the paged cache reads its block tables

    def step(carry, _):
        tok, pos, cache = carry
        logits, cache = forward(graphdef, state, tok[:, None], pos[:, None], cache, kv_len=kv_len)
        out = sample(logits[:, 0], *sampling, positions=pos + 1, greedy_only=greedy_only, top_logprobs=top_logprobs)
        return (out[0], pos + 1, cache), out

    (_, _, cache), outs = jax.lax.scan(step, (tokens, positions, cache), length=n_steps)
    if not top_logprobs:
        return outs[0].T, outs[1].T, cache
    return outs[0].T, outs[1].T, cache, outs[2].transpose(1, 0, 2), outs[3].transpose(1, 0, 2)


@functools.partial(jax.jit, static_argnames=("graphdef", "split"), donate_argnames=("k", "v"))
def prefill_chunk(graphdef, state, k, v, block_tables, valid, tokens, positions, split: Ring | None = None):
    """Writes the keys/values of one prompt chunk tokens [1, C] at `positions` into the pages k/v; with
    a `split` (sp > 1) the pages are split over sp and so are the chunk's tokens, contiguous, attending
    to every rank's pages (models/kv_cache.SeqPagedKVCache): a chunk after the prompt's first or after a
    cached prefix (a first chunk takes `prefill_chunk_ring`)."""
    if split is None:
        cache = PagedKVCache(k, v, block_tables, valid)
    else:
        tokens, positions, valid = split.split_chunk(tokens, positions, valid)
        cache = SeqPagedKVCache(k, v, block_tables, valid, split)
    _, cache = forward(graphdef, state, tokens, positions, cache, logit_index=jnp.zeros(tokens.shape[:1], jnp.int32))
    return cache.k, cache.v


@functools.partial(jax.jit, static_argnames=("graphdef", "split"), donate_argnames=("k", "v"))
def prefill_chunk_ring(graphdef, state, k, v, block_tables, valid, tokens, positions, split: Ring):
    """`prefill_chunk` for a first chunk (no cached prefix) over pages split over sp: the chunk's tokens
    split over sp in zigzag order with ring attention among them (as `forward_seq`), each layer's K/V
    written into the pages as the ring passes it round, each rank keeping its own pages' tokens."""
    b, t = tokens.shape
    # Padding tokens take a position past every real one, so as keys no real query sees them.
    positions = jnp.where(valid, positions, jnp.iinfo(jnp.int32).max // 2)
    tokens, positions, order, _ = split.layout(tokens, positions)
    valid = jnp.pad(valid, ((0, 0), (0, tokens.shape[1] - t)))[:, order]
    page_size = k.shape[2]
    entry = jnp.minimum(positions // page_size, block_tables.shape[1] - 1)
    pages = jnp.where(valid, jnp.take_along_axis(block_tables, entry, axis=1), 0)
    kv = SeqKV.pages(split, k, v, pages, positions % page_size)
    _, kv = forward(graphdef, state, tokens, positions, kv, logit_index=jnp.zeros(b, jnp.int32))
    return kv.k, kv.v


@functools.partial(jax.jit, static_argnames=("graphdef", "ring"))
def score(graphdef, state, tokens, cache, ring: Ring | None = None):
    """Full-sequence fp32 logits [B, T, V] for tokens [B, T] (positions from 0) over an empty `cache`;
    with a `ring`, split over the sp mesh axis."""
    b, t = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if ring is not None:
        return forward_seq(graphdef, state, tokens, positions, cache, ring, write=False)[0]
    logits, _ = forward(graphdef, state, tokens, positions, cache, kv_len=t)
    return logits
