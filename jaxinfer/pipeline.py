"""Pipeline parallelism: the stacked layers split into contiguous stages over the `pp` mesh axis.

All stages run in one SPMD program (`jax.shard_map`, manual over `pp` only, and `sp` when sp > 1, so
tensor parallelism inside a stage is still derived by XLA). A stage's layers are a slice of the stacked
arrays (`lax.scan` over them), or by default one array per layer of a stage (`runtime.unstack`), which
the stage loops over in Python so that no layer's weights are copied out of a stack. A batch of at least
2 x MIN_MICROBATCH_ROWS rows is cut into micro-batches; at tick t stage s works on micro-batch t - s and
hands its output to stage s + 1 with a `ppermute`, so only boundary activations cross stages. With M
micro-batches and P stages the schedule takes M + P - 1 ticks, of which each stage idles P - 1: the
bubble fraction is (P - 1) / (M + P - 1).

With sequence parallelism (sp > 1) the stage's shard_map is manual over `pp` and `sp`: a ring prefill's
activations come in split on their seq dimension (its `SeqKV` writes each layer's K/V into the cache
as the ring passes it round), the engine's page pool split on pages, and the layers run the ring's and the split pool's per-rank code, their own shard_maps
leaving the axes already manual out (`sharding.shard_map`). In a ring prefill an idle tick still runs
its layers, its cache writes dropped (`SeqKV.writing_if`), instead of skipping them under `lax.cond`: XLA:CPU rendezvouses a
collective-permute with every device of the program, not just its source-target pairs, so the ring's
permutes over sp inside a cond that only some stages take wait for devices that never come (it aborts
or segfaults). Its all-gathers and all-reduces meet per replica group, so the split pool's all-gather
and tp's all-reduces stay inside the cond.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxinfer import sharding


# Every micro-batch reads its stage's weights again, so micro-batches pay only where a stage's matmuls are
# compute-bound: from about peak FLOP/s x bytes per weight / (2 x bandwidth) rows, 206-295 rows for bf16 on
# an H200 / H100 (989 TFLOP/s over 4.8 / 3.35 TB/s). Below that a decode batch runs as one micro-batch:
# pp ticks reading each stage's weights once, where M micro-batches take M + pp - 1 ticks reading them M
# times (SmolLM2 on CPU, `jaxinfer bench --pp=P --batch_sizes=4 --prompt_len=64 --gen_len=33
# --max_seq_len=256`: pp = 2 / 3 / 5 TPOT 35.2 / 40.7 / 50.3 ms as one micro-batch, 43.7 / 49.9 / 77.5 ms
# with --pp_microbatch_rows=1, in micro-batches of 2, 2 and 1 rows).
MIN_MICROBATCH_ROWS = 256


def microbatch_count(batch: int, most: int, min_rows: int = MIN_MICROBATCH_ROWS, tokens: int = 1) -> int:
    """The largest divisor of `batch` (sequences of `tokens` tokens each) that is at most `most` and
    leaves micro-batches of at least `min_rows` rows, a row being one token (1 if none does)."""
    fits = [m for m in range(1, min(batch, most) + 1) if batch % m == 0 and batch // m * tokens >= min_rows]
    return max(fits, default=1)


def bubble_fraction(stages: int, microbatches: int) -> float:
    return (stages - 1) / (microbatches + stages - 1)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    mesh: Mesh
    microbatches: int  # at most this many; the batch is cut into its largest divisor not above it
    min_rows: int = MIN_MICROBATCH_ROWS  # ... that leaves micro-batches of at least this many rows

    def __call__(self, run, stacked: dict, x, cache, positions, cos, sin):
        """`run(stacked, x, cache, positions, cos, sin) -> (x, cache)` applies the layers it is given;
        here each stage applies its own slice of them to one micro-batch at a time."""
        stages = self.mesh.shape["pp"]
        batch = x.shape[0]
        m = microbatch_count(batch, self.microbatches, self.min_rows, tokens=x.shape[1])
        mb = batch // m
        sp = "sp" if self.mesh.shape["sp"] > 1 else None  # (the rules put seq and pages there when sp > 1)
        split = cache.sp_dim if sp else None  # k/v's dimension split over sp: a ring prefill's seq, the pool's pages
        # A ring prefill's attention permutes over sp; a later chunk's tokens split on seq too attend to
        # the pool with an all-gather and an all-to-all, which keep to cond.
        ring = bool(sp) and cache.ring_prefill

        def staged(stacked, x, cache, positions, cos, sin):
            stage = jax.lax.axis_index("pp")
            if isinstance(stacked["wq"], (list, tuple)):
                # Unrolled (runtime.unstack): one [1, ...] array per layer of this stage, its own buffer
                stacked = jax.tree.map(lambda a: a.reshape(a.shape[1:]), stacked)
            rows = lambda a, start: jax.lax.dynamic_slice_in_dim(a, start, mb, axis=0)  # noqa: E731
            state, outs = jnp.zeros_like(x[:mb]), jnp.zeros_like(x)
            for tick in range(m + stages - 1):
                k = tick - stage  # the micro-batch this stage works on now
                active = (k >= 0) & (k < m)
                start = jnp.clip(k, 0, m - 1) * mb
                inp = jnp.where(stage == 0, rows(x, min(tick, m - 1) * mb), state)

                def work(inp, cache, start=start):
                    y, view = run(
                        stacked, inp, cache.rows(start, mb), rows(positions, start), rows(cos, start), rows(sin, start)
                    )
                    return y, cache.put_rows(view, start)

                if ring:  # a ring prefill: every tick works, an idle one writes nothing to the cache
                    y, new = work(inp, cache.writing_if(active))  # (an idle tick's y goes nowhere)
                    cache = new.writing_if(cache.active)
                else:
                    y, cache = jax.lax.cond(active, work, lambda inp, cache: (inp, cache), inp, cache)
                last = (stage == stages - 1) & active
                outs = jnp.where(last, jax.lax.dynamic_update_slice_in_dim(outs, y, start, axis=0), outs)
                if tick < m + stages - 2:  # the last tick hands nothing on
                    state = jax.lax.ppermute(y, "pp", [(i, i + 1) for i in range(stages - 1)])
            return sharding.psum(jnp.where(stage == stages - 1, outs, 0), "pp"), cache

        seq = P(None, sp) if sp and cache.splits_seq else P()  # tokens split over sp: a ring prefill, a later chunk
        cache_specs = _cache_specs(cache, P("pp", *(sp if d == split else None for d in (1, 2))), seq)
        return jax.shard_map(
            staged,
            mesh=self.mesh,
            in_specs=(jax.tree.map(lambda _: P("pp"), stacked), seq, cache_specs, seq, seq, seq),
            out_specs=(seq, cache_specs),
            axis_names={"pp", sp} - {None},
            check_vma=False,
        )(stacked, x, cache, positions, cos, sin)


def _cache_specs(cache, layers: P, tokens: P):
    """Specs of a cache's fields: its k and v (each stacked over layers) by `layers`, a paged cache's
    `valid` and a ring prefill's `index` ([B, T] arrays) like the tokens, the rest (block tables, the
    ring prefill's `active`) replicated."""
    specs = jax.tree.map(lambda _: P(), cache)
    fields = {f: jax.tree.map(lambda _: layers, getattr(cache, f)) for f in ("k", "v")}
    dataclass = dataclasses.is_dataclass(cache)
    names = [f.name for f in dataclasses.fields(cache)] if dataclass else cache._fields
    for f in {"valid", "index"} & set(names):
        fields[f] = jax.tree.map(lambda _: tokens, getattr(cache, f))
    return dataclasses.replace(specs, **fields) if dataclass else specs._replace(**fields)
