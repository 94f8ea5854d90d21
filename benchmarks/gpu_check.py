"""Every GPU check in one command, sized for a session lent one H100 (or H200) for a single ~8-minute call.

Run from the repository root on the GPU machine (no package registry, no pytest needed):

    PYTHONPATH=. python benchmarks/gpu_check.py                  # rows to stdout; with OUT=dir also dir/gpu_check.jsonl
    PYTHONPATH=. python benchmarks/gpu_check.py --cpu_smoke      # every stage on CPU, tiny shapes, well under a minute
    ... --deadline_s=520 --stages=a,b,e --budget=e=150 --cache_dir=/tmp/jax-cache

Each stage runs in its own child process under a time limit taken from its budget and the global deadline
(`--deadline_s`, default 480 s); a stage that no longer fits is skipped with a row saying so, and inside a
stage a measurement that would overrun the stage's limit is skipped the same way. Every row is printed and
flushed the moment it is measured and appended as one JSON line to $OUT/gpu_check.jsonl (keys: stage, name,
status, detail, elapsed_s, and the figures of the row), so a run killed at any point keeps what it measured.
Child stderr goes to $OUT/gpu_check_logs/<stage>.log. jax's persistent compilation cache is on, and the jax
children start with XLA_PYTHON_CLIENT_MEM_FRACTION=0.92 unless it is set (stage e's weights need it).

Stages (default budget in seconds), run in the order env, a, d, f, q, p, b, s, c, peer, e:
  env  (20)  versions, device kind and memory, nameplate bandwidth and bf16 peak, jax's GPU kernels found.
  a    (45)  correctness on the device: our paged attention (page sizes 16 and 32, GQA/MQA) and grouped matmul
             against their jnp references; f32 under matmul precision "highest" (error <= 2e-5 of the
             reference's largest value) and bf16 against the f32 reference (<= 2e-2).
  b    (75)  paged attention GB/s at batch 1/16/64 x context 1k/8k/32k, Llama-3-8B heads (32 q, 8 kv, head_dim
             128), page 16, bf16: ours, jax's GPU paged_attention and the XLA path (our reference, jitted), as
             a fraction of the nameplate bandwidth. Bytes = the K and V bytes read + q and out.
             Targets (ours): >= 75% at batch >= 16 and context >= 4k; >= 50% at batch 1, 32k.
  c    (55)  grouped matmul TFLOP/s on Mixtral-8x7B (D 4096, F 14336, E 8, top-2) and Qwen3-30B-A3B (D 2048,
             F 768, E 128, top-8) expert shapes (the fused gate_up matmul, then the down one if time allows),
             prefill 8k tokens and decode 64: ours, lax.ragged_dot, jax's Mosaic GPU ragged_dot, as a fraction
             of the bf16 peak. Targets (ours): >= 60% at Mixtral prefill; >= ragged_dot everywhere.
  d    (115) Llama-3-8B shapes, random bf16 weights, batch 1/16/64 through the serving engine (`llm.generate`
             after a warm-up run of the same shapes, the Pallas attention kernel plugged in): TPOT and MBU =
             (weights read per step, of the embedding table only the rows gathered, + KV bytes read) / TPOT /
             nameplate bandwidth. Target: MBU >= 75% at batch 1.
  f    (60)  fp8 weights in one projection (Llama-3-8B's gate and down shapes) at 1, 64, 256 and 8192 rows:
             bf16, models/quant.einsum's native fp8 path (activations quantized per row, cuBLASLt fp8) and its
             weight-only path (fp8 values cast inside the dot), the native path on a weight stored [N, K], and
             at decode rows (<= 64) our Pallas kernel (pallas_kernels/fp8_matmul);
             time, GB/s, kernels launched, error: what quant.FP8_NATIVE_MIN_ROWS (the rows from which einsum
             takes the native path) should be; stage q says it beside the value in use
             (GPU_CHECK_FP8_MIN_ROWS=N runs every stage with another).
  q    (110) fp8 weights (quant="fp8") on the same shapes: whether the compiled prefill of 1024 tokens multiplies
             fp8 operands (cuBLASLt's f8 custom call) and what the one-sequence decode runs, then TPOT and MBU
             at batch 1 and 64 beside d's bf16 rows, on XLA's path (the default) and with fp8_kernel="pallas".
             Target: >= 1.6x faster than bf16 at batch 1.
  s    (30)  sequence parallelism: one ring step's attention (the per-rank body of models/ring_attention.py on a
             one-device sp axis) on blocks of 4k and 16k tokens, stage b's heads, bf16: TFLOP/s of the block's
             matmuls (the masked half included) as a fraction of the bf16 peak. No target yet.
  p    (30)  `jaxinfer plan`'s predicted TPOT for the shapes of stages d (bf16) and q (fp8) at each batch they
             measured, on this card's hardware entry and calibration/gpu.json, beside the measured TPOT.
             Target: within 25%. (gpu.json's bandwidth fraction came from an H200's batch-1 bf16 row and its
             weight_only_passes for fp8 from the batch-1 fp8 row: on an H200 those rows check the fit, the
             others are predictions.) Then the weight_only_passes that fits this run's fp8 batch-1 row.
  peer (65)  transformers (torch, bf16, static cache, no torch.compile) on the same shapes: TPOT. Then rows
             comparing d with it (target: our TPOT below transformers').
  e    (105) Qwen3-30B-A3B shapes (61 GB in bf16; fewer layers if the card cannot hold it, said in the row),
             batch 1 and 16 through the engine: TPOT and MBU over the experts a step touches.

On CPU (--cpu_smoke) the kernels run in interpret mode and the models are tiny; speed figures are printed
but labelled meaningless. tests/test_gpu_check.py runs the smoke mode so this script cannot rot.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DEADLINE_S = 480
MEM_FRACTION = "0.92"  # Qwen3-30B-A3B's 61 GB of bf16 weights fit an 80 GB card only above jax's default 0.75
DEFAULT_CACHE = Path(tempfile.gettempdir()) / "jaxinfer-gpu-check-jax-cache"
BAD = ("fail", "missed", "error")
PAGE = 16  # tokens per KV page in the engine stages
DECODE_STEPS = 8  # the engine's decode steps per compiled call (Engine.decode_steps)
F32_TOL, BF16_TOL = 2e-5, 2e-2  # largest error over the reference's largest magnitude
FP8_PREFILL_TOKENS = 1024  # stage q's compiled prefill: past quant.FP8_NATIVE_MIN_ROWS, so cuBLASLt's fp8 GEMM
FIT_FRACTION = 0.88  # weights may take this much of jax's memory limit; the rest is KV pages and work space

# Dense bf16 tensor-core peak by the device kind jax reports (no sparsity).
BF16_PEAK_FLOPS = {
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,
    "NVIDIA H200 NVL": 835e12,
}


@dataclasses.dataclass(frozen=True)
class Stage:
    name: str
    budget_s: float
    min_s: float  # with less time than this left the stage is skipped rather than started


# Run order: the rows that decide open work first (the engine's bf16 baseline, then fp8: the projection
# paths, end to end, the planner against both), the kernel benchmarks measured on earlier cards after.
STAGES = (
    Stage("env", 20, 8),
    Stage("a", 45, 15),
    Stage("d", 115, 50),
    Stage("f", 60, 15),
    Stage("q", 110, 35),
    Stage("p", 30, 15),
    Stage("b", 75, 25),
    Stage("s", 30, 15),
    Stage("c", 55, 20),
    Stage("peer", 65, 30),
    Stage("e", 105, 50),
)


@dataclasses.dataclass(frozen=True)
class Plan:
    """The shapes of one run: real ones on the GPU, tiny ones in the CPU smoke run."""

    attn_batches: tuple[int, ...]
    attn_contexts: tuple[int, ...]
    attn_heads: tuple[int, int, int]  # q heads, kv heads, head_dim
    gmm_models: tuple[tuple[str, int, int, int, int], ...]  # (name, D, F, experts, top-k)
    gmm_tokens: tuple[tuple[str, int], ...]  # (phase, tokens)
    gmm_projs: tuple[str, ...]  # the fused gate_up matmul first (the one the targets name), then down
    llama: str
    llama_batches: tuple[int, ...]
    quant_batches: tuple[int, ...]  # stage q: fp8 weights
    ring_tokens: tuple[int, ...]  # stage s: tokens of one sp rank's block in the ring step
    fp8_rows: tuple[int, ...]  # stage f: activation rows of the fp8 matmuls timed
    fp8_shapes: tuple[tuple[str, int, int], ...]  # stage f: (name, K, N) of the weights
    moe: str
    moe_batches: tuple[int, ...]
    prompt: int
    gen: int
    max_seq_len: int
    dtype: str
    unit_s: float  # what one kernel measurement may take (compile included); more left is needed to start it
    engine_batch_s: float  # the same for one batch size through the engine (its compiles included)


GPU_PLAN = Plan(
    attn_batches=(1, 16, 64),
    attn_contexts=(1024, 8192, 32768),
    attn_heads=(32, 8, 128),
    gmm_models=(("mixtral-8x7b", 4096, 14336, 8, 2), ("qwen3-30b-a3b", 2048, 768, 128, 8)),
    gmm_tokens=(("prefill 8k", 8192), ("decode 64", 64)),
    gmm_projs=("gate_up", "down"),
    llama="llama3-8b",
    llama_batches=(1, 16, 64),
    quant_batches=(1, 64),
    ring_tokens=(4096, 16384),
    fp8_rows=(1, 64, 256, 8192),
    fp8_shapes=(("gate", 4096, 14336), ("down", 14336, 4096)),
    moe="qwen3-30b-a3b",
    moe_batches=(1, 16),
    prompt=128,  # 127 prompt tokens + 96 new + 8 ahead stay within 16 pages: one decode width to compile
    gen=96,
    max_seq_len=256,
    dtype="bfloat16",
    unit_s=6.0,
    engine_batch_s=25.0,
)
SMOKE_PLAN = Plan(
    attn_batches=(1, 3),
    attn_contexts=(80,),
    attn_heads=(8, 2, 64),
    gmm_models=(("tiny-mixtral", 128, 128, 8, 2), ("tiny-qwen3-moe", 64, 48, 16, 4)),
    gmm_tokens=(("prefill", 64), ("decode", 8)),
    gmm_projs=("gate_up",),
    llama="smoke-llama",
    llama_batches=(1, 2),
    quant_batches=(1,),
    ring_tokens=(64,),
    fp8_rows=(1, 64),
    fp8_shapes=(("gate", 128, 256),),
    moe="smoke-moe",
    moe_batches=(2,),
    prompt=16,
    gen=16,
    max_seq_len=64,
    dtype="float32",
    unit_s=0.0,
    engine_batch_s=0.0,
)

# Correctness shapes: (label, batch, q heads, kv heads, head_dim, page_size, pages_per_seq).
ATTN_CHECKS = (
    ("GQA 4:1, page 16", 3, 8, 2, 64, 16, 8),
    ("Llama-3 heads, page 32", 2, 32, 8, 128, 32, 6),
    ("MQA, page 16", 4, 8, 1, 128, 16, 5),
)
# (label, M, K, N, group sizes or a group count to draw sizes for).
GMM_CHECKS = (
    ("rows past the groups, an empty group", 64, 128, 256, (20, 0, 30, 6)),
    ("8 uneven groups", 300, 256, 384, 8),
    ("128 groups (Qwen3-like)", 512, 64, 96, 128),
)


# --- rows ------------------------------------------------------------------------------------------


def emit(stage: str, name: str, status: str, detail: str = "", **fields) -> dict:
    """Prints one row at once and appends it to the JSON lines file, so a killed run keeps it."""
    t0 = float(os.environ.get("GPU_CHECK_T0", time.time()))
    row = {"stage": stage, "name": name, "status": status, "detail": detail, "elapsed_s": round(time.time() - t0, 1)}
    row["smoke"] = os.environ.get("GPU_CHECK_SMOKE") == "1"
    row.update(fields)
    shown = status.upper() if status in BAD else status
    print(f"[{stage}] {shown:<8} {name}: {detail}", flush=True)
    path = os.environ.get("GPU_CHECK_JSONL")
    if path:
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def _short(e: BaseException, limit: int = 240) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:limit]}"


@dataclasses.dataclass
class Ctx:
    """What a stage's child knows: its name, the shapes, whether this is the CPU smoke run, its own end."""

    stage: str
    plan: Plan
    smoke: bool
    until: float

    def left(self) -> float:
        return self.until - time.time()

    def row(self, name: str, status: str, detail: str = "", **fields) -> dict:
        return emit(self.stage, name, status, detail, **fields)

    def fits(self, name: str, need_s: float) -> bool:
        """Whether `need_s` more seconds fit before the stage's end; otherwise prints a skip row."""
        if self.left() >= need_s:
            return True
        self.row(name, "skip", f"would overrun the stage's budget ({self.left():.0f} s left, needs ~{need_s:.0f} s)")
        return False

    def guarded(self, name: str, fn, *args, **kwargs):
        """fn(...), or an error row (traceback to the stage log) when it raises."""
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # one failing measurement must not cost the stage its other rows
            traceback.print_exc()
            self.row(name, "error", _short(e))
            return None

    def speed_note(self) -> str:
        return " [CPU: speed meaningless]" if self.smoke else ""


def judged(ctx: Ctx, met: bool | None) -> str:
    """Status of a measurement with a target (met/missed), or 'measured' without one or on CPU."""
    if met is None or ctx.smoke:
        return "measured"
    return "met" if met else "missed"


# --- device figures (children only: these import jax) ----------------------------------------------


@functools.cache
def peaks() -> dict:
    """Bandwidth to divide by (nameplate for a known card, else the measured copy bandwidth) and bf16 peak."""
    import jax

    from jaxinfer.bench import nameplate_bandwidth

    dev = jax.devices()[0]
    bw = nameplate_bandwidth(dev)
    source = "nameplate"
    if bw is None:
        bw, source = measured_bandwidth(dev), "measured copy"
    flops = BF16_PEAK_FLOPS.get(dev.device_kind) if dev.platform == "gpu" else None
    return {"kind": dev.device_kind, "platform": dev.platform, "bw": bw, "bw_source": source, "flops": flops}


def measured_bandwidth(dev) -> float:
    from jaxinfer.bench import peak_bandwidth

    # On CPU the figure only fills a column of the smoke run: a small copy keeps that quick.
    return peak_bandwidth(dev, 32 << 20, reps=2) if dev.platform == "cpu" else peak_bandwidth(dev)


def rel_err(out, ref) -> float:
    """Largest absolute error over the reference's largest magnitude (inf when the output has NaNs)."""
    import numpy as np

    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    if not np.all(np.isfinite(out)):
        return float("inf")
    return float(np.max(np.abs(out - ref)) / max(float(np.max(np.abs(ref))), 1e-30))


def seconds_per_call(fn, *args, smoke: bool = False) -> float:
    """Wall time of one call, compile excluded: back-to-back calls (enough for ~20 ms, so launch overhead
    overlaps the device work as it does in a decode loop), best of 3 rounds."""
    import jax

    jax.block_until_ready(fn(*args))  # compile
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    once = time.perf_counter() - t0
    if smoke:
        return once
    n = max(1, min(200, int(0.02 / max(once, 1e-6))))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn(*args)  # earlier outputs are freed as they are replaced; the stream runs in order
        jax.block_until_ready(out)
        best = min(best, (time.perf_counter() - t0) / n)
    return best


# --- env -------------------------------------------------------------------------------------------


def stage_env(ctx: Ctx) -> None:
    import jax

    dev = jax.devices()[0]
    stats = dev.memory_stats() if hasattr(dev, "memory_stats") else None
    limit = (stats or {}).get("bytes_limit")
    mem = f", jax memory limit {limit / 2**30:.1f} GiB" if limit else ""
    cc = getattr(dev, "compute_capability", None)
    ctx.row(
        "device",
        "info",
        f"{dev.platform} {dev.device_kind} x{len(jax.devices())}{mem}"
        + (f", compute capability {cc}" if cc else "")
        + f", XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ.get('XLA_PYTHON_CLIENT_MEM_FRACTION', 'unset')}",
        device_kind=dev.device_kind,
        platform=dev.platform,
        device_count=len(jax.devices()),
        bytes_limit=limit,
        jax_version=jax.__version__,
    )
    from jaxinfer.bench import nameplate_bandwidth

    nameplate = nameplate_bandwidth(dev)
    copy = measured_bandwidth(dev)
    p = peaks()
    if nameplate:
        text = f"nameplate {nameplate / 1e9:.0f} GB/s (divides every GB/s and MBU); measured copy {copy / 1e9:.0f} GB/s"
    else:
        text = f"unknown card: no nameplate, so GB/s and MBU are fractions of the measured copy {copy / 1e9:.0f} GB/s"
    if p["flops"]:
        text += f"; bf16 dense peak {p['flops'] / 1e12:.0f} TFLOP/s"
    ctx.row("bandwidth", "info", text, nameplate_gb_s=nameplate and nameplate / 1e9, copy_gb_s=copy / 1e9)
    found = []
    for mod in ("paged_attention", "decode_attention", "ragged_dot_mgpu"):
        try:
            __import__(f"jax.experimental.pallas.ops.gpu.{mod}")
            found.append(f"{mod} yes")
        except Exception as e:  # absent from this jax, or its GPU backend cannot load here
            found.append(f"{mod} no ({_short(e, 80)})")
    ctx.row("jax GPU kernels", "info", ", ".join(found))


# --- a: correctness --------------------------------------------------------------------------------


def attention_case(rng, batch, heads, kv_heads, head_dim, page_size, pages_per_seq, layers=2):
    """f32 numpy inputs: ragged lengths (one token, mid-page, one full sequence), scattered pages, and
    table entries past a sequence's pages pointing at the null page 0 as the engine's do."""
    import numpy as np

    num_pages = batch * pages_per_seq + 3
    pool = (layers, num_pages, page_size, kv_heads, head_dim)
    q = rng.normal(size=(batch, heads, head_dim)).astype(np.float32)
    k, v = rng.normal(size=pool).astype(np.float32), rng.normal(size=pool).astype(np.float32)
    cap = page_size * pages_per_seq
    lengths = rng.integers(1, cap + 1, batch)
    lengths[0], lengths[-1] = 1, cap
    tables = rng.permutation(np.arange(1, num_pages))[: batch * pages_per_seq].reshape(batch, pages_per_seq)
    tables[np.arange(pages_per_seq)[None, :] >= -(-lengths // page_size)[:, None]] = 0
    return q, k, v, lengths.astype(np.int32), tables.astype(np.int32)


def check_attention(ctx: Ctx, label: str, shape: tuple) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import paged_attention as pa

    case = attention_case(np.random.default_rng(len(label)), *shape)
    q, k, v, lengths, tables = (jnp.asarray(a) for a in case)
    layer = jnp.int32(1)  # the second of two layers, so a kernel that ignores `layer` fails
    with jax.default_matmul_precision("highest"):
        ref = pa.reference(q, k, v, lengths, tables, layer)
    for dtype, tol in ((jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)):
        args = [jnp.asarray(a, dtype) for a in (q, k, v)]
        with jax.default_matmul_precision("highest"):
            out = pa.paged_attention(*args, lengths, tables, layer, interpret=ctx.smoke)
        err = rel_err(out, ref)
        name = f"paged attention {jnp.dtype(dtype).name} {label}"
        detail = f"error {err:.1e} of max|ref| (tol {tol:g}); batch {shape[0]}, {shape[1]}/{shape[2]} heads"
        ctx.row(name, "pass" if err <= tol else "fail", detail, error=err, tolerance=tol)


def group_sizes_for(rng, m: int, sizes) -> list[int]:
    import numpy as np

    if isinstance(sizes, tuple):
        return list(sizes)
    return np.bincount(rng.integers(0, sizes, m), minlength=sizes).tolist()


def check_grouped_matmul(ctx: Ctx, label: str, m: int, k: int, n: int, sizes) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import moe

    rng = np.random.default_rng(m + k + n)
    sizes = jnp.asarray(group_sizes_for(rng, m, sizes), jnp.int32)
    x = rng.normal(size=(m, k)).astype(np.float32)
    w = (rng.normal(size=(len(sizes), k, n)) / math.sqrt(k)).astype(np.float32)
    with jax.default_matmul_precision("highest"):
        ref = moe.grouped_matmul_reference(jnp.asarray(x), jnp.asarray(w), sizes)
    for dtype, tol in ((jnp.float32, F32_TOL), (jnp.bfloat16, BF16_TOL)):
        with jax.default_matmul_precision("highest"):
            out = moe.grouped_matmul(jnp.asarray(x, dtype), jnp.asarray(w, dtype), sizes, interpret=ctx.smoke)
        err = rel_err(out, ref)
        name = f"grouped matmul {jnp.dtype(dtype).name} {label}"
        detail = f"error {err:.1e} of max|ref| (tol {tol:g}); M {m}, K {k}, N {n}, {len(sizes)} groups"
        ctx.row(name, "pass" if err <= tol else "fail", detail, error=err, tolerance=tol)


def stage_a(ctx: Ctx) -> None:
    for label, *shape in ATTN_CHECKS:
        if ctx.fits(f"paged attention {label}", ctx.plan.unit_s):
            ctx.guarded(f"paged attention {label}", check_attention, ctx, label, tuple(shape))
    for label, m, k, n, sizes in GMM_CHECKS:
        if ctx.fits(f"grouped matmul {label}", ctx.plan.unit_s):
            ctx.guarded(f"grouped matmul {label}", check_grouped_matmul, ctx, label, m, k, n, sizes)


# --- b: paged attention bandwidth ------------------------------------------------------------------


def attention_target(batch: int, context: int) -> tuple[str, float | None]:
    if batch >= 16 and context >= 4096:
        return ">= 75%", 0.75
    if batch == 1 and context >= 32768:
        return ">= 50%", 0.50
    return "", None


def jax_kernel_splits(pages_per_seq: int) -> int:
    """jax's paged_attention needs k_splits to divide the pages per sequence; its default is 16."""
    splits = 16
    while pages_per_seq % splits:
        splits //= 2
    return splits


def jax_paged_attention(ctx: Ctx, name: str):
    try:
        from jax.experimental.pallas.ops.gpu import paged_attention as jax_pa
    except Exception as e:  # not shipped by this jax, or its Triton backend does not load
        ctx.row(name, "skip", f"jax's GPU paged_attention unavailable: {_short(e, 120)}")
        return None
    return jax_pa.paged_attention


def bench_attention(ctx: Ctx, batch: int, context: int) -> None:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from pallas_kernels import paged_attention as pa

    heads, kv_heads, head_dim = ctx.plan.attn_heads
    dtype = jnp.bfloat16
    pages_per_seq = context // PAGE
    num_pages = batch * pages_per_seq  # a power of two on the GPU, which jax's kernel may need; no null page here
    kq, kk, kv = jax.random.split(jax.random.key(batch * context), 3)
    q = jax.random.normal(kq, (batch, heads, head_dim), dtype)
    pool = (1, num_pages, PAGE, kv_heads, head_dim)
    k_pool, v_pool = jax.random.normal(kk, pool, dtype), jax.random.normal(kv, pool, dtype)
    tables = jnp.asarray(np.random.default_rng(0).permutation(num_pages).reshape(batch, -1), jnp.int32)
    lengths = jnp.full((batch,), context, jnp.int32)
    layer = jnp.int32(0)
    itemsize = jnp.dtype(dtype).itemsize
    # What a decode step must move: every cached K and V byte of the batch, plus q in and the output out.
    moved = batch * context * kv_heads * head_dim * 2 * itemsize + 2 * batch * heads * head_dim * itemsize
    xla = jax.jit(pa.reference)
    ref = xla(q, k_pool, v_pool, lengths, tables, layer)

    def jax_kernel(name):
        fn = jax_paged_attention(ctx, name)
        if fn is None:
            return None
        # jax's layout is [kv_heads, pages, page_size, head_dim], and it leaves the 1/sqrt(head_dim)
        # scaling to the caller: one transposed copy and a scaled q, both made outside the timing.
        k_j, v_j = (jnp.moveaxis(c[0], 2, 0) for c in (k_pool, v_pool))
        q_j = (q.astype(jnp.float32) / math.sqrt(head_dim)).astype(dtype)
        fn = functools.partial(fn, k_splits=jax_kernel_splits(pages_per_seq), interpret=ctx.smoke)
        return fn, (q_j, k_j, v_j, tables, lengths)

    impls = (
        (
            "ours",
            lambda _: (
                functools.partial(pa.paged_attention, interpret=ctx.smoke),
                (q, k_pool, v_pool, lengths, tables, layer),
            ),
        ),
        ("jax", jax_kernel),
        ("xla", lambda _: (xla, (q, k_pool, v_pool, lengths, tables, layer))),
    )
    ours = None
    for impl, make in impls:
        name = f"paged attention {impl} batch {batch}, context {context}"
        if ctx.fits(name, ctx.plan.unit_s / 2):
            made = ctx.guarded(name, make, name)
            if made is not None:
                gb_s = ctx.guarded(name, attention_row, ctx, name, impl, *made, ref, moved, (batch, context), ours)
                ours = gb_s if impl == "ours" else ours


def attention_row(ctx, name, impl, fn, args, ref, moved, where, ours) -> float:
    t = seconds_per_call(fn, *args, smoke=ctx.smoke)
    err = rel_err(fn(*args), ref)
    p = peaks()
    gb_s, frac = moved / t / 1e9, moved / t / p["bw"]
    target, need = attention_target(*where) if impl == "ours" else ("", None)
    detail = (
        f"{t * 1e6:.0f} us, {gb_s:.0f} GB/s = {frac:.0%} of {p['bw'] / 1e9:.0f} {p['bw_source']}"
        + (f", {gb_s / ours:.2f}x ours" if ours and impl != "ours" else "")
        + (f"; DIFFERS from XLA ({err:.1e})" if err > BF16_TOL else "")
        + (f"; target {target}" if target else "")
        + ctx.speed_note()
    )
    status = "fail" if err > BF16_TOL else judged(ctx, None if need is None else frac >= need)
    batch, context = where
    fields = dict(impl=impl, batch=batch, context=context, value=gb_s, unit="GB/s", fraction=frac, error=err)
    ctx.row(name, status, detail, peak_source=p["bw_source"], target=target or None, **fields)
    return gb_s


def stage_b(ctx: Ctx) -> None:
    # The cases with targets first, smaller first within each group: a short budget skips the others.
    configs = [(b, c) for b in ctx.plan.attn_batches for c in ctx.plan.attn_contexts]
    configs.sort(key=lambda bc: (attention_target(*bc)[1] is None, bc[0] * bc[1]))
    for batch, context in configs:
        name = f"paged attention batch {batch}, context {context}"
        if ctx.fits(name, ctx.plan.unit_s):
            ctx.guarded(name, bench_attention, ctx, batch, context)


# --- c: grouped matmul throughput ------------------------------------------------------------------


def routed_group_sizes(tokens: int, experts: int, top_k: int):
    """Rows per expert when each token picks top_k distinct experts uniformly at random."""
    import numpy as np

    picks = np.argsort(np.random.default_rng(tokens).random((tokens, experts)), axis=1)[:, :top_k]
    return np.bincount(picks.reshape(-1), minlength=experts).astype(np.int32)


def mgpu_ragged_dot(ctx: Ctx, name: str):
    """jax's Mosaic GPU ragged_dot (Hopper only) with one tile config, or None after a skip row."""
    import jax

    dev = jax.devices()[0]
    if dev.platform != "gpu" or not str(getattr(dev, "compute_capability", "")).startswith("9"):
        ctx.row(name, "skip", f"jax's Mosaic GPU ragged_dot needs a Hopper GPU, not {dev.device_kind}")
        return None
    try:
        from jax.experimental.pallas.ops.gpu import ragged_dot_mgpu
    except Exception as e:  # absent from this jax, or Mosaic GPU does not load
        ctx.row(name, "skip", f"ragged_dot_mgpu unavailable: {_short(e, 120)}")
        return None
    tiles = dict(block_m=128, block_n=128, block_k=64, max_concurrent_steps=4, grid_block_n=1)
    return jax.jit(lambda x, w, s: ragged_dot_mgpu.ragged_dot(x, w, group_sizes=s, **tiles))


def gmm_target(where: str, frac: float | None, t: float, base: float | None) -> tuple[str, bool | None]:
    """Ours must match ragged_dot everywhere, and reach 60% of the bf16 peak at Mixtral's prefill gate_up."""
    met = None if base is None else t <= base
    if where.startswith("mixtral") and "prefill" in where and "gate_up" in where:
        return ">= 60% of peak and >= ragged_dot", (met is not False) and frac is not None and frac >= 0.60
    return ">= ragged_dot", met


def bench_grouped_matmul(ctx: Ctx, model: str, phase: str, tokens: int, proj: str, k: int, n: int, experts, top_k):
    import jax
    import jax.numpy as jnp

    from pallas_kernels import moe

    m = tokens * top_k
    sizes = jnp.asarray(routed_group_sizes(tokens, experts, top_k))
    kx, kw = jax.random.split(jax.random.key(m + n))
    x = jax.random.normal(kx, (m, k), jnp.bfloat16)
    w = (jax.random.normal(kw, (experts, k, n), jnp.float32) / math.sqrt(k)).astype(jnp.bfloat16)
    where = f"{model} {phase} {proj}"
    ragged = jax.jit(lambda a, b, s: jax.lax.ragged_dot(a, b, s))
    ref = ragged(x, w, sizes)
    impls = (
        ("ragged_dot", lambda _: ragged),
        ("ours", lambda _: functools.partial(moe.grouped_matmul, interpret=ctx.smoke)),
        ("jax", lambda name: mgpu_ragged_dot(ctx, name)),
    )
    base = None
    for impl, make in impls:
        name = f"grouped matmul {impl} {where}"
        if ctx.fits(name, ctx.plan.unit_s / 2):
            fn = ctx.guarded(name, make, name)
            if fn is not None:
                t = ctx.guarded(name, gmm_row, ctx, name, impl, fn, (x, w, sizes), ref, 2 * m * k * n, base, where)
                base = t if impl == "ragged_dot" else base


def gmm_row(ctx, name, impl, fn, args, ref, flops, base, where) -> float:
    t = seconds_per_call(fn, *args, smoke=ctx.smoke)
    err = rel_err(fn(*args), ref)
    p = peaks()
    frac = flops / t / p["flops"] if p["flops"] else None
    target, met = gmm_target(where, frac, t, base) if impl == "ours" else ("", None)
    detail = (
        f"{t * 1e3:.3f} ms, {flops / t / 1e12:.1f} TFLOP/s"
        + (f" = {frac:.0%} of {p['flops'] / 1e12:.0f}" if frac is not None else " (bf16 peak unknown)")
        + (f", {base / t:.2f}x ragged_dot" if base and impl != "ragged_dot" else "")
        + (f"; DIFFERS from ragged_dot ({err:.1e})" if err > BF16_TOL else "")
        + (f"; target {target}" if target else "")
        + ctx.speed_note()
    )
    status = "fail" if err > BF16_TOL else judged(ctx, met)
    fields = dict(impl=impl, value=flops / t / 1e12, unit="TFLOP/s", fraction=frac, error=err)
    ctx.row(name, status, detail, target=target or None, **fields)
    return t


def stage_c(ctx: Ctx) -> None:
    for proj in ctx.plan.gmm_projs:
        for model, d, f, experts, top_k in ctx.plan.gmm_models:
            k, n = (d, 2 * f) if proj == "gate_up" else (f, d)
            for phase, tokens in ctx.plan.gmm_tokens:
                name = f"grouped matmul {model} {phase} {proj}"
                if ctx.fits(name, ctx.plan.unit_s):
                    ctx.guarded(name, bench_grouped_matmul, ctx, model, phase, tokens, proj, k, n, experts, top_k)


# --- d, e: models through the engine ---------------------------------------------------------------


def register_smoke_shapes() -> None:
    """Tiny versions of the two model shapes, registered as built-in shapes in this process only."""
    from jaxinfer.config import SHAPES

    small = dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=16
    )
    small.update(bos_token_id=None, eos_token_ids=())
    SHAPES.setdefault("smoke-llama", dataclasses.replace(SHAPES["llama3-8b"], **small))
    moe = dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, moe_layers=(0, 1))
    SHAPES.setdefault("smoke-moe", dataclasses.replace(SHAPES["qwen3-30b-a3b"], **small, **moe))


def weights_read(setup, tokens: int) -> float:
    """Parameter bytes one device reads in a decode step over `tokens` rows: every dense weight; of the
    experts, those some row picks (expected value under uniform routing); of an untied embedding table,
    only the rows gathered (the whole table is read only when it is also the output head)."""
    from jaxinfer import explain

    cfg = setup.config
    total = explain.per_device_param_bytes(setup)
    experts = explain.per_device_param_bytes(setup, explain.EXPERT_PARAMS) if cfg.num_experts else 0
    touched = 1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** tokens if cfg.num_experts else 0.0
    table = 0 if cfg.tie_word_embeddings else explain.per_device_param_bytes(setup, ("embed",))
    return total - experts + experts * touched - table + table * min(tokens, cfg.vocab_size) / cfg.vocab_size


def attention_in_use(llm) -> tuple[str, bool]:
    """What the runtime says it chose for each step, and whether the engine's decode graph really holds
    a Pallas attention kernel (the model's attention_kernel is None on the XLA path)."""
    from flax import nnx

    kernel = getattr(nnx.merge(llm.engine.graphdef, llm.state), "attention_kernel", None)
    report = getattr(llm.setup, "kernel_report", None)
    said = "; ".join(f"{k}: {v}" for k, v in report().items()) if report else "runtime reports no kernel choice"
    plugged = "a kernel is plugged into the engine's decode graph" if kernel else "NO kernel in the decode graph"
    return f"{plugged}; {said}", kernel is not None


def timed_generate(llm, prompts, params) -> dict:
    """llm.generate with every engine step timed: TPOT from the steps in which every request only decodes."""
    engine = llm.engine
    inner = engine.step
    steps = []

    def step():
        ready = [r for r in engine.running if r.in_decode]
        pure = bool(ready) and not engine.waiting and len(ready) == len(engine.running) == len(prompts)
        # A call feeds each request DECODE_STEPS tokens: it attends over len(tokens) .. len(tokens)+7 keys.
        context = sum(len(r.tokens) for r in ready) + len(ready) * (engine.decode_steps - 1) / 2
        t0 = time.perf_counter()
        out = inner()
        steps.append((time.perf_counter() - t0, pure, context))
        return out

    engine.step = step  # generate() calls engine.step(); the instance attribute shadows the method
    try:
        t0 = time.perf_counter()
        outs = llm.generate(prompts, params)
        total = time.perf_counter() - t0
    finally:
        del engine.step
    pure = [s for s in steps if s[1]]
    if not pure:
        raise RuntimeError(f"no engine step decoded all {len(prompts)} requests alone ({len(steps)} steps)")
    times = sorted(s[0] for s in pure)
    return {
        "tpot": times[len(times) // 2] / engine.decode_steps,
        "context": sum(s[2] for s in pure) / len(pure),
        "pure_steps": len(pure),
        "total": total,
        "tokens": sum(len(o.token_ids) for o in outs),
    }


def engine_batch(ctx: Ctx, llm, label: str, batch: int, target: tuple[str, float] | None) -> None:
    import numpy as np

    from jaxinfer.runtime import _pow2
    from jaxinfer.sampling import SamplingParams

    plan = ctx.plan
    rng = np.random.default_rng(batch)
    vocab = llm.config.vocab_size

    def prompts():
        return [rng.integers(0, vocab, plan.prompt).tolist() for _ in range(batch)]

    params = SamplingParams(max_tokens=plan.gen, temperature=0, ignore_eos=True)
    llm.generate(prompts(), params)  # warm-up: compiles this batch's prefill and decode shapes
    s = timed_generate(llm, prompts(), params)  # fresh prompts: no prefix-cache hits
    setup = llm.setup
    weights = weights_read(setup, _pow2(batch))  # the engine decodes a power-of-two of slots
    kv = s["context"] * setup.page_bytes(1, 1)  # k and v bytes of one token in every layer
    p = peaks()
    mbu = (weights + kv) / s["tpot"] / p["bw"]
    met = None if target is None else mbu >= target[1]
    detail = (
        f"TPOT {s['tpot'] * 1e3:.2f} ms, MBU {mbu:.0%} of {p['bw'] / 1e9:.0f} {p['bw_source']} (weights "
        f"{weights / 1e9:.2f} + KV {kv / 1e9:.3f} GB/step); {batch / s['tpot']:.0f} tok/s decode, generate() "
        f"{s['tokens'] / s['total']:.0f} tok/s" + (f"; target MBU {target[0]}" if target else "") + ctx.speed_note()
    )
    ctx.row(
        f"{label} batch {batch}",
        judged(ctx, met),
        detail,
        model=label,
        batch=batch,
        value=s["tpot"] * 1e3,
        unit="ms TPOT",
        tpot_ms=s["tpot"] * 1e3,
        mbu=mbu,
        weights_gb=weights / 1e9,
        kv_gb=kv / 1e9,
        pure_steps=s["pure_steps"],
        generate_tok_s=s["tokens"] / s["total"],
        peak_source=p["bw_source"],
        target=target[0] if target else None,
    )


def build_llm(ctx: Ctx, model: str, batches, moe: bool, quant: str = "none", fp8_kernel: str = "auto"):
    import jaxinfer

    plan = ctx.plan
    kernel = "interpret" if ctx.smoke else "pallas"
    pages_per_seq = -(-(plan.prompt + plan.gen + 2 * DECODE_STEPS) // PAGE)
    return jaxinfer.LLM(
        model,
        random_weights=True,
        dtype=plan.dtype,
        max_seq_len=plan.max_seq_len,
        max_num_seqs=max(batches),
        page_size=PAGE,
        num_pages=max(batches) * pages_per_seq + 2,
        prefill_chunk=max(batches) * plan.prompt,  # every prompt in the first step: all requests decode together
        attention=kernel,
        unroll_layers={"on": True, "off": False}.get(os.environ.get("GPU_CHECK_UNROLL", "auto")),
        quant=quant,
        fp8_kernel="interpret" if ctx.smoke and fp8_kernel == "pallas" else fp8_kernel,
        **({"moe_kernel": kernel} if moe else {}),
    )


def engine_stage(
    ctx: Ctx,
    model: str,
    label: str,
    batches,
    moe: bool,
    note: str = "",
    targets=None,
    quant: str = "none",
    fp8_kernel: str = "auto",
) -> None:
    import numpy as np

    from jaxinfer import explain

    peaks()  # before the weights: an unknown card's copy measurement needs a few free GB
    t0 = time.time()
    llm = build_llm(ctx, model, batches, moe, quant, fp8_kernel)
    what, ok = attention_in_use(llm)
    if llm.setup.fp8_matmul is not None:
        what += f"; fp8 decode matmul: {llm.setup.fp8_matmul}"
    cfg, dtype = llm.config, np.dtype(llm.dtype)
    ctx.row(
        f"{label} attention implementation",
        "pass" if ok else "fail",
        f"{what}; {cfg.num_layers} layers, {explain.total_param_bytes(llm.setup) / 1e9:.1f} GB of "
        f"{dtype.name}{'' if quant == 'none' else ', ' + quant} weights made in {time.time() - t0:.0f} s; layers "
        f"{'unrolled' if llm.unroll_layers else 'in lax.scan'}{note}",
        kernel_plugged=ok,
        layers=cfg.num_layers,
    )
    for batch in batches:
        name = f"{label} batch {batch}"
        if ctx.fits(name, ctx.plan.engine_batch_s):
            ctx.guarded(name, engine_batch, ctx, llm, label, batch, (targets or {}).get(batch))


def stage_d(ctx: Ctx) -> None:
    if ctx.smoke:
        register_smoke_shapes()
    engine_stage(
        ctx,
        ctx.plan.llama,
        "llama3-8b" if not ctx.smoke else "smoke-llama",
        ctx.plan.llama_batches,
        False,
        targets={1: (">= 75%", 0.75)},
    )


def entry_kernels(compiled) -> tuple[int, bool]:
    """Kernels the compiled program's entry computation launches (fusions, custom calls, copies, other
    non-trivial ops), and whether one of them transposes."""
    import re

    text = compiled.as_text()
    entry = text[text.index("ENTRY") :]
    entry = entry[: entry.index("\n}")]
    trivial = ("parameter(", "tuple(", "get-tuple-element(", "bitcast(", "constant(")
    ops = [line for line in entry.splitlines()[1:] if " = " in line and not any(t in line for t in trivial)]
    transposes = any(re.search(r"transpose|\bcopy\(", line) for line in ops)
    return len(ops), transposes


def fp8_matmul(ctx: Ctx, shape: str, k: int, n: int, rows: int) -> None:
    """One [rows, K] x [K, N] projection: bf16; fp8 weights through models/quant.einsum on its native path
    (activations quantized per row, cuBLASLt fp8) and on its weight-only path (the fp8 values cast inside
    the dot); the native path with the weight stored [N, K] (contracted dimension minor, the layout
    cuBLASLt's fp8 kernels take without a transpose); and at decode rows pallas_kernels/fp8_matmul."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from models import quant

    dtype = jnp.dtype(ctx.plan.dtype)
    kx, kw = jax.random.split(jax.random.key(0))  # made on the device: numpy took most of the stage at 8k rows
    x = jax.random.normal(kx, (rows, k), dtype)
    w = (jax.random.normal(kw, (k, n), jnp.float32) / np.sqrt(k)).astype(dtype)
    q = quant.quantize(w, (0,), "fp8")

    def through_einsum(min_rows, spec="mk,kn->mn"):
        def fn(x, q):
            saved = quant.FP8_NATIVE_MIN_ROWS
            quant.FP8_NATIVE_MIN_ROWS = min_rows  # read while tracing, which happens inside this call
            try:
                return quant.einsum(spec, x, q)
            finally:
                quant.FP8_NATIVE_MIN_ROWS = saved

        return fn

    # The same weight stored [N, K]: einsum's native path on the layout cuBLASLt's fp8 GEMM takes as is.
    q_nk = quant.QArray(q.values.T, q.scales.reshape(n, 1))

    from pallas_kernels import fp8_matmul as fm

    variants = {
        "bf16": (jax.jit(lambda x, w: x @ w), (x, w), w.nbytes),
        "native": (jax.jit(through_einsum(0)), (x, q), q.values.nbytes),
        "native [N,K]": (jax.jit(through_einsum(0, "mk,nk->mn")), (x, q_nk), q.values.nbytes),
        "weight-only": (jax.jit(through_einsum(1 << 62)), (x, q), q.values.nbytes),
    }
    if rows <= fm.MAX_ROWS:  # pallas_kernels/fp8_matmul, the decode kernel fp8_kernel="pallas" takes
        kernel = functools.partial(fm.fp8_matmul, interpret=ctx.smoke)
        variants["pallas"] = (jax.jit(kernel), (x, q.values, q.scales.reshape(n)), q.values.nbytes)
    ref = jnp.matmul(x.astype(jnp.float32), w.astype(jnp.float32), precision="highest")
    p, parts, fields = peaks(), [], {}
    for label, (fn, args, wbytes) in variants.items():
        if not ctx.smoke and ctx.left() < 3:
            parts.append(f"{label}: skipped (stage time)")
            continue
        compiled = fn.lower(*args).compile()
        t = seconds_per_call(compiled, *args, smoke=ctx.smoke)
        kernels, transposes = entry_kernels(compiled)
        err = float(jnp.max(jnp.abs(compiled(*args).astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
        gbs = (wbytes + x.nbytes + rows * n * dtype.itemsize) / t / 1e9
        parts.append(
            f"{label} {t * 1e3:.3f} ms ({gbs:.0f} GB/s, {2 * rows * k * n / t / 1e12:.0f} TFLOP/s, "
            f"{kernels} kernels{', a transpose' if transposes else ''}, err {err:.1e})"
        )
        fields[label] = {"ms": t * 1e3, "kernels": kernels, "transpose": transposes, "err": err}
    best = min((v["ms"], k_) for k_, v in fields.items() if k_ != "bf16") if len(fields) > 1 else None
    ctx.row(
        f"fp8 matmul {shape} K {k} N {n}, {rows} rows",
        "measured",
        "; ".join(parts) + (f"; fastest fp8: {best[1]}" if best else "") + ctx.speed_note(),
        rows=rows,
        variants=fields,
        bandwidth_gbs=p["bw"] / 1e9,
    )


def stage_f(ctx: Ctx) -> None:
    """fp8 weights in one projection: the native and weight-only paths of models/quant.einsum beside bf16,
    at decode and prefill rows: which path each row count should take (quant.FP8_NATIVE_MIN_ROWS)."""
    for shape, k, n in ctx.plan.fp8_shapes:
        for rows in ctx.plan.fp8_rows:
            name = f"fp8 matmul {shape} K {k} N {n}, {rows} rows"
            if ctx.fits(name, ctx.plan.unit_s):
                ctx.guarded(name, fp8_matmul, ctx, shape, k, n, rows)


def fp8_gemms(model: str, dtype: str, tokens: int) -> tuple[list[str], list[str]]:
    """The custom calls and fusions that multiply fp8 operands in the compiled fp8 prefill of `tokens`
    tokens and in the one-sequence decode step."""
    import re

    from jaxinfer import explain
    from jaxinfer.runtime import buckets, prepare

    setup = prepare(model, {}, dtype=dtype, random_weights=True, quant="fp8")
    b, t, cache_len = buckets(1, tokens, 16, 1, setup.max_seq_len)
    found = []
    for step in explain.compile_steps(setup, explain.abstract_cache(setup, b, cache_len), b, t, tokens):
        text = step.as_text()
        calls = re.findall(r'custom_call_target="([^"]*f8[^"]*)"', text)
        calls += re.findall(r"(__cublas\$lt\$matmul\$f8)", text)
        triton = len(re.findall(r"f8e4m3fn\[[^\]]*\][^\n]*(?:dot|__triton_gemm)", text))
        found.append(sorted(set(calls)) + ([f"{triton} fp8 dot fusions"] if triton else []))
    return found[0], found[1]


def _min_rows() -> int:
    from models import quant

    return quant.FP8_NATIVE_MIN_ROWS


def measured_min_rows() -> int | None:
    """From stage f's rows of this run: the fewest activation rows from which einsum's native fp8 path is
    as fast as its weight-only one on every shape, at that row count and every larger one measured (1 << 30
    when it never is); None without stage f's rows."""
    rows = [r for r in read_rows(Path(os.environ["GPU_CHECK_JSONL"])) if r["stage"] == "f" and "variants" in r]
    wins: dict[int, bool] = {}
    for r in rows:
        v = r["variants"]
        if "native" in v and "weight-only" in v:
            wins[r["rows"]] = wins.get(r["rows"], True) and v["native"]["ms"] <= v["weight-only"]["ms"]
    if not wins:
        return None
    threshold = 1 << 30
    for m in sorted(wins, reverse=True):
        if not wins[m]:
            break
        threshold = m
    return threshold


def stage_q(ctx: Ctx) -> None:
    """fp8 weights on Llama-3-8B shapes: the compiled decode's fp8 GEMMs, then TPOT beside stage d's bf16."""
    if ctx.smoke:
        register_smoke_shapes()
    model = ctx.plan.llama
    label = "llama3-8b" if not ctx.smoke else "smoke-llama"
    suggested = measured_min_rows()
    if suggested is not None:
        ctx.row(
            "fp8 native from rows",
            "info",
            f"stage f's timings say {suggested}; this run uses {_min_rows()} (models/quant.FP8_NATIVE_MIN_ROWS"
            f"{', set by GPU_CHECK_FP8_MIN_ROWS' if os.environ.get('GPU_CHECK_FP8_MIN_ROWS') else ''})",
            value=suggested,
        )
    if not ctx.smoke:
        tokens = FP8_PREFILL_TOKENS
        found = ctx.guarded("fp8 GEMMs in the compiled steps", fp8_gemms, model, ctx.plan.dtype, tokens)
        if found is not None:
            prefill, decode = found
            native = "__cublas$lt$matmul$f8"
            # einsum's rule: native from FP8_NATIVE_MIN_ROWS rows (the prefill's), weight-only below (decode's 1)
            expected = tokens >= _min_rows(), 1 >= _min_rows()
            ctx.row(
                "fp8 GEMMs in the compiled steps",
                "pass" if ((native in prefill), (native in decode)) == expected else "fail",
                f"prefill of {tokens} tokens: {', '.join(prefill) or 'no fp8 custom call or fp8 dot fusion'}; "
                f"one-sequence decode: {', '.join(decode) or 'no fp8 custom call or fp8 dot fusion'}; "
                f"cuBLASLt's fp8 GEMM expected from {_min_rows()} rows",
            )
    engine_stage(ctx, model, f"{label} fp8", ctx.plan.quant_batches, False, quant="fp8")
    # The same with pallas_kernels/fp8_matmul at decode rows (fp8_kernel="pallas"; "auto" keeps XLA until
    # these rows show the kernel faster).
    engine_stage(ctx, model, f"{label} fp8 kernel", ctx.plan.quant_batches, False, quant="fp8", fp8_kernel="pallas")
    bf16 = {
        r["batch"]: r for r in read_rows(Path(os.environ["GPU_CHECK_JSONL"])) if r["stage"] == "d" and "tpot_ms" in r
    }
    for r in read_rows(Path(os.environ["GPU_CHECK_JSONL"])):
        if r["stage"] != "q" or "tpot_ms" not in r or r["batch"] not in bf16:
            continue
        ratio = bf16[r["batch"]]["tpot_ms"] / r["tpot_ms"]
        target = 1.6 if r["batch"] == 1 else None
        path = "Pallas kernel" if r["model"].endswith("kernel") else "XLA"
        ctx.row(
            f"fp8 ({path}) vs bf16 TPOT batch {r['batch']}",
            judged(ctx, None if target is None else ratio >= target),
            f"fp8 {r['tpot_ms']:.2f} ms, bf16 {bf16[r['batch']]['tpot_ms']:.2f} ms: {ratio:.2f}x faster"
            + (f"; target >= {target}x" if target else "")
            + ctx.speed_note(),
            batch=r["batch"],
            value=ratio,
            unit="x bf16",
        )


def ring_step(ctx: Ctx, tokens: int) -> None:
    """One ring step's attention (models/ring_attention.py's per-rank body, in shard_map over a one-device
    sp axis, so the rank's own causal block): a block of `tokens` queries against as many keys at the
    attention heads of stage b. TFLOP/s counts the block's two matmuls whole (the masked half included:
    the body computes it); the causal half is what the prompt needs."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import Mesh
    from jax.sharding import PartitionSpec as P

    from models.ring_attention import ring_attention_local

    heads, kv_heads, hd = ctx.plan.attn_heads
    rng = np.random.default_rng(0)
    dtype = jnp.dtype(ctx.plan.dtype)
    q = jnp.asarray(rng.standard_normal((1, tokens, heads, hd)), dtype)
    k, v = (jnp.asarray(rng.standard_normal((1, tokens, kv_heads, hd)), dtype) for _ in range(2))
    pos = jnp.arange(tokens, dtype=jnp.int32)[None]
    body = functools.partial(ring_attention_local, axis="sp", size=1, sliding_window=None)
    mesh = Mesh(np.array(jax.devices()[:1]), ("sp",))
    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
    t = seconds_per_call(fn, q, k, v, pos, smoke=ctx.smoke)
    flops = 4 * tokens * tokens * heads * hd
    p = peaks()
    frac = flops / t / p["flops"] if p["flops"] else None
    ctx.row(
        f"ring step attention, block of {tokens} tokens",
        "measured",
        f"{t * 1e3:.3f} ms, {flops / t / 1e12:.1f} TFLOP/s"
        + (f" = {frac:.0%} of {p['flops'] / 1e12:.0f}" if frac is not None else " (bf16 peak unknown)")
        + f", {heads}/{kv_heads} heads of {hd}, {dtype.name}"
        + ctx.speed_note(),
        value=flops / t / 1e12,
        unit="TFLOP/s",
        fraction=frac,
    )


def stage_s(ctx: Ctx) -> None:
    """Sequence parallelism on one GPU: the ring step's attention throughput."""
    for tokens in ctx.plan.ring_tokens:
        name = f"ring step attention, block of {tokens} tokens"
        if ctx.fits(name, ctx.plan.unit_s):
            ctx.guarded(name, ring_step, ctx, tokens)


# The hardware file's name for each card jax reports (jaxinfer/hardware.toml).
PLAN_KINDS = {
    "NVIDIA H100 80GB HBM3": "h100-sxm",
    "NVIDIA H100 PCIe": "h100-pcie",
    "NVIDIA H200": "h200",
    "NVIDIA A100-SXM4-80GB": "a100-80gb",
}


def stage_p(ctx: Ctx) -> None:
    """The planner's TPOT against stages d and q's measured TPOT, same shapes, one device (tp=1)."""
    from jaxinfer import plan, runtime

    if ctx.smoke:
        register_smoke_shapes()
    kind = "cpu" if ctx.smoke else PLAN_KINDS.get(peaks()["kind"])
    if kind is None:
        ctx.row("plan vs measured", "skip", f"{peaks()['kind']} has no entry in jaxinfer/hardware.toml")
        return
    measured = [  # the runtime's default paths (stage q's Pallas-kernel rows are not what plan models)
        r
        for r in read_rows(Path(os.environ["GPU_CHECK_JSONL"]))
        if r["stage"] in "dq" and "tpot_ms" in r and not r.get("model", "").endswith("kernel")
    ]
    if not measured:
        ctx.row("plan vs measured", "skip", "stages d and q measured no TPOT in this run")
        return
    req = plan.Request(
        model=ctx.plan.llama, gpu=kind, gpus_per_node=1, nodes=1, isl=ctx.plan.prompt, osl=ctx.plan.gen, tpot_ms=1e9
    )
    cal = plan.load_calibration("cpu.json" if ctx.smoke else "gpu.json")
    hw = plan.load_hardware(kind, pinned=cal.pins())
    planner = plan.Planner(req, hw, cal, ctx.plan.dtype)
    prog = planner.program(1, 1, 1)
    context = ctx.plan.prompt + ctx.plan.gen / 2  # the mean context of a decode step, as plan takes it
    for r in measured:
        quant = "fp8" if r["stage"] == "q" else "none"
        name = f"plan vs measured TPOT {quant} batch {r['batch']}"
        mem = planner.memory_of(1, 1, quant)
        if isinstance(mem, str):
            ctx.row(name, "skip", mem)
            continue
        b, _, _ = runtime.buckets(r["batch"], ctx.plan.prompt, ctx.plan.gen, 1, ctx.plan.max_seq_len)
        predicted = planner.step_time(mem, prog, 1, b, context, True, 1) * 1e3
        err = predicted / r["tpot_ms"] - 1
        ctx.row(
            name,
            judged(ctx, abs(err) <= 0.25),
            f"predicted {predicted:.2f} ms, measured {r['tpot_ms']:.2f} ms: {err:+.0%}; target within 25%"
            + ctx.speed_note(),
            batch=r["batch"],
            value=err,
            unit="relative error",
        )
    for r in measured:
        if r["stage"] == "q" and r["batch"] == min(x["batch"] for x in measured if x["stage"] == "q"):
            mem = planner.memory_of(1, 1, "fp8")
            if isinstance(mem, str):
                continue
            b, _, _ = runtime.buckets(r["batch"], ctx.plan.prompt, ctx.plan.gen, 1, ctx.plan.max_seq_len)
            fitted = plan.fit_weight_only_passes(planner, mem, prog, b, context, r["tpot_ms"] / 1e3)
            ctx.row(
                "plan weight_only_passes fp8",
                "info",
                f"{fitted:.2f} makes batch {r['batch']}'s prediction the measured {r['tpot_ms']:.2f} ms "
                f"(the calibration file says {cal.weight_passes('fp8', 1):.2f})" + ctx.speed_note(),
                value=fitted,
            )


def moe_shape_that_fits(ctx: Ctx) -> tuple[str, str]:
    """The MoE shape, with fewer layers when its weights would not fit the device (said in the note)."""
    import jax
    import numpy as np

    from jaxinfer.config import SHAPES
    from jaxinfer.runtime import DTYPES

    name = ctx.plan.moe
    cfg = SHAPES[name]
    weights = cfg.param_count * np.dtype(DTYPES[ctx.plan.dtype]).itemsize
    dev = jax.devices()[0]
    limit = ((dev.memory_stats() if hasattr(dev, "memory_stats") else None) or {}).get("bytes_limit")
    if not limit or weights <= FIT_FRACTION * limit:
        return name, ""
    layers = max(1, int(cfg.num_layers * FIT_FRACTION * limit / weights))
    return shrink_layers(name, layers), (
        f"; {layers} of {cfg.num_layers} layers: {weights / 1e9:.0f} GB of weights exceed "
        f"{FIT_FRACTION:.0%} of the {limit / 1e9:.0f} GB jax may use"
    )


def shrink_layers(name: str, layers: int) -> str:
    from jaxinfer.config import SHAPES

    cfg = SHAPES[name]
    small = f"{name}-{layers}l"
    moe_layers = tuple(i for i in cfg.moe_layers if i < layers)
    SHAPES.setdefault(small, dataclasses.replace(cfg, num_layers=layers, moe_layers=moe_layers))
    return small


def stage_e(ctx: Ctx) -> None:
    if ctx.smoke:
        register_smoke_shapes()
    label = "qwen3-30b-a3b" if not ctx.smoke else "smoke-moe"
    model, note = moe_shape_that_fits(ctx)
    try:
        engine_stage(ctx, model, label, ctx.plan.moe_batches, True, note)
    except Exception as e:
        if "RESOURCE_EXHAUSTED" not in str(e) and "out of memory" not in str(e).lower():
            raise
        # Out of memory building the full model: say so, then try again with half the layers.
        traceback.print_exc()
        ctx.row(f"{label} full model", "error", _short(e))
        from jaxinfer.config import SHAPES

        layers = SHAPES[model].num_layers // 2
        if ctx.fits(f"{label} with {layers} layers", 2 * ctx.plan.engine_batch_s):
            note = f"; {layers} of {SHAPES[ctx.plan.moe].num_layers} layers after the full model ran out of memory"
            engine_stage(ctx, shrink_layers(ctx.plan.moe, layers), label, ctx.plan.moe_batches, True, note)


# --- peer: transformers ----------------------------------------------------------------------------


def peer_model(ctx: Ctx):
    """transformers' Llama with the shape of stage d's model, random weights, on the GPU (CPU when smoke)."""
    import torch
    import transformers

    from jaxinfer.config import SHAPES

    if ctx.smoke:
        register_smoke_shapes()
    c = SHAPES[ctx.plan.llama]
    cfg = transformers.LlamaConfig(
        vocab_size=c.vocab_size,
        hidden_size=c.hidden_size,
        intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers,
        num_attention_heads=c.num_heads,
        num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim,
        rope_theta=c.rope_theta,
        rms_norm_eps=c.rms_norm_eps,
        max_position_embeddings=c.max_position_embeddings,
    )
    device = "cpu" if ctx.smoke or not torch.cuda.is_available() else "cuda"
    dtype = torch.float32 if ctx.smoke else torch.bfloat16
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # made in bf16 directly: an f32 8B model would take 32 GB first
    try:
        with torch.device(device):
            model = transformers.LlamaForCausalLM(cfg).eval()
    finally:
        torch.set_default_dtype(previous)
    return model, device


def peer_generate_kwargs() -> tuple[dict, str]:
    """Static cache where this transformers has one, and no automatic torch.compile (a compile per batch
    size would not fit the budget); returns the kwargs and a description."""
    import transformers

    gen = transformers.GenerationConfig()
    kw = dict(do_sample=False, pad_token_id=0)
    what = []
    if hasattr(gen, "cache_implementation"):
        kw["cache_implementation"] = "static"
        what.append("static cache")
    if hasattr(gen, "disable_compile"):
        kw["disable_compile"] = True
        what.append("no torch.compile")
    return kw, ", ".join(what) or "dynamic cache"


def peer_batch(ctx: Ctx, model, device: str, kw: dict, batch: int, what: str) -> None:
    import torch

    plan = ctx.plan

    def timed(n: int) -> float:
        ids = torch.randint(0, model.config.vocab_size, (batch, plan.prompt), device=device)
        if device == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        if device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    timed(4)  # warm-up: kernels, allocator, cache classes
    first = timed(1)  # prefill and one token
    full = timed(plan.gen)
    tpot = (full - first) / (plan.gen - 1)
    ctx.row(
        f"transformers batch {batch}",
        "measured",
        f"TPOT {tpot * 1e3:.2f} ms, {batch / tpot:.0f} tok/s decode, generate() {batch * plan.gen / full:.0f} "
        f"tok/s ({what}, {model.config._attn_implementation} attention, {device}){ctx.speed_note()}",
        batch=batch,
        value=tpot * 1e3,
        unit="ms TPOT",
        tpot_ms=tpot * 1e3,
    )


def stage_peer(ctx: Ctx) -> None:
    import torch
    import transformers

    t0 = time.time()
    model, device = peer_model(ctx)
    kw, what = peer_generate_kwargs()
    ctx.row(
        "transformers model",
        "info",
        f"transformers {transformers.__version__}, torch {torch.__version__}, {ctx.plan.llama} shapes, "
        f"random weights on {device} in {time.time() - t0:.0f} s; {what}",
    )
    for batch in ctx.plan.llama_batches:
        name = f"transformers batch {batch}"
        if ctx.fits(name, ctx.plan.engine_batch_s / 2):
            ctx.guarded(name, peer_batch, ctx, model, device, kw, batch, what)


RUNNERS = {
    "env": stage_env,
    "a": stage_a,
    "b": stage_b,
    "c": stage_c,
    "d": stage_d,
    "peer": stage_peer,
    "e": stage_e,
    "f": stage_f,
    "q": stage_q,
    "s": stage_s,
    "p": stage_p,
}


def child_main(stage: str, smoke: bool, until: float) -> None:
    import logging

    logging.basicConfig(level=logging.INFO, stream=sys.stderr)  # the engine's sizes and timings, to the log
    ctx = Ctx(stage, SMOKE_PLAN if smoke else GPU_PLAN, smoke, until)
    if os.environ.get("GPU_CHECK_FP8_MIN_ROWS"):
        from models import quant

        quant.FP8_NATIVE_MIN_ROWS = int(os.environ["GPU_CHECK_FP8_MIN_ROWS"])
    try:
        RUNNERS[stage](ctx)
    except Exception as e:  # rows already printed stand; this one says where the stage stopped
        traceback.print_exc()
        ctx.row(f"stage {stage}", "error", _short(e))
    # The tests stand in a hang here, after the stage's rows, to see that a kill keeps what was printed.
    time.sleep(float(os.environ.get("GPU_CHECK_STALL_S", "0")))


# --- parent: schedule, children, summary -----------------------------------------------------------


def versions() -> str:
    out = [f"python {platform.python_version()}"]
    for pkg in (
        "jax",
        "jaxlib",
        "jax-cuda12-plugin",
        "jax-cuda13-plugin",
        "flax",
        "orbax-checkpoint",
        "triton",
        "transformers",
        "torch",
        "numpy",
    ):
        try:
            out.append(f"{pkg} {importlib.metadata.version(pkg)}")
        except importlib.metadata.PackageNotFoundError:
            if "plugin" not in pkg:
                out.append(f"{pkg} absent")
    return ", ".join(out)


def gpu_name() -> str:
    """The card as nvidia-smi names it, without starting jax (a parent holding GPU memory would starve
    the children)."""
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=15,
        )
        return r.stdout.strip().replace("\n", "; ") or f"nvidia-smi printed nothing (rc {r.returncode})"
    except (OSError, subprocess.SubprocessError) as e:
        return f"no nvidia-smi ({_short(e, 60)})"


def child_env(args, jsonl: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    env["GPU_CHECK_JSONL"] = str(jsonl)
    env["GPU_CHECK_UNROLL"] = args.unroll_layers
    env["TOKENIZERS_PARALLELISM"] = "false"
    env["JAX_COMPILATION_CACHE_DIR"] = str(args.cache_dir)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
    if args.cpu_smoke:
        env["JAX_PLATFORMS"] = "cpu"
    else:
        env.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", MEM_FRACTION)
    return env


def run_child(args, stage: Stage, timeout: float, env: dict, logs: Path) -> None:
    """One stage in a child process; its rows reach stdout and the JSON lines file as it makes them."""
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--_child",
        stage.name,
        "--_until",
        str(time.time() + timeout - 3),
    ]
    if args.cpu_smoke:
        cmd.append("--cpu_smoke")
    log = logs / f"{stage.name}.log"
    seen = count_rows(env["GPU_CHECK_JSONL"], stage.name)
    with open(log, "w") as err:
        proc = subprocess.Popen(cmd, stdout=None, stderr=err, env=env, cwd=ROOT)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            emit(
                stage.name,
                f"stage {stage.name}",
                "error",
                f"killed at its limit of {timeout:.0f} s; rows above are what it measured; log: {tail(log)}",
            )
            return
    if rc != 0 or count_rows(env["GPU_CHECK_JSONL"], stage.name) == seen:
        emit(stage.name, f"stage {stage.name}", "error", f"child exited with {rc}; log: {tail(log)}")


def tail(log: Path, lines: int = 3) -> str:
    try:
        text = log.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "(no log)"
    return " | ".join(line.strip()[:200] for line in text[-lines:]) or "(empty)"


def read_rows(path) -> list[dict]:
    try:
        return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError:
        return []


def count_rows(path, stage: str) -> int:
    return sum(1 for r in read_rows(path) if r["stage"] == stage)


def compare_with_peer(jsonl: Path) -> None:
    """Rows setting stage d's TPOT beside transformers' at each batch size (target: ours below)."""
    rows = read_rows(jsonl)
    peer = {r["batch"]: r["tpot_ms"] for r in rows if r["stage"] == "peer" and "tpot_ms" in r}
    ours = {r["batch"]: r for r in rows if r["stage"] == "d" and "tpot_ms" in r}
    smoke = os.environ.get("GPU_CHECK_SMOKE") == "1"
    for batch, r in sorted(ours.items()):
        if batch not in peer:
            emit("d", f"TPOT vs transformers batch {batch}", "skip", "no transformers figure at this batch")
            continue
        ratio = peer[batch] / r["tpot_ms"]
        status = "measured" if smoke else ("met" if r["tpot_ms"] < peer[batch] else "missed")
        emit(
            "d",
            f"TPOT vs transformers batch {batch}",
            status,
            f"ours {r['tpot_ms']:.2f} ms, transformers {peer[batch]:.2f} ms ({ratio:.2f}x faster); target: below"
            + (" [CPU: speed meaningless]" if smoke else ""),
            batch=batch,
            value=ratio,
            unit="x transformers",
        )


def summary(jsonl: Path, t0: float) -> int:
    """A short close (stdout's tail is what a killed or truncated run shows); 1 if anything failed."""
    rows = read_rows(jsonl)
    by_stage: dict[str, dict[str, int]] = {}
    for r in rows:
        counts = by_stage.setdefault(r["stage"], {})
        counts[r["status"]] = counts.get(r["status"], 0) + 1
    print(
        f"\nsummary after {time.time() - t0:.0f} s: "
        + "; ".join(f"{s} " + ", ".join(f"{n} {k}" for k, n in sorted(c.items())) for s, c in by_stage.items())
    )
    bad = [r for r in rows if r["status"] in BAD]
    for r in bad:
        print(f"  {r['status'].upper()} [{r['stage']}] {r['name']}")
    print(f"rows: {jsonl}", flush=True)
    return 1 if any(r["status"] in ("fail", "error") for r in rows) else 0


def parse_budgets(items: list[str]) -> dict[str, float]:
    out = {}
    for item in items:
        name, _, secs = item.partition("=")
        if name not in RUNNERS or not secs:
            raise SystemExit(f"--budget={item!r}: use STAGE=SECONDS with STAGE one of {', '.join(RUNNERS)}")
        out[name] = float(secs)
    return out


def parent_main(args) -> int:
    t0 = time.time()
    budgets = parse_budgets(args.budget)
    wanted = set(args.stages.split(",")) if args.stages else set(RUNNERS)
    if wanted - set(RUNNERS):
        raise SystemExit(f"--stages={args.stages}: stages are {', '.join(RUNNERS)}")
    os.environ["GPU_CHECK_T0"] = str(t0)
    out = os.environ.get("OUT")
    base = Path(out) if out else Path(tempfile.mkdtemp(prefix="gpu_check_"))
    base.mkdir(parents=True, exist_ok=True)
    jsonl, logs = base / "gpu_check.jsonl", base / "gpu_check_logs"
    logs.mkdir(exist_ok=True)
    jsonl.write_text("")  # this run's rows only
    os.environ["GPU_CHECK_JSONL"] = str(jsonl)
    os.environ["GPU_CHECK_SMOKE"] = "1" if args.cpu_smoke else "0"
    mode = "CPU smoke run (tiny shapes, interpret-mode kernels)" if args.cpu_smoke else "GPU run"
    emit("env", "versions", "info", f"{mode}; {versions()}")
    emit("env", "gpu", "info", gpu_name())
    plan = ", ".join(f"{s.name} {budgets.get(s.name, s.budget_s):.0f}" for s in STAGES if s.name in wanted)
    emit("env", "schedule", "info", f"deadline {args.deadline_s:.0f} s; stage budgets (s): {plan}")
    deadline = t0 + args.deadline_s
    env = child_env(args, jsonl)
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    for stage in STAGES:
        if stage.name not in wanted:
            continue
        budget = budgets.get(stage.name, stage.budget_s)
        left = deadline - time.time()
        if left < min(stage.min_s, budget):
            emit(
                stage.name,
                f"stage {stage.name}",
                "skip",
                f"{left:.0f} s left before the {args.deadline_s:.0f} s deadline; it needs at least {stage.min_s:.0f} s",
            )
            continue
        run_child(args, stage, min(budget, left), env, logs)
    if "d" in wanted and "peer" in wanted:
        compare_with_peer(jsonl)
    return summary(jsonl, t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu_smoke", action="store_true", help="every stage on CPU with tiny shapes")
    ap.add_argument("--deadline_s", type=float, default=DEFAULT_DEADLINE_S, help="global deadline in seconds")
    ap.add_argument("--stages", default="", help=f"comma-separated subset of {','.join(RUNNERS)}")
    ap.add_argument("--budget", action="append", default=[], help="STAGE=SECONDS, overrides a stage's budget")
    ap.add_argument("--cache_dir", type=Path, default=DEFAULT_CACHE, help="jax's persistent compilation cache")
    ap.add_argument(
        "--unroll_layers",
        choices=("auto", "on", "off"),
        default="auto",
        help="the engine stages' layer loop: LLM's default (auto), Python-unrolled (on) or lax.scan (off)",
    )
    ap.add_argument("--_child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--_until", type=float, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args._child:
        child_main(args._child, args.cpu_smoke, args._until)
        return
    sys.exit(parent_main(args))


if __name__ == "__main__":
    main()
