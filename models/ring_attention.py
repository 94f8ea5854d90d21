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

Every rank sees every token's K/V once as the ring passes the blocks round, so the cache is written
there, inside each layer, with no collective beyond the ring's own (`SeqKV`, the ring's sink): the
static path keeps its contiguous cache unsplit and each rank writes every block into its copy, so
decode runs on the full cache as before; no layer's K/V is held past its layer.

The serving engine's page pool is split over sp (`Ring.paged_update`, `Ring.paged_attend`): rank r
holds a contiguous range of page ids, a sequence's pages are dealt round robin over the ranks (block i
on rank i % sp, jaxinfer/scheduler.py), each rank writes and attends over its own pages only, and the
partial outputs (with their row max and sum) merge across sp by log-sum-exp after one all-gather per
layer. A prompt's first chunk (nothing cached before it) runs as a static prefill does, zigzag and
ring, each rank keeping the tokens of its own pages from the blocks the ring brings. A later chunk
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


def write_own_pages(kp, vp, k, v, pages, offsets, layer, rank, active=True):
    """Per-rank body: k/v [B, T, K, H] into this rank's share of pools kp/vp [L, P/sp, page, K, H] (rank
    r holds global page ids [r*P/sp, (r+1)*P/sp)) at global `pages` and `offsets` [B, T] of `layer`;
    tokens whose page another rank holds, and every token when not `active`, are dropped."""
    n_local = kp.shape[1]
    local = pages - rank * n_local
    local = jnp.where(active & (local >= 0) & (local < n_local), local, n_local)  # not this rank's: dropped
    index = (layer, local, offsets)
    return kv_cache.write_at(kp, index, k, mode="drop"), kv_cache.write_at(vp, index, v, mode="drop")


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


def ring_attention_local(q, k, v, q_pos, *, axis: str, size: int, sliding_window, cache_dtype=None, sink=None):
    """Per-rank body (inside shard_map): q [B, T, N, H], k/v [B, T, K, H], q_pos [B, T] of this rank's
    tokens; returns [B, T, N, H]. Step 0 is the rank's own block, where every query sees at least
    itself, so the running max is finite from then on. Keys and values are attended as a cache stored in
    `cache_dtype` would give them back (quantized and dequantized).

    With a `sink` (arrays, the [B, T] index arrays riding with each block, and `write(arrays, k, v,
    positions, *index) -> arrays`), every block the ring brings, the rank's own first, is also handed to
    `write`: each rank sees every token's K/V once, so it can keep what belongs to it with no collective
    beyond the ring's own. Returns (output, the sink's arrays) then."""
    b, t, n, hd = q.shape
    kh = k.shape[2]
    qg = q.reshape(b, t, kh, n // kh, hd).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    perm = [(i, (i + 1) % size) for i in range(size)]
    dest, index, write = sink if sink is not None else (None, (), None)
    block, acc = (k, v, q_pos, *index), None
    for step in range(size):
        # Sent before this step's compute, so the transfer can overlap it.
        nxt = jax.lax.ppermute(block, axis, perm) if step < size - 1 else None
        bk, bv, bpos, *bindex = block
        if write is not None:
            dest = write(dest, bk, bv, bpos, *bindex)
        if cache_dtype is not None and kv_cache.quantized(cache_dtype):
            bk, bv = (kv_cache.dequantize(kv_cache.quantize(a, np.dtype(cache_dtype)), a.dtype) for a in (bk, bv))
        part = _block(qg, bk, bv, q_pos, bpos, sliding_window)
        acc = part if acc is None else _merge(acc, part)
        block = nxt
    out, _, total = acc
    out = out / total[..., None]
    out = out.astype(q.dtype).transpose(0, 3, 1, 2, 4).reshape(b, t, n, hd)
    return out if sink is None else (out, dest)


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

    def attention(self, q, k, v, q_pos, sliding_window, cache_dtype=None, sink: SeqKV | None = None, layer=None):
        """q [B, T, N, H], k/v [B, T, K, H] (K = cache heads), q_pos [B, T], all in zigzag order and split
        on `seq` -> attention output [B, T, N, H] split alike. With a `sink` (a SeqKV), each rank also
        writes this `layer`'s K/V into its share of the sink's cache as the blocks come round the ring
        (`SeqKV.write_local`), and the sink's new k and v come back too: (output, (k, v))."""
        body = functools.partial(
            ring_attention_local, axis=self.axis, size=self.size, sliding_window=sliding_window, cache_dtype=cache_dtype
        )
        bn = self._batch(q.shape[0])  # (an engine's prefill chunk is one row, not split over dp)
        qs, ks, ps = (
            self.spec(bn, "seq", "q_heads", None),
            self.spec(bn, "seq", "cache_heads", None),
            self.spec(bn, "seq"),
        )
        if sink is None:
            return sharding.shard_map(body, self.mesh, (qs, ks, ks, ps), qs)(q, k, v, q_pos)

        def with_sink(q, k, v, q_pos, dk, dv, index, layer, active):
            write = functools.partial(sink.write_local, layer=layer, active=active, rank=jax.lax.axis_index(self.axis))
            return body(q, k, v, q_pos, sink=((dk, dv), index, write))

        dest = sink.dest_specs(bn)
        index = tuple(ps for _ in sink.index)
        args = (q, k, v, q_pos, sink.k, sink.v, sink.index, jnp.asarray(layer, jnp.int32), sink.active)
        in_specs = (qs, ks, ks, ps, *dest, index, P(), P())
        return sharding.shard_map(with_sink, self.mesh, in_specs, (qs, dest))(*args)

    # --- the paged cache split over sp (the serving engine) -----------------------------------------

    def _batch(self, b: int) -> str | None:
        """The logical name "batch" when b rows split over its mesh axis, else None (a chunk is one row)."""
        axis = dict(self.rules)["batch"]
        return "batch" if axis is None or b % self.mesh.shape[axis] == 0 else None

    def pool_spec(self, pool):
        """The PartitionSpec of a page pool (a QuantKV's values and scales) split over sp by page id."""
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
        rows are gathered first: every dp replica holds the whole pool, so each writes every row."""
        axis = self.axis

        def body(kp, vp, k, v, pages, offsets, layer):
            if seq_split:  # [B, T/sp, ...] -> [B, T, ...]: the chunk's new K/V, the one gather of this layer's
                k, v = (jax.lax.all_gather(a, axis, axis=1, tiled=True) for a in (k, v))
                pages, offsets = (jax.lax.all_gather(a, axis, axis=1, tiled=True) for a in (pages, offsets))
            return write_own_pages(kp, vp, k, v, pages, offsets, layer, jax.lax.axis_index(axis))

        seq = "seq" if seq_split else None
        pools = (self.pool_spec(k_pool), self.pool_spec(v_pool))
        new, idx = self.spec(None, seq, "cache_heads", None), self.spec(None, seq)
        return sharding.shard_map(body, self.mesh, (*pools, new, new, idx, idx, P()), pools)(
            k_pool, v_pool, k, v, pages, offsets, jnp.asarray(layer, jnp.int32)
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
        pools = (self.pool_spec(k_pool), self.pool_spec(v_pool))
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
    """The KV cache of a prefill whose tokens lie split over `sp` in zigzag order (ring attention). Each
    layer's K/V is written where it belongs while the ring passes it round, inside the layer
    (`Ring.attention` with this as its sink), so no layer's K/V is gathered over sp and none is held
    past its layer:

    - `paged`: k and v are the serving engine's page pools split over sp by page id, `index` the
      tokens' global (pages, offsets) [B, T] in zigzag order, split on `seq`; each rank keeps the
      tokens of its own pages (`write_own_pages`).
    - not `paged`: k and v are the static path's contiguous cache [L, B, K, S, H], whole on every sp
      rank (decode reads it unsplit), `index` empty: each rank writes every block at its tokens' true
      positions (positions past the cache are dropped).

    `active` (a bool scalar) drops every write when False: a pipeline stage's idle tick runs its layers
    (jaxinfer/pipeline.py) without touching the cache. `cache_dtype`: the storage dtype; attention reads
    K/V quantized and dequantized as the cache holds them, so logits match the unsplit path."""

    k: jax.Array | QuantKV
    v: jax.Array | QuantKV
    index: tuple
    active: jax.Array
    ring: Ring = dataclasses.field(metadata=dict(static=True))
    paged: bool = dataclasses.field(metadata=dict(static=True))
    splits_seq: ClassVar[bool] = True  # the layers' tokens lie split on `seq` (models/moe.py keeps them so)
    ring_prefill: ClassVar[bool] = True  # its attention permutes over sp (jaxinfer/pipeline.py keeps it out of cond)

    @classmethod
    def contiguous(cls, ring: Ring, cache: KVCache) -> SeqKV:
        return cls(cache.k, cache.v, (), jnp.asarray(True), ring, False)

    @classmethod
    def pages(cls, ring: Ring, k_pool, v_pool, pages, offsets) -> SeqKV:
        index = tuple(ring.constrain(a, "batch", "seq") for a in (pages, offsets))
        return cls(k_pool, v_pool, index, jnp.asarray(True), ring, True)

    @property
    def sp_dim(self) -> int | None:
        """The dimension of k/v split over sp: the pool's pages; the contiguous cache is whole."""
        return 1 if self.paged else None

    @property
    def cache_dtype(self):
        return self.k.dtype

    def writing_if(self, active) -> SeqKV:
        return dataclasses.replace(self, active=jnp.asarray(active))

    def rows(self, start, size: int) -> SeqKV:
        """Batch rows [start, start + size) (a pipeline micro-batch): their index rows, and the contiguous
        cache's rows (the pools are shared)."""
        take = lambda a, axis: jax.lax.dynamic_slice_in_dim(a, start, size, axis=axis)  # noqa: E731
        index = tuple(take(a, 0) for a in self.index)
        if self.paged:
            return dataclasses.replace(self, index=index)
        k, v = (jax.tree.map(lambda a: take(a, 1), c) for c in (self.k, self.v))
        return dataclasses.replace(self, k=k, v=v, index=index)

    def put_rows(self, view: SeqKV, start) -> SeqKV:
        if self.paged:
            return dataclasses.replace(self, k=view.k, v=view.v)
        put = lambda c, w: jax.lax.dynamic_update_slice_in_dim(c, w, start, axis=1)  # noqa: E731
        return dataclasses.replace(self, k=jax.tree.map(put, self.k, view.k), v=jax.tree.map(put, self.v, view.v))

    def dest_specs(self, batch) -> tuple:
        """Specs of (k, v) in `Ring.attention`'s shard_map; `batch`: the batch's logical name or None."""
        if self.paged:
            return self.ring.pool_spec(self.k), self.ring.pool_spec(self.v)
        values = self.ring.spec("layers", batch, "cache_heads", None, "head_dim")
        if isinstance(self.k, QuantKV):
            values = QuantKV(values, self.ring.spec("layers", batch, "cache_heads", None, None))
        return values, values

    def write_local(self, dest, k, v, positions, *index, layer, active, rank):
        """Per-rank body: one ring block's K/V [B, T, K, H] at `positions` [B, T] (and `index`) into this
        rank's share of dest (k, v)."""
        dk, dv = dest
        if self.paged:
            return write_own_pages(dk, dv, k, v, *index, layer, rank, active)
        rows = jnp.arange(k.shape[0])[:, None]
        positions = jnp.where(active, positions, dk.shape[3])  # an idle tick writes past the cache: dropped
        where = (layer, rows, slice(None), positions)  # advanced indices first: [B, T, K, H]
        return kv_cache.write_at(dk, where, k, mode="drop"), kv_cache.write_at(dv, where, v, mode="drop")

    def update_and_attend(self, layer, k, v, q, q_pos, kv_len: int, sliding_window, kernel=None):
        out, (new_k, new_v) = self.ring.attention(
            q, k, v, q_pos, sliding_window, cache_dtype=self.cache_dtype, sink=self, layer=layer
        )
        return out, dataclasses.replace(self, k=new_k, v=new_v)

    def as_cache(self) -> KVCache:
        return KVCache(self.k, self.v)
