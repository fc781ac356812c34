import dataclasses
import math
from numbers import Integral, Real
from typing import Any, Generic, TypeVar

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray

from .._convert import concrete_flag, is_key_like
from .._kinds import State
from .._module import Module
from .._mutating import is_mutating, mutating


_Layer = TypeVar("_Layer")

_MSG_WEIGHT_NAME_TYPE = (
    "SpectralNorm(weight_name=...) must be a string, the name of the wrapped layer's "
    "weight field (e.g. 'weight'), got {value!r} ({type})."
)
_MSG_NO_WEIGHT = (
    "SpectralNorm(weight_name={name!r}): the wrapped {cls} has no attribute {name!r}. "
    "{fields} Pass the name of its weight matrix or kernel, e.g. "
    "`SpectralNorm(layer, 'weight', key=key)`."
)
_MSG_NOT_FLOAT = (
    "SpectralNorm(weight_name={name!r}): {cls}.{name} is {what}, but spectral "
    "normalisation needs a real floating-point array (a weight matrix or kernel). "
    "{fields} Pass the name of one of them."
)
_MSG_NDIM = (
    "SpectralNorm(weight_name={name!r}): {cls}.{name} has shape {shape}, but spectral "
    "normalisation needs an array of at least 2 dimensions (a matrix, or a kernel of "
    "shape (out, ...) that is reshaped to (out, -1)). Pick the layer's weight matrix or "
    "kernel, not a bias or scale vector. {fields}"
)
_MSG_ITERATIONS = (
    "SpectralNorm(num_power_iterations=...) must be a non-negative int, the number of "
    "power-iteration steps taken on each call in training (1 is usual), got {value!r} "
    "({type})."
)
_MSG_EPS = (
    "SpectralNorm(eps=...) must be a finite non-negative number such as 1e-12 (norms are "
    "kept at least `eps` before dividing by them), got {value!r} ({type})."
)
_MSG_KEY = (
    "SpectralNorm(key=...) expects a PRNG key, used to initialise the power-iteration "
    "vectors, got {got}. Make one from a seed: `SpectralNorm(layer, 'weight', "
    "key=jax.random.key(0))` (split a key to give each layer its own)."
)
_MSG_CALL_KEY = (
    "SpectralNorm.__call__(x, key=...) expects a PRNG key or None (it is passed on to the "
    "wrapped layer), got {got}. Pass `key=jax.random.key(...)`, or leave it out."
)


def _power_iteration(
    weight: Float[Array, "m n"], v: Float[Array, " n"], eps: float
) -> tuple[Float[Array, " m"], Float[Array, " n"]]:
    """One step, as Equinox takes it (`u` is recomputed from `v`, so the old `u` is not
    an input)."""
    u = weight @ v
    u_norm = jnp.sqrt(jnp.sum(u**2))
    u = u / jnp.maximum(eps, u_norm)
    v = weight.T @ u
    v_norm = jnp.sqrt(jnp.sum(v**2))
    v = v / jnp.maximum(eps, v_norm)
    return u, v


class SpectralNorm(Module, Generic[_Layer]):
    r"""Applies spectral normalisation to a parameter of a wrapped layer.

    Given a weight matrix $W$, and letting $\sigma(W)$ denote (an approximation to) its
    largest singular value, the wrapped layer is called with $W/\sigma(W)$ in place of $W$.
    A kernel of shape `(out, ...)` (convolutions) is treated as the matrix of shape
    `(out, -1)`.

    $\sigma(W) = u^T W v$ is estimated by
    [power iteration](https://en.wikipedia.org/wiki/Power_iteration). The vectors `u`
    and `v` are `State`: in training (`inference=False`) each call takes
    `num_power_iterations` steps from the stored `v` and returns them in the new module;
    in inference the stored vectors are used and nothing changes. Gradients flow
    through $W$ in $W/\sigma(W)$ (including the $W$ in $u^T W v$), not through the power
    iteration. This is `eqx.nn.SpectralNorm`, with the state on the module: the same
    arguments and key give the same vectors and the same outputs.

    Like the layer it wraps, it works per example: call it inside `jax.vmap` with the
    module unmapped. Its state does not depend on `x`, so the new module comes back
    unmapped (`out_axes=(0, None)`).

    See [Spectral Normalization for Generative Adversarial Networks](https://arxiv.org/abs/1802.05957).

    **Fields:**

    - `layer`: the wrapped layer, with its weight un-normalised.
    - `u`, `v`: the power-iteration vectors (`State`), of sizes `out` and `prod(rest)`.
    - `weight_name`, `num_power_iterations`, `eps`: static settings.
    - `inference`: Equinox's convention; flip with `eqx.nn.inference_mode` or
        `eqstate.eval`.

    !!! example

        ```python
        key1, key2, key3 = jax.random.split(jax.random.key(0), 3)
        sn = eqstate.nn.SpectralNorm(eqx.nn.Linear(3, 32, key=key1), "weight", key=key2)
        x = jax.random.normal(key3, (8, 3))
        y, sn = jax.vmap(sn, out_axes=(0, None))(x)  # y: (8, 32); u, v updated once
        y, _ = jax.vmap(eqstate.eval(sn), out_axes=(0, None))(x)  # fixed u, v
        ```
    """

    layer: _Layer
    u: Float[Array, " u_size"] = State.field()
    v: Float[Array, " v_size"] = State.field()
    weight_name: str = eqx.field(static=True)
    num_power_iterations: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    inference: bool = False

    def __init__(
        self,
        layer: _Layer,
        weight_name: str,
        num_power_iterations: int = 1,
        eps: float = 1e-12,
        inference: bool = False,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `layer`: the layer to wrap, any Equinox or eqstate module: usually an
            `eqx.nn.Linear` or a convolution such as `eqx.nn.Conv2d`. If its `__call__`
            is `@eqstate.mutating`, its new state is kept (with the weight
            un-normalised).
        - `weight_name`: the name of the layer's field holding the array to normalise
            (at least 2-dimensional; `(out, ...)` is treated as `(out, -1)`).
        - `num_power_iterations`: the number of power-iteration steps taken on each call
            in training.
        - `eps`: norms are kept at least `eps` before dividing by them.
        - `inference`: start in inference mode (no power iteration; the stored vectors
            are used).
        - `key`: a PRNG key for the initial vectors. (Keyword only argument.)

        The vectors have the dtype of the weight; they start from normal samples and
        take 15 power-iteration steps, as in Equinox.
        """
        if not isinstance(weight_name, str):
            raise TypeError(
                _MSG_WEIGHT_NAME_TYPE.format(value=weight_name, type=type(weight_name).__name__)
            )
        if not _is_int(num_power_iterations) or num_power_iterations < 0:
            raise (ValueError if _is_int(num_power_iterations) else TypeError)(
                _MSG_ITERATIONS.format(
                    value=num_power_iterations, type=type(num_power_iterations).__name__
                )
            )
        if isinstance(eps, bool) or not isinstance(eps, Real):
            raise TypeError(_MSG_EPS.format(value=eps, type=type(eps).__name__))
        if not (math.isfinite(eps) and eps >= 0):
            raise ValueError(_MSG_EPS.format(value=eps, type=type(eps).__name__))
        if not is_key_like(key):
            raise TypeError(_MSG_KEY.format(got=_describe(key)))
        weight = _checked_weight(layer, weight_name)
        self.layer = layer
        self.weight_name = weight_name
        self.num_power_iterations = int(num_power_iterations)
        self.eps = float(eps)
        self.inference = inference

        matrix = jnp.reshape(weight, (weight.shape[0], -1))
        ukey, vkey = jr.split(key)
        u = jr.normal(ukey, (matrix.shape[0],), dtype=matrix.dtype)
        v = jr.normal(vkey, (matrix.shape[1],), dtype=matrix.dtype)
        for _ in range(15):
            u, v = _power_iteration(matrix, v, self.eps)
        self.u, self.v = u, v

    @mutating
    def __call__(
        self, x: Array, *, key: PRNGKeyArray | None = None, inference: bool | None = None
    ) -> Array:
        """Call the layer with its weight normalised; returns `(y, new_spectral_norm)`.

        **Arguments:**

        - `x`: the layer's input (one example for `eqx.nn.Linear`: vmap over a batch).
        - `key`: passed on to the wrapped layer when given (as `layer(x, key=key)`).
            `eqx.nn.SpectralNorm` drops it; the two agree for layers that ignore their
            key, such as `eqx.nn.Linear` and the convolutions. (Keyword only argument.)
        - `inference`: overrides `self.inference` when not `None`. It may be a traced
            boolean (plain `jax.jit`, `lax.scan` carries); both branches are then
            computed and selected. (Keyword only argument.)

        **Returns:**

        `(y, new_spectral_norm)`: the layer's output, and this module with the updated
        vectors (unchanged in inference).
        """
        if key is not None and not is_key_like(key):
            raise TypeError(_MSG_CALL_KEY.format(got=_describe(key)))
        flag = concrete_flag(self.inference if inference is None else inference)
        weight = getattr(self.layer, self.weight_name)
        matrix = jnp.reshape(weight, (weight.shape[0], -1))
        # the vectors are state: no gradient reaches them (as Equinox's, kept outside
        # the model, get none)
        u, v = lax.stop_gradient(self.u), lax.stop_gradient(self.v)
        if not (isinstance(flag, bool) and flag):
            stopped = lax.stop_gradient(matrix)
            new_u, new_v = u, v
            for _ in range(self.num_power_iterations):
                new_u, new_v = _power_iteration(stopped, new_v, self.eps)
            if isinstance(flag, bool):
                u, v = new_u, new_v
            else:  # a traced flag: select both branches
                u, v = jnp.where(flag, u, new_u), jnp.where(flag, v, new_v)
            self.u, self.v = u, v
        sigma = jnp.einsum("i,ij,j->", u, matrix, v)
        normalised = jnp.reshape(matrix / sigma, weight.shape)
        layer = eqx.tree_at(lambda m: getattr(m, self.weight_name), self.layer, normalised)
        out = layer(x) if key is None else layer(x, key=key)  # pyright: ignore[reportCallIssue]
        if is_mutating(type(layer).__call__):
            # an eqstate layer's `(y, new_layer)`: keep its new state, un-normalised
            out, new_layer = out
            self.layer = eqx.tree_at(lambda m: getattr(m, self.weight_name), new_layer, weight)
        return out


def _checked_weight(layer: Any, name: str) -> Any:
    """`layer`'s field `name`, checked to be a floating array of 2 dimensions or more."""
    cls = type(layer).__name__
    weight = getattr(layer, name, dataclasses.MISSING)
    if weight is dataclasses.MISSING:
        raise AttributeError(_MSG_NO_WEIGHT.format(name=name, cls=cls, fields=_arrays(layer)))
    is_array = isinstance(weight, (jax.Array, np.ndarray))
    if not is_array or not jnp.issubdtype(weight.dtype, jnp.floating):
        what = f"an array {weight.dtype}{list(weight.shape)}" if is_array else _describe(weight)
        raise TypeError(_MSG_NOT_FLOAT.format(name=name, cls=cls, what=what, fields=_arrays(layer)))
    if weight.ndim < 2:
        raise ValueError(
            _MSG_NDIM.format(name=name, cls=cls, shape=tuple(weight.shape), fields=_arrays(layer))
        )
    return weight


def _arrays(layer: Any) -> str:
    """The array fields of `layer`, with dtypes and shapes, for messages."""
    if dataclasses.is_dataclass(layer):
        names = [f.name for f in dataclasses.fields(layer)]
    else:
        names = list(getattr(layer, "__dict__", {}))
    found = [
        f"{n!r} ({x.dtype}{list(x.shape)})"
        for n in names
        if isinstance(x := getattr(layer, n, None), (jax.Array, np.ndarray))
    ]
    if not found:
        return f"{type(layer).__name__} has no array fields."
    return f"Its array fields are: {', '.join(found)}."


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _describe(x: Any) -> str:
    if isinstance(x, (jax.Array, np.ndarray)):
        return f"an array {x.dtype}{list(x.shape)}"
    return f"{x!r} ({type(x).__name__})"
