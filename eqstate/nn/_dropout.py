import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray

from .._kinds import Rng
from .._module import Module, mutating
from .._rng import next_key


class Dropout(Module):
    """Dropout that owns its PRNG key (an `Rng` field) and advances it on every call.

    In training, zeroes each element with probability `p` and scales the rest by
    `1 / (1 - p)`; in inference (`inference=True`, `eqstate.eval`) it is the identity
    and the key does not move.
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
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"Dropout(p=...) must be in [0, 1], got {p}.")
        self.key = key
        self.p = p
        self.inference = inference

    @mutating
    def __call__(self, x: Array, *, inference: bool | None = None) -> Array:
        """Apply dropout to `x`; returns `(y, new_dropout)`.

        `inference` (or `self.inference`) may be a traced boolean, as under plain
        `jax.jit` or in a `lax.scan` carry; both branches are then computed and selected.
        """
        flag = self.inference if inference is None else inference
        if self.p == 0.0 or (isinstance(flag, bool) and flag):
            return x
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
