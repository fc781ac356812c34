from numbers import Integral, Real
from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from .._convert import concrete_flag
from .._kinds import BatchStat
from .._module import Module
from .._mutating import mutating
from .._vmap import UNSET, AxisName, check_bound, layer_axes


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
_MSG_FEATURE_AXIS = (
    "BatchNorm expects a batch of shape (N, {n}, ...) with the features on axis {axis}, "
    "got shape {shape}. Set `axis=` to the feature axis of the batch (e.g. `axis=-1` for "
    "channels-last)."
)
_MSG_EXAMPLE_AXIS = (
    "BatchNorm was called per example (inside `jax.vmap`, with the BatchNorm itself not "
    "mapped: Equinox's convention), so it expects one example of shape ({n}, ...) with "
    "the features on axis {axis} (`axis={own}` counts the batch axis), got shape "
    "{shape}. Pass one example per call, or set `axis=` to the feature axis of the "
    "batch. (To normalise a batch per device, map with `shard_map` or `pmap`, not vmap.)"
)
_MSG_NOT_A_BATCH = (
    "BatchNorm expects a batch of shape (N, {n}, ...) with the features on axis {axis}, "
    "got shape {shape}: a single example. Call it on the whole batch, or per example "
    "inside `eqstate.vmap(model)(xs)`, which maps the examples and lets BatchNorm "
    "reduce its statistics over them."
)
_MSG_NO_AXIS = (
    "BatchNorm was called per example (inside `jax.vmap`, with the BatchNorm itself not "
    "mapped) in training, but has no mapped axis to take its batch statistics over. Map "
    "the model with `eqstate.vmap(model)(xs)` (its layers then reduce over the mapped "
    "axis), or name the vmapped axis: `jax.vmap(..., axis_name='batch')` with "
    "`BatchNorm(n, axis_name='batch')` or `bn(x, axis_name='batch')`. Or call it on the "
    "whole batch."
)
_MSG_MODE = (
    "BatchNorm(mode=...) must be 'running', 'batch' or 'ema', got {mode!r}. 'batch' and "
    "'ema' are `eqx.nn.BatchNorm`'s modes of the same names."
)
_MSG_ONE_VALUE = (
    "BatchNorm in training got a batch of shape {shape}: one value per feature, so its "
    "variance is 0, the output would be just the bias and `running_var` would decay to "
    "0. Train on batches of more than one example (or with spatial axes), average the "
    "statistics over devices with `axis_name=`, or call it in inference mode "
    "(`eqstate.eval(model)` or `bn(x, inference=True)`)."
)


class BatchNorm(Module):
    """Batch normalisation with running statistics, on a batch or per example.

    **On a batch:** `y, bn = bn(x)` with `x` of shape `(N, C)`, `(N, C, H, W)`, ... and
    the features on `axis` (default 1). Statistics are taken over every other axis (and
    averaged over `axis_name`, e.g. devices under `shard_map`).

    **Per example** (Equinox's style): inside `eqstate.vmap(model)(xs)`, `x` is one
    example of shape `(C, H, W, ...)` (features on `axis - 1`), and the statistics are
    taken over its other axes and over the mapped batch, with the same numbers as the
    batch-level call. The returned BatchNorm holds one copy of the statistics. Under a
    plain `jax.vmap`, name its axis (`axis_name=` here or at the call).

    In training (`inference=False`) the batch is normalised with its statistics and the
    running statistics move towards them, `running = momentum * running + (1 - momentum)
    * batch`; in inference the running statistics are used and nothing changes. The
    `mode` chooses the variant:

    - `"running"` (default): as in Flax and Haiku (PyTorch's `momentum` is
        `1 - momentum`, and it moves the running variance towards the unbiased one).
    - `"batch"`: `eqx.nn.BatchNorm(mode="batch")`: as `"running"`, but inference divides
        the running statistics by `1 - momentum**count` (zero-debiasing), with `count`
        the number of training calls.
    - `"ema"`: `eqx.nn.BatchNorm(mode="ema")`: training normalises with the updated
        running statistics themselves, which the first training call sets to that
        batch's statistics.

    **Fields:**

    - `weight`, `bias`: per-feature affine parameters (`Param`), or `None` without
        `affine`.
    - `running_mean`, `running_var`: `BatchStat`, initialised to zeros and ones.
    - `count`: `BatchStat`, the number of training calls (modes `"batch"` and `"ema"`),
        else `None`.
    - `momentum`, `eps`, `axis`, `axis_name`, `mode`: static settings.
    - `inference`: Equinox's convention; flip with `eqx.nn.inference_mode` or
        `eqstate.eval`.

    !!! example

        ```python
        bn = eqstate.nn.BatchNorm(3)
        x = jax.random.normal(key, (8, 3))  # a batch of 8, features on axis 1
        y, bn = bn(x)  # normalised with the batch's statistics; running ones updated
        y, _ = eqstate.eval(bn)(x)  # normalised with the running statistics
        ```

    !!! example "Per example, in Equinox's style"

        ```python
        ys, bn = eqstate.vmap(bn)(x)  # the same numbers: statistics over the mapped batch
        ```
    """

    weight: Float[Array, " features"] | None
    bias: Float[Array, " features"] | None
    running_mean: Float[Array, " features"] = BatchStat.field()
    running_var: Float[Array, " features"] = BatchStat.field()
    count: Int[Array, ""] | None = BatchStat.field(default=None)
    momentum: float = eqx.field(static=True, default=0.99)
    eps: float = eqx.field(static=True, default=1e-5)
    axis: int = eqx.field(static=True, default=1)
    axis_name: AxisName = eqx.field(static=True, default=None)
    mode: Literal["running", "batch", "ema"] = eqx.field(static=True, default="running")
    inference: bool = False

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.99,
        eps: float = 1e-5,
        affine: bool = True,
        axis: int = 1,
        axis_name: AxisName = None,
        mode: Literal["running", "batch", "ema"] = "running",
        inference: bool = False,
        dtype: jnp.dtype | None = None,
    ):
        """**Arguments:**

        - `num_features`: the size of the feature axis.
        - `momentum`: the weight kept from the old running value (Equinox's convention).
        - `eps`: added to the variance before the square root.
        - `affine`: whether to learn a per-feature scale and shift.
        - `axis`: the feature axis of a batch (default 1; `-1` for channels-last).
        - `axis_name`: mapped axis name(s) to average the statistics over, such as a
            device axis. Per example inside `eqstate.vmap` the mapped axis is found
            without it; a call's `axis_name=` overrides it.
        - `mode`: `"running"`, `"batch"` or `"ema"`; see above.
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
        if mode not in ("running", "batch", "ema"):
            raise ValueError(_MSG_MODE.format(mode=mode))
        dtype = jnp.dtype(jnp.float32 if dtype is None else dtype)
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(_MSG_DTYPE.format(dtype=dtype))
        num_features, axis = int(num_features), int(axis)
        self.weight = jnp.ones(num_features, dtype) if affine else None
        self.bias = jnp.zeros(num_features, dtype) if affine else None
        self.running_mean = jnp.zeros(num_features, dtype)
        self.running_var = jnp.ones(num_features, dtype)
        self.count = None if mode == "running" else jnp.zeros((), jnp.int32)
        self.momentum = float(momentum)
        self.eps = float(eps)
        self.axis = axis
        self.axis_name = axis_name
        self.mode = mode
        self.inference = inference

    @mutating
    def __call__(
        self, x: Array, *, inference: bool | None = None, axis_name: AxisName = UNSET
    ) -> Array:
        """Normalise `x`; returns `(y, new_batch_norm)`.

        **Arguments:**

        - `x`: a floating-point batch with `num_features` on `self.axis`, or one example
            (features on `self.axis - 1`) per example inside `eqstate.vmap` / `jax.vmap`.
            In training, a batch needs more than one value per feature, unless
            `axis_name` averages over devices.
        - `inference`: overrides `self.inference` when not `None`. It may be a traced
            boolean (plain `jax.jit`, `lax.scan` carries); both branches are then
            computed and selected.
        - `axis_name`: overrides `self.axis_name` for this call (`None`: no mapped axis,
            e.g. to train a model built for several devices on one).

        **Returns:**

        `(y, new_batch_norm)`: `x` normalised (same shape and dtype), and this layer
        with its running statistics updated (unchanged in inference).
        """
        x = jnp.asarray(x)
        if not jnp.issubdtype(x.dtype, jnp.inexact):
            raise TypeError(_MSG_INPUT_DTYPE.format(dtype=x.dtype))
        n = self.running_mean.shape[0]
        flag = concrete_flag(self.inference if inference is None else inference)
        axes = layer_axes("BatchNorm", self.axis_name, axis_name, x, self.running_mean)
        per_example, names = axes.per_example, axes.names
        axis = self.axis - 1 if per_example and self.axis > 0 else self.axis
        if not per_example and x.ndim < 2:
            raise ValueError(_MSG_NOT_A_BATCH.format(n=n, axis=self.axis, shape=x.shape))
        fits = -x.ndim <= axis < x.ndim and x.shape[axis] == n
        if not fits or (not per_example and axis % x.ndim == 0):
            msg = _MSG_EXAMPLE_AXIS if per_example else _MSG_FEATURE_AXIS
            raise ValueError(msg.format(n=n, axis=axis, own=self.axis, shape=x.shape))
        axis %= x.ndim
        training = flag is not True
        if training and per_example and (axes.uncovered or not names):
            raise ValueError(_MSG_NO_AXIS)
        if training:
            check_bound(axes)
        if flag is False and _values_per_feature(x.size // n, names) == 1:
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
        if training:
            mean, var = self._train(xs, axis, shape, names, dtype, flag)
        else:
            mean, var = self._inference_stats(dtype)
        y = (xs - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + self.eps)
        if self.weight is not None and self.bias is not None:
            weight, bias = self.weight.astype(dtype), self.bias.astype(dtype)
            y = y * weight.reshape(shape) + bias.reshape(shape)
        return y.astype(x.dtype)

    def _inference_stats(self, dtype: Any) -> tuple[Array, Array]:
        mean, var = self.running_mean.astype(dtype), self.running_var.astype(dtype)
        if self.mode == "batch" and self.count is not None:
            debias = 1 - jnp.power(jnp.asarray(self.momentum, dtype), self.count.astype(dtype))
            scale = jnp.where(self.count == 0, jnp.ones((), dtype), debias)
            mean, var = mean / scale, var / scale
        return mean, var

    def _train(
        self, xs: Array, axis: int, shape: list[int], names: tuple, dtype: Any, flag: Any
    ) -> tuple[Array, Array]:
        """Batch statistics, the new running statistics (assigned), and the statistics
        to normalise with (selected by a traced `flag`)."""
        reduce = tuple(i for i in range(xs.ndim) if i != axis)
        mean = jnp.mean(xs, axis=reduce)
        if names:
            mean = jax.lax.pmean(mean, names)
        var = jnp.mean(jnp.square(xs - mean.reshape(shape)), axis=reduce)
        if names:
            var = jax.lax.pmean(var, names)
        m = self.momentum
        old_mean, old_var = self.running_mean.astype(dtype), self.running_var.astype(dtype)
        new_mean = m * old_mean + (1 - m) * mean
        new_var = m * old_var + (1 - m) * var
        count = self.count
        if self.mode == "ema" and count is not None:
            first = count == 0
            new_mean = jnp.where(first, mean, new_mean)
            new_var = jnp.where(first, var, new_var)
            mean, var = new_mean, new_var
        if not isinstance(flag, bool):  # a traced flag: select both branches
            inf_mean, inf_var = self._inference_stats(dtype)
            mean, var = jnp.where(flag, inf_mean, mean), jnp.where(flag, inf_var, var)
            new_mean = jnp.where(flag, old_mean, new_mean)
            new_var = jnp.where(flag, old_var, new_var)
        self.running_mean, self.running_var = new_mean, new_var
        if count is not None:
            self.count = (
                jnp.where(flag, count, count + 1) if not isinstance(flag, bool) else count + 1
            )
        return mean, var


def _values_per_feature(local: int, names: tuple) -> int | None:
    """How many values each feature's statistics average: `local` times the size of
    the mapped axes (`None` where that size is not known when tracing)."""
    total = jax.lax.psum(1, names) if names else 1
    return local * total if isinstance(total, int) else None


def _is_int(x: Any) -> bool:
    return isinstance(x, Integral) and not isinstance(x, bool)


def _check_number(name: str, value: Any, what: str, cls: type) -> None:
    if isinstance(value, bool) or not isinstance(value, cls):
        raise TypeError(
            _MSG_NUMBER.format(name=name, what=what, value=value, type=type(value).__name__)
        )
