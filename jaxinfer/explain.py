"""`explain`: what one prefill and one decode step cost on a mesh, from the compiled programs.

Nothing is materialised: parameters and the cache are abstract arrays carrying their shardings, so a
405B model compiles on a laptop with simulated devices. Collective counts and bytes are read from the
compiled HLO; a collective inside the scanned layer loop counts once per layer.
"""

from __future__ import annotations

import math

import jax
import numpy as np
from flax import nnx

from jaxinfer import hlo, pipeline, steps
from jaxinfer.llm import Setup, buckets, prepare
from jaxinfer.sampling import SamplingParams
from models import llama


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


def per_device_param_bytes(setup: Setup) -> int:
    return sum(_shard_bytes(v.get_value()) for _, v in nnx.to_flat_state(setup.abstract))


def abstract_cache(setup: Setup, batch: int, length: int) -> llama.KVCache:
    x = jax.ShapeDtypeStruct(setup.cache_shape(batch, length), setup.dtype, sharding=setup.cache_sharding)
    return llama.KVCache(x, x)


def step_report(compiled, num_layers: int, dtype) -> dict:
    """Collectives per step and per layer. A reduction the backend widened (XLA:CPU sums bf16 in f32)
    is counted at the program's dtype, which is what a GPU moves."""
    text = compiled.as_text()
    itemsize = np.dtype(dtype).itemsize
    trips = hlo.loop_trip_counts(text)
    layer_bodies = {name for name, n in trips.items() if n == num_layers}
    report: dict[str, dict[str, int]] = {}
    for c in hlo.collectives(text):
        in_layer = c.computation in layer_bodies
        entry = report.setdefault(c.kind, {"count": 0, "bytes": 0, "per_layer_count": 0, "per_layer_bytes": 0})
        size = c.bytes * itemsize // 4 if c.promoted else c.bytes
        times = num_layers if in_layer else 1
        entry["count"] += times
        entry["bytes"] += times * size
        if in_layer:
            entry["per_layer_count"] += 1
            entry["per_layer_bytes"] += size
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    mem = compiled.memory_analysis()
    return {
        "collectives": report,
        "xla_cost_analysis": {k: float(cost[k]) for k in ("flops", "bytes accessed") if k in cost},
        "argument_bytes": int(mem.argument_size_in_bytes) if mem else None,
        "temp_bytes": int(mem.temp_size_in_bytes) if mem else None,
    }


def matmul_flops(setup: Setup, tokens: int, kv_len: int, head_tokens: int) -> float:
    """Per-device flops of a step: `tokens` new tokens through the layers attending to `kv_len` keys,
    `head_tokens` of them through the vocabulary projection (the embedding is a lookup, no matmul)."""
    cfg = setup.config
    tp = setup.mesh.shape["tp"]
    head = cfg.vocab_size * cfg.hidden_size
    layers = cfg.param_count - head * (1 if cfg.tie_word_embeddings else 2)
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * kv_len
    return (tokens * (2 * layers + attn) + head_tokens * 2 * head) / tp


def explain(
    model: str,
    axes: dict[str, int],
    mesh: str | None = None,
    dtype: str | None = None,
    batch: int = 1,
    prompt_len: int = 128,
    gen_len: int = 128,
) -> dict:
    setup = prepare(model, axes, mesh, dtype, random_weights=True)
    cfg = setup.config
    b, t, cache_len = buckets(batch, prompt_len, gen_len, setup.mesh.shape["dp"], setup.max_seq_len)
    cache = abstract_cache(setup, b, cache_len)
    sampling, _ = setup.sampling_arrays(SamplingParams(temperature=0), b, b)
    tokens = setup.put(np.zeros((b, t), np.int32))
    lengths = setup.put(np.full(b, prompt_len, np.int32))
    column = setup.put(np.zeros(b, np.int32))
    prefill = steps.prefill.lower(
        setup.graphdef, setup.abstract, cache, tokens, lengths, sampling, greedy_only=True
    ).compile()
    decode = steps.decode.lower(
        setup.graphdef, setup.abstract, cache, column, column, sampling, n_steps=1, greedy_only=True
    ).compile()
    param_bytes = per_device_param_bytes(setup)
    kv_bytes = 2 * _shard_bytes(cache.k)
    n_dev = setup.mesh.size
    out = {
        "model": model,
        "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
        "dtype": np.dtype(setup.dtype).name,
        "shapes": {"batch": b, "prompt_len": t, "cache_len": cache_len},
        "per_device": {"param_bytes": param_bytes, "kv_cache_bytes": kv_bytes},
        "total": {"param_bytes": cfg.param_count * np.dtype(setup.dtype).itemsize, "devices": n_dev},
        "steps": {},
    }
    rows = b // setup.mesh.shape["dp"]  # sequences on one device
    for name, compiled, tokens_in, kv_len, reads in (
        ("prefill", prefill, rows * t, t, param_bytes),
        ("decode", decode, rows, cache_len, param_bytes + kv_bytes),
    ):
        step = step_report(compiled, cfg.num_layers, setup.dtype)
        step["bytes_read"] = reads
        step["flops"] = matmul_flops(setup, tokens_in, kv_len, rows)
        step["arithmetic_intensity"] = step["flops"] / reads
        out["steps"][name] = step
    stages = setup.mesh.shape["pp"]
    if stages > 1:
        micro = {name: pipeline.microbatch_count(rows, stages) for name in ("prefill", "decode")}
        out["pipeline"] = {
            "stages": stages,
            "layers_per_stage": cfg.num_layers // stages,
            "microbatches": micro,
            "bubble_fraction": {k: pipeline.bubble_fraction(stages, m) for k, m in micro.items()},
            "boundary_bytes_per_step": {
                k: out["steps"][k]["collectives"].get("collective-permute", {}).get("bytes", 0) for k in micro
            },
        }
    return out


def format_report(r: dict) -> str:
    gib = 1 << 30
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "one device"
    lines = [
        f"{r['model']} on {mesh} ({r['dtype']}), batch {r['shapes']['batch']}, prompt {r['shapes']['prompt_len']}, "
        f"cache {r['shapes']['cache_len']}",
        f"per device: parameters {r['per_device']['param_bytes'] / gib:.3f} GiB "
        f"(total {r['total']['param_bytes'] / gib:.3f} GiB / {r['total']['devices']} devices), "
        f"KV cache {r['per_device']['kv_cache_bytes'] / gib:.3f} GiB",
    ]
    if "pipeline" in r:
        p = r["pipeline"]
        lines.append(
            f"pipeline: {p['stages']} stages of {p['layers_per_stage']} layers; decode micro-batches "
            f"{p['microbatches']['decode']}, bubble {p['bubble_fraction']['decode']:.0%}; bytes crossing stage "
            f"boundaries per decode step {_size(p['boundary_bytes_per_step']['decode'])}"
        )
    for name, s in r["steps"].items():
        lines.append(
            f"{name}: reads {s['bytes_read'] / gib:.3f} GiB, {s['flops'] / 1e9:.2f} GFLOP per device, "
            f"arithmetic intensity {s['arithmetic_intensity']:.1f} flop/byte"
        )
        if not s["collectives"]:
            lines.append("  no collectives")
        for kind, c in sorted(s["collectives"].items()):
            lines.append(
                f"  {kind:<18} {c['count']:>5} per step ({_size(c['bytes'])}), {c['per_layer_count']} per "
                f"layer ({_size(c['per_layer_bytes'])})"
            )
    return "\n".join(lines)


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
