import equinox as eqx
import jax
import jax.numpy as jnp


def tree_allclose(x, y, *, rtol=1e-5, atol=1e-8) -> bool:
    """Same structure, and every array leaf close (non-array leaves equal)."""
    return eqx.tree_equal(x, y, typematch=True, rtol=rtol, atol=atol) is True


def count_traces(fn):
    """Wrap `fn` so that `wrapped.traces` counts how often JAX traced it."""

    def wrapped(*args, **kwargs):
        wrapped.traces += 1
        return fn(*args, **kwargs)

    wrapped.traces = 0
    return wrapped


def is_strong(x, dtype) -> bool:
    return isinstance(x, jax.Array) and x.dtype == jnp.dtype(dtype) and not x.weak_type
