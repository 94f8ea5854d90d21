"""Decode attention over a paged KV cache, split over the KV length: the Pallas kernel, its pure-jnp
reference, one validator.

Layout: the whole pool k/v [layers, num_pages, page_size, kv_heads, head_dim] and the `layer` to read
(an argument, so no per-layer slice of the pool is ever copied); each sequence owns the pages listed in
its row of `block_tables` [batch, pages_per_seq] and holds `lengths` [batch] tokens.

Design (written for the Triton lowering; one decode token per sequence, memory bound): the grid is
(sequence, kv head, split). A sequence's tokens are cut into `num_splits` contiguous ranges so that even
batch 1 puts a program on every SM; each program walks its range `block_tokens` (>= 64) tokens at a
time, gathering each token's page from the block table, and keeps an online softmax for the query heads
that share its kv head (GQA; padded to 16 rows, the smallest tile a GPU matmul takes). Operands stay in
the cache dtype (bf16 tensor cores) with float32 accumulation; the probabilities are cast back to the
cache dtype before the second matmul. Each split writes its unnormalised output, running max and sum;
a log-sum-exp merge over the splits (a few KB per sequence) gives the result.

Quantized pools (int8 or float8_e4m3fn values) come with float32 scale pools, one scale per token and
kv head, [layers, num_pages, page_size, kv_heads] (or with a trailing 1, as models/kv_cache.py keeps
them): passed as k_scales/v_scales, or each pool as a (values, scales) pair. The kernel loads a tile's
values and its T scales, runs the matmuls in q's dtype (int8 and e4m3 values are exact in bf16), and
scales the scores' columns by the key scales and the probabilities' columns by the value scales: the
same as attending to values * scales, at [G, T] multiplies instead of [T, H]. Their speed is not known
yet: a first timing on an H200 (this module's benchmark, bf16 q, Llama-3-8B heads, page 16: batch 1 x
32k int8 186 / fp8 237 vs bf16 171 us) called the kernel eagerly, so each figure includes the dispatch of
the small ops around the pallas_call (benchmarks/gpu_check.py times the same bf16 shape jitted at 49 us);
the benchmark now jits it. The quantized cases use 168-255 registers against 123-128 for bf16 (sm_90
gate), the place to look if they prove slower.

    python -m pallas_kernels.paged_attention   # micro-benchmark: achieved GB/s against the roofline
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as pltriton

MASK = -1e30
MIN_ROWS = 16  # the smallest M (and K) a GPU matmul tile takes
TARGET_PROGRAMS = 264  # two programs per SM on an H100 (132 SMs)
MIN_SPLIT_TOKENS = 256  # below this a split's fixed cost outweighs the parallelism it adds
NUM_WARPS, NUM_STAGES = 4, 3


QUANT_DTYPES = (np.dtype(jnp.int8), np.dtype(jnp.float8_e4m3fn))


def pools(k_pages, v_pages, k_scales=None, v_scales=None):
    """(k_pages, v_pages, k_scales, v_scales) from pools given bare (with optional scales) or as
    (values, scales) pairs: how a quantized cache hands its pools over, so that one positional argument
    (and one shard_map spec) carries both."""
    out = []
    for name, pool, scales in (("k", k_pages, k_scales), ("v", v_pages, v_scales)):
        if isinstance(pool, (tuple, list)):
            if len(pool) != 2 or scales is not None:
                raise ValueError(
                    f"{name}_pages given as a sequence of {len(pool)} must be one (values, scales) pair, "
                    f"and then without {name}_scales"
                )
            pool, scales = pool
        out.append((pool, scales))
    (k_pages, k_scales), (v_pages, v_scales) = out
    return k_pages, v_pages, k_scales, v_scales


def _validate_scales(pages, scales, name: str) -> None:
    quant = np.dtype(pages.dtype) in QUANT_DTYPES
    if quant != (scales is not None):
        raise ValueError(
            f"{name}_pages are {np.dtype(pages.dtype).name}: "
            + (f"pass {name}_scales (float32, one per token and kv head)" if quant else f"drop {name}_scales")
            + " (quantized pools are int8 or float8_e4m3fn and need scales; others take none)"
        )
    if scales is None:
        return
    want = pages.shape[:4]
    if scales.shape not in (want, (*want, 1)) or scales.dtype != jnp.float32:
        raise ValueError(
            f"{name}_scales must be float32 {list(want)} (layers, pages, page_size, kv_heads), with or without a "
            f"trailing 1; got {scales.dtype} {list(scales.shape)}"
        )


def validate(q, k_pages, v_pages, lengths, block_tables, layer, k_scales=None, v_scales=None) -> None:
    """Shapes and dtypes both implementations require; raises ValueError naming the mismatch."""
    if q.ndim != 3 or k_pages.ndim != 5:
        raise ValueError(
            "q must be [batch, heads, head_dim] and pages [layers, pages, page_size, kv_heads, head_dim]; "
            f"got q {q.shape}, k_pages {k_pages.shape}"
        )
    if k_pages.shape != v_pages.shape or k_pages.dtype != v_pages.dtype:
        raise ValueError(f"k_pages {k_pages.shape} {k_pages.dtype} and v_pages {v_pages.shape} {v_pages.dtype} differ")
    b, n, h = q.shape
    kh, hd = k_pages.shape[3:]
    if hd != h:
        raise ValueError(f"head_dim of q ({h}) and of the pages ({hd}) differ")
    if n % kh:
        raise ValueError(f"query heads {n} are not a multiple of kv heads {kh}")
    if lengths.shape != (b,) or block_tables.ndim != 2 or block_tables.shape[0] != b:
        raise ValueError(
            f"lengths must be [{b}] and block_tables [{b}, pages_per_seq]; got {lengths.shape} and {block_tables.shape}"
        )
    if jnp.ndim(layer) != 0:
        raise ValueError(
            f"layer must be a scalar index into the {k_pages.shape[0]} layers; got shape {jnp.shape(layer)}"
        )
    _validate_scales(k_pages, k_scales, "k")
    _validate_scales(v_pages, v_scales, "v")


def _gather(pages, scales, layer, block_tables):
    """Each sequence's tokens of `layer` [B, P*ps, K, H], dequantized to float32 when `scales` are given."""
    b, (kh, hd) = block_tables.shape[0], pages.shape[3:]
    x = pages[layer, block_tables].reshape(b, -1, kh, hd)
    if scales is None:
        return x
    return x.astype(jnp.float32) * scales[layer, block_tables].reshape(b, -1, kh, 1)


def reference(q, k_pages, v_pages, lengths, block_tables, layer, k_scales=None, v_scales=None):
    """Pure jnp: gather each sequence's pages of `layer` (dequantized in float32 when scaled), mask past
    its length, softmax in fp32."""
    k_pages, v_pages, k_scales, v_scales = pools(k_pages, v_pages, k_scales, v_scales)
    validate(q, k_pages, v_pages, lengths, block_tables, layer, k_scales, v_scales)
    b, n, hd = q.shape
    kh = k_pages.shape[3]
    k = _gather(k_pages, k_scales, layer, block_tables)  # [B, P*ps, K, H]
    v = _gather(v_pages, v_scales, layer, block_tables)
    qg = q.reshape(b, kh, n // kh, hd)
    logits = jnp.einsum("bkgh,bskh->bkgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    visible = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
    logits = jnp.where(visible[:, None, None], logits, MASK)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgs,bskh->bkgh", probs, v.astype(jnp.float32))
    return out.reshape(b, n, hd).astype(q.dtype)


def plan(batch: int, kv_heads: int, max_tokens: int, block_tokens: int) -> tuple[int, int]:
    """(num_splits, tokens per split): enough programs to fill the GPU, each split a whole number of
    loop steps and at least MIN_SPLIT_TOKENS long."""
    wanted = -(-TARGET_PROGRAMS // (batch * kv_heads))
    most = max(1, max_tokens // max(MIN_SPLIT_TOKENS, block_tokens))
    return _split(max_tokens, min(wanted, most), block_tokens)


def _split(max_tokens: int, splits: int, block_tokens: int) -> tuple[int, int]:
    """About `splits` ranges of whole loop steps covering max_tokens: (their count, tokens in each)."""
    per_split = -(-max_tokens // max(1, splits))
    per_split = -(-per_split // block_tokens) * block_tokens
    return -(-max_tokens // per_split), per_split


def _kernel(layer_ref, lengths_ref, tables_ref, q_ref, k_ref, v_ref, *refs, page_size, block_tokens, per_split, ranks):
    # refs: (k_scales, v_scales,) for quantized pools, then the outputs acc, m, denom.
    ks_ref, vs_ref = refs[:-3] or (None, None)
    o_ref, m_ref, l_ref = refs[-3:]
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    length = lengths_ref[b]
    start = s * per_split
    if ranks > 1:  # one rank's view: its table lists the sequence's blocks rank, rank + ranks, ...
        rank = layer_ref[1]
        blocks = (length + page_size - 1) // page_size
        length = jnp.maximum(blocks - rank + ranks - 1, 0) // ranks * page_size  # tokens its blocks span
    end = jnp.minimum(length, start + per_split)
    steps = (jnp.maximum(end - start, 0) + block_tokens - 1) // block_tokens  # int32 loop bound
    q = q_ref[...]  # [G, H]
    g, hd = q.shape
    scale = 1 / math.sqrt(hd)

    def body(i, carry):
        acc, m, denom = carry
        tok = start + i * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)  # [T]
        visible = tok < end
        if ranks > 1:  # the last block may be partly filled: its global positions past the sequence weigh 0
            visible &= ((tok // page_size) * ranks + rank) * page_size + tok % page_size < lengths_ref[b]
        tok = jnp.where(visible, tok, start)  # masked tokens read a real cache row, then weigh 0
        pages = tables_ref[b, tok // page_size]  # [T]: each token's page, gathered from the block table
        offsets = tok % page_size
        k = k_ref[layer, pages, offsets, h, :]  # [T, H]
        v = v_ref[layer, pages, offsets, h, :]
        if ks_ref is None:
            column_scale = scale
        else:  # quantized: matmuls in q's dtype, the key scales on the score columns
            k, v = k.astype(q.dtype), v.astype(q.dtype)
            column_scale = (ks_ref[layer, pages, offsets, h] * scale)[None, :]  # [1, T]
        logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * column_scale  # [G, H] @ [H, T] -> [G, T]
        logits = jnp.where(visible[None, :], logits, MASK)
        m_new = jnp.maximum(m, logits.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(logits - m_new[:, None])
        weights = p if vs_ref is None else p * vs_ref[layer, pages, offsets, h][None, :]  # value scales on columns
        pv = jnp.dot(weights.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [G, T] @ [T, H] -> [G, H]
        return acc * correction[:, None] + pv, m_new, denom * correction + p.sum(axis=-1)

    init = (jnp.zeros((g, hd), jnp.float32), jnp.full((g,), MASK, jnp.float32), jnp.zeros((g,), jnp.float32))
    acc, m, denom = jax.lax.fori_loop(0, steps, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = denom


def merge_unnormalised(acc, m, denom):
    """Log-sum-exp merge of per-split partials without the final division: acc [..., S, G, H], m and
    denom [..., S, G] -> output [..., G, H], max and sum [..., G] (an empty split has m = MASK: weight 0)."""
    top = m.max(axis=-2)  # [..., G]
    weight = jnp.exp(m - top[..., None, :])
    return (acc * weight[..., None]).sum(axis=-3), top, (denom * weight).sum(axis=-2)


@functools.partial(jax.jit, static_argnames=("interpret", "num_splits", "block_tokens"))
def paged_attention(
    q,
    k_pages,
    v_pages,
    lengths,
    block_tables,
    layer,
    k_scales=None,
    v_scales=None,
    *,
    interpret: bool = False,
    num_splits=None,
    block_tokens=64,
):
    """q [B, N, H] attends to the first `lengths` cached tokens of its sequence in layer `layer` of the
    pool [L, pages, page_size, K, H]; returns [B, N, H] in q.dtype. An int8 or float8_e4m3fn pool takes
    float32 scales [L, pages, page_size, K] (k_scales/v_scales, or the pool as a (values, scales) pair).
    num_splits: KV splits per sequence (default: enough to fill an H100); block_tokens: tokens per loop
    step (a power of two)."""
    # One rank's share when there is one rank is the whole: the same kernel and merge, then normalised.
    tiling = dict(interpret=interpret, num_splits=num_splits, block_tokens=block_tokens)
    out, _, total = paged_attention_partial(
        q, k_pages, v_pages, lengths, block_tables, layer, 0, k_scales, v_scales, ranks=1, **tiling
    )  # [B, N, H], [B, N]
    return (out / jnp.maximum(total, 1e-30)[..., None]).astype(q.dtype)


@functools.partial(jax.jit, static_argnames=("ranks", "interpret", "num_splits", "block_tokens"))
def paged_attention_partial(
    q,
    k_pages,
    v_pages,
    lengths,
    block_tables,
    layer,
    rank,
    k_scales=None,
    v_scales=None,
    *,
    ranks: int,
    interpret: bool = False,
    num_splits=None,
    block_tokens=64,
):
    """One rank's share of `paged_attention` for a cache whose sequences' pages are dealt round robin over
    `ranks` (sequence parallelism): `block_tables` [B, W] lists the pages of blocks rank, rank + ranks,
    rank + 2·ranks, ... of each sequence (`rank` a scalar, may be traced), `lengths` [B] the sequences'
    whole lengths. Returns the unnormalised output [B, N, H], the running max and the sum [B, N], all
    float32, for a log-sum-exp merge with the other ranks' (a rank with no visible token returns max
    MASK and sum 0)."""
    k_pages, v_pages, k_scales, v_scales = pools(k_pages, v_pages, k_scales, v_scales)
    validate(q, k_pages, v_pages, lengths, block_tables, layer, k_scales, v_scales)
    b, n, hd = q.shape
    ps, kh = k_pages.shape[2], k_pages.shape[3]
    if block_tokens < 1 or block_tokens & (block_tokens - 1):
        raise ValueError(f"block_tokens={block_tokens} must be a power of two")
    if not interpret and (hd < MIN_ROWS or hd & (hd - 1)):
        raise ValueError(f"head_dim {hd} must be a power of two >= {MIN_ROWS} for the compiled kernel")
    g = n // kh
    gp = max(1 << (g - 1).bit_length(), 1 if interpret else MIN_ROWS)
    qg = jnp.pad(q.reshape(b, kh, g, hd), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    max_tokens = block_tables.shape[1] * ps
    if num_splits is None:
        splits, per_split = plan(b, kh, max_tokens, block_tokens)
    else:
        splits, per_split = _split(max_tokens, num_splits, block_tokens)
    whole = pl.BlockSpec(k_pages.shape, lambda i, h, s: (0,) * 5)
    scale_pools = [] if k_scales is None else [x.reshape(k_pages.shape[:4]) for x in (k_scales, v_scales)]
    whole_scales = pl.BlockSpec(k_pages.shape[:4], lambda i, h, s: (0,) * 4)
    part = (None, None, None, gp)
    scalars = jnp.reshape(layer, (1,)) if ranks == 1 else jnp.stack([jnp.asarray(layer), jnp.asarray(rank)])
    acc, m, denom = pl.pallas_call(
        functools.partial(_kernel, page_size=ps, block_tokens=block_tokens, per_split=per_split, ranks=ranks),
        grid=(b, kh, splits),
        in_specs=[
            pl.BlockSpec(scalars.shape, lambda i, h, s: (0,)),
            pl.BlockSpec((b,), lambda i, h, s: (0,)),
            pl.BlockSpec(block_tables.shape, lambda i, h, s: (0, 0)),
            pl.BlockSpec((None, None, gp, hd), lambda i, h, s: (i, h, 0, 0)),
            whole,
            whole,
            *[whole_scales] * len(scale_pools),
        ],
        out_specs=[
            pl.BlockSpec((*part, hd), lambda i, h, s: (i, h, s, 0, 0)),
            pl.BlockSpec(part, lambda i, h, s: (i, h, s, 0)),
            pl.BlockSpec(part, lambda i, h, s: (i, h, s, 0)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((b, kh, splits, gp, hd), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, splits, gp), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, splits, gp), jnp.float32),
        ],
        compiler_params=None if interpret else pltriton.CompilerParams(num_warps=NUM_WARPS, num_stages=NUM_STAGES),
        interpret=interpret,
    )(
        scalars.astype(jnp.int32),
        lengths.astype(jnp.int32),
        block_tables.astype(jnp.int32),
        qg,
        k_pages,
        v_pages,
        *scale_pools,
    )
    # acc [B, K, S, Gp, H], m and denom [B, K, S, Gp]: each split's unnormalised output, max and sum
    out, top, total = merge_unnormalised(acc, m, denom)  # [B, K, Gp, H], [B, K, Gp] x 2
    return out[:, :, :g].reshape(b, n, hd), top[:, :, :g].reshape(b, n), total[:, :, :g].reshape(b, n)


def reference_partial(q, k_pages, v_pages, lengths, block_tables, layer, rank, k_scales=None, v_scales=None, *, ranks):
    """Pure jnp `paged_attention_partial`: unnormalised output [B, N, H], max and sum [B, N] (float32)."""
    k_pages, v_pages, k_scales, v_scales = pools(k_pages, v_pages, k_scales, v_scales)
    validate(q, k_pages, v_pages, lengths, block_tables, layer, k_scales, v_scales)
    b, n, hd = q.shape
    ps, kh = k_pages.shape[2], k_pages.shape[3]
    k = _gather(k_pages, k_scales, layer, block_tables)  # [B, W*ps, K, H]
    v = _gather(v_pages, v_scales, layer, block_tables)
    qg = q.reshape(b, kh, n // kh, hd)
    logits = jnp.einsum("bkgh,bskh->bkgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    tok = jnp.arange(k.shape[1])
    position = ((tok // ps) * ranks + rank) * ps + tok % ps
    logits = jnp.where((position[None, :] < lengths[:, None])[:, None, None], logits, MASK)
    top = logits.max(axis=-1)
    p = jnp.exp(logits - top[..., None]) * (logits > MASK)  # a row with nothing visible sums to 0
    out = jnp.einsum("bkgs,bskh->bkgh", p, v.astype(jnp.float32))
    return out.reshape(b, n, hd), top.reshape(b, n), p.sum(axis=-1).reshape(b, n)


def _quantized(x, dtype, qmax: float):
    """x [..., H] as (values in `dtype`, float32 scales [...]) per token and head, for the benchmark."""
    scale = jnp.maximum(jnp.abs(x.astype(jnp.float32)).max(axis=-1), 1e-30) / qmax
    y = jnp.clip(x / scale[..., None], -qmax, qmax)
    return (jnp.round(y) if dtype == jnp.int8 else y).astype(dtype), scale


def _bench() -> None:
    """Achieved GB/s of the compiled kernel and of the XLA reference on the default device, for pools in
    the activation dtype and quantized to int8 and fp8 (bytes moved count values and scales)."""
    import time

    dev = jax.devices()[0]
    interpret = dev.platform == "cpu"
    cases = [(1, 32768), (16, 4096), (64, 8192)] if not interpret else [(2, 256)]
    heads, kv_heads, hd, ps = (32, 8, 128, 16) if not interpret else (8, 2, 64, 16)
    dtype = jnp.bfloat16 if not interpret else jnp.float32
    rng = np.random.default_rng(0)
    for batch, ctx in cases:
        pages_per_seq = ctx // ps
        num_pages = batch * pages_per_seq + 1
        q = jnp.asarray(rng.normal(size=(batch, heads, hd)), dtype)
        k = jnp.asarray(rng.normal(size=(1, num_pages, ps, kv_heads, hd)), dtype)
        v = jnp.asarray(rng.normal(size=(1, num_pages, ps, kv_heads, hd)), dtype)
        tables = jnp.asarray(rng.permutation(np.arange(1, num_pages)).reshape(batch, pages_per_seq), jnp.int32)
        lengths = jnp.full((batch,), ctx, jnp.int32)
        for fmt, store, qmax in (
            (jnp.dtype(dtype).name, None, 0),
            ("int8", jnp.int8, 127.0),
            ("fp8", jnp.float8_e4m3fn, 448.0),
        ):
            kv_pools = (k, v) if store is None else tuple(_quantized(x, store, qmax) for x in (k, v))
            per_token = hd * jnp.dtype(store or dtype).itemsize + (4 if store is not None else 0)
            moved = 2 * batch * ctx * kv_heads * per_token
            rates = []
            for name, fn in (
                # jitted, as the engine runs it: eagerly, each small op around the pallas_call dispatches alone
                ("kernel", jax.jit(functools.partial(paged_attention, interpret=interpret))),
                ("xla", jax.jit(reference)),
            ):
                fn(q, *kv_pools, lengths, tables, 0).block_until_ready()
                best = float("inf")
                for _ in range(10):
                    t0 = time.perf_counter()
                    fn(q, *kv_pools, lengths, tables, 0).block_until_ready()
                    best = min(best, time.perf_counter() - t0)
                rates.append(f"{name} {best * 1e6:.0f} us = {moved / best / 1e9:.0f} GB/s")
            print(
                f"{dev.device_kind}: batch {batch}, context {ctx}, {heads}/{kv_heads} heads, page {ps}, "
                f"{jnp.dtype(dtype).name} q, {fmt} cache{' (interpret mode: no speed meaning)' if interpret else ''}: "
                + "; ".join(rates)
            )


if __name__ == "__main__":
    _bench()
