"""The examples of Treex's state-management page, written for eqstate."""

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import is_strong

import eqstate


class Average(eqstate.Module):
    count: jax.Array = eqstate.State.field()
    total: jax.Array = eqstate.State.field()

    def __init__(self):
        self.count = jnp.array(0)
        self.total = jnp.array(0.0)

    @eqstate.mutating
    def __call__(self, x):
        self.count += np.prod(x.shape)
        self.total += jnp.sum(x)
        return self.total / self.count


class Dropout(eqstate.Module):
    key: jax.Array = eqstate.Rng.field()
    rate: float = 0.5

    def __init__(self, key, rate=0.5):
        self.key = key
        self.rate = rate

    @eqstate.mutating
    def __call__(self, x):
        key, self.key = jax.random.split(self.key)
        keep = jax.random.bernoulli(key, 1.0 - self.rate, x.shape)
        return jnp.where(keep, x / (1.0 - self.rate), jnp.zeros_like(x))


class Model(eqstate.Module):
    linear: eqstate.Module
    avg: Average
    w: jax.Array

    @eqstate.mutating
    def __call__(self, x):
        m, self.avg = self.avg(x)
        return x @ self.w + m


class Linear(eqstate.Module):
    w: jax.Array


@pytest.mark.usefixtures("standard_promotion")
def test_average_eager_and_jit():
    avg = Average()
    assert is_strong(avg.count, jnp.int32) and is_strong(avg.total, jnp.float32)
    y, avg1 = avg(jnp.arange(4.0))
    assert float(y) == pytest.approx(1.5)
    assert int(avg.count) == 0  # the original is untouched
    assert int(avg1.count) == 4 and float(avg1.total) == 6.0

    y, avg2 = jax.jit(lambda m, x: m(x))(avg1, jnp.full((2, 3), 2.0))
    assert int(avg2.count) == 10
    assert float(y) == pytest.approx(18.0 / 10)
    assert is_strong(avg2.count, jnp.int32) and is_strong(avg2.total, jnp.float32)


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey])
def test_dropout_splits_its_key_each_call(make_key):
    drop = Dropout(make_key(0))
    x = jnp.ones(1000)
    y1, drop1 = drop(x)
    y2, drop2 = jax.jit(lambda m, x: m(x))(drop1, x)
    assert not np.array_equal(y1, y2)
    assert drop1.key.dtype == drop.key.dtype and drop1.key.shape == drop.key.shape
    # reproducible from the seed
    y1_again, _ = Dropout(make_key(0))(x)
    np.testing.assert_array_equal(y1, y1_again)
    # about half dropped, the rest scaled
    assert set(np.unique(np.asarray(y1)).tolist()) == {0.0, 2.0}
    assert 400 < int(jnp.sum(y1 == 0)) < 600
    assert not np.array_equal(jax.random.key_data(drop2.key), jax.random.key_data(drop1.key))


@pytest.mark.usefixtures("standard_promotion")
def test_loss_fn_pattern_with_value_and_grad():
    model = Model(Linear(jnp.ones(3)), Average(), jnp.array([[1.0], [2.0], [3.0]]))
    x = jnp.ones((4, 3))
    y = jnp.zeros((4, 1))

    @partial(jax.value_and_grad, has_aux=True)
    def loss_fn(params, model, x, y):
        model = model.update(params)
        preds, model = model(x)
        loss = jnp.mean((preds - y) ** 2)
        return loss, model

    params = model.parameters()
    (loss, model2), grads = loss_fn(params, model, x, y)
    # state updated and returned through the aux output
    assert int(model2.avg.count) == 12
    assert int(model.avg.count) == 0
    # gradients only for parameters, and correct: preds = x @ w + 1 = 7
    assert grads.avg.count is None and grads.avg.total is None
    np.testing.assert_allclose(grads.w, np.full((3, 1), 2 * 7.0), rtol=1e-6)
    assert float(loss) == pytest.approx(49.0)
