"""KV caches the decoder layers write to and attend over: contiguous (static batches) and paged (the
serving engine). Both offer `update` (write this step's keys/values for one layer) and `attend`."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp


def attention(q, k, v, q_pos, sliding_window):
    """q [B, T, N, H] against one layer's keys/values [B, K, S, H]; key s is visible to a query at
    position p when s <= p (and p - s < window)."""
    b, t, n, hd = q.shape
    kh = k.shape[1]
    q = q.reshape(b, t, kh, n // kh, hd).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    scores = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    key_pos = jnp.arange(k.shape[2])
    visible = key_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if sliding_window:
        visible &= key_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksh->bkgth", probs, v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, hd)


class KVCache(NamedTuple):
    """Contiguous cache, k and v each [layers, batch, cache_heads, cache_seq, head_dim]: each head's keys
    are contiguous, so attention contracts them without a transpose."""

    k: jax.Array
    v: jax.Array

    def update(self, layer, k, v, q_pos) -> KVCache:
        rows = jnp.arange(k.shape[0])[:, None]
        # [B, T, K, H] into [layer, B, K, S, H] at each row's positions (advanced indices go first)
        return KVCache(*(c.at[layer, rows, :, q_pos].set(x.astype(c.dtype), mode="drop") for c, x in zip(self, (k, v))))

    def attend(self, layer, q, q_pos, kv_len: int, sliding_window, kernel=None):
        k, v = (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False)[:, :, :kv_len] for c in self)
        return attention(q, k, v, q_pos, sliding_window)

    def rows(self, start, size: int) -> KVCache:
        """The cache of batch rows [start, start + size) (a pipeline micro-batch)."""
        return KVCache(*(jax.lax.dynamic_slice_in_dim(c, start, size, axis=1) for c in self))

    def put_rows(self, view: KVCache, start) -> KVCache:
        return KVCache(*(jax.lax.dynamic_update_slice_in_dim(c, w, start, axis=1) for c, w in zip(self, view)))


CACHE_AXES = ("layers", "batch", "cache_heads", "cache_seq", "head_dim")
PAGE_AXES = ("layers", None, None, "cache_heads", "head_dim")


class PagedKVCache(NamedTuple):
    """Pages k and v each [layers, pages, page_size, cache_heads, head_dim]; row b of `block_tables`
    [B, pages_per_seq] lists the pages of the sequence in slot b. Tokens whose `valid` [B, T] is False
    (padding, idle slots) write to page 0, which no sequence owns."""

    k: jax.Array
    v: jax.Array
    block_tables: jax.Array
    valid: jax.Array

    def update(self, layer, k, v, q_pos) -> PagedKVCache:
        page_size = self.k.shape[2]
        pages = jnp.take_along_axis(self.block_tables, q_pos // page_size, axis=1)  # [B, T]
        pages = jnp.where(self.valid, pages, 0)
        offsets = q_pos % page_size
        k_new, v_new = (c.at[layer, pages, offsets].set(x.astype(c.dtype)) for c, x in zip((self.k, self.v), (k, v)))
        return self._replace(k=k_new, v=v_new)

    def attend(self, layer, q, q_pos, kv_len: int, sliding_window, kernel: Callable | None = None):
        # Both paths read the whole pool at `layer`: slicing one layer out first would copy it every step.
        if kernel is not None and q.shape[1] == 1 and not sliding_window:
            return kernel(q[:, 0], self.k, self.v, q_pos[:, 0] + 1, self.block_tables, layer)[:, None]
        b = q.shape[0]
        # Gather each sequence's pages into a contiguous [B, K, S, H] view (the XLA path).
        k, v = (
            c[layer, self.block_tables].reshape(b, -1, *c.shape[3:]).transpose(0, 2, 1, 3) for c in (self.k, self.v)
        )
        return attention(q, k, v, q_pos, sliding_window)

    def rows(self, start, size: int) -> PagedKVCache:
        """Batch rows [start, start + size): their block tables; the pages are shared."""
        tables, valid = (jax.lax.dynamic_slice_in_dim(a, start, size, axis=0) for a in (self.block_tables, self.valid))
        return self._replace(block_tables=tables, valid=valid)

    def put_rows(self, view: PagedKVCache, start) -> PagedKVCache:
        return self._replace(k=view.k, v=view.v)
