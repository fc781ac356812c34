from numbers import Real
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from .._convert import concrete_flag, is_key_like
from .._draft import is_mapped
from .._kinds import Rng
from .._module import Module
from .._mutating import mutating
from .._rng import next_key


_MSG_P_TYPE = (
    "Dropout(p=...) must be a Python number in [0, 1] (the probability of dropping; a "
    "static setting), got {p!r} ({type})."
)
_MSG_KEY = (
    "Dropout(key=...) expects a PRNG key, got {got}. Make one from a seed: "
    "`Dropout(p, key=jax.random.key(0))` (split a key to give each layer its own)."
)
_MSG_INPUT_DTYPE = (
    "Dropout: x has dtype {dtype}, but dropout scales the kept values by 1 / (1 - p), "
    "which an integer array cannot hold (the result would be inf or truncated). Cast it "
    "first, e.g. `drop(x.astype(jnp.float32))`."
)
_MSG_PER_EXAMPLE = (
    "Dropout was called per example inside `jax.vmap` with one key for the whole batch, "
    "so every example would get the same mask. Call it on the batch, `y, model = model(x)` "
    "with `x` of shape (batch, ...), vmapping only the per-example layers "
    "(`h = jax.vmap(linear)(x)`), or vmap over a batch of Dropout modules with keys of "
    "their own (`jax.vmap(...)` with the modules mapped too)."
)


class Dropout(Module):
    """Dropout that owns its PRNG key (an `Rng` field) and advances it on every call.

    In training, zeroes each element with probability `p` and scales the rest by
    `1 / (1 - p)`; in inference (`inference=True`, `eqstate.eval`) it is the identity
    and the key does not move.

    Call it on a whole batch: it draws one mask for the whole of `x`. Called per example
    inside `jax.vmap` with an unmapped key, it would draw the same mask for every
    example, so that is an error.
    """

    key: PRNGKeyArray = Rng.field()
    p: float = eqx.field(static=True, default=0.5)
    inference: bool = False

    def __init__(self, p: float = 0.5, *, key: PRNGKeyArray, inference: bool = False):
        """**Arguments:**

        - `p`: the probability of dropping an element, in `[0, 1]`.
        - `key`: a PRNG key (`jax.random.key(seed)` or `jax.random.PRNGKey(seed)`).
        - `inference`: start in inference mode.
        """
        if isinstance(p, bool) or not isinstance(p, Real):
            raise TypeError(_MSG_P_TYPE.format(p=p, type=type(p).__name__))
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout(p=...) must be in [0, 1], got {p}.")
        if not is_key_like(key):
            raise TypeError(_MSG_KEY.format(got=_describe(key)))
        self.key = key
        self.p = float(p)
        self.inference = inference

    @mutating
    def __call__(self, x: Array, *, inference: bool | None = None) -> Array:
        """Apply dropout to `x`; returns `(y, new_dropout)`.

        `x` must be floating-point. `inference` (or `self.inference`) may be a traced
        boolean, as under plain `jax.jit` or in a `lax.scan` carry; both branches are
        then computed and selected.
        """
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            raise TypeError(_MSG_INPUT_DTYPE.format(dtype=x.dtype))
        flag = concrete_flag(self.inference if inference is None else inference)
        if self.p == 0.0 or (isinstance(flag, bool) and flag):
            return x
        if is_mapped(x) and not is_mapped(self.key):
            raise ValueError(_MSG_PER_EXAMPLE)
        old_key = self.key
        if self.p == 1.0:
            next_key(self)
            y = jnp.zeros_like(x)
        else:
            keep = jax.random.bernoulli(next_key(self), 1.0 - self.p, x.shape)
            y = jnp.where(keep, x / jnp.asarray(1.0 - self.p, x.dtype), jnp.zeros_like(x))
        if isinstance(flag, bool):
            return y
        self.key = jnp.where(flag, old_key, self.key)
        return jnp.where(flag, x, y)


def _describe(x: Any) -> str:
    if isinstance(x, (jax.Array, np.ndarray)):
        return f"an array {x.dtype}{list(x.shape)}"
    return f"{x!r} ({type(x).__name__})"
