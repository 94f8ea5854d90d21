"""The Python API: `LLM(...)`, `llm.generate`, `llm.score` and the one-call `generate`."""

from __future__ import annotations

import dataclasses
import inspect
import logging
import time
from collections.abc import Sequence

import jax
import numpy as np

from jaxinfer import checkpoint, compile_cache, steps
from jaxinfer.errors import JaxinferError
from jaxinfer.executor import decode_chunks
from jaxinfer.outputs import Completion, Row, Stops, StreamText, is_token
from jaxinfer.runtime import DECODE_CHUNK, buckets, prepare
from jaxinfer.sampling import SamplingParams
from models import kv_cache, llama

log = logging.getLogger(__name__)


class LLM:
    """A model loaded onto a device mesh, ready to generate.

    model: a Hugging Face checkpoint directory, a .gguf file, an orbax checkpoint written by
    `jaxinfer convert`, or a built-in name ("smollm2-135m"). The mesh comes from the axis sizes, or
    from `mesh`, a preset name in meshes/ or a JSON file. On CPU, simulated devices are created for the
    mesh when jax has not started yet; otherwise set XLA_FLAGS=--xla_force_host_platform_device_count=N
    (or `jax.config.update("jax_num_cpu_devices", N)`) before using jax.
    sp: sequence parallelism. On `generate_static` and `score` the prompt is split over sp devices in
    zigzag order with ring attention between them (models/ring_attention.py); each device writes every
    K/V block the ring brings into its unsplit cache, so decode runs as at sp=1. In the serving engine the page pool is split
    over sp (num_pages a multiple of sp; each device holds 1/sp of the pages, a sequence's pages dealt
    round robin); prefill chunks and decode attend on each device over its own pages and merge the
    partials across sp (one small all-gather per layer), and a prompt's first chunk runs split over sp
    with ring attention. With pp > 1 as well, each pipeline stage runs all of this on its own layers.
    dtype: "float32" or "bfloat16" (default float32 on CPU, bfloat16 on GPU).
    random_weights: random weights made on the devices (for built-in shapes such as "llama3-8b").
    devices: the devices this model uses, exactly as many as the mesh needs (default: the first ones of
    jax.devices()); engines on disjoint device lists run side by side in one process (replicas).
    compilation_cache: directory of jax's persistent compilation cache, so a restart skips compiling
    (default $JAXINFER_COMPILATION_CACHE, else ~/.cache/jaxinfer/xla; "" turns it off).
    unroll_layers: loop over layers (each pipeline stage's) in Python instead of `lax.scan` (default).
    pp_microbatch_rows: at pp > 1, the fewest rows (tokens) a step's batch is cut into micro-batches of,
    at most pp of them (default pipeline.MIN_MICROBATCH_ROWS = 256: below it a stage reads its weights
    again for too few rows to pay for the bubble it saves, so a decode batch runs as one micro-batch).
    Serving engine (`generate`, `generate_stream`, `AsyncLLM`): max_num_seqs concurrent sequences
    (default 16), page_size tokens per KV page (16), num_pages (default: what half the memory left
    after the weights holds, at most what max_num_seqs full-length sequences need), prefill_chunk
    prompt tokens per prefill step (128), attention "auto" | "pallas" | "interpret" | "xla" (auto:
    the Pallas kernel on GPU, the XLA path elsewhere).
    Mixture-of-experts models: experts split over `ep`; moe_dispatch "auto" | "all_to_all" | "psum"
    (see models/moe.py; auto picks per step shape the mode that sends fewer bytes), moe_kernel as
    `attention` for the grouped expert matmul (xla: jax.lax.ragged_dot).
    quant: "auto" (default: a checkpoint stored quantized -- Hugging Face fp8 blocks, compressed-tensors,
    GGUF Q8_0/Q4_0 -- stays as stored, others load at dtype), "none" (everything at dtype), "int8" / "fp8"
    (per-output-channel scales), "int4" (groups of 128 inputs, two values per byte): the attention, MLP
    and expert projections, quantized while loading (models/quant.py); quantize_head=True quantizes
    the output head (or a tied embedding) too. fp8_kernel "auto" | "pallas" | "interpret" | "xla": fp8
    weights' contractions at decode rows on one GPU through pallas_kernels/fp8_matmul ("pallas"), or
    XLA's fused cast-and-dot (auto, until the kernel is measured faster on a GPU).
    kv_cache_dtype: "auto" (the activation dtype), "int8" or "fp8": the KV cache (paged and contiguous) stored
    in 8 bits with a float32 scale per token and kv head, dequantized inside attention (models/kv_cache.py).
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
        quant: str = "auto",
        kv_cache_dtype: str = "auto",
        quantize_head: bool = False,
        fp8_kernel: str = "auto",
        pp_microbatch_rows: int | None = None,
    ):
        t0 = time.perf_counter()
        compile_cache.enable(compilation_cache)
        engine_sizes = dict(
            max_num_seqs=max_num_seqs, page_size=page_size, num_pages=num_pages, prefill_chunk=prefill_chunk
        )
        for name, value in engine_sizes.items():
            if value is not None and (
                isinstance(value, bool) or not isinstance(value, int) or value < 1 + (name == "num_pages")
            ):
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
            quant=quant,
            kv_cache_dtype=kv_cache_dtype,
            quantize_head=quantize_head,
            fp8_kernel=fp8_kernel,
            pp_microbatch_rows=pp_microbatch_rows,
        )
        sp = setup.mesh.shape["sp"]
        if num_pages is not None and (num_pages % sp or num_pages < 2 * sp):
            fix = -(-max(num_pages, 2 * sp) // sp) * sp
            raise JaxinferError(
                f"num_pages={num_pages} does not split over sp={sp}: each sp device holds an equal share of the "
                f"page pool, at least 2; use a multiple of {sp} such as num_pages={fix}"
            )
        self.setup = setup
        self.config, self.mesh, self.rules, self.dtype = setup.config, setup.mesh, setup.rules, setup.dtype
        self.tokenizer = setup.source.tokenizer
        self.max_seq_len = setup.max_seq_len
        self.eos_token_ids = self.config.eos_token_ids or (self.tokenizer.eos_token_ids if self.tokenizer else ())
        self.cache_kv_heads = setup.cache_kv_heads
        self.graphdef = setup.graphdef
        if unroll_layers is None:
            # XLA copies each layer's weights out of the stack inside a scan, so a scanned decode step moves
            # every weight three times. Measured (benchmarks/gpu_check.py, H200, bf16, batch 1): Llama-3-8B
            # TPOT 11.7 ms scanned, 4.9 ms unrolled; Qwen3-30B-A3B 34.8 ms and 7.8 ms (the scan copies all
            # experts, not just the routed ones). On CPU decode is 1.5x faster unrolled at batch 16.
            # Pipeline stages unroll their own layers (runtime.unstack).
            unroll_layers = True
        if random_weights:
            params = checkpoint.random_params(self.config, self.mesh, self.rules, self.dtype, quant_mode=quant)
        elif setup.source.kind == "orbax":
            params = checkpoint.restore_orbax(setup.source, self.mesh, self.rules, self.dtype)
        else:
            params = checkpoint.place(setup.source, self.mesh, self.rules, self.dtype, quant)
        self.unroll_layers = unroll_layers
        self.state = setup.state_with(params, unroll=unroll_layers, consume=True)
        del params
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
        elif isinstance(prompts, (list, tuple)) and prompts and all(is_token(t) for t in prompts):
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
        bad = [t for t in ids if not is_token(t)]
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
        """An empty contiguous cache stored as kv_cache_dtype says (values, and scales when quantized)."""
        layout = self.setup.cache_layout(self.setup.cache_shape(batch, length), llama.CACHE_AXES)
        return llama.KVCache(*kv_cache.empty(layout))

    def _ring(self) -> dict:
        """The prefill steps' `ring` argument with sp > 1 (none at sp=1: jit keys an explicit default apart)."""
        ring = self.setup.ring
        return {} if ring is None else {"ring": ring}

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

    @property
    def params(self) -> dict[str, jax.Array]:
        """The weights by name, stacked weights as one [layers, ...] array (rebuilt from the per-layer
        arrays when the layers are unrolled: a copy, for saving or inspecting, not for serving)."""
        return self.setup.params_of(self.state)

    @params.setter
    def params(self, params: dict[str, jax.Array]) -> None:
        self.state = self.setup.state_with(params, unroll=self.unroll_layers)

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
        out = StreamText(req)
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
            **self._ring(),
        )
        stops = Stops(self.tokenizer, self.eos_token_ids, params)
        rows = [Row(prompt_ids[i], int(budget[i])) for i in range(n)]
        first, first_lp = np.asarray(tok), np.asarray(logprob)
        for i, row in enumerate(rows):
            stops.push(row, int(first[i]), float(first_lp[i]))
        chunks = decode_chunks(
            self.graphdef,
            self.state,
            cache,
            tok,
            lengths_b,
            sampling,
            put=self._put,
            n_steps=DECODE_CHUNK,
            greedy_only=greedy_only,
        )
        while any(not r.done for r in rows):
            toks, lps = (np.asarray(a) for a in next(chunks))
            for i, row in enumerate(rows):
                for j in range(DECODE_CHUNK):
                    if row.done:
                        break
                    stops.push(row, int(toks[i, j]), float(lps[i, j]))
        chunks.close()  # (drops its reference to the cache now)
        return [stops.completion(r) for r in rows]

    def score(self, token_ids: Sequence[int]) -> np.ndarray:
        """Full-sequence logits, numpy float32 [len(token_ids), vocab_size]."""
        ids = [int(t) for t in token_ids]
        self._check_ids(ids, "token_ids")
        batch, t, _ = buckets(1, len(ids), 0, self.mesh.shape["dp"], self.max_seq_len)
        tokens = np.zeros((batch, t), np.int32)
        tokens[0, : len(ids)] = ids
        logits = steps.score(self.graphdef, self.state, self._put(tokens), self._cache(batch, t), **self._ring())
        return np.asarray(logits[0, : len(ids)], np.float32)


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
