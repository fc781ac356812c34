from collections.abc import Hashable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from .._kinds import BatchStat
from .._module import Module, mutating


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
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"BatchNorm(momentum=...) must be in [0, 1], got {momentum}.")
        if num_features <= 0:
            raise ValueError(f"BatchNorm(num_features=...) must be positive, got {num_features}.")
        dtype = jnp.float32 if dtype is None else dtype
        self.weight = jnp.ones(num_features, dtype) if affine else None
        self.bias = jnp.zeros(num_features, dtype) if affine else None
        self.running_mean = jnp.zeros(num_features, dtype)
        self.running_var = jnp.ones(num_features, dtype)
        self.momentum = momentum
        self.eps = eps
        self.axis = axis
        self.axis_name = axis_name
        self.inference = inference

    @mutating
    def __call__(self, x: Array, *, inference: bool | None = None) -> Array:
        """Normalise `x`; returns `(y, new_batch_norm)`.

        **Arguments:**

        - `x`: an array with a leading batch axis and `num_features` on `self.axis`.
        - `inference`: overrides `self.inference` when not `None`. It may be a traced
            boolean (plain `jax.jit`, `lax.scan` carries); both branches are then
            computed and selected.
        """
        axis = self.axis % x.ndim if -x.ndim <= self.axis < x.ndim else None
        n = self.running_mean.shape[0]
        if x.ndim < 2 or axis is None or axis == 0 or x.shape[axis] != n:
            raise ValueError(
                f"BatchNorm expects a batch of shape (N, {n}, ...) with the features "
                f"on axis {self.axis}, got shape {x.shape}. Call it on a whole batch "
                "(not inside vmap), or set `axis=` to the feature axis."
            )
        shape = [1] * x.ndim
        shape[axis] = n
        stat_dtype = self.running_mean.dtype
        xs = x.astype(jnp.promote_types(x.dtype, stat_dtype))
        flag = self.inference if inference is None else inference
        if isinstance(flag, bool) and flag:
            mean, var = self.running_mean, self.running_var
        else:
            reduce = tuple(i for i in range(x.ndim) if i != axis)
            mean = jnp.mean(xs, axis=reduce)
            mean_sq = jnp.mean(jnp.square(xs), axis=reduce)
            if self.axis_name is not None:
                mean = jax.lax.pmean(mean, self.axis_name)
                mean_sq = jax.lax.pmean(mean_sq, self.axis_name)
            var = jnp.maximum(mean_sq - jnp.square(mean), 0.0)
            m = self.momentum
            new_mean = m * self.running_mean + (1 - m) * mean
            new_var = m * self.running_var + (1 - m) * var
            if not isinstance(flag, bool):  # a traced flag: select both branches
                mean = jnp.where(flag, self.running_mean, mean)
                var = jnp.where(flag, self.running_var, var)
                new_mean = jnp.where(flag, self.running_mean, new_mean)
                new_var = jnp.where(flag, self.running_var, new_var)
            self.running_mean, self.running_var = new_mean, new_var
        y = (xs - mean.reshape(shape)) * jax.lax.rsqrt(var.reshape(shape) + self.eps)
        if self.weight is not None and self.bias is not None:
            y = y * self.weight.reshape(shape) + self.bias.reshape(shape)
        return y.astype(x.dtype)
