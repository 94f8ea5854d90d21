"""y = (x @ W) * scales for an int8 weight W with one float32 scale per output column (models/quant.py's
per-channel int8 QArray), as one XLA FFI call on CPU.

XLA:CPU converts such a weight to float32 in a loop of its own, writing and re-reading a float copy four
times the int8 bytes, before its dot; this kernel widens each byte in registers as it streams the weight
once (int8_matmul.cc says how). `reference` is the XLA path it replaces; both share one validator.

    python -m cpu_kernels.int8_matmul   # the kernel against the XLA path, GB/s per shape
"""

from __future__ import annotations

import functools
import os
import platform

import jax
import jax.numpy as jnp
import numpy as np

from cpu_kernels import TARGETS, available, load


def _check(x, values, scales, transposed: bool) -> int:
    """The output width N; raises on shapes or dtypes the kernel does not take."""
    if x.ndim != 2 or values.ndim != 2 or scales.ndim != 1:
        raise ValueError(
            f"int8_matmul: x [M, K], values 2-D, scales [N]; not {x.shape}, {values.shape}, {scales.shape}"
        )
    k, n = values.shape[::-1] if transposed else values.shape
    if x.shape[1] != k or scales.shape[0] != n:
        raise ValueError(
            f"int8_matmul: x {x.shape}, values {values.shape}, scales {scales.shape}, transposed={transposed}"
        )
    if values.dtype != jnp.int8 or scales.dtype != jnp.float32:
        raise ValueError(f"int8_matmul: values int8 and scales float32, not {values.dtype} and {scales.dtype}")
    return n


def reference(x, values, scales, *, transposed: bool = False):
    """The XLA path: x [M, K] @ values ([K, N], or [N, K] when `transposed`) times scales [N], float32."""
    _check(x, values, scales, transposed)
    spec = "mk,nk->mn" if transposed else "mk,kn->mn"
    y = jnp.einsum(spec, x.astype(jnp.float32), values.astype(jnp.float32), preferred_element_type=jnp.float32)
    return y * scales


def int8_matmul(x, values, scales, *, transposed: bool = False):
    """`reference` in one pass over the int8 values (float32 out; x is cast to float32). Needs
    `available()`; on CPU only, and not partitionable: call it on one device's arrays."""
    n = _check(x, values, scales, transposed)
    if not available():
        raise RuntimeError(f"the int8_matmul kernel is unavailable: {load()}")
    call = jax.ffi.ffi_call(TARGETS[transposed], jax.ShapeDtypeStruct((x.shape[0], n), jnp.float32))
    return call(x.astype(jnp.float32), values, scales)


def _bench(m: int, k: int, n: int, transposed: bool) -> str:
    """Microseconds per call over enough distinct weights (64 MiB) that each comes from memory, as a
    model's do, for the kernel and for `reference`."""
    import time

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((m, k), np.float32))
    copies = max(1, (64 << 20) // (k * n))
    shape = (n, k) if transposed else (k, n)
    values = [jnp.asarray(rng.integers(-127, 128, shape, np.int8)) for _ in range(copies)]
    scales = jnp.asarray(rng.random(n, np.float32))

    def seconds(fn):
        f = jax.jit(functools.partial(fn, transposed=transposed))
        f(x, values[0], scales).block_until_ready()
        times = []
        for _ in range(5):
            t0 = time.perf_counter()
            for v in values:
                y = f(x, v, scales)
            y.block_until_ready()
            times.append((time.perf_counter() - t0) / copies)
        return sorted(times)[2]

    ours, xla = seconds(int8_matmul), seconds(reference)
    gb = k * n / 1e9
    layout = "nk" if transposed else "kn"
    return f"| {m} | {k} | {n} | {layout} | {ours * 1e6:.1f} | {gb / ours:.1f} | {xla * 1e6:.1f} | {xla / ours:.1f}x |"


if __name__ == "__main__":
    if not available():
        raise SystemExit(f"kernel unavailable: {load()}")
    print(f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; each weight read from memory")
    print("| M | K | N | layout | kernel us | kernel GB/s | XLA us | XLA / kernel |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for m in (1, 16, 64):
        for k, n, t in ((576, 576, False), (576, 3072, False), (1536, 576, False), (576, 49152, True)):
            print(_bench(m, k, n, t))
