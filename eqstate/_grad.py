"""Kind-aware `value_and_grad` / `grad`: differentiate only the leaves a filter selects."""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu

from ._filters import Filter, combine, describe, select
from ._kinds import Param
from ._parallel import device_mean
from ._resolve import plan


_MSG_NOTHING_SELECTED = (
    "{where}: wrt={wrt} matches no inexact-array (floating or complex) leaf of the "
    "{what} ({cls}), so there is nothing to {verb}. {has} Pass a `wrt=` filter that "
    "selects the leaves to {verb}: a kind (`eqstate.Param`, `eqstate.State`, ...), a "
    "callable `leaf -> bool` such as `eqx.is_inexact_array`, or `...` for every "
    "inexact array."
)
_MAX_LISTED = 8
_MSG_HAS_AUX = (
    "{where}: the function returned a {what}, not a scalar loss. A loss function that "
    "also returns something else (such as the new model) needs `has_aux=True`: "
    "`(loss, model), grads = {where}(loss_fn, has_aux=True)(model, ...)`."
)


def split_differentiable(
    model: Any, wrt: Filter, where: str = "eqstate.value_and_grad", verb: str = "differentiate"
) -> tuple[Any, Any]:
    """`(diff, rest)`: the inexact-array leaves matching `wrt`, and everything else.

    Both trees have the structure of `model`, with `None` for the leaves they lack.
    Raises, naming `where` and the model's array leaves, if `wrt` selects nothing.
    """
    leaves, treedef, mask = select(model, wrt, f"{where} wrt=")
    diff = [x if m and eqx.is_inexact_array(x) else None for x, m in zip(leaves, mask)]
    if all(d is None for d in diff):
        raise ValueError(
            _MSG_NOTHING_SELECTED.format(
                where=where,
                wrt=describe(wrt),
                what="model",
                cls=type(model).__name__,
                verb=verb,
                has=describe_arrays(model),
            )
        )
    rest = [x if d is None else None for x, d in zip(leaves, diff)]
    return treedef.unflatten(diff), treedef.unflatten(rest)


def describe_arrays(tree: Any) -> str:
    """What array leaves `tree` has, with their kinds, for messages."""
    leaves, p = plan(tree)
    found = [
        f"{jtu.keystr(path) or 'the root'} ({kind.__name__}, {leaf.dtype}{list(leaf.shape)})"
        for leaf, kind, path in zip(leaves, p.kinds, p.paths)
        if eqx.is_array(leaf)
    ]
    if not found:
        return "It has no array leaves at all."
    more = f", and {len(found) - _MAX_LISTED} more" if len(found) > _MAX_LISTED else ""
    return f"Its array leaves are: {', '.join(found[:_MAX_LISTED])}{more}."


def value_and_grad(
    fn: Callable[..., Any], *, has_aux: bool = False, wrt: Filter = Param
) -> Callable[..., Any]:
    """Like `jax.value_and_grad`, differentiating a model's `wrt` leaves only.

    **Arguments:**

    - `fn`: a function `fn(model, *args, **kwargs)` returning a scalar loss, or
        `(loss, aux)` if `has_aux`. `aux` is typically the new model returned by a
        mutating call.
    - `has_aux`: as for `jax.value_and_grad`.
    - `wrt`: a filter (a kind, a tuple, `...`, a callable `(path, kind, leaf)`, or a
        one-argument callable `leaf -> bool` such as `eqx.is_inexact_array`); default
        `eqstate.Param`. Only inexact-array leaves that match are differentiated. Every
        other leaf (`State`, `Rng`, `OptState`, integer arrays, non-arrays) is held
        constant. A `wrt` that matches no inexact-array leaf of the model is an error
        (the gradient would be silently empty).

    Under `eqstate.data_parallel`, a loss that differs between devices (each device's
    mean over its shard) is first averaged over them (`jax.lax.pmean`): the value and the
    gradient are those of the whole batch, the same on every device.

    **Returns:**

    A function with the signature of `fn` returning `(value, grads)`, where `value` is
    what `fn` returns and `grads` has the structure of `model` with `None` at every leaf
    that was not differentiated.

    !!! example

        ```python
        def loss_fn(model, x, y):
            logits, model = model(x)
            return cross_entropy(logits, y), model

        (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
        ```
    """
    return _value_and_grad(fn, has_aux, wrt, "eqstate.value_and_grad")


def _value_and_grad(fn: Callable[..., Any], has_aux: bool, wrt: Filter, where: str) -> Any:
    @ft.wraps(fn)
    def wrapper(model: Any, /, *args: Any, **kwargs: Any) -> Any:
        diff, rest = split_differentiable(model, wrt, where)

        def inner(diff: Any) -> Any:
            out = fn(combine(diff, rest), *args, **kwargs)
            if not has_aux and isinstance(out, (tuple, list)):
                kinds = ", ".join(type(x).__name__ for x in out)
                what = f"{type(out).__name__} of {len(out)} ({kinds})"
                raise TypeError(_MSG_HAS_AUX.format(where=where, what=what))
            # under eqstate.data_parallel, the loss of the whole batch: the mean over
            # devices (a device's own loss would give the sum of their gradients)
            if not has_aux:
                return device_mean(out)
            if isinstance(out, (tuple, list)) and len(out) == 2:
                return device_mean(out[0]), out[1]
            return out

        return jax.value_and_grad(inner, has_aux=has_aux)(diff)

    return wrapper


def grad(
    fn: Callable[..., Any], *, has_aux: bool = False, wrt: Filter = Param
) -> Callable[..., Any]:
    """Like `jax.grad`, differentiating a model's `wrt` leaves only.

    **Arguments:**

    - `fn`, `has_aux`, `wrt`: as for `eqstate.value_and_grad`.

    **Returns:**

    A function with the signature of `fn` returning `grads`, or `(grads, aux)` if
    `has_aux`; `grads` has the structure of `model`, with `None` at every leaf that was
    not differentiated.

    !!! example

        ```python
        grads, model = eqstate.grad(loss_fn, has_aux=True)(model, x, y)
        ```
    """
    vg = _value_and_grad(fn, has_aux, wrt, "eqstate.grad")

    @ft.wraps(fn)
    def wrapper(model: Any, /, *args: Any, **kwargs: Any) -> Any:
        value, grads = vg(model, *args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapper
