"""Conversions that keep state strongly typed, so a jitted step compiles once."""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.core import Tracer


def is_key(x: Any) -> bool:
    """Whether `x` is a typed PRNG key array (`jax.random.key`)."""
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def canonical_dtype(dtype: Any) -> Any:
    """The dtype JAX computes with for `dtype`: float64 NumPy leaves are float32 when
    x64 is off, so a model with them and its traced version compare equal."""
    return jax.dtypes.canonicalize_dtype(dtype, allow_extended_dtype=True)


def is_key_like(x: Any) -> bool:
    """A typed key, or a raw `uint32` key array (`jax.random.PRNGKey`)."""
    if isinstance(x, jax.ShapeDtypeStruct) or is_key(x):
        return True
    return isinstance(x, (jax.Array, np.ndarray)) and x.dtype == np.uint32 and x.ndim >= 1


def concrete_flag(flag: Any) -> Any:
    """An `inference` flag as a Python bool where its value is known (a concrete
    `bool[]` array, as `jax.jit` or `jax.device_put` return it); a tracer as it is."""
    concrete = isinstance(flag, (np.ndarray, np.bool_)) or (
        isinstance(flag, jax.Array) and not isinstance(flag, Tracer)
    )
    if concrete and jnp.shape(flag) == () and jnp.result_type(flag) == jnp.bool_:
        return bool(flag)
    return flag


def is_array_like(x: Any) -> bool:
    """Whether `x` is an array or a Python/NumPy scalar (what a State field converts)."""
    return isinstance(x, (bool, int, float, complex, np.ndarray, np.generic, jax.Array))


def _strong(x: Any) -> Any:
    if not is_array_like(x) or is_key(x):
        return x
    if isinstance(x, jax.Array) and not x.weak_type:
        return x
    dtype = jnp.asarray(x).dtype
    return jnp.asarray(x, dtype=dtype)


def to_strong(value: Any) -> Any:
    """Turn every array-like leaf of `value` into a strongly typed JAX array.

    Python scalars, NumPy arrays and weakly typed JAX arrays become JAX arrays with
    JAX's default dtype for them (`0` -> int32, `0.0` -> float32 without x64). Typed
    PRNG keys, strongly typed arrays and non-array leaves are returned unchanged.
    """
    if is_array_like(value):
        return _strong(value)
    return jax.tree_util.tree_map(_strong, value)


def cast_like(value: Any, old: jax.Array | np.ndarray) -> jax.Array:
    """Cast `value` to the dtype and weak-typedness of `old` (no-op when they agree)."""
    weak = getattr(old, "weak_type", False)
    if isinstance(value, jax.Array) and value.dtype == old.dtype and value.weak_type == weak:
        return value
    if not weak:
        return jax.lax.convert_element_type(value, old.dtype)
    return _weak(jnp.asarray(value), old)


def _weak(value: jax.Array, old: Any) -> jax.Array:
    """`value` converted to `old`'s dtype, weakly typed like `old`.

    JAX has no public cast to a weak type, but `lax.full_like` keeps the weak type of its
    example array. Mapped over the elements it lowers to a single weak
    `convert_element_type` of the whole array, with no copy or scatter.
    """
    fill = jax.vmap(lambda v: jax.lax.full_like(old, v, shape=()))
    return fill(value.reshape(-1)).reshape(value.shape)


def is_array_or_abstract(x: Any) -> bool:
    """Whether `x` is an array, concrete (JAX, NumPy) or abstract (`ShapeDtypeStruct`)."""
    return isinstance(x, (jax.Array, np.ndarray, np.generic, jax.ShapeDtypeStruct))


def stand_in(x: Any) -> Any:
    """`x`, or for an abstract leaf a zero-memory NumPy array of its shape (and dtype;
    a key's raw `uint32`), which filters see as an array."""
    if isinstance(x, jax.ShapeDtypeStruct):
        dtype = np.uint32 if jnp.issubdtype(x.dtype, jax.dtypes.prng_key) else x.dtype
        return np.broadcast_to(np.zeros((), dtype), x.shape)
    return x
