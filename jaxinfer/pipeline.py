"""Pipeline parallelism: the stacked layers split into contiguous stages over the `pp` mesh axis.

All stages run in one SPMD program (`jax.shard_map`, manual over `pp` only, so tensor parallelism
inside a stage is still derived by XLA). The batch is cut into micro-batches; at tick t stage s works
on micro-batch t - s and hands its output to stage s + 1 with a `ppermute`, so only boundary
activations cross stages. With M micro-batches and P stages the schedule takes M + P - 1 ticks, of
which each stage idles P - 1: the bubble fraction is (P - 1) / (M + P - 1).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxinfer import sharding


def microbatch_count(batch: int, most: int) -> int:
    """The largest divisor of `batch` that is at most `most`."""
    return max(m for m in range(1, min(batch, most) + 1) if batch % m == 0)


def bubble_fraction(stages: int, microbatches: int) -> float:
    return (stages - 1) / (microbatches + stages - 1)


@dataclasses.dataclass(frozen=True)
class Pipeline:
    mesh: Mesh
    microbatches: int  # at most this many; the batch is cut into its largest divisor not above it

    def __call__(self, run, stacked: dict, x, cache, positions, cos, sin):
        """`run(stacked, x, cache, positions, cos, sin) -> (x, cache)` applies the layers it is given;
        here each stage applies its own slice of them to one micro-batch at a time."""
        stages = self.mesh.shape["pp"]
        batch = x.shape[0]
        m = microbatch_count(batch, self.microbatches)
        mb = batch // m

        def staged(stacked, x, cache, positions, cos, sin):
            stage = jax.lax.axis_index("pp")
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

                y, cache = jax.lax.cond(active, work, lambda inp, cache: (inp, cache), inp, cache)
                last = (stage == stages - 1) & active
                outs = jnp.where(last, jax.lax.dynamic_update_slice_in_dim(outs, y, start, axis=0), outs)
                if tick < m + stages - 2:  # the last tick hands nothing on
                    state = jax.lax.ppermute(y, "pp", [(i, i + 1) for i in range(stages - 1)])
            return sharding.psum(jnp.where(stage == stages - 1, outs, 0), "pp"), cache

        cache_specs = type(cache)(*(P("pp") if i < 2 else P() for i in range(len(cache))))
        return jax.shard_map(
            staged,
            mesh=self.mesh,
            in_specs=(jax.tree.map(lambda _: P("pp"), stacked), P(), cache_specs, P(), P(), P()),
            out_specs=(P(), cache_specs),
            axis_names={"pp"},
            check_vma=False,
        )(stacked, x, cache, positions, cos, sin)
