"""Why `eqstate.jit` traced again: the first argument path whose structure, shape,
dtype or static value changed between two calls, in words."""

from collections.abc import Callable
from typing import Any

import jax
import jax.tree_util as jtu

from ._filters import first_mismatch


def _weak(x: Any) -> bool:
    return bool(getattr(x, "weak_type", False))


def _fmt(x: Any) -> str:
    if isinstance(x, jax.ShapeDtypeStruct):
        weak = ", weak" if x.weak_type else ""
        return f"{x.dtype}{list(x.shape)}{weak}"
    return repr(x)


def _leaf(x: Any) -> str:
    return f"an array {_fmt(x)}" if isinstance(x, jax.ShapeDtypeStruct) else repr(x)


def _same(x: Any, y: Any) -> bool:
    try:
        return x is y or (type(x) is type(y) and bool(x == y))
    except Exception:
        return False


def explain(old: Any, new: Any) -> str:
    """Name the first argument path where two skeletons differ, and how."""
    where = first_mismatch(old, new, where=argpath, leaf=_leaf)
    if where is not None:
        return f"The structure of the arguments changed {where}."
    a, _ = jtu.tree_flatten_with_path(old)
    b = jtu.tree_leaves(new)
    for (path, x), y in zip(a, b):
        if _same(x, y):
            continue
        name = argpath(path)
        x_array = isinstance(x, jax.ShapeDtypeStruct)
        y_array = isinstance(y, jax.ShapeDtypeStruct)
        if x_array and y_array:
            return f"The shape/dtype of {name} changed from {_fmt(x)} to {_fmt(y)}."
        if y_array:
            return f"{name} changed from the static value {x!r} to an array {_fmt(y)}."
        if x_array:
            return f"{name} changed from an array {_fmt(x)} to the static value {y!r}."
        return f"The static value of {name} changed from {x!r} to {y!r}."
    return "Nothing in the arguments changed (JAX retraced for another reason)."


def argpath(path: tuple) -> str:
    """`((args, kwargs), ...)` key path -> `args[0].bn.mean` / `kwargs['x']`."""
    if not path:
        return "the arguments"
    head, *rest = path
    name = "args" if getattr(head, "idx", None) == 0 else "kwargs"
    rest_path = rest[1:] if name == "kwargs" else rest
    prefix = f"kwargs[{rest[0].key!r}]" if name == "kwargs" and rest else name
    return prefix + jtu.keystr(tuple(rest_path))


def skeleton(tree: Any, is_array: Callable[[Any], bool]) -> Any:
    """`tree` with each array (as `is_array` says) replaced by its shape, dtype and weak
    type: what a trace depends on, kept to explain the next retrace."""
    return jtu.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=_weak(x)) if is_array(x) else x,
        tree,
    )
