"""Routed experts (Mixtral, Qwen3-MoE): top-k routing, expert parallelism over `ep`, grouped matmul.

Attention keeps its tp sharding and is replicated over ep, so the devices of an ep group enter the MoE
block holding the same tokens. Under sequence parallelism a prefill's tokens stay split on `seq` over sp
(as ring attention leaves them): each (dp, sp) shard dispatches its own tokens among its ep group just as
a dp shard does, so sp adds no collective here and each device routes 1/sp of the prompt.

Experts are split over ep and each expert's hidden size over tp. Two ways take the tokens to their
experts, both written by hand in `jax.shard_map` and both dropless:

- "psum": every device routes every token, runs the assignments that chose its own experts, and one
  all-reduce over (ep, tp) sums the partial outputs: a single collective of [tokens, D].
- "all_to_all": each ep rank routes 1/ep of the tokens and sends each of them once to every device that
  holds one of its experts (rows of an [ep, C, D] buffer, the routing packed alongside); the receivers
  run their experts and a second all-to-all returns the weighted sums, which an all-gather over ep makes
  whole again. The buffer has C = capacity slots per destination; if routing is so skewed that some
  destination would receive more than C tokens, that step takes the psum path instead, so no token is
  ever dropped, whatever the routing.

`dispatch_bytes` is the cost model that chooses between them ("auto"): the bytes each device sends per
MoE layer, which `explain` checks against the compiled HLO.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from jaxinfer import sharding
from jaxinfer.config import ModelConfig
from models import quant
from pallas_kernels import moe as kernels

DISPATCH_MODES = ("auto", "all_to_all", "psum")
CAPACITY_FACTOR = 1.25


def route(x, router, cfg: ModelConfig):
    """x [N, D] -> top-k routing weights (float32) and experts (int32), each [N, k]."""
    logits = jnp.einsum("nd,de->ne", x, router, preferred_element_type=jnp.float32)  # [N, D] -> [N, E]
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits, axis=-1), cfg.num_experts_per_tok)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(axis=-1, keepdims=True)
    return weights, experts.astype(jnp.int32)


def capacity(tokens_per_rank: int, ep: int, k: int, factor: float = CAPACITY_FACTOR) -> int:
    """Slots per destination in the all-to-all buffer: `factor` times the expected number of a rank's
    tokens that have at least one expert on a given device under uniform routing."""
    share = 1 - (1 - 1 / ep) ** k
    return max(1, min(tokens_per_rank, math.ceil(factor * tokens_per_rank * share)))


def dispatch_bytes(cfg: ModelConfig, ep: int, tp: int, tokens: int, itemsize: int, factor: float = CAPACITY_FACTOR):
    """Bytes one device sends per MoE layer in each mode, for `tokens` tokens entering the block on one
    (dp, sp) shard (ring collectives; an all-to-all keeps 1/ep of its buffer at home)."""
    d, k = cfg.hidden_size, cfg.num_experts_per_tok
    group = ep * tp
    out = {"psum": 2 * (group - 1) / group * tokens * d * itemsize}
    n = -(-tokens // ep)
    slots = ep * capacity(n, ep, k, factor)
    row = d * itemsize + 2 * k * 4  # a token and its packed routing (k expert ids, k weights)
    a2a = (ep - 1) / ep * slots * (row + d * itemsize)  # out and back
    a2a += (ep - 1) / ep * ep * n * d * itemsize  # all-gather of the combined tokens
    a2a += 2 * (tp - 1) / tp * n * d * itemsize  # the experts' tp partial sums
    out["all_to_all"] = a2a if ep > 1 else math.inf
    return out


@dataclasses.dataclass(frozen=True)
class MoE:
    """The routed MLP of one layer on `mesh`. dispatch: "auto" | "all_to_all" | "psum" ("auto" picks the
    mode that sends fewer bytes for the step's token count); kernel: "xla" (jax.lax.ragged_dot),
    "pallas" or "interpret" (the Pallas grouped matmul, compiled or interpreted)."""

    mesh: Mesh
    rules: tuple[tuple[str, str | None], ...]
    dispatch: str = "auto"
    kernel: str = "xla"
    capacity_factor: float = CAPACITY_FACTOR

    def cost(self, cfg: ModelConfig, tokens: int, itemsize: int) -> dict[str, float]:
        """dispatch_bytes on this mesh: bytes one device sends per layer in each mode."""
        ep, tp = self.mesh.shape["ep"], self.mesh.shape["tp"]
        return dispatch_bytes(cfg, ep, tp, tokens, itemsize, self.capacity_factor)

    def mode(self, cfg: ModelConfig, tokens: int, itemsize: int) -> str:
        if self.dispatch != "auto":
            return self.dispatch
        cost = self.cost(cfg, tokens, itemsize)
        return min(cost, key=cost.get)

    def __call__(self, p: dict, h, cfg: ModelConfig, seq_split: bool = False):
        """h [B, T, D] (normed) -> the weighted sum of its tokens' top-k experts, [B, T, D]. seq_split:
        h's tokens lie split on `seq` over sp (a prefill with ring attention); each (dp, sp) shard then
        dispatches its own tokens among its ep group, as a dp shard does, and the output stays split."""
        rules = dict(self.rules)
        b, t, _ = h.shape
        shards = self.mesh.shape[rules["batch"]] if rules.get("batch") else 1
        if b % shards:  # a batch the dp axis cannot split (one prefill chunk): every dp group takes it whole
            rules["batch"], shards = None, 1
        seq = self.mesh.shape[rules["seq"]] if seq_split and rules.get("seq") else 1
        if rules.get("seq") in sharding.manual_axes():  # in a pipeline stage manual over sp: h is this rank's tokens
            seq = 1
        if seq == 1 or t % seq:  # tokens replicated over sp (decode): every sp rank routes them all
            rules["seq"], seq = None, 1
        mode = self.mode(cfg, b * t // (shards * seq), h.dtype.itemsize)
        act = sharding.spec(("batch", "seq", "embed"), rules)
        gate_up = sharding.spec(("experts", "embed", None, "expert_mlp"), rules)
        down = sharding.spec(("experts", "expert_mlp", "embed"), rules)
        body = functools.partial(
            _routed,
            cfg=cfg,
            mode=mode,
            gmm=self._gmm(),
            factor=self.capacity_factor,
            ep_axis=rules["experts"],
            mlp_axes=tuple(a for a in [rules["expert_mlp"]] if a and self.mesh.shape[a] > 1),
            ep_split=self.mesh.shape[rules["experts"]] > 1,
        )
        manual = {a for s in (act, gate_up, down) for a in s if a is not None}
        w_gate_up, w_down = p["we_gate_up"], p["we_down"]
        in_specs = (act, P(), _quant_spec(gate_up, w_gate_up), _quant_spec(down, w_down))
        return sharding.shard_map(body, self.mesh, in_specs, act, axis_names=manual)(h, p["router"], w_gate_up, w_down)

    def _gmm(self):
        if self.kernel == "xla":
            return kernels.grouped_matmul_reference
        return functools.partial(kernels.grouped_matmul, interpret=self.kernel == "interpret")


def _quant_spec(spec: P, w):
    """A quantized weight's in_spec: its values split by `spec`, its scales alike except where they
    have size 1 (per-channel scales over the inputs)."""
    if not isinstance(w, quant.QArray):
        return spec
    scale = P(*(None if n == 1 else a for a, n in zip(tuple(spec) + (None,) * w.scales.ndim, w.scales.shape)))
    return quant.QArray(spec, scale)


def _experts(xs, group_sizes, w_gate_up, w_down, gmm):
    """Rows xs [M, D] sorted by local expert through those experts' SwiGLU MLPs -> [M, D] (partial
    sums over the tp shards of the expert hidden size). Quantized experts are dequantized here, one
    layer's local experts at a time, inside the step."""
    if isinstance(w_gate_up, quant.QArray):
        w_gate_up, w_down = quant.dequantize(w_gate_up, xs.dtype), quant.dequantize(w_down, xs.dtype)
    e, d, _, f = w_gate_up.shape
    gate_up = gmm(xs, w_gate_up.reshape(e, d, 2 * f), group_sizes)  # [M, D] -> [M, 2F]
    act = jax.nn.silu(gate_up[:, :f]) * gate_up[:, f:]
    return gmm(act, w_down, group_sizes)  # [M, F] -> [M, D]


def _local(experts, first: int, count: int):
    """Expert ids -> ids among the `count` experts from `first`, or `count` for experts held elsewhere."""
    local = experts - first
    return jnp.where((local >= 0) & (local < count), local, count)


def _psum_path(x, router, w_gate_up, w_down, *, cfg, gmm, ep_axis, mlp_axes, ep_split=True):
    count = w_gate_up.shape[0]
    weights, experts = route(x, router, cfg)
    ids = _local(experts, jax.lax.axis_index(ep_axis) * count, count)
    xs, group_sizes, order = kernels.permute(x, ids, count)
    ys = _experts(xs, group_sizes, w_gate_up, w_down, gmm)
    y = kernels.unpermute(ys, order, jnp.where(ids < count, weights, 0))
    axes = (ep_axis, *mlp_axes) if ep_split else mlp_axes
    return sharding.psum(y, axes) if axes else y


def _pack(a, dtype):
    """[R, k] 32-bit values -> [R, k * 4 / itemsize] of `dtype` with the same bits."""
    return jax.lax.bitcast_convert_type(a, dtype).reshape(a.shape[0], -1)


def _unpack(b, dtype, k: int):
    if jnp.dtype(b.dtype).itemsize == 4:
        return jax.lax.bitcast_convert_type(b, dtype)
    return jax.lax.bitcast_convert_type(b.reshape(b.shape[0], k, -1), dtype)


def _dispatch_path(x, router, w_gate_up, w_down, *, cfg, gmm, ep_axis, mlp_axes, factor):
    ep = jax.lax.axis_size(ep_axis)
    rank = jax.lax.axis_index(ep_axis)
    total, d = x.shape
    k, count = cfg.num_experts_per_tok, w_gate_up.shape[0]
    n = -(-total // ep)  # tokens this rank routes
    slots = capacity(n, ep, k, factor)
    mine = jax.lax.dynamic_slice_in_dim(jnp.pad(x, ((0, n * ep - total), (0, 0))), rank * n, n)  # [n, D]
    weights, experts = route(mine, router, cfg)
    dest = experts // count  # [n, k] the device holding each chosen expert
    real = rank * n + jnp.arange(n) < total  # padding rows go nowhere
    goes = (dest[:, :, None] == jnp.arange(ep)).any(axis=1) & real[:, None]  # [n, ep]
    slot = jnp.cumsum(goes, axis=0) - 1
    fits = jax.lax.pmax(jnp.max(goes.sum(axis=0)), ep_axis) <= slots

    def send(_):
        into = jnp.where(goes, jnp.arange(ep) * slots + slot, ep * slots).reshape(-1)  # [n * ep]; past the end: dropped
        ids = jnp.where(dest[:, None, :] == jnp.arange(ep)[:, None], experts[:, None, :] % count, count)  # [n, ep, k]
        wts = jnp.where(ids < count, weights[:, None, :], 0)
        rows = lambda fill, v: fill.at[into].set(v.reshape(n * ep, *v.shape[2:]), mode="drop")  # noqa: E731
        buf = jnp.concatenate(
            [
                rows(jnp.zeros((ep * slots, d), x.dtype), jnp.broadcast_to(mine[:, None], (n, ep, d))),
                _pack(rows(jnp.full((ep * slots, k), count, jnp.int32), ids), x.dtype),
                _pack(rows(jnp.zeros((ep * slots, k), jnp.float32), wts), x.dtype),
            ],
            axis=-1,
        )
        got = jax.lax.all_to_all(buf.reshape(ep, slots, -1), ep_axis, 0, 0, tiled=True).reshape(ep * slots, -1)
        width = (got.shape[-1] - d) // 2
        r_ids = _unpack(got[:, d : d + width], jnp.int32, k)
        r_wts = _unpack(got[:, d + width :], jnp.float32, k)
        xs, group_sizes, order = kernels.permute(got[:, :d], r_ids, count)
        ys = _experts(xs, group_sizes, w_gate_up, w_down, gmm)
        out = kernels.unpermute(ys, order, r_wts)  # [ep * slots, D], each row its token's local experts
        back = jax.lax.all_to_all(out.reshape(ep, slots, d), ep_axis, 0, 0, tiled=True).reshape(ep * slots, d)
        y = jnp.where(goes[..., None], back[jnp.minimum(into, ep * slots - 1)].reshape(n, ep, d), 0).sum(axis=1)
        if mlp_axes:
            y = sharding.psum(y, mlp_axes)
        return jax.lax.all_gather(y, ep_axis, tiled=True)[:total]  # [n, D] -> [tokens, D]

    def fallback(_):
        return _psum_path(x, router, w_gate_up, w_down, cfg=cfg, gmm=gmm, ep_axis=ep_axis, mlp_axes=mlp_axes)

    return jax.lax.cond(fits, send, fallback, None)


def _routed(h, router, w_gate_up, w_down, *, cfg, mode, gmm, factor, ep_axis, mlp_axes, ep_split):
    b, t, d = h.shape
    x = h.reshape(b * t, d)
    args = dict(cfg=cfg, gmm=gmm, ep_axis=ep_axis, mlp_axes=mlp_axes)
    if mode == "all_to_all":
        y = _dispatch_path(x, router, w_gate_up, w_down, factor=factor, **args)
    else:
        y = _psum_path(x, router, w_gate_up, w_down, ep_split=ep_split, **args)
    return y.reshape(b, t, d)
