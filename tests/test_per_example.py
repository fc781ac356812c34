"""The per-example style: a model written for one example, mapped with `eqstate.vmap`
(or `jax.vmap` / `eqx.filter_vmap` with an `axis_name`), gives the numbers of the same
model called on the whole batch, with its state coming back unmapped."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import tree_allclose
from hypothesis import given, settings, strategies as st

import eqstate
from eqstate.nn import BatchNorm, Dropout


class Net(eqstate.Module):
    lin1: eqx.nn.Linear
    bn1: BatchNorm
    drop: Dropout
    lin2: eqx.nn.Linear
    bn2: BatchNorm
    batched: bool = eqx.field(static=True)

    def __init__(self, batched, key, mode="running"):
        k1, k2, k3 = jax.random.split(key, 3)
        self.lin1 = eqx.nn.Linear(3, 16, key=k1)
        self.bn1 = BatchNorm(16, mode=mode)
        self.drop = Dropout(0.3, key=k2)
        self.lin2 = eqx.nn.Linear(16, 2, key=k3)
        self.bn2 = BatchNorm(2, momentum=0.9, mode=mode)
        self.batched = batched

    @eqstate.mutating
    def __call__(self, x):
        linear = jax.vmap if self.batched else (lambda f: f)
        x = linear(self.lin1)(x)
        x, self.bn1 = self.bn1(x)
        x, self.drop = self.drop(jax.nn.relu(x))
        x = linear(self.lin2)(x)
        x, self.bn2 = self.bn2(x)
        return x


def data(n=8, seed=0):
    kx, ky = jax.random.split(jax.random.key(seed))
    return 2.0 + 3.0 * jax.random.normal(kx, (n, 3)), jax.random.normal(ky, (n, 2))


def train(model, per_example, steps=4):
    opt = eqstate.Optimizer(optax.adam(1e-2), model)

    def loss_fn(model, x, y):
        pred, model = eqstate.vmap(model)(x) if per_example else model(x)
        return jnp.mean((pred - y) ** 2), model

    @eqstate.jit(max_traces=1)
    def step(model, opt, x, y):
        (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
        model, opt = opt.update(grads, model)
        return loss, model, opt

    losses = []
    for i in range(steps):
        loss, model, opt = step(model, opt, *data(seed=i))
        losses.append(float(loss))
    return losses, model


@pytest.mark.usefixtures("standard_promotion")
@pytest.mark.parametrize("mode", ["running", "batch", "ema"])
def test_per_example_training_matches_batch_training(mode):
    key = jax.random.key(0)
    batch_losses, batch_model = train(Net(True, key, mode), per_example=False)
    example_losses, example_model = train(Net(False, key, mode), per_example=True)
    np.testing.assert_allclose(example_losses, batch_losses, rtol=1e-5)
    # every leaf (the static `batched` setting aside) agrees
    assert tree_allclose(
        jax.tree.leaves(example_model), jax.tree.leaves(batch_model), rtol=1e-4, atol=1e-6
    )
    # the state comes back unmapped: one copy, as the batch-level call returns it
    assert example_model.bn1.running_mean.shape == (16,)
    assert example_model.bn1.count is None or example_model.bn1.count.shape == ()
    np.testing.assert_array_equal(
        jax.random.key_data(example_model.drop.key), jax.random.key_data(batch_model.drop.key)
    )
    # and inference agrees too
    x, _ = data(seed=9)
    y_batch, _ = eqstate.eval(batch_model)(x)
    y_example, _ = eqstate.vmap(eqstate.eval(example_model))(x)
    np.testing.assert_allclose(y_example, y_batch, rtol=1e-4, atol=1e-5)


def test_dropout_draws_its_own_mask_per_example():
    drop = Dropout(0.5, key=jax.random.key(1))
    xs = jnp.ones((16, 32))
    ys, new = eqstate.vmap(drop)(xs)
    assert len({tuple(np.asarray(r)) for r in ys}) == 16
    whole, new_whole = drop(xs)
    np.testing.assert_array_equal(ys, whole)
    np.testing.assert_array_equal(jax.random.key_data(new.key), jax.random.key_data(new_whole.key))
    assert new.key.shape == ()


class Noise(eqstate.Module):
    key: jax.Array = eqstate.Rng.field()

    @eqstate.mutating
    def __call__(self, x):
        return x + jax.random.normal(eqstate.next_key(self), x.shape)


def test_next_key_differs_per_example_and_the_key_advances_once():
    noise = Noise(jax.random.key(0))
    ys, new = eqstate.vmap(noise)(jnp.zeros((6, 2)))
    assert len({tuple(np.asarray(r)) for r in ys}) == 6
    _, once = noise(jnp.zeros(2))
    np.testing.assert_array_equal(jax.random.key_data(new.key), jax.random.key_data(once.key))


def test_user_axis_name_is_usable_inside():
    class Centre(eqstate.Module):
        @eqstate.mutating
        def __call__(self, x):
            return x - jax.lax.pmean(x, "examples")

    ys, _ = eqstate.vmap(Centre(), axis_name="examples")(jnp.arange(4.0))
    np.testing.assert_allclose(ys, jnp.arange(4.0) - 1.5)


class Total(eqstate.Module):
    total: jax.Array = eqstate.State.field(default=0.0)

    @eqstate.mutating
    def __call__(self, x):
        self.total += jnp.sum(x)
        return x


def test_state_that_differs_between_examples_is_a_named_error():
    with pytest.raises(
        ValueError,
        match=r"eqstate\.vmap: the returned model's \[1\]\.total differs between examples.*jax\.lax\.psum",
    ):
        eqstate.vmap(Total())(jnp.ones((4, 2)))
    # mapped explicitly, it is the user's choice
    _, totals = eqstate.vmap(Total(), out_axes=0)(jnp.ones((4, 2)))
    np.testing.assert_allclose(totals.total, jnp.full(4, 2.0))


def test_plain_vmap_and_filter_vmap_with_an_axis_name():
    # Equinox's own style: the axis named at construction, the model unmapped
    x, _ = data()
    whole, whole_bn = BatchNorm(3)(x)
    bn = BatchNorm(3, axis_name="batch")
    y1, bn1 = jax.vmap(lambda m, x: m(x), in_axes=(None, 0), out_axes=(0, None), axis_name="batch")(
        bn, x
    )
    y2, bn2 = eqx.filter_vmap(
        lambda m, x: m(x), in_axes=(None, 0), out_axes=(0, None), axis_name="batch"
    )(bn, x)
    for y, new in ((y1, bn1), (y2, bn2)):
        np.testing.assert_allclose(y, whole, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(new.running_var, whole_bn.running_var, rtol=1e-6)
    # or bound at the call
    y3, _ = jax.vmap(
        lambda x: BatchNorm(3)(x, axis_name="batch"), axis_name="batch", out_axes=(0, None)
    )(x)
    np.testing.assert_allclose(y3, whole, rtol=1e-5, atol=1e-6)


def test_the_call_can_unbind_the_axis():
    bn = BatchNorm(3, axis_name="devices")
    x, _ = data()
    with pytest.raises(NameError):
        bn(x)
    y, new = bn(x, axis_name=None)
    ref, ref_bn = BatchNorm(3)(x)
    np.testing.assert_allclose(y, ref)
    assert tree_allclose(new.running_mean, ref_bn.running_mean)


def test_eqstate_vmap_in_axes_and_kwargs():
    bn = BatchNorm(3)
    x, _ = data()
    # in_axes as in eqx.filter_vmap; the module given explicitly unmapped
    y, new = eqstate.vmap(lambda m, x: m(x), in_axes=(None, 0))(bn, x)
    ref, ref_bn = bn(x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    assert tree_allclose(new, ref_bn, rtol=1e-5, atol=1e-7)
    y, _ = eqstate.vmap(lambda m, *, x: m(x))(bn, x=x)
    np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-6)
    with pytest.raises(
        ValueError, match=r"eqstate\.vmap\(in_axes=\.\.\.\) must be an int, None, or a callable"
    ):
        eqstate.vmap(lambda m, x: m(x), in_axes=(None, "0"))(bn, x)


@pytest.mark.parametrize("mode", ["batch", "ema"])
def test_modes_match_equinox_per_example(mode):
    x_steps = [2.0 + 3.0 * jax.random.normal(jax.random.key(i), (6, 4, 5)) for i in range(3)]
    ref, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(4, axis_name="b", mode=mode, momentum=0.8)
    ours = BatchNorm(4, mode=mode, momentum=0.8)
    ref_call = jax.vmap(ref, axis_name="b", in_axes=(0, None), out_axes=(0, None))
    for x in x_steps:
        y_ref, state = ref_call(x, state)
        y, ours = eqstate.vmap(ours)(x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
        # and the batch-level call agrees
    ref_inf = jax.vmap(
        eqx.nn.inference_mode(ref), axis_name="b", in_axes=(0, None), out_axes=(0, None)
    )
    y_ref, _ = ref_inf(x_steps[0], state)
    y, _ = eqstate.eval(ours)(x_steps[0])
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


@settings(max_examples=12, deadline=None)
@given(
    n=st.integers(2, 5),
    c=st.integers(1, 4),
    spatial=st.lists(st.integers(1, 3), max_size=2),
    channels_last=st.booleans(),
    mode=st.sampled_from(["running", "batch", "ema"]),
    seed=st.integers(0, 2**16),
)
def test_per_example_batch_norm_equals_the_batch_call(n, c, spatial, channels_last, mode, seed):
    shape = (n, *spatial, c) if channels_last else (n, c, *spatial)
    x = 1.0 + 2.0 * jax.random.normal(jax.random.key(seed), shape)
    bn = BatchNorm(c, axis=-1 if channels_last else 1, mode=mode, momentum=0.5)
    y_batch, batch_bn = bn(x)
    y_example, example_bn = eqstate.vmap(bn)(x)
    np.testing.assert_allclose(y_example, y_batch, rtol=1e-4, atol=1e-4)
    assert tree_allclose(example_bn, batch_bn, rtol=1e-5, atol=1e-6)
