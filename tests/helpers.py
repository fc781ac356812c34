import jax
import jax.numpy as jnp
import numpy as np


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8) -> bool:
    """Same structure, array leaves close with equal dtypes, other leaves equal."""
    lx, tx = jax.tree_util.tree_flatten(x)
    ly, ty = jax.tree_util.tree_flatten(y)
    if tx != ty:
        return False
    for a, b in zip(lx, ly, strict=True):
        if isinstance(a, (jax.Array, np.ndarray)):
            if not isinstance(b, (jax.Array, np.ndarray)) or a.dtype != b.dtype:
                return False
            if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            if a.shape != b.shape or not np.allclose(a, b, rtol=rtol, atol=atol):
                return False
        elif a is not b and a != b:
            return False
    return True


def count_traces(fn):
    """Wrap `fn` so that `wrapped.traces` counts how often JAX traced it."""

    def wrapped(*args, **kwargs):
        wrapped.traces += 1
        return fn(*args, **kwargs)

    wrapped.traces = 0
    return wrapped


def is_strong(x, dtype) -> bool:
    return isinstance(x, jax.Array) and x.dtype == jnp.dtype(dtype) and not x.weak_type
