"""Sequence parallelism for prefill: ring attention over the `sp` mesh axis (Liu et al. 2023).

A prompt of T tokens (padded to a multiple of 2·sp) is cut into 2·sp chunks and laid out in the
load-balanced zigzag order: sp rank i holds chunks i and 2·sp-1-i, so under the causal mask every rank
has the same work. Tokens carry their true positions, so rotary angles and the causal mask follow the
prompt, not the layout. Everything outside attention is token-wise and stays split on `seq`.

Attention runs in `jax.shard_map` (manual over every mesh axis, specs from the rules table): each of
the sp steps attends the local queries to the K/V block it holds while `ppermute` passes that block
(with its positions) to the next rank, and the partial outputs merge by log-sum-exp (running max and
sum in float32). Inside a pipeline stage, manual over pp and sp already (jaxinfer/pipeline.py), the
same per-rank code runs in a shard_map over the remaining axes only (`sharding.shard_map`).

The static path keeps its contiguous cache unsplit: `SeqKV` stands in for the cache while the layers
run (each layer's K/V stays split on `seq`, no collective inside the layers), and `SeqKV.write`
scatters all layers into the ordinary contiguous cache once after prefill (that is the one all-gather
of K/V), so decode runs on the full cache as before.

The serving engine's page pool is split over sp (`Ring.paged_update`, `Ring.paged_attend`): rank r
holds a contiguous range of page ids, a sequence's pages are dealt round robin over the ranks (block i
on rank i % sp, jaxinfer/scheduler.py), each rank writes and attends over its own pages only, and the
partial outputs (with their row max and sum) merge across sp by log-sum-exp after one all-gather per
layer. A prompt's first chunk (nothing cached before it) runs as a static prefill does, zigzag and
ring, and `SeqKV.write_pages` puts every layer's K/V into the pages after the layers. A later chunk
(or a prompt's first new chunk after a cached prefix: the cached part is only read) splits its new
tokens over sp too, contiguous (`Ring.split_chunk`, models/kv_cache.SeqPagedKVCache): outside
attention each rank holds T/sp of them; per layer the chunk's new K/V is gathered over sp and written
to its pages, its queries gathered, every rank attends all of them over its own pages, and one
all-to-all hands each rank its own tokens' partials from every rank to merge. Decode (one token per
sequence, nothing to split) runs replicated over sp: the same attention over pages, merged after one
all-gather of the partials.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import ClassVar

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
    [B, K, G, T] (float32); a long block's queries in tiles (kv_cache.over_query_tiles)."""
    part = functools.partial(_block_rows, k=k, v=v, k_pos=k_pos, sliding_window=sliding_window)
    return kv_cache.over_query_tiles(part, q, q_pos, k.shape[1], axis=3)


def _block_rows(q, q_pos, *, k, v, k_pos, sliding_window):
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
    """How the sequence is split over sp: the mesh, the rules table (a sorted tuple of items, so a Ring
    is hashable and can be a static jit argument), the activation dtype (its name), and for the serving
    engine's decode the attention implementation over a rank's pages: "xla", or the Pallas kernel
    ("pallas", or "interpret" on CPU) returning its partial max and sum."""

    mesh: Mesh
    rules: tuple
    dtype: str
    decode_kernel: str = "xla"

    @property
    def size(self) -> int:
        return self.mesh.shape[self.axis]

    @property
    def axis(self) -> str:
        return dict(self.rules)["seq"]

    def spec(self, *logical) -> P:
        return sharding.spec(logical, dict(self.rules))

    def constrain(self, x, *logical):
        logical = [self._batch(n) if name == "batch" else name for name, n in zip(logical, x.shape)]
        return jax.lax.with_sharding_constraint(x, NamedSharding(self.mesh, self.spec(*logical)))

    def attention(self, q, k, v, q_pos, sliding_window):
        """q [B, T, N, H], k/v [B, T, K, H] (K = cache heads), q_pos [B, T], all in zigzag order and split
        on `seq` -> attention output [B, T, N, H] split alike."""
        body = functools.partial(ring_attention_local, axis=self.axis, size=self.size, sliding_window=sliding_window)
        bn = self._batch(q.shape[0])  # (an engine's prefill chunk is one row, not split over dp)
        qs, ks, ps = (
            self.spec(bn, "seq", "q_heads", None),
            self.spec(bn, "seq", "cache_heads", None),
            self.spec(bn, "seq"),
        )
        return sharding.shard_map(body, self.mesh, (qs, ks, ks, ps), qs)(q, k, v, q_pos)

    # --- the paged cache split over sp (the serving engine) -----------------------------------------

    def _batch(self, b: int) -> str | None:
        """The logical name "batch" when b rows split over its mesh axis, else None (a chunk is one row)."""
        axis = dict(self.rules)["batch"]
        return "batch" if axis is None or b % self.mesh.shape[axis] == 0 else None

    def _pool_spec(self, pool):
        values = self.spec("layers", "pages", None, "cache_heads", "head_dim")
        if isinstance(pool, QuantKV):
            return QuantKV(values, self.spec("layers", "pages", None, "cache_heads", None))
        return values

    def paged_update(self, k_pool, v_pool, k, v, pages, offsets, layer, seq_split: bool = False):
        """Writes new keys/values k/v [B, T, K, H] at global page ids `pages` and `offsets` [B, T] of
        `layer` into pools split over sp by page id (rank r holds ids [r*P/sp, (r+1)*P/sp)): each rank
        writes the tokens whose page it holds and drops the others, so a new token's K/V lands on the
        rank that owns its page. Replicated over sp (decode), every rank has computed every token, so
        nothing crosses sp; with `seq_split` k/v/pages/offsets lie split on `seq` (a later prefill
        chunk) and each rank gathers them over sp first (a token's page may lie on any rank). Over dp the
        rows are gathered first: every dp replica holds the whole pool, so each writes every row.
        layer=None: k/v hold every layer, [L, B, T, K, H] (split on `seq` they are gathered first)."""
        axis, every = self.axis, layer is None

        def body(kp, vp, k, v, pages, offsets, layer):
            if seq_split:  # [B, T/sp, ...] -> [B, T, ...]: the chunk's new K/V, the one gather of this layer's
                k, v = (jax.lax.all_gather(a, axis, axis=1, tiled=True) for a in (k, v))
                pages, offsets = (jax.lax.all_gather(a, axis, axis=1, tiled=True) for a in (pages, offsets))
            n_local = kp.shape[1]
            local = pages - jax.lax.axis_index(axis) * n_local
            local = jnp.where((local >= 0) & (local < n_local), local, n_local)  # another rank's page: dropped
            index = (slice(None) if every else layer, local, offsets)
            return kv_cache.write_at(kp, index, k, mode="drop"), kv_cache.write_at(vp, index, v, mode="drop")

        seq = "seq" if seq_split else None
        pools = (self._pool_spec(k_pool), self._pool_spec(v_pool))
        new = self.spec(*(["layers"] if every else []), None, seq, "cache_heads", None)
        idx = self.spec(None, seq)
        return sharding.shard_map(body, self.mesh, (*pools, new, new, idx, idx, P()), pools)(
            k_pool, v_pool, k, v, pages, offsets, jnp.asarray(0 if every else layer, jnp.int32)
        )

    def paged_attend(self, q, k_pool, v_pool, block_tables, q_pos, layer, sliding_window, seq_split: bool = False):
        """q [B, T, N, H] at positions q_pos [B, T] attends to its sequence's pages of `layer` in pools
        split over sp. A sequence's pages are dealt round robin (block i on rank i % sp, see
        jaxinfer/scheduler.py), so rank r reads only entries r, r + sp, ... of each block table: 1/sp of
        the keys, its own pages. Each rank returns its unnormalised output, row max and row sum; one
        all-gather over sp of those [B, T, N, H + 2] partials per layer, and a log-sum-exp merge on every
        rank, give the output [B, T, N, H] (replicated over sp). A decode step (T = 1) without a sliding
        window takes the Pallas kernel's partials when `decode_kernel` says so; the rest the XLA path.

        With `seq_split`, q and q_pos lie split on `seq` (a later prefill chunk, T/sp tokens per rank):
        each rank gathers the chunk's queries over sp (every query may see keys on every rank), computes
        the partials of all T over its pages, and one all-to-all over sp hands rank r the partials of its
        own T/sp queries from every rank, merged there: the output stays split on `seq`. That moves
        (sp-1)/sp of one rank's [B, T, N, H + 2] partials per rank, 1/sp of what all-gathering them (and
        keeping one's own share) would move, and merges only the rank's own rows."""
        size, axis = self.size, self.axis
        kernel = self.decode_kernel != "xla" and q.shape[1] == 1 and not sliding_window and not seq_split

        def body(q, kp, vp, tables, q_pos, layer):
            if seq_split:  # [B, T/sp, ...] -> [B, T, ...]: every query of the chunk against this rank's pages
                q, q_pos = (jax.lax.all_gather(a, axis, axis=1, tiled=True) for a in (q, q_pos))
            rank = jax.lax.axis_index(axis)
            n_local, ps = kp.shape[1], kp.shape[2]
            b, w = tables.shape
            wr = -(-w // size)  # table entries each rank reads
            tables = jnp.pad(tables, ((0, 0), (0, wr * size - w)))  # (padding: null-page entries, past every position)
            mine = jax.lax.dynamic_index_in_dim(tables.reshape(b, wr, size), rank, axis=2, keepdims=False)  # [B, wr]
            local = mine - rank * n_local
            owned = (local >= 0) & (local < n_local)
            local = jnp.where(owned, local, 0)
            if kernel:
                from pallas_kernels.paged_attention import paged_attention_partial

                # Its rank's column of the table; entries past the length (the null page) it never reads.
                interpret = self.decode_kernel == "interpret"
                parts = paged_attention_partial(
                    q[:, 0], kp, vp, q_pos[:, 0] + 1, local, layer, rank, ranks=size, interpret=interpret
                )
                return merge(*(a[:, None] for a in parts))  # [B, N, H], [B, N] x 2 -> with T = 1
            k, v = (jax.tree.map(lambda a: a[layer, local].reshape(b, wr * ps, *a.shape[3:]), c) for c in (kp, vp))
            key_pos = ((jnp.arange(wr) * size + rank)[:, None] * ps + jnp.arange(ps)).reshape(-1)  # [S]
            visible = jnp.repeat(owned, ps, axis=1)[:, None, :] & (key_pos[None, None, :] <= q_pos[:, :, None])
            if sliding_window:
                visible &= key_pos[None, None, :] > q_pos[:, :, None] - sliding_window
            return merge(*kv_cache.partial_attention(q, k, v, visible))  # [B, T, N, H], [B, T, N] x 2

        def merge(out, m, total):
            parts = jnp.concatenate([out, m[..., None], total[..., None]], axis=-1)  # [B, T, N, H + 2]
            if seq_split:  # rank r receives every rank's partials of its own queries: [sp·B, T/sp, N, H + 2]
                parts = jax.lax.all_to_all(parts, axis, split_axis=1, concat_axis=0, tiled=True)
                parts = parts.reshape(size, -1, *parts.shape[1:])
            else:
                parts = jax.lax.all_gather(parts, axis)  # [sp, B, T, N, H + 2]: the layer's one collective over sp
            return kv_cache.merge_partials(parts[..., :-2], parts[..., -2], parts[..., -1], q.dtype)

        bn, seq = self._batch(q.shape[0]), "seq" if seq_split else None
        qs, rows, tables = self.spec(bn, seq, "q_heads", None), self.spec(bn, seq), self.spec(bn, None)
        pools = (self._pool_spec(k_pool), self._pool_spec(v_pool))
        return sharding.shard_map(body, self.mesh, (qs, *pools, tables, rows, P()), qs)(
            q, k_pool, v_pool, block_tables, q_pos, jnp.asarray(layer, jnp.int32)
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

    def split_chunk(self, *rows):
        """[B, T] arrays of a prefill chunk read against the split pool (tokens, positions, valid) ->
        padded with zeros to a multiple of sp and split on `seq`, contiguous: the attention work is
        spread by pages, not by tokens, so no zigzag is needed. A pad token is not valid (zero is False),
        so it writes only the null page; at position 0 it attends as a real query would, never to a row
        that sees nothing."""
        pad = -rows[0].shape[1] % self.size
        return tuple(self.constrain(jnp.pad(a, ((0, 0), (0, pad))), "batch", "seq") for a in rows)


# A Ring rides in the paged cache's pytree (PagedKVCache.split) as static data, never as arrays.
jax.tree_util.register_static(Ring)


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
    splits_seq: ClassVar[bool] = True  # the layers' tokens lie split on `seq` (models/moe.py keeps them so)
    sp_dim: ClassVar[int] = 2  # k/v [L, B, T, K, H] split over sp on T

    @classmethod
    def empty(cls, ring: Ring, cache: KVCache, t: int) -> SeqKV:
        """Room for t tokens of every layer of `cache` (a contiguous [L, B, K, S, H] cache)."""
        layers, b, kv_heads, _, head_dim = cache.k.shape
        return cls.zeros(ring, (layers, b, t, kv_heads, head_dim), cache.k.dtype)

    @classmethod
    def zeros(cls, ring: Ring, shape: tuple[int, ...], cache_dtype) -> SeqKV:
        """Room for K/V [L, B, T, K, H] bound for a cache stored in `cache_dtype`."""
        z = jnp.zeros(shape, ring.dtype)
        z = ring.constrain(z, "layers", "batch", "seq", "cache_heads", None)
        return cls(z, z, ring, str(np.dtype(cache_dtype)))

    # A pipeline micro-batch's rows (batch is axis 1, as in the contiguous cache).
    rows, put_rows = KVCache.rows, KVCache.put_rows

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

    def write_pages(self, k_pool, v_pool, pages, offsets):
        """Every layer's K/V into a page pool split over sp at global page ids `pages` and `offsets`
        [B, T] (in this K/V's zigzag order): gathered over sp once after the layers, and each rank keeps
        the tokens of its own pages (`Ring.paged_update`)."""
        return self.ring.paged_update(k_pool, v_pool, self.k, self.v, pages, offsets, None)
