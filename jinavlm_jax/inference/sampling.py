"""Choosing the next token: greedy, temperature, top-k and top-p, with one setting per row.

Every setting is an array with one entry per row, so rows (the requests in a serving engine's decode
slots) with different settings share one compiled step. Row b draws with `fold_in(key(seed[b]), step)`,
so a request's tokens depend only on its own seed and step, not on its neighbours.
"""
from __future__ import annotations

from dataclasses import dataclass

import jax
import jax.numpy as jnp
import numpy as np


class GenerateError(ValueError):
    """A request generation cannot serve: budget, sampling or batch-layout problems (names the limit)."""


@dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 means greedy (argmax, first index on ties).

    top_k > 0 keeps the k most likely tokens; top_p < 1 keeps the smallest set of most likely tokens
    whose probability reaches top_p (always at least one). Both apply after the temperature.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (self.temperature >= 0 and np.isfinite(self.temperature)):
            raise GenerateError(f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature}")
        if int(self.top_k) != self.top_k or self.top_k < 0:
            raise GenerateError(f"top_k must be an integer >= 0 (0 = off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise GenerateError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")

    @property
    def greedy(self) -> bool:
        """True for temperature 0 (argmax decoding)."""
        return self.temperature == 0

    @property
    def filtered(self) -> bool:
        """True when top-k or top-p removes tokens (the sampler then sorts the vocabulary)."""
        return self.top_k > 0 or self.top_p < 1


def row_keys(seeds: jax.Array) -> jax.Array:
    """uint32 seeds [B] -> typed PRNG keys [B]."""
    return jax.vmap(jax.random.key)(seeds)


def sample(logits: jax.Array, keys: jax.Array, step, temperature: jax.Array, top_k: jax.Array,
           top_p: jax.Array, *, filtered: bool = True) -> jax.Array:
    """[B, V] float32 logits -> [B] int32 tokens.

    keys [B] typed keys; step an int or [B] ints (row b draws with fold_in(keys[b], step[b]));
    temperature [B] (0 = greedy for that row), top_k [B] int (0 = off), top_p [B] (1 = off).
    `filtered=False` skips the top-k / top-p pass (a static choice: valid when no row uses them;
    with them off the filtered pass removes nothing, so both give the same tokens).
    """
    b, v = logits.shape
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)

    def draw():
        t = jnp.where(temperature > 0, temperature, 1.0).astype(logits.dtype)
        z = logits / t[:, None]
        neg = jnp.finfo(z.dtype).min
        if filtered:
            srt = -jnp.sort(-z, axis=-1)                                        # descending
            k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v).astype(jnp.int32)
            kth = jnp.take_along_axis(srt, (k - 1)[:, None], axis=-1)           # the k-th largest
            z = jnp.where(z < kth, neg, z)
            cand = jnp.where(jnp.arange(v)[None, :] < k[:, None], srt, neg)     # top-k, still sorted
            probs = jax.nn.softmax(cand, axis=-1)
            # Keep a token if the mass strictly before it is < top_p (so the top token always stays).
            keep = ((jnp.cumsum(probs, axis=-1) - probs) < top_p[:, None]) | (top_p[:, None] >= 1)
            cutoff = jnp.min(jnp.where(keep, cand, jnp.inf), axis=-1, keepdims=True)
            z = jnp.where(z < cutoff, neg, z)
        steps = jnp.broadcast_to(jnp.asarray(step, jnp.int32), (b,))
        step_keys = jax.vmap(jax.random.fold_in)(keys, steps)
        drawn = jax.vmap(jax.random.categorical)(step_keys, z).astype(jnp.int32)
        return jnp.where(temperature > 0, drawn, greedy)

    # The draw (a Gumbel sample over the whole vocabulary for every row, and the sort of top-k / top-p)
    # runs only when some row samples: a greedy batch pays for the argmax alone.
    return jax.lax.cond(jnp.any(temperature > 0), draw, lambda: greedy)


def sampling_arrays(settings, rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One `Sampling` (for every row) or one per row -> (temperature f32, top_k i32, top_p f32) of `rows`
    entries; rows past the given settings are greedy."""
    if isinstance(settings, Sampling):
        settings = [settings] * rows
    settings = list(settings) + [Sampling()] * (rows - len(settings))
    return (np.array([s.temperature for s in settings], np.float32),
            np.array([s.top_k for s in settings], np.int32),
            np.array([s.top_p for s in settings], np.float32))
