"""Which implementation decode attention, the grouped expert matmul and int8 and fp8 weights' contractions use,
and why.

Decided once per model, before any weight is read: "auto" takes the Pallas kernel on a GPU when it
compiles and runs at the model's head and expert sizes, the XLA path elsewhere; an explicit "pallas"
that cannot serve the model raises. Every choice carries its reason, which `LLM` logs and `explain` and
`bench` print, so no fallback is silent. The int8 matmul has no option: the CPU kernel wherever it
applies and builds (JAXINFER_CPU_KERNELS=0 turns it off), XLA elsewhere. The fp8 decode matmul's "auto"
is XLA's path until the Pallas kernel is measured on a GPU.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable

import jax
import jax.numpy as jnp

from jaxinfer.config import ModelConfig
from jaxinfer.errors import JaxinferError

log = logging.getLogger(__name__)

CHOICES = ("auto", "pallas", "interpret", "xla")


@dataclasses.dataclass(frozen=True)
class Choice:
    impl: str  # "pallas" | "interpret" | "xla"
    why: str

    def __str__(self) -> str:
        return f"{self.impl} ({self.why})"


def check(name: str, requested: str) -> None:
    if requested not in CHOICES:
        raise JaxinferError(f"{name}={requested!r}; use one of {', '.join(CHOICES)}")


def choose(name: str, requested: str, probe: Callable[[], None], unsupported: str | None = None) -> Choice:
    """The implementation for `name` ("attention" or "moe_kernel"). `unsupported` says why the kernel
    cannot serve this model at all (then only "auto", "xla" and "interpret" are accepted)."""
    check(name, requested)
    if requested == "xla":
        return Choice("xla", f"{name}='xla' was asked for")
    if unsupported and requested != "auto":
        raise JaxinferError(f"{name}={requested!r} cannot serve this model: {unsupported}; use 'auto' or 'xla'")
    if unsupported:
        return Choice("xla", unsupported)
    if requested == "interpret":
        return Choice("interpret", "Pallas interpret mode was asked for (correct but slow: for CPU tests)")
    backend = jax.default_backend()
    if backend != "gpu":
        if requested == "pallas":
            raise JaxinferError(
                f"{name}='pallas' needs a GPU (the kernel compiles with Triton for CUDA; this backend is "
                f"{backend}); use 'auto', 'xla', or 'interpret' to run it slowly on CPU"
            )
        return Choice("xla", f"no GPU here ({backend}): the Pallas kernel compiles for CUDA only")
    try:
        probe()
    except Exception as e:  # any lowering, compile or launch failure: report it, never hide it
        reason = f"the Pallas kernel failed on a test case here ({type(e).__name__}: {str(e)[:300]})"
        if requested == "pallas":
            raise JaxinferError(f"{name}='pallas': {reason}; use 'auto' or 'xla'") from e
        log.warning("%s: using the XLA path: %s", name, reason)
        return Choice("xla", reason)
    return Choice("pallas", "compiled and ran at this model's sizes")


def attention(
    cfg: ModelConfig, dtype, requested: str, page_size: int = 16, kv_cache_dtype: str = "auto", sp: int = 1
) -> Choice:
    """Decode attention over the paged cache (prefill and the static path always use XLA). The probe
    reads pools stored as the cache will be (8-bit values with their scales when quantized). With sp > 1
    the pool is split over sp and each rank attends over its own pages
    (models/ring_attention.Ring.paged_attend): the kernel then reads one rank's column of the block
    table and returns its partial max and sum (`paged_attention_partial`), which the probe runs."""
    from pallas_kernels import paged_attention as pa

    hd, group = cfg.head_dim, cfg.num_heads // cfg.num_kv_heads
    unsupported = None
    if cfg.sliding_window:
        unsupported = f"the kernel has no sliding window (this model's is {cfg.sliding_window} tokens)"
    elif requested != "interpret" and (hd < pa.MIN_ROWS or hd & (hd - 1)):
        unsupported = f"head_dim {hd} is not a power of two >= {pa.MIN_ROWS}, as the compiled kernel needs"

    def probe():
        q = jnp.zeros((1, group, hd), dtype)
        pool = jnp.zeros((1, 2, page_size, 1, hd), dtype)
        if kv_cache_dtype != "auto":
            stored = {"int8": jnp.int8, "fp8": jnp.float8_e4m3fn}[kv_cache_dtype]
            pool = (pool.astype(stored), jnp.ones((1, 2, page_size, 1), jnp.float32))
        ones = jnp.ones(1, jnp.int32)
        if sp > 1:
            pa.paged_attention_partial(q, pool, pool, ones, jnp.ones((1, 1), jnp.int32), 0, 0, ranks=sp)[
                0
            ].block_until_ready()
        else:
            pa.paged_attention(q, pool, pool, ones, jnp.ones((1, 1), jnp.int32), 0).block_until_ready()

    return choose("attention", requested, probe, unsupported)


def int8_matmul(quant: str, mesh: jax.sharding.Mesh) -> Choice | None:
    """The per-channel int8 contraction (models/quant.einsum) of a model held in int8: the C++ kernel
    (cpu_kernels/int8_matmul) on a one-device CPU mesh where it builds, XLA's convert-then-dot elsewhere.
    None for a model not held in int8. Set JAXINFER_CPU_KERNELS=0 to keep the XLA path."""
    if quant != "int8":
        return None
    platform = mesh.devices.flat[0].platform
    if platform != "cpu":
        return Choice("xla", f"the kernel is for CPU; this mesh is on {platform}")
    if mesh.devices.size > 1:
        # GSPMD cannot partition an FFI call; it would gather the weights onto every device.
        return Choice("xla", f"the mesh has {mesh.devices.size} devices and the kernel runs on one")
    from cpu_kernels import load

    why = load()
    if why is not None:
        return Choice("xla", f"the kernel is unavailable: {why}")
    return Choice("cpu", "one pass over each int8 weight at decode and short-prompt sizes (cpu_kernels/int8_matmul)")


def fp8_matmul(quant: str, mesh: jax.sharding.Mesh, dtype, requested: str) -> Choice | None:
    """The per-channel fp8 contraction at decode rows (models/quant.einsum) of a model held in fp8:
    pallas_kernels/fp8_matmul on a one-device GPU mesh when asked for ("pallas"; "interpret" runs it on
    CPU), XLA's fused cast-and-dot otherwise. "auto" keeps XLA until the kernel is measured faster on a
    GPU (benchmarks/gpu_check.py stage f). None for a model not held in fp8."""
    check("fp8_kernel", requested)
    if quant != "fp8":
        return None
    if requested in ("auto", "xla"):
        why = (
            "fp8_kernel='xla' was asked for"
            if requested == "xla"
            else (
                "XLA's cast-and-dot, the measured path; the Pallas kernel awaits its GPU measurement "
                "(fp8_kernel='pallas' takes it)"
            )
        )
        return Choice("xla", why)
    if mesh.devices.size > 1:
        raise JaxinferError(
            f"fp8_kernel={requested!r} runs on one device and this mesh has {mesh.devices.size} (GSPMD cannot "
            "partition a Pallas call); use fp8_kernel='auto'"
        )
    from pallas_kernels import fp8_matmul as fm

    def probe():
        x = jnp.zeros((1, 256), dtype)
        fm.fp8_matmul(x, jnp.zeros((256, 256), fm.FP8), jnp.ones(256, jnp.float32)).block_until_ready()

    return choose("fp8_kernel", requested, probe)


def grouped_matmul(cfg: ModelConfig, dtype, requested: str) -> Choice:
    """The routed experts' grouped matmul (only asked for mixture-of-experts models)."""
    from pallas_kernels import moe

    def probe():
        x, w = jnp.ones((64, 64), dtype), jnp.ones((2, 64, 64), dtype)
        moe.grouped_matmul(x, w, jnp.array([40, 24], jnp.int32)).block_until_ready()

    return choose("moe_kernel", requested, probe)
