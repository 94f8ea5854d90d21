"""`bench`: time to first token, time per output token, throughput and memory-bandwidth utilisation.

MBU = bytes a decode step must read on one device (its weights and its KV cache) / TPOT / that
device's peak bandwidth: the nameplate figure of a known GPU, else (CPU, unknown cards) the peak measured
on the spot as the best of several large on-device copies. Simulated CPU devices share one memory
system, so on CPU the figure is meaningful at one device.
"""

from __future__ import annotations

import importlib.metadata
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer import explain, pipeline, steps
from jaxinfer.executor import decode_chunks
from jaxinfer.llm import LLM
from jaxinfer.runtime import DECODE_CHUNK, buckets
from jaxinfer.sampling import SamplingParams
from models import kv_cache, llama

# HBM bandwidth on the data sheet, by the device kind jax reports (bytes/s). An unknown card falls back
# to the measured peak, which runs below the nameplate and so flatters MBU.
NAMEPLATE_BANDWIDTH = {
    "NVIDIA H100 80GB HBM3": 3.35e12,  # H100 SXM
    "NVIDIA H100 PCIe": 2.0e12,
    "NVIDIA H100 NVL": 3.9e12,
    "NVIDIA H200": 4.8e12,
    "NVIDIA H200 NVL": 4.8e12,
    "NVIDIA A100-SXM4-80GB": 2.039e12,
    "NVIDIA A100-SXM4-40GB": 1.555e12,
    "NVIDIA A100 80GB PCIe": 1.935e12,
}


def nameplate_bandwidth(device: jax.Device) -> float | None:
    """The data-sheet bandwidth of a known GPU, or None (CPU, or a card not in the table)."""
    return NAMEPLATE_BANDWIDTH.get(device.device_kind) if device.platform == "gpu" else None


def _best_time(fn, *args, reps: int) -> float:
    fn(*args).block_until_ready()
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(*args).block_until_ready()
        best = min(best, time.perf_counter() - t0)
    return best


def peak_bandwidth(device: jax.Device, nbytes: int | None = None, reps: int = 5) -> float:
    """Bytes per second `device` moves, best of `reps`: the larger of a large copy (read + write) and a
    large matrix-vector product (the weights read once, as a decode step reads them). On CPU the copy
    runs on one thread while the product uses all cores, so the product sets the peak there."""
    if nbytes is None:
        nbytes = (256 << 20) if device.platform == "cpu" else (2 << 30)
    x = jax.device_put(jnp.zeros(nbytes // 4, jnp.float32), device)
    copy = 2 * nbytes / _best_time(jax.jit(lambda a: a + 1.0), x, reps=reps)
    w = x.reshape(1024, -1)
    v = jax.device_put(jnp.ones((1, 1024), jnp.float32), device)
    matvec = nbytes / _best_time(jax.jit(lambda a, b: a @ b), v, w, reps=reps)
    return max(copy, matvec)


def versions() -> dict[str, str]:
    out = {}
    for pkg in ("jax", "jaxlib", "flax", "orbax-checkpoint"):
        try:
            out[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def device_name() -> str:
    d = jax.devices()[0]
    if d.platform == "cpu":
        return f"CPU {platform.processor() or platform.machine()} ({len(jax.devices())} jax devices)"
    return f"{d.device_kind} x{len(jax.devices())}"


def bench_batch(llm: LLM, batch: int, prompt_len: int, gen_len: int, peak: float, seed: int = 0) -> dict:
    setup = llm.setup
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, llm.config.vocab_size, prompt_len).tolist() for _ in range(batch)]
    b, t, cache_len = buckets(batch, prompt_len, gen_len, llm.mesh.shape["dp"], llm.max_seq_len)
    tokens = np.zeros((b, t), np.int32)
    tokens[:batch, :prompt_len] = prompts
    tokens_d = setup.put(tokens)
    lengths = setup.put(np.full(b, prompt_len, np.int32))
    sampling, _ = setup.sampling_arrays(SamplingParams(temperature=0), b, b)
    chunks = max(1, -(-(gen_len - 1) // DECODE_CHUNK))

    def once():
        cache = llm._cache(b, cache_len)
        jax.block_until_ready(cache)
        t0 = time.perf_counter()
        tok, _, cache = steps.prefill(
            llm.graphdef,
            llm.state,
            cache,
            tokens_d,
            lengths,
            sampling,
            greedy_only=True,
            **({} if llm.setup.ring is None else {"ring": llm.setup.ring}),
        )
        tok.block_until_ready()
        ttft = time.perf_counter() - t0
        per_token = []
        decoding = decode_chunks(
            llm.graphdef,
            llm.state,
            cache,
            tok,
            np.full(b, prompt_len, np.int32),
            sampling,
            put=setup.put,
            n_steps=DECODE_CHUNK,
            greedy_only=True,
        )
        for _ in range(chunks):
            t1 = time.perf_counter()
            toks, _ = next(decoding)
            toks.block_until_ready()
            per_token.append((time.perf_counter() - t1) / DECODE_CHUNK)
        return ttft, per_token

    once()  # compile
    ttft, tpot = once()
    ttft = min(ttft, once()[0])
    params = SamplingParams(max_tokens=gen_len, temperature=0, ignore_eos=True)
    # The engine compiles the shapes this batch meets on first use: time a second batch of fresh
    # prompts (the same ones would hit the prefix cache).
    llm.generate([rng.integers(0, llm.config.vocab_size, prompt_len).tolist() for _ in range(batch)], params)
    t0 = time.perf_counter()
    llm.generate(prompts, params)
    e2e = batch * gen_len / (time.perf_counter() - t0)
    cache = setup.cache_layout(setup.cache_shape(b, cache_len), llama.CACHE_AXES)  # values and scales
    reads = explain.step_param_bytes(setup, b // llm.mesh.shape["dp"]) + kv_cache.device_bytes(cache)
    median = statistics.median(tpot)
    moe = {}
    if llm.config.num_experts:
        tokens, itemsize = b // llm.mesh.shape["dp"], np.dtype(setup.dtype).itemsize
        mode = setup.moe.mode(llm.config, tokens, itemsize)
        sent = setup.moe.cost(llm.config, tokens, itemsize)[mode]
        moe = {"moe_decode_mode": mode, "moe_bytes_sent_per_token_per_layer": sent / tokens}
    return {
        **moe,
        "batch": batch,
        "ttft_s": ttft,
        "tpot_median_s": median,
        "tpot_p90_s": float(np.percentile(tpot, 90)),
        "decode_tok_s": batch / median,
        "generate_tok_s": e2e,
        "bytes_read_per_step": reads,
        "mbu": reads / median / peak,
        "roofline_tok_s": batch * peak / reads,
        "bubble_fraction": pipeline.bubble_fraction(
            llm.mesh.shape["pp"], pipeline.microbatch_count(b, llm.mesh.shape["pp"], llm.setup.microbatch_rows)
        ),
    }


def run(llm: LLM, batch_sizes: list[int], prompt_len: int, gen_len: int) -> dict:
    device = llm.mesh.devices.flat[0]
    nameplate = nameplate_bandwidth(device)
    peak = nameplate or peak_bandwidth(device)
    rows = [bench_batch(llm, b, prompt_len, gen_len, peak) for b in batch_sizes]
    return {
        "device": device_name(),
        "dtype": np.dtype(llm.dtype).name,
        "mesh": {k: int(v) for k, v in llm.mesh.shape.items()},
        "versions": versions(),
        "peak_bandwidth_gb_s": peak / 1e9,
        "peak_source": "nameplate" if nameplate else "measured",
        "kernels": llm.setup.kernel_report(),
        "layers": "unrolled" if llm.unroll_layers else "scanned",  # (each pipeline stage's, at pp > 1)
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        **(
            {"expert_param_bytes_per_device": explain.per_device_param_bytes(llm.setup, explain.EXPERT_PARAMS)}
            if llm.config.num_experts
            else {}
        ),
        "rows": rows,
    }


def format_table(r: dict) -> str:
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "one device"
    head = (
        f"{r['device']}, {r['dtype']}, {mesh}, prompt {r['prompt_len']}, {r['gen_len']} new tokens; "
        f"peak bandwidth {r['peak_bandwidth_gb_s']:.1f} GB/s ({r.get('peak_source', 'measured')}); "
        + ", ".join(f"{k} {v}" for k, v in r["versions"].items())
    )
    head += "".join(f"\n{step}: {impl}" for step, impl in r.get("kernels", {}).items())
    moe = any("moe_decode_mode" in x for x in r["rows"])
    if "expert_param_bytes_per_device" in r:
        head += f"; expert weights per device {r['expert_param_bytes_per_device'] / (1 << 30):.3f} GiB"
    lines = [
        head,
        "| batch | TTFT ms | TPOT ms (median / p90) | decode tok/s | generate() tok/s | roofline tok/s | MBU "
        "| pipeline bubble |" + (" MoE decode dispatch, bytes sent per token per layer |" if moe else ""),
        "|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---|" if moe else ""),
    ]
    for x in r["rows"]:
        lines.append(
            f"| {x['batch']} | {x['ttft_s'] * 1e3:.1f} | {x['tpot_median_s'] * 1e3:.2f} / "
            f"{x['tpot_p90_s'] * 1e3:.2f} | {x['decode_tok_s']:.1f} | {x['generate_tok_s']:.1f} | "
            f"{x['roofline_tok_s']:.1f} | {x['mbu']:.0%} | {x['bubble_fraction']:.0%} |"
            + (f" {x['moe_decode_mode']}, {x['moe_bytes_sent_per_token_per_layer']:.0f} |" if moe else "")
        )
    return "\n".join(lines)


def prefill_sweep(make_llm, sps: list[int], prompt_lens: list[int], reps: int = 3) -> dict:
    """Sequence parallelism's prefill, measured: for each sp (an LLM from `make_llm(sp)`) and prompt
    length, the best of `reps` timed prefills of one prompt (the ring at sp > 1) and the compiled step's
    temporary bytes on one device (XLA's memory analysis: activations, attention blocks, the K/V in
    flight). Simulated CPU devices share this machine's cores and memory, so their times show the
    ring's overhead, not its speed-up; the bytes per device are what a real device would hold."""
    rows = []
    for sp in sps:
        llm = make_llm(sp)
        setup = llm.setup
        ring = {} if setup.ring is None else {"ring": setup.ring}
        sampling, _ = setup.sampling_arrays(SamplingParams(temperature=0), 1, 1)
        for n in prompt_lens:
            _, t, cache_len = buckets(1, n, 1, llm.mesh.shape["dp"], llm.max_seq_len)
            tokens = setup.put(np.random.default_rng(n).integers(0, llm.config.vocab_size, (1, t)).astype(np.int32))
            lengths = setup.put(np.full(1, n, np.int32))
            weights = (llm.graphdef, llm.state)
            cache = llm._cache(1, cache_len)
            mem = steps.prefill.lower(*weights, cache, tokens, lengths, sampling, greedy_only=True, **ring)
            mem = mem.compile().memory_analysis()
            best = float("inf")
            for _ in range(reps + 1):  # the first call compiles; the step takes (donates) the cache
                cache = jax.block_until_ready(llm._cache(1, cache_len))
                t0 = time.perf_counter()
                jax.block_until_ready(
                    steps.prefill(*weights, cache, tokens, lengths, sampling, greedy_only=True, **ring)
                )
                best = min(best, time.perf_counter() - t0)
            rows.append(
                {
                    "sp": sp,
                    "prompt_len": n,
                    "prefill_s": best,
                    "prompt_tok_s": n / best,
                    "temp_bytes_per_device": int(mem.temp_size_in_bytes) if mem else None,
                }
            )
    return {"device": device_name(), "dtype": np.dtype(llm.dtype).name, "versions": versions(), "rows": rows}


def format_prefill_sweep(r: dict) -> str:
    lines = [
        f"{r['device']}, {r['dtype']}: prefill of one prompt, best of 3",
        "| sp | prompt tokens | prefill ms | prompt tok/s | XLA temp bytes per device | vs sp=1 |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    base = {x["prompt_len"]: x["temp_bytes_per_device"] for x in r["rows"] if x["sp"] == 1}
    for x in r["rows"]:
        ratio = base.get(x["prompt_len"]) and x["temp_bytes_per_device"] / base[x["prompt_len"]]
        lines.append(
            f"| {x['sp']} | {x['prompt_len']} | {x['prefill_s'] * 1e3:.1f} | {x['prompt_tok_s']:.0f} | "
            f"{x['temp_bytes_per_device'] / 2**20:.1f} MiB | {f'{ratio:.2f}' if ratio else '-'} |"
        )
    return "\n".join(lines)
