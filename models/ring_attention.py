"""Sequence parallelism for prefill: ring attention over the `sp` mesh axis (Liu et al. 2023).

A prompt of T tokens (padded to a multiple of 2·sp) is cut into 2·sp chunks and laid out in the
load-balanced zigzag order: sp rank i holds chunks i and 2·sp-1-i, so under the causal mask every rank
has the same work. Tokens carry their true positions, so rotary angles and the causal mask follow the
prompt, not the layout. Everything outside attention is token-wise and stays split on `seq`.

Attention runs in `jax.shard_map` (manual over every mesh axis, specs from the rules table): each of
the sp steps attends the local queries to the K/V block it holds while `ppermute` passes that block
(with its positions) to the next rank, and the partial outputs merge by log-sum-exp (running max and
sum in float32).

This slice keeps the static path's contiguous cache unsplit: `SeqKV` stands in for the cache while
the layers run (each layer's K/V stays split on `seq`, no collective inside the layers), and
`SeqKV.write` scatters all layers into the ordinary contiguous cache once after prefill (that is the
one all-gather of K/V), so decode runs on the full cache as before. A cache split over sp for decode
(and the paged engine) is the next slice.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer import sharding
from models import kv_cache
from models.kv_cache import KVCache, QuantKV


def zigzag_order(t: int, sp: int) -> np.ndarray:
    """Token indices in zigzag order for t tokens (t a multiple of 2·sp): rank i's contiguous share of
    the result is chunks i and 2·sp-1-i of the prompt."""
    c = t // (2 * sp)
    chunks = np.arange(t).reshape(2 * sp, c)
    return np.concatenate([np.concatenate([chunks[i], chunks[2 * sp - 1 - i]]) for i in range(sp)])


def padded_length(t: int, sp: int) -> int:
    return -(-t // (2 * sp)) * (2 * sp)


def _block(q, k, v, q_pos, k_pos, sliding_window):
    """One ring step's partial attention: q [B, K, G, T, H] against k/v [B, S, K, H] with positions
    q_pos [B, T], k_pos [B, S] -> unnormalised output [B, K, G, T, H] (float32), row max and row sum
    [B, K, G, T] (float32)."""
    hd = q.shape[-1]
    scores = jnp.einsum("bkgth,bskh->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    visible = k_pos[:, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if sliding_window:
        visible &= k_pos[:, None, :] > q_pos[:, :, None] - sliding_window
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1)
    # A row that sees nothing in this block has m = -inf; exp(-inf - 0) = 0 keeps it out of the sum.
    p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)[..., None])
    out = jnp.einsum("bkgts,bskh->bkgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out, m, jnp.sum(p, axis=-1)


def _merge(acc, part):
    """Log-sum-exp merge of two partial results (out, max, sum)."""
    o1, m1, l1 = acc
    o2, m2, l2 = part
    m = jnp.maximum(m1, m2)
    safe = jnp.where(jnp.isfinite(m), m, 0.0)
    a1, a2 = jnp.exp(m1 - safe), jnp.exp(m2 - safe)
    return o1 * a1[..., None] + o2 * a2[..., None], m, l1 * a1 + l2 * a2


def ring_attention_local(q, k, v, q_pos, *, axis: str, size: int, sliding_window):
    """Per-rank body (inside shard_map): q [B, T, N, H], k/v [B, T, K, H], q_pos [B, T] of this rank's
    tokens; returns [B, T, N, H]. Step 0 is the rank's own block, where every query sees at least
    itself, so the running max is finite from then on."""
    b, t, n, hd = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, hd).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    perm = [(i, (i + 1) % size) for i in range(size)]
    block, acc = (k, v, q_pos), None
    for step in range(size):
        # Sent before this step's compute, so the transfer can overlap it.
        nxt = jax.lax.ppermute(block, axis, perm) if step < size - 1 else None
        part = _block(qg, block[0], block[1], q_pos, block[2], sliding_window)
        acc = part if acc is None else _merge(acc, part)
        block = nxt
    out, _, total = acc
    out = out / total[..., None]
    return out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, n, hd)


@dataclasses.dataclass(frozen=True)
class Ring:
    """How the prefill's sequence is split: the mesh, the rules table (a sorted tuple of items, so a Ring
    is hashable and can be a static jit argument) and the activation dtype (its name)."""

    mesh: Mesh
    rules: tuple
    dtype: str

    @property
    def size(self) -> int:
        return self.mesh.shape[self.axis]

    @property
    def axis(self) -> str:
        return dict(self.rules)["seq"]

    def spec(self, *logical) -> P:
        return sharding.spec(logical, dict(self.rules))

    def constrain(self, x, *logical):
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(*logical)))

    def attention(self, q, k, v, q_pos, sliding_window):
        """q [B, T, N, H], k/v [B, T, K, H] (K = cache heads), q_pos [B, T], all in zigzag order and split
        on `seq` -> attention output [B, T, N, H] split alike."""
        body = functools.partial(ring_attention_local, axis=self.axis, size=self.size, sliding_window=sliding_window)
        qs, ks, ps = (
            self.spec("batch", "seq", "q_heads", None),
            self.spec("batch", "seq", "cache_heads", None),
            self.spec("batch", "seq"),
        )
        return jax.shard_map(body, mesh=self.mesh, in_specs=(qs, ks, ks, ps), out_specs=qs, check_vma=False)(
            q, k, v, q_pos
        )

    def layout(self, tokens, positions):
        """tokens/positions [B, T] -> padded to a multiple of 2·sp (pad positions continue past T), in
        zigzag order and split on `seq`; also the order (host indices) and its inverse."""
        b, t = tokens.shape
        tp = padded_length(t, self.size)
        if tp > t:
            tokens = jnp.pad(tokens, ((0, 0), (0, tp - t)))
            extra = positions[:, -1:] + jnp.arange(1, tp - t + 1, dtype=positions.dtype)
            positions = jnp.concatenate([positions, extra], axis=1)
        order = zigzag_order(tp, self.size)
        inverse = np.argsort(order)
        tokens, positions = (self.constrain(a[:, order], "batch", "seq") for a in (tokens, positions))
        return tokens, positions, order, inverse


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SeqKV:
    """Stands in for the KV cache while the layers prefill over `sp`: k and v [layers, B, T, K, H] in
    zigzag order, split on `seq` (each rank keeps its tokens' K/V; nothing is gathered inside the
    layers). `cache_dtype`: the storage dtype of the cache it will be written to; attention reads K/V
    quantized and dequantized as that cache would hold them, so logits match the unsplit path."""

    k: jax.Array
    v: jax.Array
    ring: Ring = dataclasses.field(metadata=dict(static=True))
    cache_dtype: str = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def empty(cls, ring: Ring, cache: KVCache, t: int) -> SeqKV:
        """Room for t tokens of every layer of `cache` (a contiguous [L, B, K, S, H] cache)."""
        layers, b, kv_heads, _, head_dim = cache.k.shape
        z = jnp.zeros((layers, b, t, kv_heads, head_dim), ring.dtype)
        z = ring.constrain(z, "layers", "batch", "seq", "cache_heads", None)
        return cls(z, z, ring, str(np.dtype(cache.k.dtype)))

    def update(self, layer, k, v, q_pos) -> SeqKV:
        put = lambda c, x: jax.lax.dynamic_update_index_in_dim(c, x.astype(c.dtype), layer, 0)  # noqa: E731
        return dataclasses.replace(self, k=put(self.k, k), v=put(self.v, v))

    def attend(self, layer, q, q_pos, kv_len: int, sliding_window, kernel=None):
        k, v = (jax.lax.dynamic_index_in_dim(c, layer, keepdims=False) for c in (self.k, self.v))
        if kv_cache.quantized(self.cache_dtype):
            k, v = (kv_cache.dequantize(kv_cache.quantize(a, np.dtype(self.cache_dtype)), a.dtype) for a in (k, v))
        return self.ring.attention(q, k, v, q_pos, sliding_window)

    def write(self, cache: KVCache, positions) -> KVCache:
        """Every layer's K/V into the contiguous cache [L, B, K, S, H] at the tokens' true positions (pad
        positions past the cache are dropped): the one gather over `sp`, after the layers."""
        rows = jnp.arange(positions.shape[0])[:, None]
        index = (slice(None), rows, slice(None), positions)  # advanced indices first: [B, T, L, K, H]

        def put(c, x):
            x = x.transpose(1, 2, 0, 3, 4)
            if isinstance(c, QuantKV):
                new = kv_cache.quantize(x, c.dtype)
                return QuantKV(*(a.at[index].set(n, mode="drop") for a, n in zip(c, new)))
            return c.at[index].set(x.astype(c.dtype), mode="drop")

        return KVCache(put(cache.k, self.k), put(cache.v, self.v))
