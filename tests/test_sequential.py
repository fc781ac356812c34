import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tree_allclose

import eqstate
from eqstate.nn import BatchNorm, Dropout, Sequential


def make(key):
    k1, k2, k3 = jax.random.split(key, 3)
    return Sequential(
        [
            eqx.nn.Linear(3, 8, key=k1),
            BatchNorm(8),
            jax.nn.relu,
            Dropout(0.25, key=k2),
            eqx.nn.Linear(8, 2, key=k3),
        ]
    )


class ByHand(eqstate.Module):
    """The oracle: the same layers, threaded by hand."""

    lin1: eqx.nn.Linear
    bn: BatchNorm
    drop: Dropout
    lin2: eqx.nn.Linear

    @eqstate.mutating
    def __call__(self, x):
        x, self.bn = self.bn(self.lin1(x))
        x, self.drop = self.drop(jax.nn.relu(x))
        return self.lin2(x)


def by_hand(seq):
    lin1, bn, _, drop, lin2 = seq.layers
    return ByHand(lin1, bn, drop, lin2)


def test_sequential_threads_state_like_a_hand_written_model():
    seq = make(jax.random.key(0))
    hand = by_hand(seq)
    xs = jax.random.normal(jax.random.key(1), (16, 3))
    for _ in range(3):
        y, seq = eqstate.vmap(seq)(xs)
        y_ref, hand = eqstate.vmap(hand)(xs)
        np.testing.assert_allclose(y, y_ref, rtol=1e-6)
    arrays = lambda m: jax.tree.leaves(eqx.filter(m, eqx.is_array))  # noqa: E731
    assert tree_allclose(arrays(seq), arrays(hand))
    # the BatchNorm and Dropout inside moved; the original sequence did not
    fresh = make(jax.random.key(0))
    assert not np.allclose(seq[1].running_mean, fresh[1].running_mean)
    y_inf, same = eqstate.vmap(eqstate.eval(seq))(xs)
    y_inf_ref, _ = eqstate.vmap(eqstate.eval(hand))(xs)
    np.testing.assert_allclose(y_inf, y_inf_ref, rtol=1e-6)
    assert tree_allclose(same, eqstate.eval(seq))


def test_keys_are_passed_on_as_eqx_nn_sequential_does():
    k1, k2 = jax.random.split(jax.random.key(0))
    layers = [eqx.nn.Linear(4, 4, key=k1), eqx.nn.Dropout(0.5), eqx.nn.Lambda(jnp.tanh)]
    x = jnp.ones(4)
    ref = eqx.nn.Sequential(layers)(x, key=k2)
    y, _ = Sequential(layers)(x, key=k2)
    np.testing.assert_array_equal(y, ref)
    # without a key, layers that need none run
    y, _ = Sequential([eqx.nn.Linear(4, 4, key=k1), jnp.tanh])(x)
    np.testing.assert_allclose(y, jnp.tanh(layers[0](x)))


@pytest.mark.usefixtures("standard_promotion")
def test_sequential_trains_under_eqstate_jit():
    seq = make(jax.random.key(0))
    opt = eqstate.Optimizer(optax.sgd(0.1), seq)
    xs = jax.random.normal(jax.random.key(1), (16, 3))
    ys = jnp.sum(xs, axis=1, keepdims=True) * jnp.array([1.0, -1.0])

    def loss_fn(model, x, y):
        pred, model = eqstate.vmap(model)(x)
        return jnp.mean((pred - y) ** 2), model

    @eqstate.jit(max_traces=1)
    def step(model, opt):
        (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, xs, ys)
        model, opt = opt.update(grads, model)
        return loss, model, opt

    losses = []
    for _ in range(20):
        loss, seq, opt = step(seq, opt)
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0]


def test_indexing_slicing_and_iteration():
    seq = make(jax.random.key(0))
    assert len(seq) == 5
    assert isinstance(seq[1], BatchNorm) and seq[-1] is seq.layers[-1]
    head = seq[:2]
    assert isinstance(head, Sequential) and len(head) == 2
    assert list(seq) == list(seq.layers)
    xs = jnp.ones((4, 3))
    y, new_head = eqstate.vmap(head)(xs)
    assert y.shape == (4, 8) and isinstance(new_head, Sequential)
    with pytest.raises(
        TypeError, match=r"Sequential indices must be ints or slices, got '1' \(str\)"
    ):
        seq["1"]


def test_bad_layers_are_named_errors():
    with pytest.raises(TypeError, match=r"layers\[1\] is 3 \(int\), which cannot be called"):
        Sequential([jnp.tanh, 3])
    with pytest.raises(TypeError, match=r"takes a sequence of layers, such as a list"):
        Sequential(jnp.tanh)  # pyright: ignore[reportArgumentType]
    bn = eqx.nn.BatchNorm(3, axis_name="batch", mode="batch")
    with pytest.raises(
        TypeError,
        match=r"layers\[0\] is eqx\.nn\.BatchNorm, an Equinox stateful layer .*eqstate\.nn\.WithState",
    ):
        Sequential([bn])
    with pytest.raises(
        TypeError,
        match=r"layers\[1\] is eqx\.nn\.Sequential, an Equinox stateful layer \(or one holding such",
    ):
        Sequential([jnp.tanh, eqx.nn.Sequential([bn])])
    seq = Sequential([jnp.tanh, BatchNorm(3).__call__])
    with pytest.raises(
        TypeError, match=r"layers\[1\] returned `\(y, new BatchNorm\)`.*Put the layer itself"
    ):
        seq(jnp.ones((2, 3)))
