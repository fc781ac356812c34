import jax
import pytest


jax.config.update("jax_numpy_dtype_promotion", "strict")


@pytest.fixture
def standard_promotion():
    """For code written with NumPy's promotion in mind (the Treex examples)."""
    with jax.numpy_dtype_promotion("standard"):
        yield
