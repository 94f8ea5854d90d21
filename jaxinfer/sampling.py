"""Sampling parameters (validated on the host) and the sampler that runs on the device."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxinfer.errors import JaxinferError


@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 is greedy; top_k 0 and top_p 1 disable those filters.

    `logprobs=True` returns, per generated token, its log-probability under the model's distribution
    (before temperature, top-k and top-p). Stop strings are cut from the text; stop token ids and
    eos ids end generation and are kept in `token_ids` but not in the text.
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

    def __post_init__(self):
        if not isinstance(self.max_tokens, (int, np.integer)) or self.max_tokens < 1:
            raise JaxinferError(f"max_tokens={self.max_tokens!r} must be an integer >= 1")
        if not self.temperature >= 0:
            raise JaxinferError(f"temperature={self.temperature!r} must be >= 0 (0 is greedy)")
        if not isinstance(self.top_k, (int, np.integer)) or self.top_k < 0:
            raise JaxinferError(f"top_k={self.top_k!r} must be an integer >= 0 (0 disables it)")
        if not 0 < self.top_p <= 1:
            raise JaxinferError(f"top_p={self.top_p!r} must be in (0, 1] (1 disables it)")
        if self.seed is not None and not isinstance(self.seed, (int, np.integer)):
            raise JaxinferError(f"seed={self.seed!r} must be an integer or None")

    @property
    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


def sample(logits, temperature, top_k, top_p, keys, positions, *, greedy_only: bool):
    """Picks one token per row of fp32 logits [B, V].

    Per-row parameters are arrays [B]; the random stream of a row depends only on its key and its
    position, so results do not depend on batch composition or on how steps are grouped.
    Returns (tokens [B] int32, logprobs [B] fp32 of the chosen tokens under the raw distribution).
    """
    logp = jax.nn.log_softmax(logits, axis=-1)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
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
    return tokens, jnp.take_along_axis(logp, tokens[:, None], axis=-1)[:, 0]
