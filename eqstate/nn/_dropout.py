from numbers import Real
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, PRNGKeyArray

from .._convert import concrete_flag, is_key_like
from .._kinds import Rng
from .._module import Module
from .._mutating import mutating
from .._rng import device_index, fold_axes, next_key
from .._vmap import UNSET, AxisName, check_bound, layer_axes


_MSG_P_TYPE = (
    "Dropout(p=...) must be a Python number in [0, 1] (the probability of dropping; a "
    "static setting), got {p!r} ({type})."
)
_MSG_KEY = (
    "Dropout(key=...) expects a PRNG key, got {got}. Make one from a seed: "
    "`Dropout(p, key=jax.random.key(0))` (split a key to give each layer its own)."
)
_MSG_CALL_KEY = (
    "Dropout(x, key=...) expects a PRNG key (or None, to use the Dropout's own key), got {got}."
)
_MSG_INPUT_DTYPE = (
    "Dropout: x has dtype {dtype}, but dropout scales the kept values by 1 / (1 - p), "
    "which an integer array cannot hold (the result would be inf or truncated). Cast it "
    "first, e.g. `drop(x.astype(jnp.float32))`."
)
_MSG_PER_EXAMPLE = (
    "Dropout was called per example inside `jax.vmap` (with the Dropout itself not "
    "mapped) but has no mapped axis to fold its key over, so every example would get "
    "the same mask. Map the model with `eqstate.vmap(model)(xs)` (each example then gets "
    "its own mask), or name the vmapped axis: `jax.vmap(..., axis_name='batch')` with "
    "`Dropout(p, key=key, axis_name='batch')` or `drop(x, axis_name='batch')`. Or call "
    "it on the whole batch."
)


class Dropout(Module):
    """Dropout that owns its PRNG key (an `Rng` field) and advances it on every call.

    In training, zeroes each element with probability `p` and scales the rest by
    `1 / (1 - p)`; in inference (`inference=True`, `eqstate.eval`) it is the identity
    and the key does not move.

    On a batch, row `i` (along the leading axis) gets the mask that example `i` gets per
    example inside `eqstate.vmap(model)(xs)`, so both styles give the same numbers. Under
    `axis_name` (e.g. devices under `shard_map`), each index along it draws its own
    masks while the stored key stays in step. Under `eqstate.data_parallel`, each row
    draws the mask of its row in the whole batch: the masks differ between devices and
    are those of one device with the whole batch.

    !!! example

        ```python
        drop = eqstate.nn.Dropout(0.5, key=jax.random.key(0))
        y, drop = drop(jnp.ones((4, 3)))  # a fresh mask on every call: the key moves on
        y, _ = eqstate.eval(drop)(jnp.ones((4, 3)))  # the identity
        ```
    """

    key: PRNGKeyArray = Rng.field()
    p: float = eqx.field(static=True, default=0.5)
    axis_name: AxisName = eqx.field(static=True, default=None)
    inference: bool = False

    def __init__(
        self,
        p: float = 0.5,
        *,
        key: PRNGKeyArray,
        axis_name: AxisName = None,
        inference: bool = False,
    ):
        """**Arguments:**

        - `p`: the probability of dropping an element, in `[0, 1]`.
        - `key`: a PRNG key (`jax.random.key(seed)` or `jax.random.PRNGKey(seed)`).
        - `axis_name`: mapped axis name(s) along which masks differ, such as a device
            axis. Per example inside `eqstate.vmap` the mapped axis is found without it;
            a call's `axis_name=` overrides it.
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
        self.axis_name = axis_name
        self.inference = inference

    @mutating
    def __call__(
        self,
        x: Array,
        *,
        key: PRNGKeyArray | None = None,
        inference: bool | None = None,
        axis_name: AxisName = UNSET,
    ) -> Array:
        """Apply dropout to `x`; returns `(y, new_dropout)`.

        **Arguments:**

        - `x`: a floating-point batch, or one example per example inside `eqstate.vmap`.
        - `key`: as in `eqx.nn.Dropout`, draw the masks from this key instead; the
            stored key then does not move. (`eqstate.nn.Sequential(..., key=key)` passes
            one.)
        - `inference`: overrides `self.inference`. It may be a traced boolean, as under
            plain `jax.jit` or in a `lax.scan` carry; both branches are then computed and
            selected.
        - `axis_name`: overrides `self.axis_name` for this call.

        **Returns:**

        `(y, new_dropout)`: `x` with the dropped elements zeroed and the others scaled
        by `1 / (1 - p)`, and this layer with its key advanced (unchanged in inference
        or when `key` is given).
        """
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            raise TypeError(_MSG_INPUT_DTYPE.format(dtype=x.dtype))
        flag = concrete_flag(self.inference if inference is None else inference)
        if self.p == 0.0 or (isinstance(flag, bool) and flag):
            return x
        axes = layer_axes("Dropout", self.axis_name, axis_name, x, self.key)
        per_example, names = axes.per_example, axes.names
        if per_example and (axes.uncovered or not names):
            raise ValueError(_MSG_PER_EXAMPLE)
        check_bound(axes)
        if key is not None and not is_key_like(key):
            raise TypeError(_MSG_CALL_KEY.format(got=_describe(key)))
        old_key = self.key
        rows = not per_example and x.ndim > 0
        # a batch split over devices (eqstate.data_parallel): row i of shard d is row
        # d * n + i of the whole batch, and draws that row's mask
        devices = axes.devices if rows else ()
        names = tuple(n for n in names if n not in devices)
        key = next_key(self, axis_name=names) if key is None else fold_axes(key, names)
        if self.p == 1.0:
            y = jnp.zeros_like(x)
        else:
            if not rows:
                keep = jax.random.bernoulli(key, 1.0 - self.p, x.shape)
            else:  # row i as example i would draw it per example
                index = jnp.arange(x.shape[0])
                if devices:
                    index = index + device_index(devices) * x.shape[0]
                keys = jax.vmap(jax.random.fold_in, (None, 0))(key, index)
                keep = jax.vmap(lambda k: jax.random.bernoulli(k, 1.0 - self.p, x.shape[1:]))(keys)
                keep = _sharded_like(keep, x)
            y = jnp.where(keep, x / jnp.asarray(1.0 - self.p, x.dtype), jnp.zeros_like(x))
        if isinstance(flag, bool):
            return y
        self.key = jnp.where(flag, old_key, self.key)
        return jnp.where(flag, x, y)


def _sharded_like(keep: Array, x: Array) -> Array:
    """`keep` with the sharding of `x` where its type carries one (a batch split over the
    explicit axes of a mesh, `jax.make_mesh`'s default), which `jnp.where` requires."""
    typeof = getattr(jax, "typeof", None)  # JAX 0.4.36 and newer
    sharding = getattr(typeof(x), "sharding", None) if typeof is not None else None
    spec = getattr(sharding, "spec", None)
    if sharding is None or not spec or all(e is None for e in spec):
        return keep
    return jax.sharding.reshard(keep, sharding)


def _describe(x: Any) -> str:
    if isinstance(x, (jax.Array, np.ndarray)):
        return f"an array {x.dtype}{list(x.shape)}"
    return f"{x!r} ({type(x).__name__})"
