"""KV caches the decoder layers write to and attend over: contiguous (static batches) and paged (the
serving engine). Both offer `update` (write this step's keys/values for one layer) and `attend`.

Each of k and v is stored in the activation dtype, or quantized (kv_cache_dtype "fp8" or "int8") as a
`QuantKV`: values in float8_e4m3fn or int8 and one float32 scale per token and kv head (symmetric:
max|x| over head_dim / the format's largest value). Scales are written with their token and applied
when it is attended; the cache's own dtype says which, so the model code is the same for every format.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# kv_cache_dtype -> (storage dtype, the largest value a scaled element may take)
FORMATS = {"fp8": (jnp.float8_e4m3fn, 448.0), "int8": (jnp.int8, 127.0)}
_QMAX = {np.dtype(dtype): qmax for dtype, qmax in FORMATS.values()}


class QuantKV(NamedTuple):
    """A quantized k or v: `values` shaped like the unquantized cache, float32 `scales` of the same
    shape with head_dim cut to 1. Scales keep the values' rank (rather than dropping head_dim) so that
    every index, slice, PartitionSpec and shard_map spec written for the values applies to the scales
    unchanged (the pipeline's P("pp") per cache field, the kernel's shard_map specs over the pools), and
    values * scales broadcasts. The bytes are the same; GPU and CPU layouts do not pad a trailing 1."""

    values: jax.Array
    scales: jax.Array

    @property
    def shape(self) -> tuple[int, ...]:
        return self.values.shape

    @property
    def dtype(self):
        return self.values.dtype


def quantized(dtype) -> bool:
    """Whether a cache stored in `dtype` holds quantized values (and so carries scales)."""
    return np.dtype(dtype) in _QMAX


def quantize(x: jax.Array, dtype) -> QuantKV:
    """x [..., head_dim] -> values in `dtype` (int8 or float8_e4m3fn) and scales [..., 1]: scale =
    max|x| / qmax over head_dim (1 where x is all zero), values = x / scale rounded (int8) or cast (fp8)."""
    qmax = _QMAX[np.dtype(dtype)]
    x = x.astype(jnp.float32)
    amax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(amax > 0, amax / qmax, 1.0)
    # x / scale can land a rounding step past qmax; e4m3fn has no inf, so it would turn NaN.
    y = jnp.clip(x / scale, -qmax, qmax)
    if jnp.issubdtype(dtype, jnp.integer):
        y = jnp.round(y)
    return QuantKV(y.astype(dtype), scale)


def dequantize(c: QuantKV, dtype=jnp.float32) -> jax.Array:
    return (c.values.astype(jnp.float32) * c.scales).astype(dtype)


def write_at(c, index: tuple, x, **mode):
    """c.at[index].set(x) for a plain cache array or a QuantKV (x quantized per token and head)."""
    if isinstance(c, QuantKV):
        new = quantize(x, c.dtype)
        return QuantKV(*(a.at[index].set(n, **mode) for a, n in zip(c, new)))
    return c.at[index].set(x.astype(c.dtype), **mode)


def _operand(c, dtype):
    """A cache slice [B, K, S, H] as a matmul operand in `dtype`, and the per-key scales [B, K, 1, 1, S]
    to weigh its columns of the scores or probabilities with (None when not quantized)."""
    if not isinstance(c, QuantKV):
        return c, None
    return c.values.astype(dtype), c.scales[..., 0][:, :, None, None, :]


def _scores(q, k):
    """q [B, T, N, H] against one layer's keys [B, K, S, H] (array or QuantKV) -> float32 scores
    [B, K, G, T, S] (G = N / K query heads per key head), the keys' scales applied column-wise."""
    b, t, n, hd = q.shape
    k, k_scale = _operand(k, q.dtype)
    kh = k.shape[1]
    q = q.reshape(b, t, kh, n // kh, hd).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]
    scores = jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    return scores if k_scale is None else scores * k_scale


# Once an attention call's float32 scores would pass SCORE_TILE_BYTES, its queries go through in tiles of
# QUERY_TILE_ROWS rows (a row's softmax is whole in its tile, so results do not change), as
# FlashAttention's fixed query blocks: the scores held at once grow with the keys, not with the prompt's
# square, so prefill memory stays linear in the tokens a device holds (T, or T/sp in each ring step).
# XLA:CPU holds about five buffers of a call's scores (scores, mask, exp, ...), so tiling starts early:
# 16 MiB is Llama-3-8B's 32 heads at 360 tokens. 128 rows against 16k keys are 256 MiB; past
# MAX_TILE_BYTES (128 rows against 64k keys) a tile takes fewer rows.
SCORE_TILE_BYTES = 1 << 24
QUERY_TILE_ROWS = 128
MAX_TILE_BYTES = 1 << 30


def over_query_tiles(fn, q, q_pos, keys: int, axis: int):
    """`fn(q, q_pos)` for queries q (their T on `axis`, head_dim last) at positions q_pos [B, T] against
    `keys` keys, computed a tile of query rows at a time (a loop) when all their float32 scores would
    pass SCORE_TILE_BYTES: QUERY_TILE_ROWS rows, or fewer (a multiple of 8, at least 8) where those rows'
    scores would pass MAX_TILE_BYTES. Every output of fn has its T on `axis` too."""
    t, hd = q.shape[axis], q.shape[-1]
    row_bytes = q.size // (t * hd) * keys * 4  # one query position's scores over every head and row
    if t * row_bytes <= SCORE_TILE_BYTES:
        return fn(q, q_pos)
    tile = max(min(QUERY_TILE_ROWS, MAX_TILE_BYTES // row_bytes // 8 * 8), 8)
    if tile >= t:
        return fn(q, q_pos)
    n = -(-t // tile)
    pad = n * tile - t  # pad rows repeat the last position (finite scores); dropped below
    q = jnp.pad(q, [(0, pad if i == axis else 0) for i in range(q.ndim)])
    q_pos = jnp.pad(q_pos, [(0, 0), (0, pad)], mode="edge")
    tiles = jnp.moveaxis(q.reshape(q.shape[:axis] + (n, tile) + q.shape[axis + 1 :]), axis, 0)
    pos_tiles = jnp.moveaxis(q_pos.reshape(q_pos.shape[0], n, tile), 1, 0)
    shapes = jax.eval_shape(fn, tiles[0], pos_tiles[0])
    outs = jax.tree.map(lambda s: _start(tiles, s), shapes)

    def tile_step(i, outs):
        got = fn(tiles[i], pos_tiles[i])
        return jax.tree.map(lambda o, g: jax.lax.dynamic_update_index_in_dim(o, g, i, 0), outs, got)

    outs = jax.lax.fori_loop(0, n, tile_step, outs)

    def join(o):  # [n, ..., tile, ...] -> [..., T, ...]
        o = jnp.moveaxis(o, 0, axis)
        o = o.reshape(o.shape[:axis] + (n * tile,) + o.shape[axis + 2 :])
        return jax.lax.slice_in_dim(o, 0, t, axis=axis)

    return jax.tree.map(join, outs)


def _start(tiles, out: jax.ShapeDtypeStruct):
    """The loop's buffer for `out` of every tile, [n, *out.shape], made from the query tiles [n, ...]
    (x * 0 is not folded for floats) where out is shaped like a tile (an output) or like one less its
    last axis (a row max or sum): elementwise, so it keeps the tiles' sharding and takes no collective,
    and it is made once the queries are. From a constant, XLA:CPU makes every layer's at the start of an
    unrolled program and holds them all (SmolLM2's 30 layers at 4k tokens on sp=4: 270 MiB). Every
    element is written by some tile, so the start value is never read."""
    if out.shape == tiles.shape[1:]:
        return (tiles * 0).astype(out.dtype)
    if out.shape == tiles.shape[1:-1]:
        return (tiles[..., 0] * 0).astype(out.dtype)
    return jnp.zeros((tiles.shape[0], *out.shape), out.dtype)


def attention(q, k, v, q_pos, sliding_window):
    """q [B, T, N, H] against one layer's keys/values [B, K, S, H] (arrays or QuantKV); key s is visible
    to a query at position p when s <= p (and p - s < window). Quantized keys/values are scaled on the
    scores and probabilities column-wise: the same as attending to values * scales, without making that
    dequantized copy of the layer. A long prompt's queries go through in tiles (over_query_tiles)."""
    keys = (k.values if isinstance(k, QuantKV) else k).shape[2]
    return over_query_tiles(lambda q, q_pos: _attention(q, k, v, q_pos, sliding_window), q, q_pos, keys, axis=1)


def _attention(q, k, v, q_pos, sliding_window):
    b, t, n, hd = q.shape
    scores = _scores(q, k)
    v, v_scale = _operand(v, q.dtype)
    key_pos = jnp.arange(k.shape[2])
    visible = key_pos[None, None, :] <= q_pos[:, :, None]  # [B, T, S]
    if sliding_window:
        visible &= key_pos[None, None, :] > q_pos[:, :, None] - sliding_window
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1)
    if v_scale is not None:
        probs = probs * v_scale
    out = jnp.einsum("bkgts,bksh->bkgth", probs.astype(v.dtype), v)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, hd)


def partial_attention(q, k, v, visible):
    """`attention`'s unnormalised parts over some of the keys, for a merge with other parts (a split
    cache): q [B, T, N, H] against k/v [B, S, K, H] (arrays or QuantKV with scales [B, S, K, 1]) where
    visible [B, T, S] -> float32 output [B, T, N, H], row max and row sum [B, T, N]. A row that sees no
    key here has max -inf and sum 0, so it weighs nothing in the merge."""
    b, t, n, hd = q.shape
    k, v = (jax.tree.map(lambda a: jnp.swapaxes(a, 1, 2), c) for c in (k, v))  # [B, K, S, H]
    scores = _scores(q, k)
    v, v_scale = _operand(v, q.dtype)
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    m = jnp.max(scores, axis=-1)  # [B, K, G, T]
    p = jnp.exp(scores - jnp.where(jnp.isfinite(m), m, 0.0)[..., None])
    total = jnp.sum(p, axis=-1)
    if v_scale is not None:
        p = p * v_scale
    out = jnp.einsum("bkgts,bksh->bkgth", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    heads = lambda a: a.transpose(0, 3, 1, 2).reshape(b, t, n)  # noqa: E731  [B, K, G, T] -> [B, T, N]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, n, hd), heads(m), heads(total)


def merge_partials(out, m, total, dtype):
    """Log-sum-exp merge of stacked partials (from `partial_attention`): out [R, B, T, N, H], m and total
    [R, B, T, N] -> [B, T, N, H] in `dtype`. Some part must see a key for every row."""
    top = jnp.max(m, axis=0)
    weight = jnp.exp(m - jnp.where(jnp.isfinite(top), top, 0.0))  # a part that saw nothing: exp(-inf) = 0
    num = jnp.sum(out * weight[..., None], axis=0)
    return (num / jnp.sum(total * weight, axis=0)[..., None]).astype(dtype)


def update_and_attend(cache, layer, k, v, q, q_pos, kv_len: int, sliding_window, kernel=None):
    """A decoder layer's use of its cache: write this step's k/v, then attend q to the layer -> (output,
    the cache). A ring prefill's cache does both at once (models/ring_attention.SeqKV)."""
    cache = cache.update(layer, k, v, q_pos)
    return cache.attend(layer, q, q_pos, kv_len, sliding_window, kernel), cache


class KVCache(NamedTuple):
    """Contiguous cache, k and v each [layers, batch, cache_heads, cache_seq, head_dim] (or a QuantKV with
    scales [layers, batch, cache_heads, cache_seq, 1]): each head's keys are contiguous, so attention
    contracts them without a transpose."""

    k: jax.Array | QuantKV
    v: jax.Array | QuantKV
    splits_seq = False  # the layers' tokens are not split over sp (models/ring_attention.SeqKV's are)
    ring_prefill = False
    sp_dim = None  # no dimension of k/v lies split over sp
    update_and_attend = update_and_attend

    def update(self, layer, k, v, q_pos) -> KVCache:
        rows = jnp.arange(k.shape[0])[:, None]
        # [B, T, K, H] into [layer, B, K, S, H] at each row's positions (advanced indices go first)
        index = (layer, rows, slice(None), q_pos)
        return KVCache(*(write_at(c, index, x, mode="drop") for c, x in zip(self, (k, v))))

    def attend(self, layer, q, q_pos, kv_len: int, sliding_window, kernel=None):
        k, v = (
            jax.tree.map(lambda a: jax.lax.dynamic_index_in_dim(a, layer, keepdims=False)[:, :, :kv_len], c)
            for c in self
        )
        return attention(q, k, v, q_pos, sliding_window)

    def rows(self, start, size: int) -> KVCache:
        """The cache of batch rows [start, start + size) (a pipeline micro-batch)."""
        return jax.tree.map(lambda c: jax.lax.dynamic_slice_in_dim(c, start, size, axis=1), self)

    def put_rows(self, view: KVCache, start) -> KVCache:
        return jax.tree.map(lambda c, w: jax.lax.dynamic_update_slice_in_dim(c, w, start, axis=1), self, view)


CACHE_AXES = ("layers", "batch", "cache_heads", "cache_seq", "head_dim")
# "pages" lies on sp (jaxinfer/sharding.py): with sp > 1 each rank holds a contiguous range of page ids.
PAGE_AXES = ("layers", "pages", None, "cache_heads", "head_dim")


def scale_axes(axes: tuple[str | None, ...]) -> tuple[str | None, ...]:
    """The logical axes of a cache's scales: the values' axes, head_dim (kept as a 1) unnamed."""
    return (*axes[:-1], None)


class PagedKVCache(NamedTuple):
    """Pages k and v each [layers, pages, page_size, cache_heads, head_dim] (or a QuantKV with scales
    [layers, pages, page_size, cache_heads, 1]); row b of `block_tables` [B, pages_per_seq] lists the
    pages of the sequence in slot b. Tokens whose `valid` [B, T] is False (padding, idle slots) write to
    page 0, which no sequence owns.

    `split` (static, no arrays): with sp > 1 the pool's pages are split over the sp mesh axis and
    `split` (a models.ring_attention.Ring) writes and attends on each rank over its own pages
    (`Ring.paged_update`, `Ring.paged_attend`); None on one sp rank."""

    k: jax.Array | QuantKV
    v: jax.Array | QuantKV
    block_tables: jax.Array
    valid: jax.Array
    split: object = None
    splits_seq = False  # its pages may be split over sp, the layers' tokens are not
    ring_prefill = False
    update_and_attend = update_and_attend

    @property
    def sp_dim(self) -> int | None:
        """The dimension of k/v split over sp: pages, when the pool is split."""
        return None if self.split is None else 1

    def update(self, layer, k, v, q_pos) -> PagedKVCache:
        page_size = self.k.shape[2]
        pages = jnp.take_along_axis(self.block_tables, q_pos // page_size, axis=1)  # [B, T]
        pages = jnp.where(self.valid, pages, 0)
        if self.split is not None:
            offsets = q_pos % page_size
            new_k, new_v = self.split.paged_update(self.k, self.v, k, v, pages, offsets, layer, self.splits_seq)
            return self._replace(k=new_k, v=new_v)
        index = (layer, pages, q_pos % page_size)
        return self._replace(k=write_at(self.k, index, k), v=write_at(self.v, index, v))

    def attend(self, layer, q, q_pos, kv_len: int, sliding_window, kernel: Callable | None = None):
        if self.split is not None:  # each sp rank over its own pages, partials merged (the kernel reads whole pools)
            return self.split.paged_attend(
                q, self.k, self.v, self.block_tables, q_pos, layer, sliding_window, self.splits_seq
            )
        # Both paths read the whole pool at `layer`: slicing one layer out first would copy it every step.
        if kernel is not None and q.shape[1] == 1 and not sliding_window:
            # A QuantKV pool reaches the kernel as its (values, scales) pair.
            return kernel(q[:, 0], self.k, self.v, q_pos[:, 0] + 1, self.block_tables, layer)[:, None]
        b = q.shape[0]

        def gather(a):  # each sequence's pages as a contiguous [B, K, S, H] view (the XLA path)
            return a[layer, self.block_tables].reshape(b, -1, *a.shape[3:]).transpose(0, 2, 1, 3)

        k, v = (jax.tree.map(gather, c) for c in (self.k, self.v))
        return attention(q, k, v, q_pos, sliding_window)

    def rows(self, start, size: int) -> PagedKVCache:
        """Batch rows [start, start + size): their block tables; the pages are shared."""
        tables, valid = (jax.lax.dynamic_slice_in_dim(a, start, size, axis=0) for a in (self.block_tables, self.valid))
        return self._replace(block_tables=tables, valid=valid)

    def put_rows(self, view: PagedKVCache, start) -> PagedKVCache:
        return self._replace(k=view.k, v=view.v)


class SeqPagedKVCache(PagedKVCache):
    """A `PagedKVCache` over a pool split over sp, for a prefill chunk whose tokens lie split on `seq`
    as well (contiguous, T/sp per rank; `valid` [B, T] split alike): a chunk after a prompt's first, or
    after a cached prefix. Its `split` gathers the chunk's K/V to write each rank's pages, and attends
    every query of the chunk over each rank's own pages, each rank keeping the merged output of its own
    tokens (models/ring_attention.Ring.paged_attend)."""

    __slots__ = ()
    splits_seq = True


def storage_dtype(kind: str, dtype):
    """The dtype cache values are stored in for kv_cache_dtype `kind` ("auto": the activation `dtype`)."""
    return dtype if kind == "auto" else FORMATS[kind][0]


def layout(shape: tuple[int, ...], kind: str, dtype, sharding, scale_sharding) -> tuple:
    """Abstract k and v (ShapeDtypeStructs carrying their shardings) of a cache of `shape` stored as
    kv_cache_dtype `kind`: arrays in the activation `dtype` for "auto", else QuantKVs whose scales are
    laid out by `scale_sharding` (the values' logical axes, see `scale_axes`)."""
    values = jax.ShapeDtypeStruct(shape, storage_dtype(kind, dtype), sharding=sharding)
    if kind == "auto":
        return values, values
    scales = jax.ShapeDtypeStruct((*shape[:-1], 1), jnp.float32, sharding=scale_sharding)
    return QuantKV(values, scales), QuantKV(values, scales)


@functools.partial(jax.jit, static_argnames=("shape", "dtype", "sharding"))
def _zeros(shape, dtype, sharding):
    # Created sharded (never gathered on one device first).
    return jax.lax.with_sharding_constraint(jnp.zeros(shape, dtype), sharding)


def empty(spec):
    """Zeros for every array of an abstract cache from `layout` (a zero scale dequantizes to zero too)."""
    return jax.tree.map(lambda a: _zeros(a.shape, a.dtype, a.sharding), spec)


def device_bytes(spec) -> int:
    """Bytes one device holds of an abstract cache from `layout`: values and scales."""
    return sum(math.prod(a.sharding.shard_shape(a.shape)) * np.dtype(a.dtype).itemsize for a in jax.tree.leaves(spec))
