"""Everything decided before any weight is read: config, mesh on the given devices, rules, dtype,
kernel choice and the abstract model (`prepare` -> `Setup`), and the shape buckets steps compile for."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer import checkpoint, distributed, kernels, sharding
from jaxinfer.config import ModelConfig
from jaxinfer.errors import JaxinferError
from jaxinfer.pipeline import MIN_MICROBATCH_ROWS, Pipeline
from jaxinfer.sampling import SamplingParams, seed_key
from models import kv_cache, llama, quant
from models.moe import DISPATCH_MODES, MoE
from models.ring_attention import Ring

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MIN_PROMPT_BUCKET = 16
DECODE_CHUNK = 8  # decode steps per compiled call; tokens come back to the host this often


def _pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def buckets(n_prompts: int, longest: int, max_tokens: int, dp: int, max_seq_len: int) -> tuple[int, int, int]:
    """The compiled shapes a request lands in: (batch, prompt length, cache length), powers of two."""
    batch = dp * _pow2(-(-n_prompts // dp))
    prompt = min(max(MIN_PROMPT_BUCKET, _pow2(longest)), max_seq_len)
    cache = min(max(prompt, _pow2(longest + max_tokens)), max_seq_len)
    return batch, prompt, cache


def ensure_devices(count: int) -> None:
    """On CPU, asks jax for `count` simulated devices when its backend has not started yet."""
    try:
        from jax._src import xla_bridge

        started = xla_bridge.backends_are_initialized()
    except (ImportError, AttributeError):
        return
    flag = re.search(r"--xla_force_host_platform_device_count=(\d+)", os.environ.get("XLA_FLAGS", ""))
    have = max(jax.config.jax_num_cpu_devices, int(flag.group(1)) if flag else 1)
    if not started and count > have:
        jax.config.update("jax_num_cpu_devices", count)


def check_quant(mode) -> None:
    """Weight quantization modes: "none", "auto" (as the checkpoint stores them), "int8", "fp8", "int4"."""
    if isinstance(mode, str) and mode in quant.MODES:
        return
    why = " is not built yet" if mode in quant.NOT_BUILT else " is not a quantization mode"
    planned = f" ({', '.join(quant.NOT_BUILT)} are planned, not built yet)" if quant.NOT_BUILT else ""
    raise JaxinferError(f"quant={mode!r}{why}; use one of {', '.join(map(repr, quant.MODES))}{planned}")


KV_CACHE_DTYPES = ("auto", *kv_cache.FORMATS)  # "auto" = the activation dtype; fp8 (e4m3), int8
KV_CACHE_PLANNED = ()


def check_kv_cache_dtype(kind) -> None:
    """KV-cache storage: "auto" (the activation dtype); fp8 and int8 (scales per token and head)."""
    if kind in KV_CACHE_DTYPES:
        return
    why = " is not built yet" if kind in KV_CACHE_PLANNED else " is not a KV-cache dtype"
    raise JaxinferError(f"kv_cache_dtype={kind!r}{why}; use one of {', '.join(map(repr, KV_CACHE_DTYPES))}")


@dataclasses.dataclass
class Setup:
    """Everything decided before any weight is read: config, mesh, rules, dtype and the abstract model."""

    source: checkpoint.Source
    config: ModelConfig
    mesh: Mesh
    rules: dict
    dtype: jnp.dtype
    max_seq_len: int
    cache_kv_heads: int
    graphdef: nnx.GraphDef
    abstract: nnx.State  # parameters as ShapeDtypeStructs carrying their shardings
    moe: MoE | None = None  # how routed layers dispatch tokens to their experts
    attention: kernels.Choice | None = None  # paged decode attention: implementation and why
    moe_kernel: kernels.Choice | None = None  # the routed experts' grouped matmul (MoE models)
    int8_matmul: kernels.Choice | None = None  # int8 weights' contractions (models held in int8)
    fp8_matmul: kernels.Choice | None = None  # fp8 weights' contractions at decode rows (models held in fp8)
    quant: str = "none"  # weights as held: "none", or a format of models/quant.py ("auto" resolved)
    kv_cache_dtype: str = "auto"  # KV-cache storage: "auto" = the activation dtype
    microbatch_rows: int = MIN_MICROBATCH_ROWS  # pp > 1: the fewest rows a micro-batch is cut to

    def kernel_report(self) -> dict[str, str]:
        """Which implementation each compiled step uses, and why."""
        out = {
            "engine decode attention": str(self.attention),
            "prefill and static-path attention": "xla (the Pallas kernel is for paged decode)",
        }
        if self.mesh.shape["sp"] > 1:
            out["prefill and static-path attention"] += f"; prefill as ring attention over sp={self.mesh.shape['sp']}"
            out["engine decode attention"] += "; each sp rank over its own pages, partials merged across sp"
            out["engine prefill-chunk attention"] = "xla, each sp rank over its own pages, partials merged across sp"
        if self.moe_kernel is not None:
            out["expert matmul"] = str(self.moe_kernel)
        if self.int8_matmul is not None:
            out["int8 matmul"] = str(self.int8_matmul)
        if self.fp8_matmul is not None:
            out["fp8 decode matmul"] = str(self.fp8_matmul)
        return out

    def weight_kernel(self) -> str | None:
        """The kernel the model's quantized contractions may take (models/quant.einsum's `kernel`)."""
        for choice in (self.int8_matmul, self.fp8_matmul):
            if choice is not None and choice.impl != "xla":
                return choice.impl
        return None

    def build(self, attention_kernel=None) -> tuple[nnx.GraphDef, nnx.State]:
        """The abstract model (no weights made) split into graph and state."""
        cfg = self.config
        pp = self.mesh.shape["pp"]
        pipeline = Pipeline(self.mesh, pp, self.microbatch_rows) if pp > 1 else None
        model = nnx.eval_shape(
            lambda: llama.Llama(
                cfg,
                dtype=self.dtype,
                kv_repeat=self.cache_kv_heads // cfg.num_kv_heads,
                rngs=nnx.Rngs(0),
                attention_kernel=attention_kernel,
                pipeline=pipeline,
                moe=self.moe,
                quant_mode=self.quant,
                weight_kernel=self.weight_kernel(),
            )
        )
        return nnx.split(model)

    def state_with(self, params: dict[str, jax.Array], unroll: bool = False, consume: bool = False) -> nnx.State:
        """The model state holding `params`; with `unroll`, each stacked parameter becomes a list of
        per-layer arrays (at pp > 1, per layer of a stage: `unstack`) and the forward pass (each pipeline
        stage) loops over layers in Python instead of `lax.scan`. With
        `consume` each stacked array is freed once split, so the weights are never held twice (the
        caller must hold no other reference to them)."""
        state = jax.tree.map(lambda x: x, self.abstract)
        for path, var in nnx.to_flat_state(state):
            x = params[path[-1]]
            if unroll and path[-1] in self.stacked:
                var.set_value(unstack(x, self.mesh.shape["pp"]))
                if consume:
                    jax.tree.map(lambda a: a.delete(), x)
            else:
                var.set_value(x)
        return state

    def params_of(self, state: nnx.State) -> dict[str, jax.Array]:
        """The parameters in `state` by name, each stacked one as one [layers, ...] array again."""
        shardings = checkpoint.param_shardings(self.config, self.mesh, self.rules, self.quant)
        stages = self.mesh.shape["pp"]
        return {
            path[-1]: restack(var.get_value(), shardings[path[-1]], stages) for path, var in nnx.to_flat_state(state)
        }

    @property
    def stacked(self) -> set[str]:
        return {name for name, w in llama.weights(self.config).items() if w.stacked}

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        cfg = self.config
        return (cfg.num_layers, batch, self.cache_kv_heads, length, cfg.head_dim)

    def page_shape(self, num_pages: int, page_size: int) -> tuple[int, ...]:
        cfg = self.config
        return (cfg.num_layers, num_pages, page_size, self.cache_kv_heads, cfg.head_dim)

    def cache_layout(self, shape: tuple[int, ...], axes, kind: str | None = None) -> tuple:
        """Abstract k and v of a cache of `shape` with logical `axes` (CACHE_AXES or PAGE_AXES), stored as
        kv_cache_dtype `kind` (default this setup's): values and, when quantized, their scales, each
        carrying its sharding (models/kv_cache.py `layout`; `kv_cache.empty` makes them)."""
        values, scales = (sharding.named(self.mesh, a, self.rules) for a in (axes, kv_cache.scale_axes(axes)))
        return kv_cache.layout(shape, kind or self.kv_cache_dtype, self.dtype, values, scales)

    def shard_shape(self, shape: tuple[int, ...], axes) -> tuple[int, ...]:
        return sharding.named(self.mesh, axes, self.rules).shard_shape(shape)

    def page_bytes(self, num_pages: int, page_size: int) -> int:
        """Bytes of k and v pages on one device, scales included."""
        return kv_cache.device_bytes(self.cache_layout(self.page_shape(num_pages, page_size), kv_cache.PAGE_AXES))

    def attention_kernel(self):
        """The paged decode-attention kernel wrapped in shard_map over the mesh, or None for the XLA path."""
        kind = self.attention.impl
        if kind == "xla" or self.mesh.shape["sp"] > 1:  # over sp the split cache runs it (page_split)
            return None
        from pallas_kernels.paged_attention import paged_attention

        r = self.rules
        q = P(r["batch"], r["q_heads"], None)
        pages = P(None, None, None, r["cache_heads"], None)  # the layers a pipeline stage holds, whole
        specs = (q, pages, pages, P(r["batch"]), P(r["batch"], None), P())
        kernel = functools.partial(paged_attention, interpret=kind == "interpret")

        manual = {a for s in specs for a in s if a is not None}
        # (inside a pipeline stage it runs on the context mesh, pp already manual there)
        return lambda *args: sharding.shard_map(kernel, self.mesh, specs, q, axis_names=manual)(*args)

    def put(self, x: np.ndarray) -> jax.Array:
        """A host batch [B, ...] onto the mesh, split over the batch axis."""
        spec = P(self.rules["batch"], *([None] * (x.ndim - 1)))
        return jax.device_put(x, NamedSharding(self.mesh, spec))

    def sampling_arrays(self, params: SamplingParams, n: int, batch: int):
        """Per-row sampling arrays for n real rows padded to `batch`, and whether all rows are greedy."""
        temperature = np.zeros(batch, np.float32)
        temperature[:n] = params.temperature
        top_k = np.zeros(batch, np.int32)
        top_k[:n] = params.top_k
        top_p = np.ones(batch, np.float32)
        top_p[:n] = params.top_p
        seed = params.seed if params.seed is not None else distributed.draw_seed()
        keys = np.broadcast_to(seed_key(seed), (batch, 2)).copy()
        arrays = tuple(self.put(a) for a in (temperature, top_k, top_p, keys))
        return arrays, params.temperature == 0

    @property
    def ring(self) -> Ring | None:
        """How prefill splits a prompt over the sp mesh axis (models/ring_attention.py); None when sp=1."""
        if self.mesh.shape["sp"] == 1:
            return None
        return Ring(self.mesh, tuple(sorted(self.rules.items())), np.dtype(self.dtype).name)

    @property
    def page_split(self) -> Ring | None:
        """How the serving engine's page pool is split over sp (models/kv_cache.PagedKVCache.split): the
        ring with the decode-attention implementation chosen; None when sp=1."""
        ring = self.ring
        return None if ring is None else dataclasses.replace(ring, decode_kernel=self.attention.impl)

    @property
    def cache_sharding(self) -> NamedSharding:
        return sharding.named(self.mesh, llama.CACHE_AXES, self.rules)


def restack(x, sharding, stages: int = 1):
    """unstack's inverse: per-layer arrays (or QArrays) -> one [L, ...] array placed by `sharding` (a
    QArray of shardings for QArrays); anything else as given."""
    if not isinstance(x, (list, tuple)):
        return x
    if isinstance(x[0], quant.QArray):
        return quant.QArray(
            restack([q.values for q in x], sharding.values, stages),
            restack([q.scales for q in x], sharding.scales, stages),
        )
    if stages == 1:
        return jax.jit(lambda parts: jnp.stack(parts), out_shardings=sharding)(list(x))
    # [stages, ...] per layer of a stage -> [stages, L / stages, ...] -> [L, ...], each stage's layers in order
    stack = lambda parts: jnp.stack(parts, axis=1).reshape(-1, *parts[0].shape[1:])  # noqa: E731
    return jax.jit(stack, out_shardings=sharding)(list(x))


def unstack(x, stages: int = 1) -> list:
    """[L, ...] -> L arrays [...] with the same split of the remaining dimensions (a QArray: L QArrays).

    With pp `stages` (the stack split over pp, each stage holding L / stages consecutive layers): L / stages
    arrays [stages, ...], the j-th holding every stage's j-th layer and still split over pp, so that each
    device holds its stage's layers as separate buffers and a stage loops over them without slicing a stack
    (XLA copies a layer's weights out of a stack inside `lax.scan`: three passes over every weight instead
    of one, a bandwidth-bound decode step's whole cost)."""
    if isinstance(x, quant.QArray):
        return [quant.QArray(v, s) for v, s in zip(unstack(x.values, stages), unstack(x.scales, stages))]
    if stages == 1:
        sh = NamedSharding(x.sharding.mesh, P(*x.sharding.spec[1:]))
        return jax.jit(lambda a: [a[i] for i in range(a.shape[0])], out_shardings=[sh] * x.shape[0])(x)
    n = x.shape[0] // stages
    split = lambda a: [a.reshape(stages, n, *a.shape[1:])[:, j] for j in range(n)]  # noqa: E731
    return jax.jit(split, out_shardings=[x.sharding] * n)(x)


def prepare(
    model: str | ModelConfig,
    axes: dict[str, int],
    mesh: str | None = None,
    dtype: str | None = None,
    max_seq_len: int | None = None,
    random_weights: bool = False,
    moe_dispatch: str = "auto",
    moe_kernel: str = "auto",
    attention: str = "auto",
    devices=None,
    quant: str = "auto",
    kv_cache_dtype: str = "auto",
    quantize_head: bool = False,
    fp8_kernel: str = "auto",
    pp_microbatch_rows: int | None = None,
) -> Setup:
    """Resolves the model and mesh and checks every constraint; reads no weights. `model` names a
    checkpoint or a built-in shape, or is a ModelConfig: a shape without weights, named by nothing (for
    `plan`, which plans a Hugging Face config.json without registering it anywhere)."""
    t0 = time.perf_counter()
    check_quant(quant)
    check_kv_cache_dtype(kv_cache_dtype)
    if moe_dispatch not in DISPATCH_MODES:
        raise JaxinferError(f"moe_dispatch={moe_dispatch!r}; use one of {', '.join(DISPATCH_MODES)}")
    kernels.check("moe_kernel", moe_kernel)
    kernels.check("attention", attention)
    kernels.check("fp8_kernel", fp8_kernel)
    rows = pp_microbatch_rows
    if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
        raise JaxinferError(f"pp_microbatch_rows={rows!r} must be a positive integer (the fewest rows per micro-batch)")
    overrides = None
    if mesh is not None:
        preset = sharding.load_preset(mesh)
        shape = sharding.mesh_shape(**preset.get("axes", {}))
        overrides = preset.get("rules")
    else:
        shape = sharding.mesh_shape(**axes)
    if dtype is not None and dtype not in DTYPES:
        raise JaxinferError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    if isinstance(model, ModelConfig):
        source = checkpoint.Source("shape", None, model, None)
    else:
        source = checkpoint.resolve(model)
    if source.kind == "shape" and not random_weights:
        raise JaxinferError(f"{model!r} is a model shape without weights; pass random_weights=True (--random_weights)")
    # What the weights are held in: "auto" and the checkpoint's own formats resolved against what it stores.
    quant = checkpoint.load_mode(None if random_weights else source, quant)
    source.quant = quant
    cfg = source.config
    if quantize_head:
        if quant == "none":
            raise JaxinferError("quantize_head=True needs a quantized model: pass quant='int8', 'fp8' or 'int4'")
        # every weight declaration reads the config (models/llama.weights), the loader's included
        source.config = cfg = dataclasses.replace(cfg, quantize_head=True)
    if max_seq_len is not None and (type(max_seq_len) is not int or not 1 < max_seq_len <= cfg.max_position_embeddings):
        raise JaxinferError(
            f"max_seq_len={max_seq_len!r} must be in [2, {cfg.max_position_embeddings}] "
            "(the model's max_position_embeddings) and an integer"
        )
    need = int(np.prod(list(shape.values())))
    if devices is not None:
        devices = list(devices)
        if len(devices) != need or len(set(devices)) != need:
            raise JaxinferError(
                f"devices= lists {len(devices)} devices ({len(set(devices))} distinct) but the mesh "
                f"{dict(shape)} needs exactly {need}; pass {need} distinct devices or change the axis sizes"
            )
    else:
        ensure_devices(need)
    available = len(devices) if devices is not None else len(jax.devices())
    if shape["sp"] > 1 and available % shape["sp"]:
        raise JaxinferError(
            f"sp={shape['sp']} does not divide the {available} devices; choose sp from the divisors of {available}"
        )
    device_mesh = sharding.make_mesh(shape, devices)
    rules = sharding.resolve_rules(cfg, device_mesh, overrides)
    if dtype is None:
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    dt = DTYPES[dtype]
    checkpoint.check_quant_layout(cfg, device_mesh, rules, quant)
    kv_heads = llama.cache_kv_heads(cfg, shape["tp"])
    log.info("opened %s (%s) in %.1fs", source.path, source.kind, time.perf_counter() - t0)
    setup = Setup(source, cfg, device_mesh, rules, dt, max_seq_len or cfg.max_position_embeddings, kv_heads, None, None)
    setup.quant = quant
    setup.kv_cache_dtype = kv_cache_dtype
    setup.microbatch_rows = MIN_MICROBATCH_ROWS if pp_microbatch_rows is None else pp_microbatch_rows
    setup.attention = kernels.attention(cfg, dt, attention, kv_cache_dtype=kv_cache_dtype, sp=shape["sp"])
    log.info("decode attention: %s", setup.attention)
    if cfg.num_experts:
        setup.moe_kernel = kernels.grouped_matmul(cfg, dt, moe_kernel)
        log.info("expert matmul: %s", setup.moe_kernel)
        setup.moe = MoE(device_mesh, tuple(sorted(rules.items())), moe_dispatch, setup.moe_kernel.impl)
    setup.int8_matmul = kernels.int8_matmul(quant, device_mesh)
    if setup.int8_matmul is not None:
        log.info("int8 matmul: %s", setup.int8_matmul)
    setup.fp8_matmul = kernels.fp8_matmul(quant, device_mesh, dt, fp8_kernel)
    if setup.fp8_matmul is not None:
        log.info("fp8 decode matmul: %s", setup.fp8_matmul)
    setup.graphdef, abstract = setup.build()
    params = checkpoint.abstract_params(cfg, device_mesh, rules, dt, quant)  # in the checkpoint's own layout
    for path, var in nnx.to_flat_state(abstract):
        var.set_value(params[path[-1]])
    setup.abstract = abstract
    return setup
