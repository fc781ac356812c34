from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._filters import Filter, combine
from .._grad import split_differentiable
from .._kinds import Param, State
from .._module import Module, mutating


_M = TypeVar("_M")


class EMA(Module):
    """An exponential moving average of a model's parameters, for evaluation.

    Holds a copy of the model's `wrt` leaves (inexact arrays; default `eqstate.Param`)
    as `State`, so it is never trained. `update` moves the average towards the model;
    `apply` puts the average into a model.

    With `warmup=True` the decay at step `t` is `min(decay, (1 + t) / (10 + t))`, so the
    average follows the model closely early in training.

    !!! example

        ```python
        ema = eqstate.nn.EMA(model, decay=0.999)
        ...
        _, ema = ema.update(model)           # each training step
        eval_model = eqstate.eval(ema.apply(model))
        ```
    """

    params: Any = State.field()
    step: jax.Array = State.field()
    decay: float = eqx.field(static=True)
    warmup: bool = eqx.field(static=True)
    wrt: Any = eqx.field(static=True)

    def __init__(
        self, model: Any, decay: float = 0.999, *, warmup: bool = False, wrt: Filter = Param
    ):
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA(decay=...) must be in [0, 1], got {decay}.")
        params, _ = split_differentiable(model, wrt)
        # own buffers: never aliases of the model's, so either can be donated
        self.params = jtu.tree_map(jnp.copy, params)
        self.step = jnp.zeros((), jnp.int32)
        self.decay = decay
        self.warmup = warmup
        self.wrt = wrt

    @mutating
    def update(self, model: Any) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Move the average towards `model`'s current leaves. Returns `(None, new_ema)`."""
        params, _ = split_differentiable(model, self.wrt)
        decay = jnp.asarray(self.decay, jnp.float32)
        if self.warmup:
            t = self.step.astype(jnp.float32)
            decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        self.params = jtu.tree_map(
            lambda e, p: e + (1.0 - decay).astype(e.dtype) * (p - e), self.params, params
        )
        self.step += 1

    def apply(self, model: _M) -> _M:
        """`model` with its `wrt` leaves replaced by the average."""
        return combine(self.params, model)
