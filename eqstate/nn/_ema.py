from numbers import Real
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

from .._convert import canonical_dtype
from .._filters import Filter, check_same_structure, describe, is_none, leaf_path
from .._grad import split_differentiable
from .._kinds import Param, State
from .._module import Module
from .._mutating import mutating


_M = TypeVar("_M")

_MSG_DECAY = "EMA(decay=...) must be a number in [0, 1] (typically 0.99 to 0.9999), got {decay!r}."
_MSG_PUT_BACK = (
    "EMA.update(model) moves the average towards a model, but it was given an EMA tree "
    "(such as `ema.states()` or a loaded checkpoint). To put a tree back into a module, "
    "use `eqstate.update(module, tree)`, e.g. `ema = eqstate.update(ema, tree)`."
)
_MSG_LEAF = (
    "EMA.{method}: the model's leaf at {path} is {new}, but the average holds {old} there. "
    "The average has the shapes and dtypes of the model the EMA was built from; build "
    "the EMA from the model you train: `ema = eqstate.nn.EMA(model, decay=...)`."
)


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
        """**Arguments:**

        - `model`: the model whose `wrt` leaves are averaged (copied; not stored).
        - `decay`: the weight kept from the old average at each update, in `[0, 1]`.
        - `warmup`: use a smaller decay early in training (see above).
        - `wrt`: a filter, as in `eqstate.filter`; default `eqstate.Param`. It must
            match at least one inexact-array leaf of `model`.
        """
        if isinstance(decay, bool) or not isinstance(decay, Real):
            raise TypeError(_MSG_DECAY.format(decay=decay))
        if not 0.0 <= decay <= 1.0:
            raise ValueError(_MSG_DECAY.format(decay=decay))
        params, _ = split_differentiable(model, wrt, "EMA", "average")
        # own buffers, never aliases of the model's (so either can be donated), kept in
        # float32 at least: a bfloat16 average would round each small step away
        self.params = jtu.tree_map(lambda p: jnp.array(p, _accumulator(p.dtype)), params)
        self.step = jnp.zeros((), jnp.int32)
        self.decay = float(decay)
        self.warmup = warmup
        self.wrt = wrt

    @mutating
    def update(self, model: Any) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Move the average towards `model`'s current leaves. Returns `(None, new_ema)`.

        This `update` averages; it is not `eqstate.Module.update`, which puts trees back
        into a module. To load a saved average into `ema`, use
        `ema = eqstate.update(ema, tree)`.

        `model`'s `wrt` leaves must have the shapes and dtypes of those of the model the
        EMA was built from.

        **Arguments:**

        - `model`: the model being trained, of the structure the EMA was built from.

        **Returns:**

        `(None, new_ema)`: the average moved by one step, `avg = decay * avg + (1 -
        decay) * leaf` (with the warmup decay if `warmup`), and the step count advanced.

        !!! example

            ```python
            ema = eqstate.nn.EMA(model, decay=0.99)
            _, ema = ema.update(model)  # after each optimizer step
            ```
        """
        if isinstance(model, EMA):
            raise TypeError(_MSG_PUT_BACK)
        params, _ = split_differentiable(model, self.wrt, "EMA.update", "average")
        self._check(model, params, "update")
        decay = jnp.asarray(self.decay, jnp.float32)
        if self.warmup:
            t = self.step.astype(jnp.float32)
            decay = jnp.minimum(decay, (1.0 + t) / (10.0 + t))
        self.params = jtu.tree_map(
            lambda e, p: e + (1.0 - decay).astype(e.dtype) * (p.astype(e.dtype) - e),
            self.params,
            params,
        )
        self.step += 1

    def apply(self, model: _M) -> _M:
        """`model` with its `wrt` leaves replaced by the average.

        `model` must have the structure of the model the EMA was built from, with arrays
        of the same shapes and dtypes where the average has leaves.

        **Arguments:**

        - `model`: a model of the structure the EMA was built from, usually the one
            being trained; its other leaves (state, static settings) are kept.

        **Returns:**

        A new model of `model`'s type with the averaged leaves, cast to the dtypes of
        `model`'s.

        !!! example

            ```python
            ema = eqstate.nn.EMA(model, decay=0.99)
            eval_model = eqstate.eval(ema.apply(model))  # averaged weights, running stats
            logits, _ = eval_model(x)
            ```
        """
        m_leaves, m_def = self._check(model, None, "apply")
        e_leaves = jtu.tree_leaves(self.params, is_leaf=is_none)
        return m_def.unflatten(
            [
                m if e is None else e.astype(canonical_dtype(m.dtype))
                for m, e in zip(m_leaves, e_leaves)
            ]
        )

    def _check(self, model: Any, params: Any, method: str) -> tuple[list, Any]:
        """Check `model` (and its `wrt` leaves `params`, for `update`) against the average.

        Returns the model's leaves and treedef, `None` counted as a leaf.
        """
        (m_leaves, m_def), (e_leaves, _) = check_same_structure(
            (model, self.params),
            f"EMA.{method}",
            lambda i: "the average" if i else "the model",
            "Pass a model of the structure of the one the EMA was built from.",
        )
        p_leaves = m_leaves if params is None else jtu.tree_leaves(params, is_leaf=is_none)
        for i, (m, p, e) in enumerate(zip(m_leaves, p_leaves, e_leaves)):
            if e is None:
                if params is None or p is None:
                    continue
            elif eqx.is_array(p) and (p.shape, _accumulator(p.dtype)) == (e.shape, e.dtype):
                continue
            new = _describe(m)
            if params is not None and p is None:
                new += f", not a leaf that wrt={describe(self.wrt)} selects"
            path = jtu.keystr(leaf_path(model, i))
            raise ValueError(
                _MSG_LEAF.format(method=method, path=path or "the root", new=new, old=_describe(e))
            )
        return m_leaves, m_def


def _accumulator(dtype: Any) -> Any:
    """The dtype the average of leaves of `dtype` is kept in: float32 at least."""
    dtype = jnp.dtype(canonical_dtype(dtype))
    narrow = jnp.issubdtype(dtype, jnp.floating) and dtype.itemsize < 4
    return jnp.dtype(jnp.float32) if narrow else dtype


def _describe(x: Any) -> str:
    if eqx.is_array(x):
        return f"{x.dtype}{list(x.shape)}"
    return "nothing" if x is None else f"a {type(x).__name__}"
