"""The Llama family: Llama 2/3/3.1/3.2, Mistral, Qwen2, Qwen3 and SmolLM2 as switches on one config.

Every parameter is declared with its logical axes; jaxinfer/sharding.py says which mesh axis splits
each. Layers are stacked on a leading `layers` axis and run under `lax.scan`, so compile time is flat
in depth and pipeline stages can later take contiguous slices of that axis. The model knows nothing
of meshes: XLA derives the collectives from the shardings of the parameters and the cache.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxinfer.config import ModelConfig
from models import quant
from models.kv_cache import CACHE_AXES, KVCache, PagedKVCache  # noqa: F401  (CACHE_AXES re-exported)


@dataclasses.dataclass(frozen=True)
class Weight:
    """How one parameter is declared and where it comes from in a Hugging Face checkpoint.

    `hf` names the checkpoint tensor ({i} is the layer, {e} the expert). A stacked weight's entry j
    comes from checkpoint layer `layer_ids[j]` (all layers in order when None). An `experts` weight has
    one checkpoint tensor per expert, stacked on the first per-layer dimension. A `linear` weight is
    stored by Hugging Face as [out, in] and here as [in..., out...] with `n_in` leading input
    dimensions; other weights keep their element order and are only reshaped. A `fused` weight stacks
    several checkpoint tensors (`hf` is then a tuple) along that axis of the per-tensor shape, so that
    one matmul computes them all. A `quant` weight is stored quantized (int8, fp8 or int4 values and their
    scales, models/quant.py) when the model is; its input dimensions are the `n_in` after layers and experts.
    """

    shape: tuple[int, ...]
    axes: tuple[str | None, ...]
    hf: str | tuple[str, ...]
    linear: bool = False
    n_in: int = 1
    init: str = "normal"  # or "ones" for norm scales, "zeros" for biases
    fused: int | None = None
    layer_ids: tuple[int, ...] | None = None
    experts: bool = False
    quant: bool = False
    contract: tuple[int, ...] | None = None  # in_axes of a weight that is not `linear` (a tied embedding)

    @property
    def stacked(self) -> bool:
        return self.axes[0] == "layers"

    @property
    def in_axes(self) -> tuple[int, ...]:
        """The dimensions a matmul contracts (a linear weight's input dimensions)."""
        if self.contract is not None:
            return self.contract
        first = int(self.stacked) + int(self.experts)
        return tuple(range(first, first + self.n_in))

    def quantized(self, mode: str) -> bool:
        return self.quant and mode != "none"

    def layout(self, fmt) -> quant.Layout:
        """Shapes of the values and scales in quantization format `fmt` (models/quant.py)."""
        return quant.layout(self.shape, self.in_axes, fmt)

    def scale_axes(self, fmt="int8") -> tuple[str | None, ...]:
        """The weight's axes, unnamed where the scales have size 1: per-channel scales split like the
        output channels and are replicated where the input is split (row-parallel wo, w_down); grouped
        scales also split with the groups of the inputs each device holds."""
        sizes = self.layout(fmt).scale_shape
        return tuple(a if s != 1 else None for a, s in zip(self.axes, sizes))

    @property
    def layer_shape(self) -> tuple[int, ...]:
        return self.shape[1:] if self.stacked else self.shape

    def checkpoint_name(self, j: int) -> str:
        """The checkpoint tensor of stack entry j (an unfused, per-expert weight)."""
        return self.hf.format(i=self.layer_ids[j] if self.layer_ids else j)

    def _drop(self, dim: int, **changes) -> Weight:
        return dataclasses.replace(
            self, shape=self.shape[:dim] + self.shape[dim + 1 :], axes=self.axes[:dim] + self.axes[dim + 1 :], **changes
        )

    def part(self, hf: str) -> Weight:
        """One checkpoint tensor of a fused weight, as an unfused weight of its own."""
        return self._drop(self.fused + self.stacked + self.experts, hf=hf, fused=None)

    def expert(self, e: int) -> Weight:
        """Expert e's tensors, as a weight without the experts dimension."""
        hf = (
            tuple(h.replace("{e}", str(e)) for h in self.hf)
            if self.fused is not None
            else self.hf.replace("{e}", str(e))
        )
        return self._drop(int(self.stacked), hf=hf, experts=False)


# Checkpoint names of a routed MLP: block prefix, router, expert gate, up, down ({e} is the expert).
MOE_NAMES = {
    "mixtral": ("block_sparse_moe.", "gate", "w1", "w3", "w2"),
    "qwen3_moe": ("mlp.", "gate", "gate_proj", "up_proj", "down_proj"),
}


def weights(cfg: ModelConfig) -> dict[str, Weight]:
    """Every parameter of the model, stacked ones with a leading `layers` dimension."""
    d, f, v, n = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.num_layers
    h, k, hd = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
    a = "model.layers.{i}."
    w = {
        # Tied, the table is also the output head: quantized (with quantize_head) over embed, the dim the
        # head contracts, so a looked-up row is its values times its one scale (or its groups' scales).
        "embed": Weight(
            (v, d),
            ("vocab", "embed"),
            "model.embed_tokens.weight",
            quant=cfg.quantize_head and cfg.tie_word_embeddings,
            contract=(1,),
        ),
        "final_norm": Weight((d,), ("embed",), "model.norm.weight", init="ones"),
        "attn_norm": Weight((n, d), ("layers", "embed"), a + "input_layernorm.weight", init="ones"),
        "wq": Weight(
            (n, d, h, hd), ("layers", "embed", "q_heads", "head_dim"), a + "self_attn.q_proj.weight", True, quant=True
        ),
        "wkv": Weight(
            (n, d, 2, k, hd),
            ("layers", "embed", None, "kv_heads", "head_dim"),
            (a + "self_attn.k_proj.weight", a + "self_attn.v_proj.weight"),
            True,
            fused=1,
            quant=True,
        ),
        "wo": Weight(
            (n, h, hd, d),
            ("layers", "q_heads", "head_dim", "embed"),
            a + "self_attn.o_proj.weight",
            True,
            2,
            quant=True,
        ),
        "mlp_norm": Weight((n, d), ("layers", "embed"), a + "post_attention_layernorm.weight", init="ones"),
    }
    dense = cfg.dense_layers
    if dense:  # stacked over the dense layers only; all layers in a dense model
        ids = None if len(dense) == n else dense
        w["w_gate_up"] = Weight(
            (len(dense), d, 2, f),
            ("layers", "embed", None, "mlp"),
            (a + "mlp.gate_proj.weight", a + "mlp.up_proj.weight"),
            True,
            fused=1,
            layer_ids=ids,
            quant=True,
        )
        w["w_down"] = Weight(
            (len(dense), f, d), ("layers", "mlp", "embed"), a + "mlp.down_proj.weight", True, layer_ids=ids, quant=True
        )
    if cfg.moe_layers:
        m, e, fe = len(cfg.moe_layers), cfg.num_experts, cfg.moe_intermediate_size
        ids = None if m == n else cfg.moe_layers
        block, gate, w_gate, w_up, w_down = MOE_NAMES[cfg.architecture]
        x = a + block + "experts.{e}."
        w["router"] = Weight((m, d, e), ("layers", "embed", None), a + block + gate + ".weight", True, layer_ids=ids)
        w["we_gate_up"] = Weight(
            (m, e, d, 2, fe),
            ("layers", "experts", "embed", None, "expert_mlp"),
            (x + w_gate + ".weight", x + w_up + ".weight"),
            True,
            fused=1,
            layer_ids=ids,
            experts=True,
            quant=True,
        )
        w["we_down"] = Weight(
            (m, e, fe, d),
            ("layers", "experts", "expert_mlp", "embed"),
            x + w_down + ".weight",
            True,
            layer_ids=ids,
            experts=True,
            quant=True,
        )
    if cfg.qkv_bias:
        w["bq"] = Weight((n, h, hd), ("layers", "q_heads", "head_dim"), a + "self_attn.q_proj.bias", init="zeros")
        w["bkv"] = Weight(
            (n, 2, k, hd),
            ("layers", None, "kv_heads", "head_dim"),
            (a + "self_attn.k_proj.bias", a + "self_attn.v_proj.bias"),
            init="zeros",
            fused=0,
        )
    if cfg.qk_norm:
        w["q_norm"] = Weight((n, hd), ("layers", "head_dim"), a + "self_attn.q_norm.weight", init="ones")
        w["k_norm"] = Weight((n, hd), ("layers", "head_dim"), a + "self_attn.k_norm.weight", init="ones")
    if not cfg.tie_word_embeddings:
        w["lm_head"] = Weight((d, v), ("embed", "vocab"), "lm_head.weight", True, quant=cfg.quantize_head)
    return w


# Hugging Face tensor name pieces -> GGUF (llama.cpp) names.
GGUF_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def cache_kv_heads(cfg: ModelConfig, tp: int) -> int:
    """KV heads as stored in the cache: with fewer kv heads than tp each is repeated so every tp shard
    holds exactly the one its query heads read."""
    return max(cfg.num_kv_heads, tp)


def rope_frequencies(cfg: ModelConfig) -> np.ndarray:
    dim = cfg.head_dim
    inv = 1.0 / (cfg.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    s = cfg.rope_scaling
    if s.rope_type == "linear":
        inv = inv / s.factor
    elif s.rope_type == "llama3":
        low_wl = s.original_max_position_embeddings / s.low_freq_factor
        high_wl = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wl, inv / s.factor, inv)
        smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
            s.high_freq_factor - s.low_freq_factor
        )
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wl) & (wavelen <= low_wl)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rms_norm(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (y * scale.astype(jnp.float32)).astype(x.dtype)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    # x [B, T, N, H]; cos/sin [B, T, H/2]; Hugging Face's rotate-half convention.
    x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
    c, s = cos[:, :, None, :], sin[:, :, None, :]
    return jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1).astype(x.dtype)


def block(
    p: dict,
    x,
    q_pos,
    cache: KVCache | PagedKVCache,
    layer,
    cos,
    sin,
    cfg: ModelConfig,
    kv_repeat: int,
    kv_len: int,
    kernel=None,
    moe=None,
    weight_kernel: str | None = None,
):
    """Decoder layer `layer` on its parameters `p`; writes this step's keys/values into the whole cache
    in place (a loop carry) and attends to that layer's first `kv_len` positions. A layer whose
    parameters hold a router runs routed experts (`moe`, a models.moe.MoE) in place of the MLP.
    `weight_kernel`: the kernel quantized weights may take (models/quant.einsum's `kernel`)."""
    eps = cfg.rms_norm_eps
    mm = functools.partial(quant.einsum, kernel=weight_kernel)
    with jax.named_scope("attn"):
        h = rms_norm(x, p["attn_norm"], eps)
        q = mm("btd,dnh->btnh", h, p["wq"])  # [B, T, D] -> [B, T, N, H]
        kv = mm("btd,dckh->btckh", h, p["wkv"])  # [B, T, D] -> [B, T, 2, K, H]
        if cfg.qkv_bias:
            q, kv = q + p["bq"], kv + p["bkv"]
        k, v = kv[:, :, 0], kv[:, :, 1]
        if cfg.qk_norm:
            q, k = rms_norm(q, p["q_norm"], eps), rms_norm(k, p["k_norm"], eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv_repeat > 1:
            k, v = jnp.repeat(k, kv_repeat, axis=2), jnp.repeat(v, kv_repeat, axis=2)
        o, cache = cache.update_and_attend(layer, k, v, q, q_pos, kv_len, cfg.sliding_window, kernel)
        # As one [B, T, N*H] x [N*H, D] matmul: an einsum over (n, h) made XLA:CPU transpose wo each step.
        wo = quant.merge_leading(p["wo"], 2)
        x = x + mm("btf,fd->btd", o.reshape(*o.shape[:2], -1), wo)  # [B, T, N*H] -> [B, T, D]
    with jax.named_scope("mlp"):
        h = rms_norm(x, p["mlp_norm"], eps)
        if "router" in p:
            x = x + moe(p, h, cfg, seq_split=cache.splits_seq)
        else:
            gate_up = mm("btd,dcf->btcf", h, p["w_gate_up"])  # [B, T, D] -> [B, T, 2, F]
            gate, up = gate_up[:, :, 0], gate_up[:, :, 1]
            x = x + mm("btf,fd->btd", jax.nn.silu(gate) * up, p["w_down"])
    return x, cache


DENSE_MLP = ("w_gate_up", "w_down")
ROUTED_MLP = ("router", "we_gate_up", "we_down")


def _length(x) -> int:
    return len(x) if isinstance(x, (list, tuple)) else x.shape[0]


def _take(x, start: int, stop: int):
    if (start, stop) == (0, _length(x)):
        return x
    return x[start:stop] if isinstance(x, (list, tuple)) else jax.tree.map(lambda a: a[start:stop], x)


def run_layers(
    stacked: dict, x, cache, positions, cos, sin, *, cfg, kv_repeat, kv_len, kernel, moe=None, weight_kernel=None
):
    """The layers in `stacked` (stacked arrays, or one array per layer), in order; `cache` holds just
    those layers. A model mixing dense and routed layers runs each run of one kind as its own loop
    (the MLP stacks hold only their kind's layers); a pipeline stage is always of one kind."""
    n = _length(stacked["wq"])
    if n == cfg.num_layers:
        routed = [i in cfg.moe_layers for i in range(n)]
    else:
        routed = [bool(cfg.moe_layers)] * n
    start = 0
    for kind, run in itertools.groupby(routed):
        stop = start + len(list(run))
        first = sum(r == kind for r in routed[:start])  # this run's first entry in its kind's MLP stack
        mlp = ROUTED_MLP if kind else DENSE_MLP
        part = {k: _take(v, start, stop) for k, v in stacked.items() if k not in DENSE_MLP + ROUTED_MLP}
        part |= {k: _take(stacked[k], first, first + stop - start) for k in mlp}
        x, cache = _loop(part, x, cache, positions, cos, sin, start, cfg, kv_repeat, kv_len, kernel, moe, weight_kernel)
        start = stop
    return x, cache


def _loop(stacked, x, cache, positions, cos, sin, offset, cfg, kv_repeat, kv_len, kernel, moe, weight_kernel):
    def layer_step(carry, layer):
        x, cache = carry
        lp, i = layer
        return block(lp, x, positions, cache, i, cos, sin, cfg, kv_repeat, kv_len, kernel, moe, weight_kernel), None

    n = _length(stacked["wq"])
    if isinstance(stacked["wq"], (list, tuple)):
        # Unrolled: one array per layer (see unstack), so no layer's weights are sliced out of a stack.
        for i in range(n):
            (x, cache), _ = layer_step((x, cache), ({k: v[i] for k, v in stacked.items()}, offset + i))
    else:
        (x, cache), _ = jax.lax.scan(layer_step, (x, cache), (stacked, offset + jnp.arange(n)))
    return x, cache


INITS = {
    "normal": lambda key, shape, dtype: 0.02 * jax.random.normal(key, shape, dtype),
    "ones": lambda key, shape, dtype: jnp.ones(shape, dtype),
    "zeros": lambda key, shape, dtype: jnp.zeros(shape, dtype),
}


class Llama(nnx.Module):
    """Parameters live in `self.params` (an nnx.Dict of Params carrying `logical_axes` metadata)."""

    def __init__(
        self,
        cfg: ModelConfig,
        *,
        dtype=jnp.float32,
        kv_repeat: int = 1,
        rngs: nnx.Rngs,
        attention_kernel=None,
        pipeline=None,
        moe=None,
        quant_mode: str = "none",
        weight_kernel: str | None = None,
    ):
        self.cfg = cfg
        self.kv_repeat = kv_repeat
        self.attention_kernel = attention_kernel  # decode attention over pages; None: the XLA path
        self.pipeline = pipeline  # jaxinfer.pipeline.Pipeline over pp stages, or None
        self.moe = moe  # models.moe.MoE for the routed layers, or None
        # the kernel quantized contractions may call ("cpu": int8, "pallas"/"interpret": fp8; jaxinfer/kernels.py)
        self.weight_kernel = weight_kernel
        spec = weights(cfg)
        self.stacked = tuple(name for name, w in spec.items() if w.stacked)

        def init(w: Weight):
            x = INITS[w.init](rngs.params(), w.shape, dtype)
            return quant.quantize(x, w.in_axes, quant_mode) if w.quantized(quant_mode) else x

        self.params = nnx.Dict({name: nnx.Param(init(w), logical_axes=w.axes) for name, w in spec.items()})

    def __call__(self, tokens, positions, cache: KVCache | PagedKVCache, *, kv_len: int = 0, logit_index=None):
        """tokens/positions [B, T]; returns (fp32 logits [B, T or 1, V], updated cache).

        With `logit_index` [B], only the hidden state at that index of each row reaches the head.
        """
        p = {name: param.get_value() for name, param in self.params.items()}
        x = quant.take(p["embed"], tokens, p["final_norm"].dtype)  # [B, T] -> [B, T, D]
        angles = positions[..., None].astype(jnp.float32) * rope_frequencies(self.cfg)  # [B, T, H/2]
        cos, sin = jnp.cos(angles), jnp.sin(angles)
        stacked = {name: p[name] for name in self.stacked}
        run = functools.partial(
            run_layers,
            cfg=self.cfg,
            kv_repeat=self.kv_repeat,
            kv_len=kv_len,
            kernel=self.attention_kernel,
            moe=self.moe,
            weight_kernel=self.weight_kernel,
        )
        if self.pipeline is None:
            x, cache = run(stacked, x, cache, positions, cos, sin)
        else:
            x, cache = self.pipeline(run, stacked, x, cache, positions, cos, sin)
        if logit_index is not None:
            x = jnp.take_along_axis(x, logit_index[:, None, None], axis=1)  # [B, T, D] -> [B, 1, D]
        x = rms_norm(x, p["final_norm"], self.cfg.rms_norm_eps)
        mm = functools.partial(quant.einsum, kernel=self.weight_kernel)
        if self.cfg.tie_word_embeddings:
            logits = mm("btd,vd->btv", x, p["embed"], preferred_element_type=jnp.float32)
        else:
            logits = mm("btd,dv->btv", x, p["lm_head"], preferred_element_type=jnp.float32)
        return logits, cache
