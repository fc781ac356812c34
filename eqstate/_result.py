"""`eqstate.result(model)(x)`: just the result of a mutating call that changed nothing."""

import functools as ft
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer

from ._mutating import is_mutating
from ._resolve import plan
from ._vmap import Vmap


_P = ParamSpec("_P")
_R = TypeVar("_R")

_MSG_NOT_MUTATING = (
    "eqstate.result expects a module with a `@eqstate.mutating` `__call__`, a bound "
    "mutating method (`model.encode`) or `eqstate.vmap` of one, got {got}. {hint}"
)
_HINT_PLAIN = "Its call returns just the result already: call it directly."
_MSG_CHANGED = (
    "eqstate.result({call}) returns only the result, but the call changed the "
    "{cls} ({changed}), so the update would be lost. In inference, call it on "
    "`eqstate.eval(model)`, whose state does not change; to keep the update, "
    "`y, model = {call}(...)`; to drop it on purpose, `y, _ = {call}(...)`."
)
_TRACED = (
    " (Under a JAX transformation, a leaf that is not the very same traced value counts "
    "as changed: use `eqx.filter_jit` or `eqstate.jit`, which keep `inference` flags "
    "static.)"
)


def result(fn: Callable[_P, tuple[_R, Any]]) -> Callable[_P, _R]:
    """Call a mutating module or method for its result alone, checking that nothing of
    the model changed.

    A `@eqstate.mutating` call returns `(result, new_model)`, so a notebook cell ending
    in `model(x)` displays the whole model after the result. In inference nothing
    changes (`eqstate.eval(model)`: running statistics are read, dropout is off, no key
    advances), and `eqstate.result(model)(x)` returns just `y`. If the call did change
    the model (in training: new statistics, an advanced key), discarding the new model
    would lose the update, so it raises, naming the changed leaves.

    **Arguments:**

    - `fn`: an `eqstate.Module` whose `__call__` is mutating, a bound mutating method
        (`model.encode`), or `eqstate.vmap(model)`.

    **Returns:**

    A function taking `fn`'s arguments and returning the first element of its
    `(result, new_model)`.

    **Raises:**

    `RuntimeError` if the call changed any leaf of the model (compared by identity,
    then by value; under a JAX transformation, a leaf that is not the very same traced
    value counts as changed). `TypeError` if `fn` is not a mutating call.

    !!! example

        ```python
        model = eqstate.eval(model)
        eqstate.result(model)(x)  # the last line of a cell: shows y, not (y, model)
        logits = eqstate.result(eqstate.vmap(model))(xs)
        ```
    """
    module, call = _target(fn)

    @ft.wraps(fn)
    def just_the_result(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        y, new = fn(*args, **kwargs)
        changed = _changed(module, new)
        if changed:
            traced = any(isinstance(x, Tracer) for x in jtu.tree_leaves(new))
            shown = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
            message = _MSG_CHANGED.format(call=call, cls=type(module).__name__, changed=shown)
            raise RuntimeError(message + (_TRACED if traced else ""))
        return y

    return just_the_result


def _target(fn: Any) -> tuple[Any, str]:
    """The module whose new version `fn` returns, and how to name the call."""
    inner, wrap = fn, "{}"
    if isinstance(fn, Vmap):
        inner, wrap = fn.fun, "eqstate.vmap({})"
    owner = getattr(inner, "__self__", None)
    if isinstance(owner, eqx.Module) and is_mutating(getattr(inner, "__func__", None)):
        return owner, wrap.format(f"model.{getattr(inner, '__name__', 'method')}")
    if isinstance(inner, eqx.Module) and is_mutating(type(inner).__call__):
        return inner, wrap.format("model")
    got = f"a {type(fn).__qualname__}"
    raise TypeError(_MSG_NOT_MUTATING.format(got=got, hint=_HINT_PLAIN if callable(fn) else ""))


def _changed(old: Any, new: Any) -> list[str]:
    """The paths of the leaves of `new` that differ from those of `old`."""
    a, p = plan(old)
    b, q = plan(new)
    if p.treedef != q.treedef:
        return ["its structure"]
    return [jtu.keystr(k) or "(root)" for k, x, y in zip(p.paths, a, b) if _differs(x, y)]


def _differs(x: Any, y: Any) -> bool:
    if x is y:
        return False
    if isinstance(x, Tracer) or isinstance(y, Tracer):
        return True  # not the same traced value: cannot tell
    try:
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if isinstance(y, jax.Array) and jax.dtypes.issubdtype(y.dtype, jax.dtypes.prng_key):
            y = jax.random.key_data(y)
        if isinstance(x, (jax.Array, np.ndarray, np.generic)):
            a, b = np.asarray(x), np.asarray(y)
            if a.shape != b.shape or a.dtype != b.dtype:
                return True
            if not jax.dtypes.issubdtype(a.dtype, np.inexact):
                return not np.array_equal(a, b)
            wide = (
                np.complex128 if jax.dtypes.issubdtype(a.dtype, np.complexfloating) else np.float64
            )
            return not np.array_equal(a.astype(wide), b.astype(wide), equal_nan=True)
        return type(x) is not type(y) or not bool(x == y)
    except Exception:
        return True
