import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_allclose

import eqstate
from eqstate.nn import EMA, BatchNorm, Dropout


nnx = pytest.importorskip("flax.nnx")


def batches(shape, n=3, seed=0):
    keys = jax.random.split(jax.random.key(seed), n)
    return [2.0 + 3.0 * jax.random.normal(k, shape) for k in keys]


@pytest.mark.parametrize(("shape", "axis"), [((8, 5), 1), ((4, 5, 3, 3), 1), ((6, 2, 5), -1)])
def test_batch_norm_matches_flax_nnx(shape, axis):
    c = shape[axis]
    ours = BatchNorm(c, momentum=0.9, axis=axis)
    ref = nnx.BatchNorm(c, momentum=0.9, axis=axis, rngs=nnx.Rngs(0))
    for x in batches(shape):
        y, ours = ours(x)
        y_ref = ref(x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.running_mean, ref.mean[...], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(ours.running_var, ref.var[...], rtol=1e-5, atol=1e-6)
    x = batches(shape, seed=7)[0]
    y_eval, after = eqstate.eval(ours)(x)
    np.testing.assert_allclose(y_eval, ref(x, use_running_average=True), rtol=1e-5, atol=1e-5)
    assert tree_allclose(after, eqstate.eval(ours))  # inference changes nothing


def test_batch_norm_training_output_matches_equinox():
    x = batches((8, 5))[0]
    ref, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(5, axis_name="batch", mode="batch")
    y_ref, _ = jax.vmap(ref, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, state)
    y, _ = BatchNorm(5)(x)
    np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-5)


def test_batch_norm_defaults_and_options():
    bn = BatchNorm(3)
    assert bn.momentum == 0.99 and bn.eps == 1e-5
    np.testing.assert_array_equal(bn.running_var, np.ones(3))
    assert [k.__name__ for k in eqstate.kinds(bn)] == [
        "Param",
        "Param",
        "BatchStat",
        "BatchStat",
        "Param",
    ]
    plain = BatchNorm(3, affine=False)
    assert plain.weight is None and plain.bias is None
    x = batches((16, 3))[0]
    y, _ = plain(x)
    np.testing.assert_allclose(jnp.mean(y, axis=0), np.zeros(3), atol=1e-5)
    np.testing.assert_allclose(jnp.std(y, axis=0), np.ones(3), atol=1e-3)
    y_inf, same = bn(x, inference=True)
    assert same.running_mean is bn.running_mean or tree_allclose(same, bn)
    np.testing.assert_allclose(y_inf, x / np.sqrt(1 + 1e-5), rtol=1e-5)


def test_batch_norm_cross_device_statistics():
    x = batches((8, 4))[0]
    whole_y, whole = BatchNorm(4)(x)
    per_dev = jax.vmap(
        lambda bn, xs: bn(xs), in_axes=(None, 0), out_axes=(0, None), axis_name="dev"
    )
    y, bn = per_dev(BatchNorm(4, axis_name="dev"), x.reshape(2, 4, 4))
    np.testing.assert_allclose(y.reshape(8, 4), whole_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, whole.running_mean, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var, whole.running_var, rtol=1e-5)


def test_batch_norm_errors():
    with pytest.raises(
        ValueError,
        match=r"expects a batch of shape \(N, 3, \.\.\.\) with the features on axis 1, got shape \(3,\)",
    ):
        BatchNorm(3)(jnp.ones(3))
    with pytest.raises(ValueError, match=r"got shape \(2, 4\)"):
        BatchNorm(3)(jnp.ones((2, 4)))
    with pytest.raises(ValueError, match=r"momentum=\.\.\.\) must be in \[0, 1\]"):
        BatchNorm(3, momentum=1.5)


def test_dropout_keys_differ_per_step_and_reproduce_from_seed():
    x = jnp.ones(256)
    d = Dropout(0.5, key=jax.random.key(0))
    step = jax.jit(lambda d, x: d(x))
    y1, d1 = step(d, x)
    y2, _ = step(d1, x)
    assert not np.array_equal(y1, y2)
    y1_again, _ = step(Dropout(0.5, key=jax.random.key(0)), x)
    np.testing.assert_array_equal(y1, y1_again)
    assert set(np.unique(np.asarray(y1)).tolist()) == {0.0, 2.0}
    y_eval, d_eval = eqstate.eval(d)(x)
    np.testing.assert_array_equal(y_eval, x)
    np.testing.assert_array_equal(jax.random.key_data(d_eval.key), jax.random.key_data(d.key))
    raw = Dropout(0.5, key=jax.random.PRNGKey(0))
    _y_raw, raw1 = raw(x)
    assert raw1.key.dtype == jnp.uint32 and not np.array_equal(raw1.key, raw.key)
    with pytest.raises(ValueError, match=r"Dropout\(p=\.\.\.\) must be in \[0, 1\]"):
        Dropout(1.5, key=jax.random.key(0))


class Noisy(eqstate.Module):
    key: jax.Array = eqstate.Rng.field()

    @eqstate.mutating
    def __call__(self, x, axis_name=None):
        return x + jax.random.normal(eqstate.next_key(self, axis_name=axis_name), x.shape)


def test_next_key_under_vmap_per_example_keys():
    n = Noisy(jax.random.key(0))
    xs = jnp.zeros((4, 3))
    # an unbatched key folded with the vmap index
    ys, new = jax.vmap(lambda x: n(x, "batch"), axis_name="batch", out_axes=(0, None))(xs)
    assert len({tuple(np.asarray(r).round(5)) for r in ys}) == 4
    assert new.key.shape == ()
    # a batch of modules, each with its own key
    many = jax.vmap(Noisy)(jax.random.split(jax.random.key(1), 4))
    ys, many2 = jax.vmap(lambda m, x: m(x))(many, xs)
    assert len({tuple(np.asarray(r).round(5)) for r in ys}) == 4
    assert many2.key.shape == (4,)


def test_next_key_errors():
    class Two(eqstate.Module):
        a: jax.Array = eqstate.Rng.field()
        b: jax.Array = eqstate.Rng.field()

        @eqstate.mutating
        def draw(self):
            return eqstate.next_key(self)

    class NoKey(eqstate.Module):
        @eqstate.mutating
        def draw(self):
            return eqstate.next_key(self)

    with pytest.raises(ValueError, match="of Two: it has several: a, b"):
        Two(jax.random.key(0), jax.random.key(1)).draw()
    with pytest.raises(ValueError, match="of NoKey: it has no Rng field"):
        NoKey().draw()
    with pytest.raises(RuntimeError, match="inside a `@eqstate.mutating` method of Noisy"):
        eqstate.next_key(Noisy(jax.random.key(0)))


def test_traced_inference_flag_under_plain_jit():
    x = batches((8, 3))[0]
    model = (BatchNorm(3), Dropout(0.5, key=jax.random.key(0)))

    @jax.jit  # traces the `inference` bools too
    def run(model, x):
        bn, drop = model
        h, bn = bn(x)
        y, drop = drop(h)
        return y, (bn, drop)

    for mode in (eqstate.train, eqstate.eval):
        y, new = run(mode(model), x)
        y_ref, new_ref = eqx.filter_jit(run)(mode(model), x)
        np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
        assert tree_allclose(new, jax.tree_util.tree_map(jnp.asarray, new_ref))


def test_ema_tracks_parameters_and_is_never_trained():
    model = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    ema = EMA(model, decay=0.5)
    assert eqstate.filter(ema, eqstate.Param) is not None
    assert jax.tree_util.tree_leaves(ema.parameters()) == []
    shifted = jax.tree_util.tree_map(lambda x: x + 2.0, model)
    _, ema1 = ema.update(shifted)
    np.testing.assert_allclose(ema1.params.weight, model.weight + 1.0, rtol=1e-6)
    _, ema2 = ema1.update(shifted)
    np.testing.assert_allclose(ema2.apply(model).weight, model.weight + 1.5, rtol=1e-6)
    assert int(ema2.step) == 2
    warm = EMA(model, decay=0.999, warmup=True)
    _, warm1 = warm.update(shifted)  # decay 0.1 at step 0
    np.testing.assert_allclose(warm1.params.weight, model.weight + 1.8, rtol=1e-5)


def test_train_eval_switch_equinox_layers_too():
    model = (BatchNorm(2), Dropout(key=jax.random.key(0)), eqx.nn.Dropout(0.5))
    ev = eqstate.eval(model)
    assert all(m.inference for m in ev)
    assert not any(m.inference for m in eqstate.train(ev))
