"""The checks every assignment inside a `@eqstate.mutating` method goes through.

An array keeps its shape (unless its field says `fixed_shape=False`), its dtype (values
are cast, but never across a category: a float is not truncated to an int) and its key
type. A child module or container assigned whole is checked field by field, each with
its own field's `fixed_shape`.
"""

import copy
import dataclasses
import operator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer

from ._convert import cast_like, is_array_like, is_key
from ._kinds import FIXED_SHAPE_KEY


_MSG_SHAPE = (
    "{where} has shape {old} but was assigned a value of shape {new}. An array "
    "field keeps its shape inside `@eqstate.mutating` methods (a new shape would "
    "recompile a jitted step). If this state's shape legitimately changes, declare it "
    "with `fixed_shape=False`."
)
_MSG_KEY = (
    "{where} holds a PRNG key of dtype {old} but was assigned a value of dtype {new}. "
    "Assign a key of the same kind, e.g. `key, self.key = jax.random.split(self.key)` "
    "or `key = eqstate.next_key(self)`."
)
_MSG_LOSSY = (
    "{where} holds {old} values but was assigned a {new} value; casting it to {old} "
    "would lose information ({what}). Declare the field with a {want} dtype (e.g. "
    "`default={example}`), or cast on purpose with `.astype({old})`."
)
_MSG_NOT_ARRAY = (
    "{where} holds an array ({dtype}{shape}) but was assigned {value} of type "
    "{type}. An array field keeps holding an array of its dtype and shape; assign one "
    "(e.g. `jnp.zeros_like(...)`), or declare the field as `Optional` and initialise it "
    "with `None` if it may be empty."
)
_MSG_RANGE = (
    "{where} holds {old} values but was assigned {value}, outside {old}'s range "
    "[{lo}, {hi}]; the cast would wrap around. Declare the field with a wider dtype, or "
    "assign a value in range."
)
_MSG_STATIC = (
    "{where} is a static field (part of the model's structure, never traced), but was "
    "assigned a JAX array{tracer}. Static values must be Python values such as ints, "
    "strings or functions. Declare the field without `static=True` to hold an array."
)

# dtype categories, in the order a cast may widen them
_CATEGORIES = (
    (jnp.bool_, "bool", "False"),
    (jnp.integer, "integer", "0"),
    (jnp.floating, "floating", "0.0"),
    (jnp.complexfloating, "complex", "0j"),
)


def category(x: Any) -> int:
    """0 bool, 1 integer, 2 floating, 3 complex (Python scalars included)."""
    if isinstance(x, (bool, np.bool_)):
        return 0
    if isinstance(x, int):
        return 1
    if isinstance(x, float):
        return 2
    if isinstance(x, complex):
        return 3
    dtype = x.dtype
    for i, (base, *_) in enumerate(_CATEGORIES):
        if jnp.issubdtype(dtype, base):
            return i
    return 4  # anything else (e.g. extended dtypes): cast as before


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"an array of dtype {x.dtype}"
    if isinstance(x, (list, dict, tuple, set)):
        return f"a {type(x).__name__}"
    return repr(x)


def _dtype_name(x: Any) -> str:
    return str(x.dtype) if hasattr(x, "dtype") else type(x).__name__


def is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


Where = str | tuple
"""A field path: a string, or `(parent, key)` built lazily (formatted on error only)."""


def where_str(where: Where) -> str:
    if isinstance(where, str):
        return where
    parent, key = where
    if isinstance(key, str):
        return f"{where_str(parent)}.{key}"
    return f"{where_str(parent)}[{key[0]!r}]"


def fit(value: Any, old: Any, where: Where, fixed_shape: bool) -> Any:
    """`value` with `old`'s dtype (a key stays a key), checked for `old`'s shape."""
    if not (is_array_like(value) and _fits(value, old, fixed_shape)):
        return _fit_slow(value, old, where_str(where), fixed_shape)
    if isinstance(value, np.ndarray) and isinstance(old, np.ndarray):
        return value  # a NumPy leaf stays NumPy
    return cast_like(value, old)


def _fits(value: Any, old: Any, fixed_shape: bool) -> bool:
    """The common case, cheaply: same dtype (no key involved) and shape."""
    return (
        isinstance(value, (jax.Array, np.ndarray))
        and value.dtype == old.dtype
        and not is_key(old)
        and (not fixed_shape or value.shape == old.shape)
    )


def _fit_slow(value: Any, old: Any, where: str, fixed_shape: bool) -> Any:
    if not is_array_like(value) or (isinstance(value, np.ndarray) and value.dtype.kind in "OSUV"):
        raise TypeError(
            _MSG_NOT_ARRAY.format(
                where=where,
                dtype=old.dtype,
                shape=list(old.shape),
                value=_describe(value),
                type=type(value).__name__,
            )
        )
    if is_key(old) or is_key(value):
        if getattr(value, "dtype", None) != old.dtype:
            new = getattr(value, "dtype", type(value).__name__)
            raise TypeError(_MSG_KEY.format(where=where, old=old.dtype, new=new))
    else:
        have, got = category(old), category(value)
        if got > have and got < 4 and have < 4:
            what_old, what_new = _CATEGORIES[have][1], _CATEGORIES[got][1]
            raise TypeError(
                _MSG_LOSSY.format(
                    where=where,
                    old=old.dtype,
                    new=_dtype_name(value),
                    what=f"{what_new} to {what_old}",
                    want=what_new,
                    example=_CATEGORIES[got][2],
                )
            )
        if isinstance(value, int) and not isinstance(value, bool) and have == 1:
            info = np.iinfo(old.dtype)
            if not info.min <= value <= info.max:
                raise ValueError(
                    _MSG_RANGE.format(
                        where=where, value=value, old=old.dtype, lo=info.min, hi=info.max
                    )
                )
        value = cast_like(value, old)
    if fixed_shape and jnp.shape(value) != old.shape:
        raise ValueError(_MSG_SHAPE.format(where=where, old=old.shape, new=jnp.shape(value)))
    return value


def check_static(value: Any, where: Where) -> None:
    """A static field never holds a JAX array (a tracer would escape its trace), not
    even inside a container."""
    if isinstance(value, jax.Array):
        tracer = " (a tracer)" if isinstance(value, Tracer) else ""
        raise TypeError(_MSG_STATIC.format(where=where_str(where), tracer=tracer))
    if isinstance(value, (list, tuple, dict)):
        try:
            leaves = jax.tree_util.tree_leaves(value)
        except RecursionError:
            return
        for leaf in leaves:
            if isinstance(leaf, jax.Array):
                check_static(leaf, where)


def fit_tree(value: Any, old: Any, where: Where, fixed_shape: bool) -> Any:
    """`value`, checked against `old` leaf by leaf where their structures meet.

    Arrays go through `fit`; modules are checked field by field (each field's own
    `fixed_shape`, static fields never holding arrays); lists and tuples of the same
    length item by item, dicts key by key. Lists that grew or shrank, new keys, and
    values whose type differs from `old`'s (other than arrays) are taken as they are.
    Returns `value` itself when nothing needed a cast.
    """
    if value is old:
        return value
    if is_array(old):
        return fit(value, old, where, fixed_shape)
    t = type(old)
    if type(value) is not t:
        return value
    if isinstance(old, (list, tuple)):
        if len(value) != len(old):
            return value  # grown or shrunk: a new structure, as a new list would be
        if all(map(operator.is_, value, old)):
            return value
        items = [
            fit_tree(v, o, (where, (i,)), fixed_shape) for i, (v, o) in enumerate(zip(value, old))
        ]
        if all(map(operator.is_, items, value)):
            return value
        if t is list or t is tuple:
            return t(items)
        if hasattr(t, "_fields"):
            return t(*items)
        out = copy.copy(value)
        out[:] = items
        return out
    if isinstance(old, dict):
        changed = {}
        for k, v in value.items():
            if k in old:
                new = fit_tree(v, old[k], (where, (k,)), fixed_shape)
                if new is not v:
                    changed[k] = new
        if not changed:
            return value
        out = copy.copy(value)
        out.update(changed)
        return out
    if isinstance(old, eqx.Module):
        return _fit_module(value, old, where, fixed_shape)
    return value


def _fit_module(value: Any, old: Any, where: Where, fixed_shape: bool) -> Any:
    new_values, old_values = vars(value), vars(old)
    changed = {}
    for f in dataclasses.fields(value):
        name = f.name
        v = new_values.get(name, old_values.get(name))
        o = old_values.get(name, v)
        if v is o:
            continue
        path = (where, name)
        if f.metadata.get("static", False):
            check_static(v, path)
            continue
        new = fit_tree(v, o, path, f.metadata.get(FIXED_SHAPE_KEY, fixed_shape))
        if new is not v:
            changed[name] = new
    if not changed:
        return value
    out = object.__new__(type(value))
    vars(out).update(new_values)
    vars(out).update(changed)
    return out
