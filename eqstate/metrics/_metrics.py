import abc
from collections.abc import Hashable
from typing import Any, Self

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike

from .._filters import combine, filter as filter_
from .._kinds import State
from .._module import Module, mutating


class Metric(Module):
    """Base class of metrics: state modules that accumulate over batches.

    Subclasses keep their totals in `State` fields and implement `update` (a mutating
    method) and `compute`. `reset`, `merge` and `all_reduce` work on every `State` leaf,
    which must be a sum over batches.
    """

    @abc.abstractmethod
    def update(self, *args: Any, **kwargs: Any) -> Any:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Accumulate one batch (a `@mutating` method): returns `(None, new_metric)`."""

    @abc.abstractmethod
    def compute(self) -> Any:
        """The metric's value over everything accumulated so far."""

    def reset(self) -> Self:
        """A metric with the same settings and all totals zero."""
        zeros = jtu.tree_map(jnp.zeros_like, filter_(self, State))
        return combine(zeros, self)

    def merge(self, other: Self) -> Self:
        """The metric over both `self`'s and `other`'s batches (e.g. from two devices)."""
        if type(other) is not type(self):
            raise TypeError(
                f"{type(self).__name__}.merge: other is a {type(other).__name__}; merge "
                "metrics of the same class."
            )
        summed = jtu.tree_map(jnp.add, filter_(self, State), filter_(other, State))
        return combine(summed, self)

    def all_reduce(self, axis_name: Hashable) -> Self:
        """Sum the totals across a mapped axis (`pmap`, `shard_map`, `vmap` axis name)."""
        summed = jtu.tree_map(lambda x: jax.lax.psum(x, axis_name), filter_(self, State))
        return combine(summed, self)


def _pick(metric: Metric, given: Any, kwargs: dict[str, Any], name: str) -> Any:
    if given is not None:
        return given
    try:
        return kwargs[name]
    except KeyError:
        raise TypeError(
            f"{type(metric).__name__}.update needs `{name}=`: pass it by name "
            f"(got {sorted(kwargs) or 'no keyword arguments'})."
        ) from None


class Mean(Metric):
    """A (weighted) mean of values over batches.

    `argname` names the keyword this metric reads when updated through a `Collection`
    (`Mean(argname="loss")` reads `loss=`).
    """

    total: Array = State.field(default=0.0)
    count: Array = State.field(default=0.0)
    argname: str = eqx.field(static=True, default="values")

    @mutating
    def update(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, values: ArrayLike | None = None, *, weights: ArrayLike | None = None, **kwargs: Any
    ) -> None:
        """Add `values` (any shape; every element counts), optionally `weights`."""
        values = jnp.asarray(_pick(self, values, kwargs, self.argname))
        values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
        w = jnp.ones_like(values) if weights is None else jnp.broadcast_to(weights, values.shape)
        w = w.astype(values.dtype)
        self.total += jnp.sum(values * w)
        self.count += jnp.sum(w)

    def compute(self) -> Array:
        """`total / count` (NaN before any update)."""
        return self.total / self.count


class Accuracy(Metric):
    """The fraction of correct predictions over batches.

    `update(logits=..., labels=...)` takes class scores (the last axis is the class
    axis) or `preds=` class indices, and integer `labels`.
    """

    correct: Array = State.field(default=0.0)
    count: Array = State.field(default=0.0)

    @mutating
    def update(  # pyright: ignore[reportIncompatibleMethodOverride]
        self,
        logits: ArrayLike | None = None,
        labels: ArrayLike | None = None,
        *,
        preds: ArrayLike | None = None,
        **kwargs: Any,
    ) -> None:
        """Add a batch of predictions: `logits` (`(..., classes)`) or `preds`, and `labels`."""
        labels = jnp.asarray(_pick(self, labels, kwargs, "labels"))
        if preds is None:
            logits = jnp.asarray(_pick(self, logits, kwargs, "logits"))
            if logits.shape[:-1] != labels.shape:
                raise ValueError(
                    f"Accuracy.update: logits of shape {logits.shape} need labels of shape "
                    f"{logits.shape[:-1]}, got {labels.shape}."
                )
            preds = jnp.argmax(logits, axis=-1)
        preds = jnp.asarray(preds)
        if preds.shape != labels.shape:
            raise ValueError(
                f"Accuracy.update: preds of shape {preds.shape} and labels of shape "
                f"{labels.shape} differ."
            )
        self.correct += jnp.sum(preds == labels.astype(preds.dtype)).astype(jnp.float32)
        self.count += labels.size

    def compute(self) -> Array:
        """`correct / count` (NaN before any update)."""
        return self.correct / self.count


class Collection(Metric):
    """Several metrics updated together: `Collection(loss=Mean(argname="loss"), acc=Accuracy())`.

    `update(**kwargs)` passes every keyword to every metric, each taking what it needs;
    `compute()` returns a dict of values.
    """

    metrics: dict[str, Metric]

    def __init__(self, **metrics: Metric):
        for name, m in metrics.items():
            if not isinstance(m, Metric):
                raise TypeError(
                    f"Collection({name}=...) expects an eqstate.metrics.Metric, got "
                    f"{type(m).__name__}."
                )
        self.metrics = dict(metrics)

    @mutating
    def update(self, **kwargs: Any) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Update every metric with the same keyword arguments."""
        self.metrics = {name: m.update(**kwargs)[1] for name, m in self.metrics.items()}

    def compute(self) -> dict[str, Any]:
        return {name: m.compute() for name, m in self.metrics.items()}

    def __getitem__(self, name: str) -> Metric:
        return self.metrics[name]
