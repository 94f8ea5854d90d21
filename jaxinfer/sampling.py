"""Sampling parameters (validated on the host) and the sampler that runs on the device.

Importing this module loads no jax (the sampler imports it when traced), so the host-only scheduler
can use SamplingParams and seed_key."""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import numpy as np

from jaxinfer.errors import JaxinferError

MAX_TOP_K = 2**31 - 1  # the sampler holds top_k in int32; the vocabulary bounds it further when a request is added
MAX_TOP_LOGPROBS = 20  # alternatives per token a request may ask for: a decode call computes this many, or none


def _is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def _is_real(x) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def _strings(name: str, value) -> tuple[str, ...] | str | None:
    """stop: None, one non-empty string, or a list/tuple of them (kept as a tuple)."""
    if value is None:
        return None
    fix = f"give {name} as a non-empty string or a list of non-empty strings (token ids go in stop_token_ids)"
    if isinstance(value, str):
        if not value:
            raise JaxinferError(f'{name}="" would end every completion at once; {fix}, or leave it out')
        return value
    if not isinstance(value, (list, tuple)):
        raise JaxinferError(f"{name}={value!r} is a {type(value).__name__}; {fix}")
    for i, s in enumerate(value):
        if not isinstance(s, str):
            raise JaxinferError(f"{name}={value!r}: {name}[{i}]={s!r} is a {type(s).__name__}, not a string; {fix}")
        if not s:
            raise JaxinferError(f'{name}={value!r}: {name}[{i}]="" would end every completion at once; {fix}')
    return tuple(value)


def seed_key(seed: int) -> np.ndarray:
    """The threefry key data (uint32 [2]) of any Python int: seeds in [0, 2**64) are their own 64 bits
    (below 2**32 the same key as jax.random.key(seed)); others are hashed to 64 bits."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raw = seed.to_bytes((seed.bit_length() + 8) // 8, "little", signed=True)
        seed = int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=b"jaxinfer-seed").digest(), "little")
    return np.array([seed >> 32, seed & 0xFFFFFFFF], np.uint32)


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.

    `logprobs=True` returns, per generated token, its log-probability under the model's distribution
    (before temperature, top-k and top-p); `top_logprobs=k` (with logprobs) also the k most likely
    tokens at each step and their log-probabilities (at most MAX_TOP_LOGPROBS; the serving engine only).
    Stop strings are cut from the text; stop token ids and eos ids end generation and are kept in
    `token_ids` but not in the text. `seed`: any int (the same seed, prompt and parameters give the
    same tokens); None draws one per request.

    Every field is checked when the object is made, and again, against the model's vocabulary, when a
    request is added: a bad value raises JaxinferError naming it, before anything is queued.
    """

    max_tokens: int = 16
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: str | Sequence[str] | None = None
    stop_token_ids: Sequence[int] | None = None
    ignore_eos: bool = False
    logprobs: bool = False
    top_logprobs: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self, vocab_size: int | None = None) -> None:
        """Raises JaxinferError for a bad field; with `vocab_size`, also for top_k and stop_token_ids
        outside the vocabulary. Normalizes numpy scalars to Python ones and lists to tuples."""
        put = lambda name, value: object.__setattr__(self, name, value)  # (the dataclass is frozen)
        if not _is_int(self.max_tokens) or self.max_tokens < 1:
            raise JaxinferError(f"max_tokens={self.max_tokens!r} must be an integer >= 1 (new tokens at most)")
        put("max_tokens", int(self.max_tokens))
        t = self.temperature
        if not _is_real(t):
            raise JaxinferError(f"temperature={t!r} is a {type(t).__name__}; give a number >= 0 (0 is greedy)")
        if not math.isfinite(t) or t < 0:
            raise JaxinferError(f"temperature={t!r} must be >= 0 (0 is greedy) and finite")
        put("temperature", float(t))
        k, top = self.top_k, MAX_TOP_K if vocab_size is None else vocab_size
        if not _is_int(k) or not 0 <= k <= top:
            where = "the vocabulary size" if vocab_size is not None else "2**31 - 1"
            raise JaxinferError(f"top_k={k!r} must be an integer >= 0 and <= {top} ({where}; 0 disables it)")
        put("top_k", int(k))
        p = self.top_p
        if not _is_real(p):
            raise JaxinferError(f"top_p={p!r} is a {type(p).__name__}; give a number in (0, 1] (1 disables it)")
        if not 0 < p <= 1:
            raise JaxinferError(f"top_p={p!r} must be in (0, 1] (1 disables it)")
        put("top_p", float(p))
        if self.seed is not None and not _is_int(self.seed):
            raise JaxinferError(f"seed={self.seed!r} must be an integer (any size, negative too) or None")
        if self.seed is not None:
            put("seed", int(self.seed))
        put("stop", _strings("stop", self.stop))
        ids = self.stop_token_ids
        if ids is not None:
            fix = "give stop_token_ids as a list of token ids"
            if not isinstance(ids, (list, tuple, np.ndarray)):
                raise JaxinferError(f"stop_token_ids={ids!r} is a {type(ids).__name__}; {fix}")
            for i, t in enumerate(ids):
                if not _is_int(t):
                    raise JaxinferError(f"stop_token_ids[{i}]={t!r} is not an integer; {fix}")
                if t < 0 or (vocab_size is not None and t >= vocab_size):
                    vocab = "" if vocab_size is None else f" [0, {vocab_size})"
                    raise JaxinferError(f"stop_token_ids[{i}]={t} is outside the vocabulary{vocab}; {fix}")
            put("stop_token_ids", tuple(int(t) for t in ids))
        for name in ("ignore_eos", "logprobs"):
            value = getattr(self, name)
            if not isinstance(value, (bool, np.bool_)):
                raise JaxinferError(f"{name}={value!r} must be True or False")
            put(name, bool(value))
        k = self.top_logprobs
        if not _is_int(k) or not 0 <= k <= MAX_TOP_LOGPROBS:
            raise JaxinferError(f"top_logprobs={k!r} must be an integer in [0, {MAX_TOP_LOGPROBS}] (0: none)")
        if k and not self.logprobs:
            raise JaxinferError(f"top_logprobs={k} needs logprobs=True")
        put("top_logprobs", int(k))

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def sample(logits, temperature, top_k, top_p, keys, positions, *, greedy_only: bool, top_logprobs: int = 0):
    """Picks one token per row of fp32 logits [B, V].

    Per-row parameters are arrays [B]; the random stream of a row depends only on its key and its
    position, so results do not depend on batch composition or on how steps are grouped.
    Returns (tokens [B] int32, logprobs [B] fp32 of the chosen tokens under the raw distribution), and
    with top_logprobs=k > 0 also the k most likely tokens (ids [B, k] int32, logprobs [B, k] fp32).
    """
    import jax  # here, not at the top: the host-only layers import this module for SamplingParams
    import jax.numpy as jnp

    logp = jax.nn.log_softmax(logits, axis=-1)
    # jnp.argmax's first largest (or first NaN) as two plain reductions: XLA:CPU runs argmax's paired
    # (value, index) reduction one element at a time, 0.25 ms of a 7 ms SmolLM2-135M int8 decode step.
    top = jnp.max(logits, axis=-1, keepdims=True)
    first = jnp.where(
        (logits == top) | jnp.isnan(logits), jnp.arange(logits.shape[-1], dtype=jnp.int32), logits.shape[-1]
    )
    greedy = jnp.min(first, axis=-1)
    if greedy_only:
        tokens = greedy
    else:
        vocab = logits.shape[-1]
        scaled = logits / jnp.maximum(temperature, 1e-6)[:, None]
        order = jnp.argsort(-scaled, axis=-1)
        sorted_logits = jnp.take_along_axis(scaled, order, axis=-1)
        rank = jnp.arange(vocab)[None, :]
        k = jnp.where(top_k > 0, top_k, vocab)[:, None]
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        keep = (rank < k) & (mass_before < top_p[:, None])
        masked = jnp.where(keep, sorted_logits, -jnp.inf)
        step_keys = jax.vmap(jax.random.fold_in)(keys, positions)
        choice = jax.vmap(jax.random.categorical)(step_keys, masked)
        sampled = jnp.take_along_axis(order, choice[:, None], axis=-1)[:, 0].astype(jnp.int32)
        tokens = jnp.where(temperature > 0, sampled, greedy)
    chosen = jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
    if not top_logprobs:
        return tokens, chosen
    top_lp, top_ids = jax.lax.top_k(logp, top_logprobs)
    return tokens, chosen, top_ids.astype(jnp.int32), top_lp
