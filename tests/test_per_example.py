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
        match=r"eqstate\.vmap: output\[1\]\.total is returned unmapped \(it is inside a module.*differs between examples.*jax\.lax\.psum",
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
    with pytest.raises(
        ValueError,
        match=r"BatchNorm: axis_name 'devices' is not a mapped axis here.*`layer\(x, axis_name=None\)`",
    ):
        bn(x)
    eqstate.eval(bn)(x)  # inference reduces over nothing, so needs no axis
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
    with pytest.raises(
        ValueError,
        match=r"eqstate\.vmap: nothing to map.*keyword arguments are unmapped by default.*in_axes=\{'x': 0\}",
    ):
        eqstate.vmap(lambda m, *, x: m(x))(bn, x=x)
    y, _ = eqstate.vmap(lambda m, *, x: m(x), in_axes={"x": 0})(bn, x=x)
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


class ScanDrop(eqstate.Module):
    drop: Dropout

    @eqstate.mutating
    def __call__(self, x):  # x: (T, D), one example
        def body(d, xt):
            y, d = d(xt)
            return d, y

        self.drop, ys = jax.lax.scan(body, self.drop, x)
        return ys


class CheckpointedNorm(eqstate.Module):
    bn: BatchNorm

    @eqstate.mutating
    def __call__(self, x):
        y, self.bn = jax.checkpoint(lambda bn, x: bn(x))(self.bn, x)
        return y


class JittedNorm(eqstate.Module):
    bn: BatchNorm

    @eqstate.mutating
    def __call__(self, x):
        y, self.bn = eqx.filter_jit(lambda bn, x: bn(x))(self.bn, x)
        return y


def test_layers_inside_scan_checkpoint_and_jit_still_run_per_example():
    # the tracers inside these show no batch axis; eqstate.vmap's axis is still bound
    ys, _ = eqstate.vmap(ScanDrop(Dropout(0.5, key=jax.random.key(0))))(jnp.ones((4, 3, 8)))
    assert len({tuple(np.asarray(r)) for r in ys[:, 0]}) == 4
    x = 1.0 + jax.random.normal(jax.random.key(0), (6, 4, 4, 4))  # (N, C, H, W), C == H
    ref, ref_bn = BatchNorm(4)(x)
    for wrapper in (CheckpointedNorm, JittedNorm):
        y, new = eqstate.vmap(wrapper(BatchNorm(4)))(x)
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
        assert tree_allclose(new.bn, ref_bn, rtol=1e-5, atol=1e-6)


def test_an_ensemble_of_models_each_run_per_example():
    keys = jax.random.split(jax.random.key(0), 2)
    drops = eqx.filter_vmap(lambda k: Dropout(0.5, key=k))(keys)
    ys, _ = eqx.filter_vmap(lambda d, x: eqstate.vmap(d)(x))(drops, jnp.ones((2, 4, 6)))
    for member in ys:
        assert len({tuple(np.asarray(r)) for r in member}) == 4
    bns = eqx.filter_vmap(lambda _: BatchNorm(3))(jnp.arange(2))
    x = jax.random.normal(jax.random.key(1), (2, 5, 3))
    ys, new = eqx.filter_vmap(lambda bn, x: eqstate.vmap(bn)(x))(bns, x)
    for i in range(2):
        ref, ref_bn = BatchNorm(3)(x[i])
        np.testing.assert_allclose(ys[i], ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(new.running_var[i], ref_bn.running_var, rtol=1e-5)
    # an ensemble mapped by eqstate.vmap itself: each member normalises its own batch
    ys, _ = eqstate.vmap(lambda bn, x: bn(x), in_axes=(0, 0), out_axes=0)(
        bns, jax.random.normal(jax.random.key(2), (2, 5, 3))
    )
    assert ys.shape == (2, 5, 3)


def test_an_inner_unnamed_vmap_is_still_refused():
    class TimeDrop(eqstate.Module):
        drop: Dropout

        @eqstate.mutating
        def __call__(self, x):  # (T, D)
            y, self.drop = jax.vmap(lambda xt: self.drop(xt), out_axes=(0, None))(x)
            return y

    m = TimeDrop(Dropout(0.5, key=jax.random.key(0)))
    with pytest.raises(ValueError, match="same mask"):
        eqstate.vmap(m)(jnp.ones((2, 3, 6)))


def test_next_key_in_a_method_without_mapped_arguments_differs_per_example():
    class Sampler(eqstate.Module):
        key: jax.Array = eqstate.Rng.field()

        @eqstate.mutating
        def sample(self, shape):
            return jax.random.normal(eqstate.next_key(self), shape)

    class WithNoise(eqstate.Module):
        noise: Sampler

        @eqstate.mutating
        def __call__(self, x):
            eps, self.noise = self.noise.sample(x.shape)
            return x + eps

    ys, _ = eqstate.vmap(WithNoise(Sampler(jax.random.key(0))))(jnp.zeros((3, 2)))
    assert len({tuple(np.asarray(r)) for r in ys}) == 3
    ys, _ = eqstate.vmap(lambda s: s.sample((2,)), axis_size=3)(Sampler(jax.random.key(0)))
    assert len({tuple(np.asarray(r)) for r in ys}) == 3


def test_device_axis_and_example_axis_together():
    # a layer's own axis (devices, here simulated by an outer named vmap) adds to the
    # example axis of eqstate.vmap inside
    drop = Dropout(0.5, key=jax.random.key(0), axis_name="dev")
    x = jnp.ones((2, 4, 64))
    ys, new = jax.vmap(lambda x: eqstate.vmap(drop)(x), axis_name="dev", out_axes=(0, None))(x)
    assert len({tuple(np.asarray(r)) for r in ys.reshape(8, 64)}) == 8
    bn = BatchNorm(6, axis_name="dev")
    x = jax.random.normal(jax.random.key(1), (2, 4, 6))
    ys, new = jax.vmap(lambda x: eqstate.vmap(bn)(x), axis_name="dev", out_axes=(0, None))(x)
    ref, ref_bn = BatchNorm(6)(x.reshape(8, 6))
    np.testing.assert_allclose(ys.reshape(8, 6), ref, rtol=1e-5, atol=1e-5)
    assert tree_allclose(new.running_var, ref_bn.running_var, rtol=1e-5)


def test_vmap_axes_follow_jax_and_equinox():
    xs = jnp.arange(12.0).reshape(4, 3)
    # None means unmapped, as in jax.vmap
    np.testing.assert_allclose(
        eqstate.vmap(lambda x: x.sum(), in_axes=None, axis_size=4)(xs), jnp.full(4, 66.0)
    )
    with pytest.raises(ValueError):
        eqstate.vmap(lambda x: x, out_axes=None)(xs)
    # keyword arguments are unmapped by default (key=, inference=)
    seq = eqstate.nn.Sequential([eqx.nn.Linear(3, 3, key=jax.random.key(0)), eqx.nn.Dropout(0.5)])
    ys, _ = eqstate.vmap(seq)(xs, key=jax.random.key(1))
    assert ys.shape == (4, 3)
    y, _ = eqstate.vmap(BatchNorm(3))(xs, inference=jnp.array(True))
    np.testing.assert_allclose(y, xs / np.sqrt(1 + 1e-5), rtol=1e-6)
    # the dict form of eqx.filter_vmap, keyword arguments included
    f = eqstate.vmap(lambda x, scale: x * scale, in_axes={"scale": 0})
    np.testing.assert_allclose(f(xs, jnp.arange(4.0)), xs * jnp.arange(4.0)[:, None])
    np.testing.assert_allclose(f(xs, scale=jnp.arange(4.0)), xs * jnp.arange(4.0)[:, None])
    with pytest.raises(
        ValueError, match=r"in_axes=\{\.\.\.\}\) names 'sclae', which is not a parameter"
    ):
        eqstate.vmap(lambda x, scale: x * scale, in_axes={"sclae": 0})(xs, 1.0)
    with pytest.raises(
        ValueError, match=r"in_axes=\.\.\.\) has 1 entries but the call has 2 positional"
    ):
        eqstate.vmap(lambda x, y: x + y, in_axes=(0,))(xs, xs)
    np.testing.assert_allclose(
        eqstate.vmap(lambda x, y: x + y, in_axes=[0, None])(xs, xs[0]), xs + xs[0]
    )
    with pytest.raises(ValueError, match=r"must be an int, None, or a callable .* got True"):
        eqstate.vmap(lambda x: x, in_axes=True)(xs)


def test_per_example_batch_of_one_is_refused_in_training():
    with pytest.raises(ValueError, match=r"one value per feature, so its variance is 0"):
        eqstate.vmap(BatchNorm(3))(jnp.array([[1.0, 2.0, 3.0]]))
    y, _ = eqstate.vmap(eqstate.eval(BatchNorm(3)))(jnp.array([[1.0, 2.0, 3.0]]))
    assert y.shape == (1, 3)
