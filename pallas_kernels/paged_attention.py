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


def validate(q, k_pages, v_pages, lengths, block_tables, layer) -> None:
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


def reference(q, k_pages, v_pages, lengths, block_tables, layer):
    """Pure jnp: gather each sequence's pages of `layer`, mask past its length, softmax in fp32."""
    validate(q, k_pages, v_pages, lengths, block_tables, layer)
    b, n, hd = q.shape
    kh = k_pages.shape[3]
    k = k_pages[layer, block_tables].reshape(b, -1, kh, hd)  # [B, P*ps, K, H]
    v = v_pages[layer, block_tables].reshape(b, -1, kh, hd)
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


def _kernel(
    layer_ref, lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *, page_size, block_tokens, per_split
):
    b, h, s = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    layer = layer_ref[0]
    start = s * per_split
    end = jnp.minimum(lengths_ref[b], start + per_split)
    steps = (jnp.maximum(end - start, 0) + block_tokens - 1) // block_tokens  # int32 loop bound
    q = q_ref[...]  # [G, H]
    g, hd = q.shape
    scale = 1 / math.sqrt(hd)

    def body(i, carry):
        acc, m, denom = carry
        tok = start + i * block_tokens + jnp.arange(block_tokens, dtype=jnp.int32)  # [T]
        visible = tok < end
        tok = jnp.where(visible, tok, start)  # masked tokens read a real cache row, then weigh 0
        pages = tables_ref[b, tok // page_size]  # [T]: each token's page, gathered from the block table
        k = k_ref[layer, pages, tok % page_size, h, :]  # [T, H]
        v = v_ref[layer, pages, tok % page_size, h, :]
        logits = jnp.dot(q, k.T, preferred_element_type=jnp.float32) * scale  # [G, H] @ [H, T] -> [G, T]
        logits = jnp.where(visible[None, :], logits, MASK)
        m_new = jnp.maximum(m, logits.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(logits - m_new[:, None])
        pv = jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)  # [G, T] @ [T, H] -> [G, H]
        return acc * correction[:, None] + pv, m_new, denom * correction + p.sum(axis=-1)

    init = (jnp.zeros((g, hd), jnp.float32), jnp.full((g,), MASK, jnp.float32), jnp.zeros((g,), jnp.float32))
    acc, m, denom = jax.lax.fori_loop(0, steps, body, init)
    o_ref[...] = acc
    m_ref[...] = m
    l_ref[...] = denom


def merge(acc, m, denom):
    """Log-sum-exp merge of per-split partials: acc [..., S, G, H], m and denom [..., S, G] -> [..., G, H]."""
    top = m.max(axis=-2, keepdims=True)  # [..., 1, G]
    weight = jnp.exp(m - top)  # an empty split has m = MASK: weight 0
    total = (acc * weight[..., None]).sum(axis=-3)
    return total / jnp.maximum((denom * weight).sum(axis=-2), 1e-30)[..., None]


@functools.partial(jax.jit, static_argnames=("interpret", "num_splits", "block_tokens"))
def paged_attention(
    q, k_pages, v_pages, lengths, block_tables, layer, *, interpret: bool = False, num_splits=None, block_tokens=64
):
    """q [B, N, H] attends to the first `lengths` cached tokens of its sequence in layer `layer` of the
    pool [L, pages, page_size, K, H]; returns [B, N, H] in q.dtype. num_splits: KV splits per sequence
    (default: enough to fill an H100); block_tokens: tokens per loop step (a power of two)."""
    validate(q, k_pages, v_pages, lengths, block_tables, layer)
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
    part = (None, None, None, gp)
    acc, m, denom = pl.pallas_call(
        functools.partial(_kernel, page_size=ps, block_tokens=block_tokens, per_split=per_split),
        grid=(b, kh, splits),
        in_specs=[
            pl.BlockSpec((1,), lambda i, h, s: (0,)),
            pl.BlockSpec((b,), lambda i, h, s: (0,)),
            pl.BlockSpec(block_tables.shape, lambda i, h, s: (0, 0)),
            pl.BlockSpec((None, None, gp, hd), lambda i, h, s: (i, h, 0, 0)),
            whole,
            whole,
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
        jnp.reshape(layer, (1,)).astype(jnp.int32),
        lengths.astype(jnp.int32),
        block_tables.astype(jnp.int32),
        qg,
        k_pages,
        v_pages,
    )
    out = merge(acc, m, denom)  # [B, K, Gp, H]
    return out[:, :, :g].reshape(b, n, hd).astype(q.dtype)


def _bench() -> None:
    """Achieved GB/s of the compiled kernel and of the XLA reference on the default device."""
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
        moved = 2 * batch * ctx * kv_heads * hd * jnp.dtype(dtype).itemsize
        rates = []
        for name, fn in (
            ("kernel", functools.partial(paged_attention, interpret=interpret)),
            ("xla", jax.jit(reference)),
        ):
            fn(q, k, v, lengths, tables, 0).block_until_ready()
            best = float("inf")
            for _ in range(10):
                t0 = time.perf_counter()
                fn(q, k, v, lengths, tables, 0).block_until_ready()
                best = min(best, time.perf_counter() - t0)
            rates.append(f"{name} {best * 1e6:.0f} us = {moved / best / 1e9:.0f} GB/s")
        print(
            f"{dev.device_kind}: batch {batch}, context {ctx}, {heads}/{kv_heads} heads, page {ps}, "
            f"{jnp.dtype(dtype).name}{' (interpret mode: no speed meaning)' if interpret else ''}: " + "; ".join(rates)
        )


if __name__ == "__main__":
    _bench()
