"""Decode attention over a paged KV cache: the Pallas kernel, its pure-jnp reference, one validator.

Layout (one layer): pages k/v [num_pages, page_size, kv_heads, head_dim]; each sequence owns the pages
listed in its row of `block_tables` [batch, pages_per_seq] and holds `lengths` [batch] tokens. One
program instance handles one (sequence, kv head) pair and streams that sequence's pages once for all
the query heads sharing the kv head (GQA), with an online softmax. Query heads per kv head are padded
to a power of two (at least 16 when compiled, the smallest tile a GPU matmul takes).

    python -m pallas_kernels.paged_attention   # micro-benchmark: achieved GB/s against the roofline
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from jaxinfer.errors import JaxinferError

MASK = -1e30


def validate(q, k_pages, v_pages, lengths, block_tables) -> None:
    """Shapes and dtypes both implementations require; raises JaxinferError naming the mismatch."""
    if q.ndim != 3 or k_pages.ndim != 4:
        raise JaxinferError(
            f"q must be [batch, heads, head_dim] and pages [pages, page_size, kv_heads, head_dim]; "
            f"got q {q.shape}, k_pages {k_pages.shape}"
        )
    if k_pages.shape != v_pages.shape:
        raise JaxinferError(f"k_pages {k_pages.shape} and v_pages {v_pages.shape} differ")
    b, n, h = q.shape
    _, _, kh, hd = k_pages.shape
    if hd != h:
        raise JaxinferError(f"head_dim of q ({h}) and of the pages ({hd}) differ")
    if n % kh:
        raise JaxinferError(f"query heads {n} are not a multiple of kv heads {kh}")
    if lengths.shape != (b,) or block_tables.ndim != 2 or block_tables.shape[0] != b:
        raise JaxinferError(
            f"lengths must be [{b}] and block_tables [{b}, pages_per_seq]; got {lengths.shape} and {block_tables.shape}"
        )


def reference(q, k_pages, v_pages, lengths, block_tables):
    """Pure jnp: gather each sequence's pages, mask past its length, softmax in fp32."""
    validate(q, k_pages, v_pages, lengths, block_tables)
    b, n, hd = q.shape
    _, ps, kh, _ = k_pages.shape
    k = k_pages[block_tables].reshape(b, -1, kh, hd)  # [B, P*ps, K, H]
    v = v_pages[block_tables].reshape(b, -1, kh, hd)
    qg = q.reshape(b, kh, n // kh, hd)
    logits = jnp.einsum("bkgh,bskh->bkgs", qg, k, preferred_element_type=jnp.float32) / math.sqrt(hd)
    visible = jnp.arange(k.shape[1])[None, :] < lengths[:, None]
    logits = jnp.where(visible[:, None, None], logits, MASK)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bkgs,bskh->bkgh", probs, v.astype(jnp.float32))
    return out.reshape(b, n, hd).astype(q.dtype)


def _kernel(lengths_ref, tables_ref, q_ref, k_ref, v_ref, o_ref, *, page_size: int, scale: float):
    b = pl.program_id(0)
    length = lengths_ref[b]
    q = q_ref[...].astype(jnp.float32) * scale  # [G, H]
    g, hd = q.shape

    def body(i, carry):
        acc, m, denom = carry
        page = tables_ref[b, i]
        k = k_ref[page].astype(jnp.float32)  # [page_size, H]
        v = v_ref[page].astype(jnp.float32)
        logits = jnp.dot(q, k.T)  # [G, page_size]
        pos = i * page_size + jnp.arange(page_size)
        logits = jnp.where(pos[None, :] < length, logits, MASK)
        m_new = jnp.maximum(m, logits.max(axis=-1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(logits - m_new[:, None])
        return acc * correction[:, None] + jnp.dot(p, v), m_new, denom * correction + p.sum(axis=-1)

    init = (jnp.zeros((g, hd), jnp.float32), jnp.full((g,), MASK, jnp.float32), jnp.zeros((g,), jnp.float32))
    acc, _, denom = jax.lax.fori_loop(0, pl.cdiv(length, page_size), body, init)
    o_ref[...] = (acc / jnp.maximum(denom, 1e-30)[:, None]).astype(o_ref.dtype)


@functools.partial(jax.jit, static_argnames=("interpret",))
def paged_attention(q, k_pages, v_pages, lengths, block_tables, *, interpret: bool = False):
    """q [B, N, H] attends to its sequence's first `lengths` cached tokens; returns [B, N, H]."""
    validate(q, k_pages, v_pages, lengths, block_tables)
    b, n, hd = q.shape
    num_pages, ps, kh, _ = k_pages.shape
    g = n // kh
    gp = max(1 << (g - 1).bit_length(), 1 if interpret else 16)
    qg = jnp.pad(q.reshape(b, kh, g, hd), ((0, 0), (0, 0), (0, gp - g), (0, 0)))
    pages_per_seq = block_tables.shape[1]
    out = pl.pallas_call(
        functools.partial(_kernel, page_size=ps, scale=1 / math.sqrt(hd)),
        grid=(b, kh),
        in_specs=[
            pl.BlockSpec((b,), lambda i, h: (0,)),
            pl.BlockSpec((b, pages_per_seq), lambda i, h: (0, 0)),
            pl.BlockSpec((None, None, gp, hd), lambda i, h: (i, h, 0, 0)),
            pl.BlockSpec((num_pages, ps, None, hd), lambda i, h: (0, 0, h, 0)),
            pl.BlockSpec((num_pages, ps, None, hd), lambda i, h: (0, 0, h, 0)),
        ],
        out_specs=pl.BlockSpec((None, None, gp, hd), lambda i, h: (i, h, 0, 0)),
        out_shape=jax.ShapeDtypeStruct(qg.shape, q.dtype),
        interpret=interpret,
    )(lengths.astype(jnp.int32), block_tables.astype(jnp.int32), qg, k_pages, v_pages)
    return out[:, :, :g].reshape(b, n, hd)


def _bench() -> None:
    """Achieved GB/s of the compiled kernel against the copy-bandwidth roofline, on the default device."""
    import time

    from jaxinfer.bench import peak_bandwidth

    dev = jax.devices()[0]
    interpret = dev.platform == "cpu"
    batch, heads, kv_heads, hd, ps, ctx = (16, 32, 8, 128, 16, 4096) if not interpret else (2, 8, 2, 64, 16, 256)
    pages_per_seq = ctx // ps
    num_pages = batch * pages_per_seq + 1
    rng = np.random.default_rng(0)
    dtype = jnp.bfloat16 if not interpret else jnp.float32
    q = jnp.asarray(rng.normal(size=(batch, heads, hd)), dtype)
    k = jnp.asarray(rng.normal(size=(num_pages, ps, kv_heads, hd)), dtype)
    v = jnp.asarray(rng.normal(size=(num_pages, ps, kv_heads, hd)), dtype)
    tables = jnp.asarray(rng.permutation(np.arange(1, num_pages)).reshape(batch, pages_per_seq), jnp.int32)
    lengths = jnp.full((batch,), ctx, jnp.int32)
    run = functools.partial(paged_attention, interpret=interpret)
    run(q, k, v, lengths, tables).block_until_ready()
    best = float("inf")
    for _ in range(10):
        t0 = time.perf_counter()
        run(q, k, v, lengths, tables).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    moved = 2 * batch * ctx * kv_heads * hd * jnp.dtype(dtype).itemsize
    peak = peak_bandwidth(dev)
    print(
        f"{dev.device_kind}: batch {batch}, context {ctx}, {heads}/{kv_heads} heads, page {ps}, {jnp.dtype(dtype).name}"
        f"{' (interpret mode)' if interpret else ''}: {best * 1e6:.0f} us, {moved / best / 1e9:.1f} GB/s of KV read, "
        f"roofline {peak / 1e9:.0f} GB/s ({moved / best / peak:.0%})"
    )


if __name__ == "__main__":
    _bench()
