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
from jaxinfer.runtime import Setup, buckets, prepare
from jaxinfer.sampling import SamplingParams
from models import kv_cache, llama, ring_attention

EXPERT_PARAMS = ("we_gate_up", "we_down")


def _shard_bytes(x: jax.ShapeDtypeStruct) -> int:
    return math.prod(x.sharding.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize


def per_device_param_bytes(setup: Setup, names=None) -> int:
    """Bytes of the parameters (all, or those named) that one device holds; a quantized weight counts
    its int8 values and its scales."""
    return sum(
        _shard_bytes(leaf)
        for path, v in nnx.to_flat_state(setup.abstract)
        if names is None or path[-1] in names
        for leaf in jax.tree.leaves(v.get_value())
    )


def total_param_bytes(setup: Setup) -> int:
    """Bytes of all parameters, unsharded."""
    if setup.quant == "none":
        return setup.config.param_count * np.dtype(setup.dtype).itemsize
    leaves = [leaf for _, v in nnx.to_flat_state(setup.abstract) for leaf in jax.tree.leaves(v.get_value())]
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


def step_param_bytes(setup: Setup, tokens: int) -> float:
    """Parameter bytes one device reads in a step over `tokens` tokens: all of them in a dense model
    but the embedding rows no token looks up; in a routed one only the experts some token chose
    (expected value under uniform routing)."""
    params = per_device_param_bytes(setup)
    cfg = setup.config
    if not cfg.tie_word_embeddings:
        # The embedding is a lookup: a step reads one row per token, not the table (a tied table is
        # read whole as the output head).
        table = per_device_param_bytes(setup, ("embed",))
        params += table * min(tokens, cfg.vocab_size) / cfg.vocab_size - table
    if not cfg.num_experts:
        return params
    experts = per_device_param_bytes(setup, EXPERT_PARAMS)
    touched = 1 - (1 - cfg.num_experts_per_tok / cfg.num_experts) ** tokens
    return params - experts + experts * touched


def abstract_cache(setup: Setup, batch: int, length: int) -> llama.KVCache:
    """The contiguous cache as kv_cache_dtype stores it (values, and scales when quantized)."""
    return llama.KVCache(*setup.cache_layout(setup.cache_shape(batch, length), llama.CACHE_AXES))


def pool_bytes_per_token(setup: Setup, page_size: int = 16) -> int:
    """Bytes a token of the serving engine's page pool costs one device, averaged over the pool: the
    layers and heads the device holds, and with sp > 1 a 1/sp share, since the pool's pages are split
    over sp (one page per sp rank here). At sp = 1 this equals the contiguous cache's bytes per token."""
    sp = setup.mesh.shape["sp"]
    return setup.page_bytes(sp, page_size) // (sp * page_size)


def step_report(compiled, num_layers: int, dtype) -> dict:
    """Collectives per step and per layer, `num_layers` being the trip count of a layer loop (a pipeline
    stage runs one loop over its layers in each tick it works; per layer counts one loop). A reduction
    the backend widened (XLA:CPU sums bf16 in f32) is counted at the program's dtype, which is what a
    GPU moves."""
    text = compiled.as_text()
    itemsize = np.dtype(dtype).itemsize
    bodies = {name for name, n in hlo.loop_trip_counts(text).items() if n == num_layers}
    # A layer's collectives may sit in computations its loop body calls (the MoE dispatch's branches).
    in_layers = hlo.reachable(text, bodies)
    report: dict[str, dict[str, int]] = {}
    for c in hlo.collectives(text):
        in_layer = c.computation in in_layers
        entry = report.setdefault(c.kind, {"count": 0, "bytes": 0, "per_layer_count": 0, "per_layer_bytes": 0})
        size = c.bytes * itemsize // 4 if c.promoted else c.bytes
        times = num_layers if in_layer else 1
        entry["count"] += times
        entry["bytes"] += times * size
        if in_layer:
            entry["per_layer_count"] += 1
            entry["per_layer_bytes"] += size
    for entry in report.values():
        entry["per_layer_count"] //= max(1, len(bodies))
        entry["per_layer_bytes"] //= max(1, len(bodies))
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
    tp, ep = setup.mesh.shape["tp"], setup.mesh.shape["ep"]
    head = cfg.vocab_size * cfg.hidden_size
    experts = cfg.expert_param_count(cfg.num_experts_per_tok)
    layers = cfg.active_param_count - head * (1 if cfg.tie_word_embeddings else 2) - experts
    attn = 4 * cfg.num_layers * cfg.num_heads * cfg.head_dim * kv_len
    return (tokens * (2 * layers + attn + 2 * experts / ep) + head_tokens * 2 * head) / tp


def explain(
    model: str,
    axes: dict[str, int],
    mesh: str | None = None,
    dtype: str | None = None,
    batch: int = 1,
    prompt_len: int = 128,
    gen_len: int = 128,
    moe_dispatch: str = "auto",
    attention: str = "auto",
    moe_kernel: str = "auto",
    quant: str = "auto",
    kv_cache_dtype: str = "auto",
    quantize_head: bool = False,
) -> dict:
    setup = prepare(
        model,
        axes,
        mesh,
        dtype,
        random_weights=True,
        moe_dispatch=moe_dispatch,
        attention=attention,
        moe_kernel=moe_kernel,
        quant=quant,
        kv_cache_dtype=kv_cache_dtype,
        quantize_head=quantize_head,
    )
    cfg = setup.config
    b, t, cache_len = buckets(batch, prompt_len, gen_len, setup.mesh.shape["dp"], setup.max_seq_len)
    cache = abstract_cache(setup, b, cache_len)
    prefill, decode = compile_steps(setup, cache, b, t, prompt_len)
    param_bytes = per_device_param_bytes(setup)
    kv_bytes = kv_cache.device_bytes(cache)
    rows = b // setup.mesh.shape["dp"]  # sequences on one device
    n_dev = setup.mesh.size
    out = {
        "model": model,
        "mesh": {k: int(v) for k, v in setup.mesh.shape.items()},
        "dtype": np.dtype(setup.dtype).name,
        "quant": setup.quant,
        "kv_cache_dtype": setup.kv_cache_dtype,
        "shapes": {"batch": b, "prompt_len": t, "cache_len": cache_len},
        "per_device": {
            "param_bytes": param_bytes,
            "kv_cache_bytes": kv_bytes,
            # the serving engine's paged pool, split over sp (the static path's contiguous cache is not)
            "kv_cache_bytes_per_token": pool_bytes_per_token(setup),
            "bytes_left_beside_weights": fits(param_bytes),
        },
        "total": {"param_bytes": total_param_bytes(setup), "devices": n_dev},
        "kernels": setup.kernel_report(),
        "steps": {},
    }
    for name, compiled, tokens_in, kv_len, reads in (
        ("prefill", prefill, rows * t, t, step_param_bytes(setup, rows * t)),
        ("decode", decode, rows, cache_len, step_param_bytes(setup, rows) + kv_bytes),
    ):
        # Pipeline stages each scan their own slice of the layers (once per tick they work).
        step = step_report(compiled, cfg.num_layers // setup.mesh.shape["pp"], setup.dtype)
        step["bytes_read"] = reads
        step["flops"] = matmul_flops(setup, tokens_in, kv_len, rows)
        if name == "prefill" and setup.ring is not None:
            step["flops"] /= setup.mesh.shape["sp"]  # each sp rank runs its share of the prompt (zigzag: equal work)
        step["arithmetic_intensity"] = step["flops"] / reads
        out["steps"][name] = step
    # What the compiled prefill holds on one device beside its arguments (activations, attention blocks,
    # the ring's K/V in flight): XLA's own figure, the one sequence parallelism divides.
    out["per_device"]["prefill_activation_bytes"] = out["steps"]["prefill"]["temp_bytes"]
    if setup.mesh.shape["sp"] > 1:
        permutes = out["steps"]["prefill"]["collectives"].get("collective-permute", {})
        out["ring"] = {
            "sp": int(setup.mesh.shape["sp"]),
            "collective_permutes_per_layer": permutes.get("per_layer_count", 0),
            "bytes_per_layer": permutes.get("per_layer_bytes", 0),
        }
    if cfg.num_experts:
        # Over sp a prefill's tokens reach the experts split as ring attention left them (models/moe.py):
        # each sp rank dispatches its share of the padded prompt.
        sp = setup.mesh.shape["sp"] if setup.ring is not None else 1
        out["moe"] = moe_report(
            setup, out, {"prefill": rows * ring_attention.padded_length(t, sp) // sp, "decode": rows}
        )
    stages = setup.mesh.shape["pp"]
    if stages > 1:
        micro = {
            "prefill": pipeline.microbatch_count(rows, stages, setup.microbatch_rows, tokens=t),
            "decode": pipeline.microbatch_count(rows, stages, setup.microbatch_rows),
        }
        out["pipeline"] = {
            "stages": stages,
            "layers_per_stage": cfg.num_layers // stages,
            "microbatches": micro,
            "bubble_fraction": {k: pipeline.bubble_fraction(stages, m) for k, m in micro.items()},
            "boundary_bytes_per_step": {
                "prefill": boundary_bytes(prefill, setup.mesh),
                "decode": boundary_bytes(decode, setup.mesh),
            },
        }
    return out


def boundary_bytes(compiled, mesh) -> int:
    """Bytes one device hands to the next pipeline stage in a step: its collective-permutes over pp (a
    ring's over sp are not stage boundaries)."""
    return sum(
        c.bytes for c in hlo.collectives(compiled.as_text()) if c.kind == "collective-permute" and "pp" in c.axes(mesh)
    )


def moe_report(setup: Setup, report: dict, tokens: dict[str, int]) -> dict:
    """Expert memory per device, the dispatch mode of each step, its all-to-all bytes from the HLO, and
    the cost model's bytes for both modes (what "auto" chose by)."""
    cfg = setup.config
    itemsize = np.dtype(setup.dtype).itemsize
    out = {
        "experts": cfg.num_experts,
        "top_k": cfg.num_experts_per_tok,
        "routed_layers": len(cfg.moe_layers),
        "expert_param_bytes": {
            "per_device": per_device_param_bytes(setup, EXPERT_PARAMS),
            "total": cfg.expert_param_count(cfg.num_experts) * itemsize,
        },
        "steps": {},
    }
    for name, n in tokens.items():
        a2a = report["steps"][name]["collectives"].get("all-to-all", {})
        out["steps"][name] = {
            "tokens": n,
            "mode": setup.moe.mode(cfg, n, itemsize),
            "all_to_all_per_layer": a2a.get("per_layer_count", 0),
            "all_to_all_bytes_per_token_per_layer": a2a.get("per_layer_bytes", 0) / n,
            "model_bytes_sent_per_layer": setup.moe.cost(cfg, n, itemsize),
        }
    return out


# Memory per GPU of the cards people serve on (data sheets: H100 SXM 80 GB HBM3, H200 141 GB HBM3e).
CARDS = {"an 80 GB H100": 80e9, "a 141 GB H200": 141e9}


def fits(param_bytes: int) -> dict[str, float]:
    """Per card: the bytes left beside one device's weights for the KV cache and activations (negative:
    the weights alone do not fit)."""
    return {card: size - param_bytes for card, size in CARDS.items()}


def _fits_line(param_bytes: int) -> str:
    parts = []
    for card, left in fits(param_bytes).items():
        if left > 0:
            parts.append(f"fit {card} with {left / 1e9:.1f} GB left for the KV cache and activations")
        else:
            parts.append(f"do not fit {card} ({-left / 1e9:.1f} GB over)")
    return f"weights per device {param_bytes / 1e9:.1f} GB: " + "; ".join(parts)


def compile_steps(setup: Setup, cache, b: int, t: int, prompt_len: int):
    """The static path's prefill (b prompts of t tokens) and one-token decode, compiled against abstract
    weights: nothing is allocated, so any model compiles on any machine."""
    sampling, _ = setup.sampling_arrays(SamplingParams(temperature=0), b, b)
    tokens = setup.put(np.zeros((b, t), np.int32))
    lengths = setup.put(np.full(b, prompt_len, np.int32))
    column = setup.put(np.zeros(b, np.int32))
    prefill = steps.prefill.lower(
        setup.graphdef,
        setup.abstract,
        cache,
        tokens,
        lengths,
        sampling,
        greedy_only=True,
        **({} if setup.ring is None else {"ring": setup.ring}),
    ).compile()
    decode = steps.decode.lower(
        setup.graphdef, setup.abstract, cache, column, column, sampling, n_steps=1, greedy_only=True
    ).compile()
    return prefill, decode


def compile_engine_steps(setup: Setup, chunk: int, page_size: int = 16):
    """The serving engine's programs over its page pool (split over sp when sp > 1, as
    jaxinfer/executor.py builds it), compiled against abstract weights and an abstract pool: a prompt's
    first chunk of `chunk` tokens (as ring attention over sp; None at sp = 1, where it is an ordinary
    chunk), a later chunk, and one decode step of one sequence, both over a context of two chunks."""
    split = setup.page_split
    sp = setup.mesh.shape["sp"]
    width = 1 << max(0, -(-2 * chunk // page_size) - 1).bit_length()  # block-table entries, a power of two
    k, v = setup.cache_layout(setup.page_shape(sp * (-(-width // sp) + 1), page_size), kv_cache.PAGE_AXES)
    tables, valid = np.zeros((1, width), np.int32), np.ones((1, chunk), bool)
    tokens = positions = np.zeros((1, chunk), np.int32)
    args = (setup.graphdef, setup.abstract, k, v, tables, valid, tokens, positions)
    extra = {} if split is None else {"split": split}  # (jit keys an explicit None apart)
    ring = None if split is None else steps.prefill_chunk_ring.lower(*args, split=split).compile()
    later = steps.prefill_chunk.lower(*args, **extra).compile()
    sampling, _ = setup.sampling_arrays(SamplingParams(temperature=0), 1, 1)
    cache = kv_cache.PagedKVCache(k, v, tables, np.ones((1, 1), bool), split)
    column = setup.put(np.zeros(1, np.int32))
    decode = steps.decode.lower(
        setup.graphdef, setup.abstract, cache, column, column, sampling, n_steps=1, greedy_only=True
    ).compile()
    return ring, later, decode


def format_report(r: dict) -> str:
    gib = 1 << 30
    mesh = " x ".join(f"{k}={v}" for k, v in r["mesh"].items() if v > 1) or "one device"
    weights = r["dtype"] if r.get("quant", "none") == "none" else f"{r['dtype']}, {r['quant']} weights"
    lines = [
        f"{r['model']} on {mesh} ({weights}), batch {r['shapes']['batch']}, prompt {r['shapes']['prompt_len']}, "
        f"cache {r['shapes']['cache_len']}",
        f"per device: parameters {r['per_device']['param_bytes'] / gib:.3f} GiB "
        f"(total {r['total']['param_bytes'] / gib:.3f} GiB / {r['total']['devices']} devices), "
        f"KV cache {r['per_device']['kv_cache_bytes'] / gib:.3f} GiB "
        f"({_kv_format(r)}; the engine's page pool: {r['per_device']['kv_cache_bytes_per_token']} bytes per token)",
    ]
    lines.append(_fits_line(r["per_device"]["param_bytes"]))
    lines += [f"{step}: {impl}" for step, impl in r["kernels"].items()]
    if "moe" in r:
        m = r["moe"]
        e = m["expert_param_bytes"]
        lines.append(
            f"experts: {m['experts']} per routed layer, top-{m['top_k']}, {m['routed_layers']} routed layers; "
            f"expert weights per device {e['per_device'] / gib:.3f} GiB (total {e['total'] / gib:.3f} GiB)"
        )
        for name, s in m["steps"].items():
            cost = ", ".join(f"{k} {_size(int(v))}" for k, v in s["model_bytes_sent_per_layer"].items() if v < 1e30)
            lines.append(
                f"  {name}: {s['tokens']} tokens per dp shard -> {s['mode']}; sent per device per layer: {cost}; "
                f"all-to-all {s['all_to_all_per_layer']} per layer, {s['all_to_all_bytes_per_token_per_layer']:.0f} "
                "bytes per token"
            )
    if r["per_device"].get("prefill_activation_bytes") is not None:
        lines.append(f"prefill activations per device (XLA temp): {_size(r['per_device']['prefill_activation_bytes'])}")
    if "ring" in r:
        g = r["ring"]
        lines.append(
            f"ring attention over sp={g['sp']}: {g['collective_permutes_per_layer']} collective-permutes per layer "
            f"in prefill ({_size(g['bytes_per_layer'])} per layer per device)"
        )
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


def _kv_format(r: dict) -> str:
    """How the cache is stored: the activation dtype, or a quantized format with its scales."""
    kind = r.get("kv_cache_dtype", "auto")
    if kind == "auto":
        return f"kv_cache_dtype auto: {r['dtype']}"
    return f"kv_cache_dtype {kind}: {kind} values + a float32 scale per token and kv head"


def _size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"
