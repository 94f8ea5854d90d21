"""The Python API: `LLM(...)`, `llm.generate`, `llm.score` and the one-call `generate`."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import re
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxinfer import checkpoint, compile_cache, kernels, sharding, steps
from jaxinfer.config import ModelConfig
from jaxinfer.errors import JaxinferError
from jaxinfer.pipeline import Pipeline
from jaxinfer.sampling import SamplingParams
from models import kv_cache, llama
from models.moe import DISPATCH_MODES, MoE

log = logging.getLogger(__name__)

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
MIN_PROMPT_BUCKET = 16
DECODE_CHUNK = 8  # decode steps per compiled call; tokens come back to the host this often


@dataclasses.dataclass
class Completion:
    text: str
    token_ids: list[int]
    logprobs: list[float] | None
    finish_reason: str  # "stop" | "length" | "cancelled" ("error" is raised as JaxinferError instead)
    prompt_token_ids: list[int] = dataclasses.field(default_factory=list)


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

    def kernel_report(self) -> dict[str, str]:
        """Which implementation each compiled step uses, and why."""
        out = {
            "engine decode attention": str(self.attention),
            "prefill and static-path attention": "xla (the Pallas kernel is for paged decode)",
        }
        if self.moe_kernel is not None:
            out["expert matmul"] = str(self.moe_kernel)
        return out

    def build(self, attention_kernel=None) -> tuple[nnx.GraphDef, nnx.State]:
        """The abstract model (no weights made) split into graph and state."""
        cfg = self.config
        pipeline = Pipeline(self.mesh, self.mesh.shape["pp"]) if self.mesh.shape["pp"] > 1 else None
        model = nnx.eval_shape(
            lambda: llama.Llama(
                cfg,
                dtype=self.dtype,
                kv_repeat=self.cache_kv_heads // cfg.num_kv_heads,
                rngs=nnx.Rngs(0),
                attention_kernel=attention_kernel,
                pipeline=pipeline,
                moe=self.moe,
            )
        )
        return nnx.split(model)

    def state_with(self, params: dict[str, jax.Array], unroll: bool = False) -> nnx.State:
        """The model state holding `params`; with `unroll`, each stacked parameter becomes a list of
        per-layer arrays and the forward pass loops over layers in Python instead of `lax.scan`."""
        state = jax.tree.map(lambda x: x, self.abstract)
        for path, var in nnx.to_flat_state(state):
            x = params[path[-1]]
            var.set_value(unstack(x) if unroll and path[-1] in self.stacked else x)
        return state

    @property
    def stacked(self) -> set[str]:
        return {name for name, w in llama.weights(self.config).items() if w.stacked}

    def cache_shape(self, batch: int, length: int) -> tuple[int, ...]:
        cfg = self.config
        return (cfg.num_layers, batch, self.cache_kv_heads, length, cfg.head_dim)

    def page_shape(self, num_pages: int, page_size: int) -> tuple[int, ...]:
        cfg = self.config
        return (cfg.num_layers, num_pages, page_size, self.cache_kv_heads, cfg.head_dim)

    def shard_shape(self, shape: tuple[int, ...], axes) -> tuple[int, ...]:
        return sharding.named(self.mesh, axes, self.rules).shard_shape(shape)

    def page_bytes(self, num_pages: int, page_size: int) -> int:
        """Bytes of k and v pages on one device."""
        shard = self.shard_shape(self.page_shape(num_pages, page_size), kv_cache.PAGE_AXES)
        return 2 * int(np.prod(shard)) * np.dtype(self.dtype).itemsize

    def paged_cache(self, num_pages: int, page_size: int) -> tuple[jax.Array, jax.Array]:
        sh = sharding.named(self.mesh, kv_cache.PAGE_AXES, self.rules)
        return tuple(steps.init_cache(self.page_shape(num_pages, page_size), self.dtype, sh))

    def attention_kernel(self):
        """The paged decode-attention kernel wrapped in shard_map over the mesh, or None for the XLA path."""
        kind = self.attention.impl
        if kind == "xla":
            return None
        from pallas_kernels.paged_attention import paged_attention

        r = self.rules
        q = P(r["batch"], r["q_heads"], None)
        pages = P(None, None, None, r["cache_heads"], None)  # the layers a pipeline stage holds, whole
        specs = (q, pages, pages, P(r["batch"]), P(r["batch"], None), P())
        kernel = functools.partial(paged_attention, interpret=kind == "interpret")

        def attend(*args):
            # Inside a pipeline stage the context mesh already has pp manual; take it from there.
            mesh = jax.sharding.get_abstract_mesh()
            mesh = self.mesh if mesh.empty else mesh
            manual = {a for s in specs for a in s if a is not None}
            return jax.shard_map(kernel, mesh=mesh, in_specs=specs, out_specs=q, axis_names=manual, check_vma=False)(
                *args
            )

        return attend

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
        seed = params.seed if params.seed is not None else int(np.random.randint(0, 2**31 - 1))
        keys = np.broadcast_to(np.asarray(jax.random.key_data(jax.random.key(seed))), (batch, 2)).copy()
        arrays = tuple(self.put(a) for a in (temperature, top_k, top_p, keys))
        return arrays, params.temperature == 0

    @property
    def cache_sharding(self) -> NamedSharding:
        return sharding.named(self.mesh, llama.CACHE_AXES, self.rules)


def unstack(x: jax.Array) -> list[jax.Array]:
    """[L, ...] -> L arrays [...] with the same split of the remaining dimensions."""
    sh = NamedSharding(x.sharding.mesh, P(*x.sharding.spec[1:]))
    return jax.jit(lambda a: [a[i] for i in range(a.shape[0])], out_shardings=[sh] * x.shape[0])(x)


def prepare(
    model: str,
    axes: dict[str, int],
    mesh: str | None = None,
    dtype: str | None = None,
    max_seq_len: int | None = None,
    random_weights: bool = False,
    moe_dispatch: str = "auto",
    moe_kernel: str = "auto",
    attention: str = "auto",
    devices=None,
) -> Setup:
    """Resolves the model and mesh and checks every constraint; reads no weights."""
    t0 = time.perf_counter()
    if moe_dispatch not in DISPATCH_MODES:
        raise JaxinferError(f"moe_dispatch={moe_dispatch!r}; use one of {', '.join(DISPATCH_MODES)}")
    kernels.check("moe_kernel", moe_kernel)
    kernels.check("attention", attention)
    overrides = None
    if mesh is not None:
        preset = sharding.load_preset(mesh)
        shape = sharding.mesh_shape(**preset.get("axes", {}))
        overrides = preset.get("rules")
    else:
        shape = sharding.mesh_shape(**axes)
    if dtype is not None and dtype not in DTYPES:
        raise JaxinferError(f"dtype={dtype!r} is not supported; use one of {', '.join(DTYPES)}")
    source = checkpoint.resolve(model)
    if source.kind == "shape" and not random_weights:
        raise JaxinferError(f"{model!r} is a model shape without weights; pass random_weights=True (--random_weights)")
    cfg = source.config
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
    device_mesh = sharding.make_mesh(shape, devices)
    rules = sharding.resolve_rules(cfg, device_mesh, overrides)
    if dtype is None:
        dtype = "float32" if jax.default_backend() == "cpu" else "bfloat16"
    dt = DTYPES[dtype]
    kv_heads = llama.cache_kv_heads(cfg, shape["tp"])
    log.info("opened %s (%s) in %.1fs", source.path, source.kind, time.perf_counter() - t0)
    setup = Setup(source, cfg, device_mesh, rules, dt, max_seq_len or cfg.max_position_embeddings, kv_heads, None, None)
    setup.attention = kernels.attention(cfg, dt, attention)
    log.info("decode attention: %s", setup.attention)
    if cfg.num_experts:
        setup.moe_kernel = kernels.grouped_matmul(cfg, dt, moe_kernel)
        log.info("expert matmul: %s", setup.moe_kernel)
        setup.moe = MoE(device_mesh, tuple(sorted(rules.items())), moe_dispatch, setup.moe_kernel.impl)
    setup.graphdef, abstract = setup.build()
    shardings = checkpoint.param_shardings(cfg, device_mesh, rules)
    for path, var in nnx.to_flat_state(abstract):
        v = var.get_value()
        var.set_value(jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shardings[path[-1]]))
    setup.abstract = abstract
    return setup


class LLM:
    """A model loaded onto a device mesh, ready to generate.

    model: a Hugging Face checkpoint directory, a .gguf file, an orbax checkpoint written by
    `jaxinfer convert`, or a built-in name ("smollm2-135m"). The mesh comes from the axis sizes, or
    from `mesh`, a preset name in meshes/ or a JSON file. On CPU, simulated devices are created for the
    mesh when jax has not started yet; otherwise set XLA_FLAGS=--xla_force_host_platform_device_count=N
    (or `jax.config.update("jax_num_cpu_devices", N)`) before using jax.
    dtype: "float32" or "bfloat16" (default float32 on CPU, bfloat16 on GPU).
    random_weights: random weights made on the devices (for built-in shapes such as "llama3-8b").
    devices: the devices this model uses, exactly as many as the mesh needs (default: the first ones of
    jax.devices()); engines on disjoint device lists run side by side in one process (replicas).
    compilation_cache: directory of jax's persistent compilation cache, so a restart skips compiling
    (default $JAXINFER_COMPILATION_CACHE, else ~/.cache/jaxinfer/xla; "" turns it off).
    unroll_layers: loop over layers in Python instead of `lax.scan` (default: on CPU only).
    Serving engine (`generate`, `generate_stream`, `AsyncLLM`): max_num_seqs concurrent sequences
    (default 16), page_size tokens per KV page (16), num_pages (default: what half the memory left
    after the weights holds, at most what max_num_seqs full-length sequences need), prefill_chunk
    prompt tokens per prefill step (128), attention "auto" | "pallas" | "interpret" | "xla" (auto:
    the Pallas kernel on GPU, the XLA path elsewhere).
    Mixture-of-experts models: experts split over `ep`; moe_dispatch "auto" | "all_to_all" | "psum"
    (see models/moe.py; auto picks per step shape the mode that sends fewer bytes), moe_kernel as
    `attention` for the grouped expert matmul (xla: jax.lax.ragged_dot).
    """

    def __init__(
        self,
        model: str = "smollm2-135m",
        tp: int = 1,
        pp: int = 1,
        ep: int = 1,
        sp: int = 1,
        dp: int = 1,
        mesh: str | None = None,
        dtype: str | None = None,
        max_seq_len: int | None = None,
        random_weights: bool = False,
        unroll_layers: bool | None = None,
        max_num_seqs: int | None = None,
        page_size: int | None = None,
        num_pages: int | None = None,
        prefill_chunk: int | None = None,
        attention: str = "auto",
        moe_dispatch: str = "auto",
        moe_kernel: str = "auto",
        devices=None,
        compilation_cache: str | None = None,
    ):
        t0 = time.perf_counter()
        compile_cache.enable(compilation_cache)
        engine_sizes = dict(
            max_num_seqs=max_num_seqs, page_size=page_size, num_pages=num_pages, prefill_chunk=prefill_chunk
        )
        for name, value in engine_sizes.items():
            if value is not None and (not isinstance(value, int) or value < 1 + (name == "num_pages")):
                raise JaxinferError(f"{name}={value!r} must be a positive integer (num_pages: at least 2)")
        setup = prepare(
            model,
            dict(dp=dp, pp=pp, tp=tp, ep=ep, sp=sp),
            mesh,
            dtype,
            max_seq_len,
            random_weights,
            moe_dispatch=moe_dispatch,
            moe_kernel=moe_kernel,
            attention=attention,
            devices=devices,
        )
        self.setup = setup
        self.config, self.mesh, self.rules, self.dtype = setup.config, setup.mesh, setup.rules, setup.dtype
        self.tokenizer = setup.source.tokenizer
        self.max_seq_len = setup.max_seq_len
        self.eos_token_ids = self.config.eos_token_ids or (self.tokenizer.eos_token_ids if self.tokenizer else ())
        self.cache_kv_heads = setup.cache_kv_heads
        self.graphdef = setup.graphdef
        if unroll_layers is None:
            # XLA:CPU copies each layer's weights out of the stack inside a scan (measured: 1.5x slower
            # decode at batch 16); elsewhere the scan keeps compile time flat in depth. Pipeline stages
            # split the stack itself, so they always scan.
            unroll_layers = jax.default_backend() == "cpu" and self.mesh.shape["pp"] == 1
        if unroll_layers and self.mesh.shape["pp"] > 1:
            raise JaxinferError("unroll_layers=True needs pp=1: pipeline stages split the stacked layers")
        if random_weights:
            params = checkpoint.random_params(self.config, self.mesh, self.rules, self.dtype)
        elif setup.source.kind == "orbax":
            params = checkpoint.restore_orbax(setup.source, self.mesh, self.rules, self.dtype)
        else:
            params = checkpoint.place(setup.source, self.mesh, self.rules, self.dtype)
        self.params = params
        self.unroll_layers = unroll_layers
        self.state = setup.state_with(params, unroll=unroll_layers)
        self.engine_options = dict(
            max_num_seqs=16 if max_num_seqs is None else max_num_seqs,
            page_size=16 if page_size is None else page_size,
            num_pages=num_pages,
            prefill_chunk=128 if prefill_chunk is None else prefill_chunk,
        )
        self._engine = None
        log.info("loaded %s on mesh %s in %.1fs", model, dict(self.mesh.shape), time.perf_counter() - t0)

    # --- inputs ----------------------------------------------------------------------------------

    def _prompt_ids(self, prompts, chat: bool) -> list[list[int]]:
        if isinstance(prompts, str):
            prompts = [prompts]
        elif isinstance(prompts, (list, tuple)) and prompts and all(_is_token(t) for t in prompts):
            prompts = [list(prompts)]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise JaxinferError("prompts must be a str, a non-empty list of str, or a list of token-id lists")
        out = []
        for i, p in enumerate(prompts):
            if isinstance(p, str):
                if self.tokenizer is None:
                    raise JaxinferError("this checkpoint has no tokenizer files; pass prompts as token-id lists")
                ids = self.tokenizer.encode_chat(p) if chat else self.tokenizer.encode(p)
            elif isinstance(p, (list, tuple, np.ndarray)):
                ids = list(p)
            else:
                raise JaxinferError(f"prompt {i} is a {type(p).__name__}; give a str or a list of token ids")
            self._check_ids(ids, f"prompt {i}")
            out.append([int(t) for t in ids])
        return out

    def _check_ids(self, ids: list[int], what: str) -> None:
        if not ids:
            raise JaxinferError(f"{what} is empty; give at least one token")
        bad = [t for t in ids if not _is_token(t)]
        if bad:
            raise JaxinferError(f"{what} has {bad[0]!r} ({type(bad[0]).__name__}) where a token id (an int) belongs")
        bad = [t for t in ids if not 0 <= t < self.config.vocab_size]
        if bad:
            raise JaxinferError(f"{what} has token id {bad[0]} outside the vocabulary [0, {self.config.vocab_size})")
        if len(ids) >= self.max_seq_len:
            raise JaxinferError(
                f"{what} has {len(ids)} tokens, longer than the context allows (max_seq_len="
                f"{self.max_seq_len}, leaving room for one new token); shorten it or raise max_seq_len"
            )

    def _cache(self, batch: int, length: int) -> llama.KVCache:
        return steps.init_cache(self.setup.cache_shape(batch, length), self.dtype, self.setup.cache_sharding)

    def _put(self, x: np.ndarray) -> jax.Array:
        return self.setup.put(x)

    # --- generation ------------------------------------------------------------------------------

    @property
    def engine(self):
        """The serving engine (created on first use), shared by generate, generate_stream and AsyncLLM."""
        if self._engine is None:
            from jaxinfer.engine import Engine

            self._engine = Engine(self, **self.engine_options)
        return self._engine

    def paged_graphdef(self):
        """The model graph with the chosen paged decode-attention implementation plugged in."""
        kernel = self.setup.attention_kernel()
        if kernel is None:
            return self.graphdef
        return self.setup.build(kernel)[0]

    def _params_list(self, params, n: int) -> list[SamplingParams]:
        params = SamplingParams() if params is None else params
        plist = list(params) if isinstance(params, (list, tuple)) else [params] * n
        if len(plist) != n:
            raise JaxinferError(f"got {len(plist)} SamplingParams for {n} prompts; give one, or one per prompt")
        for i, p in enumerate(plist):
            if not isinstance(p, SamplingParams):
                raise JaxinferError(f"params must be jaxinfer.SamplingParams, got {type(p).__name__} (for prompt {i})")
            p.validate(self.config.vocab_size)
        return plist

    def generate(self, prompts, params=None, chat: bool = False) -> list[Completion]:
        """One Completion per prompt (a str, a list of str, or a list of token-id lists), run on the
        serving engine. `params`: one SamplingParams for all prompts, or a list with one per prompt.
        Every prompt and params is checked before any is queued (JaxinferError names the bad one); a
        request that fails while running raises JaxinferError naming it, and the others of the call end."""
        prompt_ids = self._prompt_ids(prompts, chat)
        plist = self._params_list(params, len(prompt_ids))
        engine = self.engine
        reqs = engine.add_all(list(zip(prompt_ids, plist)))
        try:
            while True:
                for i, r in enumerate(reqs):
                    if r.row.finish == "error":
                        raise JaxinferError(f"request {r.id} (prompt {i}) failed: {r.row.error}")
                if all(r.row.done for r in reqs):
                    break
                engine.step()
        finally:
            for r in reqs:
                if not r.row.done:
                    engine.cancel(r)
        with engine.lock:
            return [r.stops.completion(r.row) for r in reqs]

    def generate_stream(self, prompt, params: SamplingParams | None = None, chat: bool = False):
        """An iterator of StreamChunk(text, token_ids, finish_reason) pieces for one prompt as they are
        made; other requests submitted meanwhile share the engine's steps. The prompt and params are
        checked now; the request is queued when iteration starts, and closing the iterator early
        cancels it. A request that fails raises JaxinferError from the iterator."""
        ids = self._prompt_ids(prompt if isinstance(prompt, str) else [prompt], chat)[0]
        params = self._params_list(params, 1)[0]
        return self._stream(self.engine.request(ids, params))

    def _stream(self, req):
        engine = self.engine
        engine.queue([req])
        out = _StreamText(req)
        try:
            while True:
                if not req.row.done:
                    engine.step()
                with engine.lock:
                    item = out.next(req.row)
                if isinstance(item, BaseException):
                    raise item
                if item is not None:
                    yield item
                if req.row.done:
                    return
        finally:
            if not req.row.done:
                engine.cancel(req)

    def generate_static(self, prompts, params: SamplingParams | None = None, chat: bool = False) -> list[Completion]:
        """The plain path: one right-padded batch, a contiguous cache, no engine (for comparison)."""
        params = self._params_list(params, 1)[0]
        prompt_ids = self._prompt_ids(prompts, chat)
        n = len(prompt_ids)
        lengths = np.array([len(p) for p in prompt_ids], np.int32)
        batch, t_bucket, cache_len = buckets(
            n, lengths.max(), params.max_tokens, self.mesh.shape["dp"], self.max_seq_len
        )
        budget = np.minimum(params.max_tokens, cache_len - lengths)  # new tokens each row may make

        tokens = np.zeros((batch, t_bucket), np.int32)
        for i, p in enumerate(prompt_ids):
            tokens[i, : len(p)] = p
        lengths_b = np.ones(batch, np.int32)
        lengths_b[:n] = lengths
        sampling, greedy_only = self.setup.sampling_arrays(params, n, batch)

        cache = self._cache(batch, cache_len)
        tok, logprob, cache = steps.prefill(
            self.graphdef,
            self.state,
            cache,
            self._put(tokens),
            self._put(lengths_b),
            sampling,
            greedy_only=greedy_only,
        )
        stops = _Stops(self, params)
        rows = [_Row(prompt_ids[i], int(budget[i])) for i in range(n)]
        first, first_lp = np.asarray(tok), np.asarray(logprob)
        for i, row in enumerate(rows):
            stops.push(row, int(first[i]), float(first_lp[i]))
        positions = lengths_b.copy()
        last = first
        while any(not r.done for r in rows):
            toks, lps, cache = steps.decode(
                self.graphdef,
                self.state,
                cache,
                self._put(last.astype(np.int32)),
                self._put(positions),
                sampling,
                n_steps=DECODE_CHUNK,
                greedy_only=greedy_only,
            )
            toks, lps = np.asarray(toks), np.asarray(lps)
            for i, row in enumerate(rows):
                for j in range(DECODE_CHUNK):
                    if row.done:
                        break
                    stops.push(row, int(toks[i, j]), float(lps[i, j]))
            positions = positions + DECODE_CHUNK
            last = toks[:, -1]
        return [stops.completion(r) for r in rows]

    def score(self, token_ids: Sequence[int]) -> np.ndarray:
        """Full-sequence logits, numpy float32 [len(token_ids), vocab_size]."""
        ids = [int(t) for t in token_ids]
        self._check_ids(ids, "token_ids")
        batch, t, _ = buckets(1, len(ids), 0, self.mesh.shape["dp"], self.max_seq_len)
        tokens = np.zeros((batch, t), np.int32)
        tokens[0, : len(ids)] = ids
        logits = steps.score(
            self.graphdef,
            self.state,
            self._put(tokens),
            cache_shape=self.setup.cache_shape(batch, t),
            cache_sharding=self.setup.cache_sharding,
        )
        return np.asarray(logits[0, : len(ids)], np.float32)


@dataclasses.dataclass
class StreamChunk:
    text: str  # new text since the previous chunk
    token_ids: list[int]  # new token ids since the previous chunk
    finish_reason: str | None  # set on the last chunk


def _is_token(t) -> bool:
    return isinstance(t, (int, np.integer)) and not isinstance(t, (bool, np.bool_))


@dataclasses.dataclass
class _Row:
    prompt: list[int]
    budget: int
    ids: list[int] = dataclasses.field(default_factory=list)
    logprobs: list[float] = dataclasses.field(default_factory=list)
    text: str | None = None  # the final text, once done
    finish: str | None = None  # "stop" | "length" | "cancelled" | "error"
    error: str | None = None  # what went wrong, with finish "error"

    @property
    def done(self) -> bool:
        return self.finish is not None


class _Stops:
    """Host-side end-of-sequence rules: stop ids, eos ids, stop strings and the token budget."""

    def __init__(self, llm: LLM, params: SamplingParams):
        self.params = params
        self.tokenizer = llm.tokenizer
        ids = set(params.stop_token_ids or ())
        if not params.ignore_eos:
            ids |= set(llm.eos_token_ids)
        self.stop_ids = ids
        self.stop_strings = params.stop_strings
        if self.stop_strings and self.tokenizer is None:
            raise JaxinferError("stop strings need a tokenizer; this checkpoint has none, use stop_token_ids")

    def push(self, row: _Row, token: int, logprob: float) -> None:
        row.ids.append(token)
        row.logprobs.append(logprob)
        if token in self.stop_ids:
            row.finish = "stop"
            return
        if self.stop_strings:
            text = self.tokenizer.decode(row.ids)
            hits = [text.find(s) for s in self.stop_strings if s in text]
            if hits:
                row.text, row.finish = text[: min(hits)], "stop"
                return
        if len(row.ids) >= row.budget:
            row.finish = "length"

    def text(self, row: _Row) -> str:
        """The final text of a finished row."""
        if row.text is None:
            ids = row.ids
            visible = ids[:-1] if ids and ids[-1] in self.stop_ids and row.finish == "stop" else ids
            text = self.tokenizer.decode(visible) if self.tokenizer else ""
            if not row.done:
                return text
            row.text = text
        return row.text

    def settled_text(self, row: _Row) -> str:
        """The text of an unfinished row that no later token can change: without a trailing incomplete
        UTF-8 sequence (decoded as U+FFFD) or a suffix that may be the start of a stop string."""
        if self.tokenizer is None:
            return ""
        text = self.tokenizer.decode(row.ids).rstrip("\ufffd")
        hold = 0
        for s in self.stop_strings:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return text[: len(text) - hold]

    def completion(self, row: _Row) -> Completion:
        return Completion(
            text=self.text(row),
            token_ids=list(row.ids),
            logprobs=list(row.logprobs) if self.params.logprobs else None,
            finish_reason=row.finish,
            prompt_token_ids=row.prompt,
        )


class _StreamText:
    """What one stream has sent of a request: `next` gives the new token ids and the new text that is
    settled, so that the chunks' texts add up to the completion's text exactly."""

    def __init__(self, req):
        self.req = req
        self.ids = 0
        self.text = ""

    def error(self, row: _Row) -> JaxinferError:
        return JaxinferError(f"request {self.req.id} failed: {row.error}")

    def next(self, row: _Row) -> StreamChunk | JaxinferError | None:
        """The next chunk, None when there is nothing new, or the error of a failed request."""
        if row.finish == "error":
            return self.error(row)
        done = row.done
        if len(row.ids) == self.ids and not done:
            return None
        stops = self.req.stops
        text = stops.text(row) if done else stops.settled_text(row)
        if text.startswith(self.text):
            new = text[len(self.text) :]
        else:  # the tokenizer decoded settled text differently later; what was sent cannot be taken back
            log.warning("request %d: the decoded text changed under the streamed text", self.req.id)
            new = ""
        ids = row.ids[self.ids :]
        self.ids, self.text = self.ids + len(ids), self.text + new
        return StreamChunk(new, ids, row.finish if done else None)


def generate(prompts, model: str = "smollm2-135m", chat: bool = False, **kwargs) -> list[Completion]:
    """One call: load `model` with the LLM keyword arguments, generate with the SamplingParams ones."""
    llm_keys = set(inspect.signature(LLM).parameters) - {"model"}
    sampling_keys = {f.name for f in dataclasses.fields(SamplingParams)}
    unknown = set(kwargs) - llm_keys - sampling_keys
    if unknown:
        raise JaxinferError(
            f"unknown arguments {sorted(unknown)}; LLM takes {sorted(llm_keys)}, "
            f"SamplingParams takes {sorted(sampling_keys)}"
        )
    params = SamplingParams(**{k: v for k, v in kwargs.items() if k in sampling_keys})
    llm = LLM(model, **{k: v for k, v in kwargs.items() if k in llm_keys})
    return llm.generate(prompts, params, chat=chat)
