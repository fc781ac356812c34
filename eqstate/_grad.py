"""Kind-aware `value_and_grad` / `grad`: differentiate only the leaves a filter selects."""

import functools as ft
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax

from ._filters import Filter, combine, select
from ._kinds import Param


def split_differentiable(model: Any, wrt: Filter) -> tuple[Any, Any]:
    """`(diff, rest)`: the inexact-array leaves matching `wrt`, and everything else.

    Both trees have the structure of `model`, with `None` for the leaves they lack.
    """
    leaves, treedef, mask = select(model, wrt, "wrt=")
    diff = [x if m and eqx.is_inexact_array(x) else None for x, m in zip(leaves, mask)]
    rest = [x if d is None else None for x, d in zip(leaves, diff)]
    return treedef.unflatten(diff), treedef.unflatten(rest)


def value_and_grad(
    fn: Callable[..., Any], *, has_aux: bool = False, wrt: Filter = Param
) -> Callable[..., Any]:
    """Like `jax.value_and_grad`, differentiating a model's `wrt` leaves only.

    **Arguments:**

    - `fn`: a function `fn(model, *args, **kwargs)` returning a scalar loss, or
        `(loss, aux)` if `has_aux`. `aux` is typically the new model returned by a
        mutating call.
    - `has_aux`: as for `jax.value_and_grad`.
    - `wrt`: a filter (a kind, a tuple, `...`, or a callable `(path, kind, leaf)`);
        default `eqstate.Param`. Only inexact-array leaves that match are
        differentiated. Every other leaf (`State`, `Rng`, `OptState`, integer arrays,
        non-arrays) is held constant.

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

    @ft.wraps(fn)
    def wrapper(model: Any, /, *args: Any, **kwargs: Any) -> Any:
        diff, rest = split_differentiable(model, wrt)

        def inner(diff: Any) -> Any:
            return fn(combine(diff, rest), *args, **kwargs)

        return jax.value_and_grad(inner, has_aux=has_aux)(diff)

    return wrapper


def grad(
    fn: Callable[..., Any], *, has_aux: bool = False, wrt: Filter = Param
) -> Callable[..., Any]:
    """Like `jax.grad`, differentiating a model's `wrt` leaves only.

    Returns `grads`, or `(grads, aux)` if `has_aux`. See `eqstate.value_and_grad`.
    """
    vg = value_and_grad(fn, has_aux=has_aux, wrt=wrt)

    @ft.wraps(fn)
    def wrapper(model: Any, /, *args: Any, **kwargs: Any) -> Any:
        value, grads = vg(model, *args, **kwargs)
        return (grads, value[1]) if has_aux else grads

    return wrapper
