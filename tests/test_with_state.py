"""Migrating Equinox's `stateful.ipynb` model: `eqstate.nn.WithState` gives Equinox's
numbers, in training and in inference, in both of `eqx.nn.BatchNorm`'s modes."""

from typing import Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import optax
import pytest
from helpers import tree_allclose

import eqstate
from eqstate.nn import WithState


class Model(eqx.Module):
    """Equinox's `stateful.ipynb` model, unchanged but for the BatchNorm `mode`."""

    norm1: eqx.nn.BatchNorm
    spectral_linear: eqx.nn.SpectralNorm[eqx.nn.Linear]
    norm2: eqx.nn.BatchNorm
    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear

    def __init__(self, key, mode: Literal["ema", "batch"] = "batch"):
        key1, key2, key3, key4 = jr.split(key, 4)
        self.norm1 = eqx.nn.BatchNorm(input_size=3, axis_name="batch", mode=mode)
        self.spectral_linear = eqx.nn.SpectralNorm(
            layer=eqx.nn.Linear(in_features=3, out_features=32, key=key1),
            weight_name="weight",
            key=key2,
        )
        self.norm2 = eqx.nn.BatchNorm(input_size=32, axis_name="batch", mode=mode)
        self.linear1 = eqx.nn.Linear(in_features=32, out_features=32, key=key3)
        self.linear2 = eqx.nn.Linear(in_features=32, out_features=3, key=key4)

    def __call__(self, x, state):
        x, state = self.norm1(x, state)
        x, state = self.spectral_linear(x, state)
        x = jax.nn.relu(x)
        x, state = self.norm2(x, state)
        x = self.linear1(x)
        x = jax.nn.relu(x)
        x = self.linear2(x)
        return x, state


def dataset(seed=5678, size=10):
    _, xkey, xkey2 = jr.split(jr.PRNGKey(seed), 3)
    xs = jr.normal(xkey, (size, 3))
    return xs, jnp.sin(xs) + 1 * jr.normal(xkey2, (size, 3))


def train_equinox(model, state, xs, ys, steps, optim=None):
    """The notebook's training loop."""
    optim = optax.adam(3e-4) if optim is None else optim
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))

    def compute_loss(model, state, xs, ys):
        batch_model = jax.vmap(model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
        pred_ys, state = batch_model(xs, state)
        return jnp.mean((pred_ys - ys) ** 2), state

    @eqx.filter_jit
    def make_step(model, state, opt_state, xs, ys):
        (loss, state), grads = eqx.filter_value_and_grad(compute_loss, has_aux=True)(
            model, state, xs, ys
        )
        updates, opt_state = optim.update(grads, opt_state)
        model = eqx.apply_updates(model, updates)
        return loss, model, state, opt_state

    losses = []
    for _ in range(steps):
        loss, model, state, opt_state = make_step(model, state, opt_state, xs, ys)
        losses.append(float(loss))
    return losses, model, state


def train_eqstate(model, xs, ys, steps, tx=None):
    opt = eqstate.Optimizer(optax.adam(3e-4) if tx is None else tx, model)

    def loss_fn(model, xs, ys):
        pred_ys, model = eqstate.vmap(model, axis_name="batch")(xs)
        return jnp.mean((pred_ys - ys) ** 2), model

    @eqstate.jit(max_traces=1)
    def step(model, opt, xs, ys):
        (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, xs, ys)
        model, opt = opt.update(grads, model)
        return loss, model, opt

    losses = []
    for _ in range(steps):
        loss, model, opt = step(model, opt, xs, ys)
        losses.append(float(loss))
    return losses, model


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_migrated_stateful_notebook_gives_equinoxs_numbers(mode):
    xs, ys = dataset()
    eqx_model, eqx_state = eqx.nn.make_with_state(Model)(jr.PRNGKey(0), mode)
    ref_losses, eqx_model, eqx_state = train_equinox(eqx_model, eqx_state, xs, ys, steps=6)

    model = WithState(*eqx.nn.make_with_state(Model)(jr.PRNGKey(0), mode))
    losses, model = train_eqstate(model, xs, ys, steps=6)

    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert tree_allclose(
        eqx.filter(model.model, eqx.is_array),
        eqx.filter(eqx_model, eqx.is_array),
        rtol=1e-5,
        atol=1e-7,
    )
    assert tree_allclose(model.state, eqx_state, rtol=1e-5, atol=1e-7)
    # inference, as the notebook does it
    inference_model = eqx.Partial(eqx.nn.inference_mode(eqx_model), state=eqx_state)
    ref = jax.vmap(inference_model, axis_name="batch")(xs)[0]
    ours, same = eqstate.vmap(eqstate.eval(model), axis_name="batch")(xs)
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-6)
    assert tree_allclose(same.state, eqx_state)


class Ported(eqstate.Module):
    """The same model ported layer by layer to eqstate's own layers."""

    norm1: eqstate.nn.BatchNorm
    spectral_linear: eqstate.nn.SpectralNorm[eqx.nn.Linear]
    norm2: eqstate.nn.BatchNorm
    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear

    def __init__(self, key, mode: Literal["ema", "batch"]):
        key1, key2, key3, key4 = jr.split(key, 4)
        self.norm1 = eqstate.nn.BatchNorm(3, mode=mode)
        self.spectral_linear = eqstate.nn.SpectralNorm(
            eqx.nn.Linear(in_features=3, out_features=32, key=key1), "weight", key=key2
        )
        self.norm2 = eqstate.nn.BatchNorm(32, mode=mode)
        self.linear1 = eqx.nn.Linear(in_features=32, out_features=32, key=key3)
        self.linear2 = eqx.nn.Linear(in_features=32, out_features=3, key=key4)

    @eqstate.mutating
    def __call__(self, x):
        x, self.norm1 = self.norm1(x)
        x, self.spectral_linear = self.spectral_linear(x)
        x = jax.nn.relu(x)
        x, self.norm2 = self.norm2(x)
        return self.linear2(jax.nn.relu(self.linear1(x)))


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_ported_layer_by_layer_gives_equinoxs_numbers(mode):
    xs, ys = dataset()
    # forward in training: the same outputs and state, call after call
    eqx_model, eqx_state = eqx.nn.make_with_state(Model)(jr.PRNGKey(0), mode)
    ported = Ported(jr.PRNGKey(0), mode)
    forward = jax.vmap(eqx_model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))
    for _ in range(3):
        ref, eqx_state = forward(xs, eqx_state)
        ours, ported = eqstate.vmap(ported)(xs)
        np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)
    for norm in ("norm1", "norm2"):
        index = (
            getattr(eqx_model, norm).batch_state_index or getattr(eqx_model, norm).ema_state_index
        )
        mean, var = eqx_state.get(index)
        np.testing.assert_allclose(getattr(ported, norm).running_mean, mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(getattr(ported, norm).running_var, var, rtol=1e-6, atol=1e-7)
    u, v = eqx_state.get(eqx_model.spectral_linear.uv_index)
    np.testing.assert_allclose(ported.spectral_linear.u, u, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ported.spectral_linear.v, v, rtol=1e-6, atol=1e-7)

    # trained (with SGD: Adam turns float noise in near-zero gradients into steps of the
    # full learning rate, so two exact ports drift apart), then inference
    eqx_model, eqx_state = eqx.nn.make_with_state(Model)(jr.PRNGKey(0), mode)
    ref_losses, eqx_model, eqx_state = train_equinox(
        eqx_model, eqx_state, xs, ys, steps=6, optim=optax.sgd(0.05)
    )
    losses, model = train_eqstate(Ported(jr.PRNGKey(0), mode), xs, ys, steps=6, tx=optax.sgd(0.05))
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    inference_model = eqx.Partial(eqx.nn.inference_mode(eqx_model), state=eqx_state)
    ref = jax.vmap(inference_model, axis_name="batch")(xs)[0]
    ours, _ = eqstate.vmap(eqstate.eval(model))(xs)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5)


def test_state_is_seen_by_kinds():
    model = WithState(*eqx.nn.make_with_state(Model)(jr.PRNGKey(0)))
    # BatchNorm's statistics (running mean and variance, and the step counter, twice)
    stats = jax.tree.leaves(eqstate.filter(model, eqstate.BatchStat))
    assert sorted(x.shape for x in stats) == sorted([(), (3,), (3,), (), (32,), (32,)])
    # SpectralNorm's power-iteration vectors are State but no batch statistics
    states = jax.tree.leaves(model.states())
    assert len(states) == len(stats) + 2
    # none of it is trained: the parameters are the model's weights alone
    params = jax.tree.leaves(model.parameters())
    assert len(params) == len(jax.tree.leaves(eqx.filter(model.model, eqx.is_inexact_array)))


def test_the_callers_state_stays_usable():
    eqx_model, state = eqx.nn.make_with_state(Model)(jr.PRNGKey(0))
    model = WithState(eqx_model, state)
    xs, _ = dataset()
    _, model = eqstate.vmap(model, axis_name="batch")(xs)
    _, model = eqstate.vmap(model, axis_name="batch")(xs)
    # Equinox invalidates a state after `state.set`; the caller's was never passed in
    ys, _ = jax.vmap(eqx_model, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(xs, state)
    assert ys.shape == (10, 3)
    assert not tree_allclose(model.state, state)


class Counter(eqx.Module):
    index: eqx.nn.StateIndex

    def __init__(self):
        self.index = eqx.nn.StateIndex(jnp.array(0))

    def __call__(self, x, state, *, key=None):
        del key
        count = state.get(self.index)
        return x + count.astype(x.dtype), state.set(self.index, count + 1)


def test_a_layer_with_state_and_keyword_arguments():
    layer = WithState(*eqx.nn.make_with_state(Counter)())
    y, layer = layer(jnp.zeros(2), key=jr.PRNGKey(0))
    y, layer = layer(jnp.zeros(2))
    np.testing.assert_array_equal(y, [1, 1])
    assert int(layer.buffers[0]) == 2 and layer.stats == ()


def test_bad_input_is_a_named_error():
    counter, state = eqx.nn.make_with_state(Counter)()
    with pytest.raises(
        TypeError, match=r"the arguments look swapped: the order is `WithState\(model, state\)`"
    ):
        WithState(state, counter)  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match=r"`model` must be callable"):
        WithState(3, state)  # pyright: ignore[reportArgumentType]
    _, newer = counter(jnp.zeros(2), state)
    with pytest.raises(ValueError, match=r"this `eqx.nn.State` was already used"):
        WithState(counter, state)
    _, other_state = eqx.nn.make_with_state(Model)(jr.PRNGKey(0))
    with pytest.raises(
        ValueError, match=r"1 of the model's stateful layers \(\.index\) have no entry"
    ):
        WithState(counter, other_state)
    with pytest.raises(
        ValueError, match=r"Linear holds no `eqx\.nn\.StateIndex`, so it keeps no state"
    ):
        WithState(*eqx.nn.make_with_state(eqx.nn.Linear)(2, 2, key=jr.PRNGKey(0)))
    wrapped = WithState(counter, newer)
    bad = eqx.tree_at(lambda w: w.model, wrapped, lambda x, state: x)
    with pytest.raises(
        TypeError,
        match=r"returned a \w+; a model wrapped by WithState must return `\(y, new_state\)`",
    ):
        bad(jnp.zeros(2))
