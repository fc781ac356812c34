from collections.abc import Hashable, Sequence
from numbers import Integral, Real
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._convert import concrete_flag
from .._draft import is_mapped
from .._kinds import BatchStat
from .._module import Module
from .._mutating import mutating


_MSG_NUM_FEATURES = (
    "BatchNorm(num_features=...) must be a positive int, the size of the feature axis; "
    "got {value!r} ({type}). Pass e.g. `BatchNorm(3)` (or `BatchNorm(int(n))` for a "
    "computed size)."
)
_MSG_NUMBER = "BatchNorm({name}=...) must be {what}, got {value!r} ({type})."
_MSG_DTYPE = (
    "BatchNorm(dtype=...) must be a floating dtype such as jnp.float32 or jnp.bfloat16, "
    "got {dtype}: its running statistics and affine parameters hold fractions."
)
_MSG_INPUT_DTYPE = (
    "BatchNorm: x has dtype {dtype}, but batch normalisation needs a floating-point input "
    "(the output has the input's dtype, so normalised values would be truncated to "
    "integers). Cast it first, e.g. `bn(x.astype(jnp.float32))`."
)
_MSG_PER_EXAMPLE = (
    "BatchNorm expects a batch of shape (N, {n}, ...) with the features on axis {axis}, "
    "got shape {shape}: a single example (per example inside `jax.vmap`). BatchNorm "
    "normalises whole batches, so call it "
    "on the batch, `y, bn = bn(x)` with `x` of shape (N, {n}, ...), not per example "
    "inside `jax.vmap` (vmap only the per-example layers: `x = jax.vmap(linear)(x)`)."
)
_MSG_FEATURE_AXIS = (
    "BatchNorm expects a batch of shape (N, {n}, ...) with the features on axis {axis}, "
    "got shape {shape}. Set `axis=` to the feature axis of the batch (e.g. `axis=-1` for "
    "channels-last), and call it on the whole batch rather than per example inside "
    "`jax.vmap`."
)
_MSG_ONE_VALUE = (
    "BatchNorm in training got a batch of shape {shape}: one value per feature, so its "
    "variance is 0, the output would be just the bias and `running_var` would decay to "
    "0. Train on batches of more than one example (or with spatial axes), average the "
    "statistics over devices with `axis_name=`, or call it in inference mode "
    "(`eqstate.eval(model)` or `bn(x, inference=True)`)."
)


class BatchNorm(Module):
    """Batch normalisation over a batch with a leading batch axis, with running statistics.

    Works on whole batches as vmapped Equinox layers produce them: `(N, C)`,
    `(N, C, H, W)`, ... with features on `axis` (default 1). Statistics are taken over
    every other axis, so no `vmap` or `axis_name` is needed. With `axis_name`, they are
    also averaged across that mapped axis (devices under `shard_map` / `pmap`).

    In training (`inference=False`) the batch is normalised with its own mean and
    (biased) variance, and the running statistics move towards them:
    `running = momentum * running + (1 - momentum) * batch`. In inference the running
    statistics are used and nothing changes.

    **Fields:**

    - `weight`, `bias`: per-feature affine parameters (`Param`), or `None` without
        `affine`.
    - `running_mean`, `running_var`: `BatchStat`, initialised to zeros and ones.
    - `momentum`, `eps`, `axis`, `axis_name`: static settings.
    - `inference`: Equinox's convention; flip with `eqx.nn.inference_mode` or
        `eqstate.eval`.
    """

    weight: Float[Array, " features"] | None
    bias: Float[Array, " features"] | None
    running_mean: Float[Array, " features"] = BatchStat.field()
    running_var: Float[Array, " features"] = BatchStat.field()
    momentum: float = eqx.field(static=True, default=0.99)
    eps: float = eqx.field(static=True, default=1e-5)
    axis: int = eqx.field(static=True, default=1)
    axis_name: Hashable | Sequence[Hashable] | None = eqx.field(static=True, default=None)
    inference: bool = False

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.99,
        eps: float = 1e-5,
        affine: bool = True,
        axis: int = 1,
        axis_name: Hashable | Sequence[Hashable] | None = None,
        inference: bool = False,
        dtype: jnp.dtype | None = None,
    ):
        """**Arguments:**

        - `num_features`: the size of the feature axis.
        - `momentum`: the weight kept from the old running value (Equinox's convention).
        - `eps`: added to the variance before the square root.
        - `affine`: whether to learn a per-feature scale and shift.
        - `axis`: the feature axis of the batched input (default 1; `-1` for
            channels-last).
        - `axis_name`: optional mapped axis name(s) to average statistics over.
        - `inference`: start in inference mode.
        - `dtype`: dtype of parameters and statistics (default float32).
        """
        if not _is_int(num_features) or num_features <= 0:
            raise (ValueError if _is_int(num_features) else TypeError)(
                _MSG_NUM_FEATURES.format(value=num_features, type=type(num_features).__name__)
            )
        _check_number("momentum", momentum, "a number in [0, 1]", Real)
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm(momentum=...) must be in [0, 1], got {momentum}.")
        _check_number("eps", eps, "a non-negative number, such as 1e-5", Real)
        if eps < 0:
            raise ValueError(f"BatchNorm(eps=...) must be non-negative, got {eps}.")
        _check_number("axis", axis, "an int (the feature axis, e.g. 1 or -1)", Integral)
        dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(_MSG_DTYPE.format(dtype=dtype))
        num_features, axis = int(num_features), int(axis)
        self.weight = jnp.ones(num_features, dtype) if affine else None
        self.bias = jnp.zeros(num_features, dtype) if affine else None
        self.running_mean = jnp.zeros(num_features, dtype)
        self.running_var = jnp.ones(num_features, dtype)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.axis = axis
        self.axis_name = axis_name
        self.inference = inference

    @mutating
    def __call__(self, x: Array, *, inference: bool | None = None) -> Array:
        """Normalise `x`; returns `(y, new_batch_norm)`.

        **Arguments:**

        - `x`: a floating-point array with a leading batch axis and `num_features` on
            `self.axis`: the whole batch, not one example (not per example inside
            `jax.vmap`). In training it needs more than one value per feature (the
            variance of one value is 0), unless `axis_name` averages over devices.
        - `inference`: overrides `self.inference` when not `None`. It may be a traced
            boolean (plain `jax.jit`, `lax.scan` carries); both branches are then
            computed and selected.
        """
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            raise TypeError(_MSG_INPUT_DTYPE.format(dtype=x.dtype))
        axis = self.axis % x.ndim if -x.ndim <= self.axis < x.ndim else None
        n = self.running_mean.shape[0]
        flag = concrete_flag(self.inference if inference is None else inference)
        # per example under jax.vmap (e.g. a (C, H, W) map), unless the statistics are
        # averaged across the mapped axis (`axis_name`, e.g. devices simulated by vmap)
        one_example = x.ndim < 2 or (
            flag is not True
            and self.axis_name is None
            and is_mapped(x)
            and not is_mapped(self.running_mean)
        )
        if one_example or axis is None or axis == 0 or x.shape[axis] != n:
            msg = _MSG_PER_EXAMPLE if one_example else _MSG_FEATURE_AXIS
            raise ValueError(msg.format(n=n, axis=self.axis, shape=x.shape))
        if flag is False and self.axis_name is None and x.size == n:
            raise ValueError(_MSG_ONE_VALUE.format(shape=x.shape))
        shape = [1] * x.ndim
        shape[axis] = n
        # statistics in float32 at least (bf16 sums lose the variance), two-pass
        # (E[x^2] - E[x]^2 cancels catastrophically when the mean is large)
        dtype = max(
            (jnp.dtype(x.dtype), jnp.dtype(self.running_mean.dtype), jnp.dtype(jnp.float32)),
            key=lambda d: d.itemsize,
        )
        xs = x.astype(dtype)
        if isinstance(flag, bool) and flag:
            mean = self.running_mean.astype(dtype)
            var = self.running_var.astype(dtype)
        else:
            reduce = tuple(i for i in range(x.ndim) if i != axis)
            mean = jnp.mean(xs, axis=reduce)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
            var = jnp.mean(jnp.square(xs - mean.reshape(shape)), axis=reduce)
            if self.axis_name is not None:
                var = jax.lax.pmean(var, self.axis_name)
            m = self.momentum
            new_mean = m * self.running_mean.astype(dtype) + (1 - m) * mean
            new_var = m * self.running_var.astype(dtype) + (1 - m) * var
            if not isinstance(flag, bool):  # a traced flag: select both branches
                mean = jnp.where(flag, self.running_mean.astype(dtype), mean)
                var = jnp.where(flag, self.running_var.astype(dtype), var)
                new_mean = jnp.where(flag, self.running_mean.astype(dtype), new_mean)
                new_var = jnp.where(flag, self.running_var.astype(dtype), new_var)
            self.running_mean, self.running_var = new_mean, new_var
        y = (xs - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + self.eps)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight.reshape(shape).astype(dtype) + self.bias.reshape(shape).astype(
                dtype
            )
        return y.astype(x.dtype)


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _check_number(name: str, value: Any, what: str, cls: type) -> None:
    if isinstance(value, bool) or not isinstance(value, cls):
        raise TypeError(
            _MSG_NUMBER.format(name=name, what=what, value=value, type=type(value).__name__)
        )
