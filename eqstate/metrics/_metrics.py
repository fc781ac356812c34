import abc
from collections.abc import Hashable
from typing import Any, Self

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, ArrayLike

from .._filters import check_same_structure, combine, filter as filter_
from .._kinds import State
from .._module import Module
from .._mutating import mutating
from .._parallel import device_count, device_sum, varying_devices
from .._vmap import device_axes


_MSG_PUT_BACK = (
    "{cls}.update accumulates a batch, but it was given {given} as {where} (such as "
    "`metric.states()` or a loaded checkpoint). To put a tree back into a module, use "
    "`eqstate.update(module, tree)`, e.g. `metrics = eqstate.update(metrics, tree)`."
)
_MSG_COLLECTION_POSITIONAL = (
    "Collection.update takes keyword arguments only, passed on to every metric (e.g. "
    "`metrics.update(loss=loss, logits=logits, labels=y)`); got {n} positional "
    "argument(s)."
)


def _check_batch(metric: "Metric", args: tuple, kwargs: dict[str, Any]) -> None:
    """Raise if a metric tree was passed to `update` where a batch was expected."""
    for i, a in enumerate(args):
        if isinstance(a, Metric):
            raise TypeError(_put_back(metric, a, f"positional argument {i}"))
    for k, a in kwargs.items():
        if isinstance(a, Metric):
            raise TypeError(_put_back(metric, a, f"`{k}=`"))


def _put_back(metric: "Metric", given: "Metric", where: str) -> str:
    name = type(given).__name__
    article = "an" if name[:1].lower() in "aeiou" else "a"
    return _MSG_PUT_BACK.format(cls=type(metric).__name__, given=f"{article} {name}", where=where)


class Metric(Module):
    """Base class of metrics: state modules that accumulate over batches.

    Subclasses keep their totals in `State` fields and implement `update` (a mutating
    method) and `compute`. `reset`, `merge` and `all_reduce` work on every `State` leaf,
    which must be a sum over batches. Counts are best kept as integers (exact up to
    2**31 - 1); float32 stops counting at 2**24.

    Under `eqstate.data_parallel`, `Mean` and `Accuracy` add up the batches of every
    device (`update` sums over the devices what differs between them). A subclass does
    the same by wrapping what it adds in `jax.lax.psum(..., axis_name)`; otherwise
    returning it is an error, never device 0's value.

    A metric's `update` accumulates a batch; it is not `eqstate.Module.update`. To put a
    saved tree back into a metric, use `eqstate.update(metric, tree)`.

    !!! example

        ```python
        class SumOfSquares(eqstate.metrics.Metric):
            total: jax.Array = eqstate.State.field(default=0.0)

            @eqstate.mutating
            def update(self, values):
                self.total += jnp.sum(jnp.square(values))

            def compute(self):
                return self.total

        metric = SumOfSquares()
        _, metric = metric.update(jnp.arange(3.0))
        metric.compute()  # 5.0
        ```
    """

    @abc.abstractmethod
    def update(self, *args: Any, **kwargs: Any) -> Any:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Accumulate one batch (a `@mutating` method): returns `(None, new_metric)`.

        Not `eqstate.Module.update`: to put a tree back, use `eqstate.update(metric, tree)`.

        **Arguments:**

        The batch, as each metric defines it (`Mean`: `values`, `Accuracy`: `logits`
        or `preds`, and `labels`).

        **Returns:**

        `(None, new_metric)`: this metric with the batch added to its totals.
        """

    @abc.abstractmethod
    def compute(self) -> Any:
        """The metric's value over everything accumulated so far.

        **Returns:**

        The value (`Mean`, `Accuracy`: a float32 scalar, NaN before any update).
        """

    def reset(self) -> Self:
        """A metric with the same settings and all totals zero.

        **Returns:**

        A new metric of this class; `self` is unchanged.

        !!! example

            ```python
            mean = eqstate.metrics.Mean()
            _, mean = mean.update(jnp.arange(3.0))
            mean = mean.reset()  # at the start of an epoch: mean.compute() is NaN again
            ```
        """
        zeros = jtu.tree_map(jnp.zeros_like, filter_(self, State))
        return combine(zeros, self)

    def merge(self, other: Self) -> Self:
        """The metric over both `self`'s and `other`'s batches (e.g. from two devices).

        **Arguments:**

        - `other`: a metric of the same class, built alike (for a `Collection`, the
            same metrics under the same names).

        **Returns:**

        A new metric whose totals are the sums of both.

        !!! example

            ```python
            _, a = eqstate.metrics.Mean().update(jnp.array([1.0, 2.0]))
            _, b = eqstate.metrics.Mean().update(jnp.array([3.0]))
            a.merge(b).compute()  # 2.0, the mean of the three values
            ```
        """
        if type(other) is not type(self):
            raise TypeError(
                f"{type(self).__name__}.merge: other is a {type(other).__name__}; merge "
                "metrics of the same class."
            )
        mine, theirs = filter_(self, State), filter_(other, State)
        check_same_structure(
            (mine, theirs),
            f"{type(self).__name__}.merge",
            lambda i: "other" if i else "self",
            "Merge metrics built alike (the same metrics, names and settings).",
        )
        return combine(jtu.tree_map(jnp.add, mine, theirs), self)

    def all_reduce(self, axis_name: Hashable) -> Self:
        """Sum the totals across a mapped axis (`pmap`, `shard_map`, `vmap` axis name).

        Under `eqstate.data_parallel`, whose metrics already add up every device's
        batches, totals that are the same on every device are left as they are.

        **Arguments:**

        - `axis_name`: the name of the mapped axis to sum over.

        **Returns:**

        A new metric holding the totals of every index along the axis.

        !!! example

            ```python
            def per_device(values):
                _, mean = eqstate.metrics.Mean().update(values)
                return mean.all_reduce("devices")

            batches = jnp.arange(6.0).reshape(2, 3)  # the batches of two devices
            mean = jax.vmap(per_device, axis_name="devices", out_axes=None)(batches)
            mean.compute()  # 2.5, over both
            ```
        """

        def one(x: Array) -> Array:
            if axis_name in device_axes() and axis_name not in varying_devices(x):
                return x
            return jax.lax.psum(x, axis_name)

        return combine(jtu.tree_map(one, filter_(self, State)), self)


_MSG_WEIGHTS = (
    "{cls}.update: weights of shape {w} do not fit values of shape {v}. Weights weigh "
    "examples along the leading axes: give shape {v} or a prefix of it (e.g. one weight "
    "per example, shape {first})."
)


def _per_example(weights: ArrayLike, shape: tuple[int, ...], cls: str) -> Array:
    """`weights` broadcast from the leading axes of `shape` (one weight per example)."""
    w = jnp.asarray(weights)
    if w.shape != shape[: w.ndim]:
        first = shape[:1]
        raise ValueError(_MSG_WEIGHTS.format(cls=cls, w=w.shape, v=shape, first=first))
    return jnp.broadcast_to(w.reshape(w.shape + (1,) * (len(shape) - w.ndim)), shape)


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

    **Fields** (`State`, summed over batches):

    - `total`: the (weighted) sum of the values, float32.
    - `count`: how many values were added without weights, int32 (exact).
    - `weight`: the sum of the weights of values added with weights, float32.

    `compute()` is `total / (count + weight)`: unweighted values weigh 1.

    **Arguments:**

    - `argname`: the keyword read in a `Collection` (default `"values"`). The totals
        start at zero.

    !!! example

        ```python
        mean = eqstate.metrics.Mean()
        _, mean = mean.update(jnp.array([1.0, 2.0, 3.0]))
        _, mean = mean.update(jnp.array([4.0]), weights=jnp.array([2.0]))
        mean.compute()  # (1 + 2 + 3 + 2 * 4) / (3 + 2) = 2.8
        ```
    """

    total: Array = State.field(default=0.0)
    count: Array = State.field(default=0)
    weight: Array = State.field(default=0.0)
    argname: str = eqx.field(static=True, default="values")

    @mutating
    def update(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, values: ArrayLike | None = None, *, weights: ArrayLike | None = None, **kwargs: Any
    ) -> None:
        """Add `values` (any shape; every element counts), optionally `weights`.

        **Arguments:**

        - `values`: an array of any shape (or, in a `Collection`, the keyword named by
            `argname`).
        - `weights`: one weight per value, or per example along the leading axes (a
            prefix of `values`' shape).

        **Returns:**

        `(None, new_mean)`.
        """
        _check_batch(self, (values, weights), kwargs)
        if self.argname != "values" and self.argname in kwargs:
            values = kwargs[self.argname]  # its own name first, in a Collection too
        values = jnp.asarray(_pick(self, values, kwargs, self.argname))
        values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
        if weights is None:
            self.total += device_sum(jnp.sum(values))
            self.count += values.size * device_count(values)
        else:
            w = _per_example(weights, values.shape, type(self).__name__).astype(values.dtype)
            self.total += device_sum(jnp.sum(values * w))
            self.weight += device_sum(jnp.sum(w))

    def compute(self) -> Array:
        """`total / (count + weight)`, float32 (NaN before any update)."""
        return self.total / (self.count.astype(self.weight.dtype) + self.weight)


class Accuracy(Metric):
    """The fraction of correct predictions over batches.

    `update(logits=..., labels=...)` takes class scores (the last axis is the class
    axis, at least two classes) or `preds=` class indices, and integer `labels`;
    optionally `weights=` (one per prediction, or a prefix of their shape).

    **Fields** (`State`, summed over batches):

    - `correct`, `count`: correct and all predictions added without weights, int32
        (exact up to 2**31 - 1).
    - `weighted_correct`, `weight`: the same for predictions added with weights,
        float32.

    `compute()` returns `(correct + weighted_correct) / (count + weight)`, float32.

    !!! example

        ```python
        acc = eqstate.metrics.Accuracy()
        logits, _ = eqstate.eval(model)(x)
        _, acc = acc.update(logits=logits, labels=y)
        acc.compute()  # the fraction of the batch classified correctly
        ```
    """

    correct: Array = State.field(default=0)
    count: Array = State.field(default=0)
    weighted_correct: Array = State.field(default=0.0)
    weight: Array = State.field(default=0.0)

    @mutating
    def update(  # pyright: ignore[reportIncompatibleMethodOverride]
        self,
        logits: ArrayLike | None = None,
        labels: ArrayLike | None = None,
        *,
        preds: ArrayLike | None = None,
        weights: ArrayLike | None = None,
        **kwargs: Any,
    ) -> None:
        """Add a batch of predictions: `logits` (`(..., classes)`) or `preds`, and `labels`.

        **Arguments:**

        - `logits`: class scores, classes on the last axis (at least two).
        - `labels`: integer class indices, of the shape of the predictions.
        - `preds`: integer class indices, instead of `logits`.
        - `weights`: one weight per prediction, or a prefix of their shape.

        **Returns:**

        `(None, new_accuracy)`.
        """
        _check_batch(self, (logits, labels, preds, weights), kwargs)
        labels = jnp.asarray(_pick(self, labels, kwargs, "labels"))
        if not _is_index(labels):
            raise TypeError(_MSG_LABELS.format(what="labels", dtype=labels.dtype))
        if preds is None:
            logits = jnp.asarray(_pick(self, logits, kwargs, "logits"))
            if logits.shape[:-1] != labels.shape:
                raise ValueError(
                    f"Accuracy.update: logits of shape {logits.shape} need labels of shape "
                    f"{logits.shape[:-1]}, got {labels.shape}."
                )
            if logits.shape[-1] < 2:
                raise ValueError(_MSG_ONE_CLASS.format(shape=logits.shape))
            preds = jnp.argmax(logits, axis=-1)
        preds = jnp.asarray(preds)
        if not _is_index(preds):
            raise TypeError(_MSG_LABELS.format(what="preds", dtype=preds.dtype))
        if preds.shape != labels.shape:
            raise ValueError(
                f"Accuracy.update: preds of shape {preds.shape} and labels of shape "
                f"{labels.shape} differ."
            )
        hits = preds.astype(jnp.int32) == labels.astype(jnp.int32)  # no narrow wrap-around
        if weights is None:
            self.correct += device_sum(jnp.sum(hits, dtype=jnp.int32))
            self.count += labels.size * device_count(hits)
        else:
            w = _per_example(weights, labels.shape, "Accuracy").astype(jnp.float32)
            self.weighted_correct += device_sum(jnp.sum(jnp.where(hits, w, 0.0)))
            self.weight += device_sum(jnp.sum(w))

    def compute(self) -> Array:
        """`(correct + weighted_correct) / (count + weight)`, float32 (NaN before any
        update)."""
        hits = self.correct.astype(jnp.float32) + self.weighted_correct
        return hits / (self.count.astype(jnp.float32) + self.weight)


_MSG_LABELS = (
    "Accuracy.update: {what} must be integer class indices, got dtype {dtype}. Pass "
    "`{what}.astype(jnp.int32)` if they hold whole numbers."
)
_MSG_ONE_CLASS = (
    "Accuracy.update: logits of shape {shape} have one score per example, so their "
    "argmax is always class 0. For a binary (sigmoid) head, pass "
    "`preds=(logits[..., 0] > 0).astype(jnp.int32)`."
)


def _is_index(x: Array) -> bool:
    return jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_


class Collection(Metric):
    """Several metrics updated together: `Collection(loss=Mean(argname="loss"), acc=Accuracy())`.

    `update(**kwargs)` passes every keyword to every metric, each taking what it needs;
    `compute()` returns a dict of values.

    **Arguments:**

    - `**metrics`: the metrics, by name.

    !!! example

        ```python
        metrics = eqstate.metrics.Collection(
            loss=eqstate.metrics.Mean(argname="loss"), acc=eqstate.metrics.Accuracy()
        )
        logits, _ = eqstate.eval(model)(x)
        _, metrics = metrics.update(loss=cross_entropy(logits, y), logits=logits, labels=y)
        metrics.compute()  # {"loss": ..., "acc": ...}
        ```
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
    def update(self, *args: Any, **kwargs: Any) -> None:  # pyright: ignore[reportIncompatibleMethodOverride]
        """Update every metric with the same keyword arguments.

        Not `eqstate.Module.update`: to put a tree back, use `eqstate.update(metrics, tree)`.

        **Arguments:**

        - `**kwargs`: passed to every metric's `update`, each taking what it needs.

        **Returns:**

        `(None, new_collection)`.
        """
        _check_batch(self, args, kwargs)
        if args:
            raise TypeError(_MSG_COLLECTION_POSITIONAL.format(n=len(args)))
        self.metrics = {name: m.update(**kwargs)[1] for name, m in self.metrics.items()}

    def compute(self) -> dict[str, Any]:
        """Every metric's value, by name.

        **Returns:**

        A dict from the metrics' names to their `compute()`.
        """
        return {name: m.compute() for name, m in self.metrics.items()}

    def __getitem__(self, name: str) -> Metric:
        try:
            return self.metrics[name]
        except KeyError:
            names = ", ".join(repr(n) for n in self.metrics) or "none"
            raise KeyError(
                f"Collection[{name!r}]: no metric of that name; this collection holds {names}."
            ) from None
