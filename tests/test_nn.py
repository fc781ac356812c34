import os
import subprocess
import sys

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


def test_batch_norm_per_example_under_named_vmap_matches_the_batch():
    # Equinox's convention: under jax.vmap with the layer unmapped, a call is per example
    x = batches((8, 4))[0]
    whole_y, whole = BatchNorm(4)(x)
    per_example = jax.vmap(
        lambda bn, xs: bn(xs), in_axes=(None, 0), out_axes=(0, None), axis_name="dev"
    )
    y, bn = per_example(BatchNorm(4, axis_name="dev"), x)
    np.testing.assert_allclose(y, whole_y, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(bn.running_mean, whole.running_mean, rtol=1e-5)
    np.testing.assert_allclose(bn.running_var, whole.running_var, rtol=1e-5)


_CROSS_DEVICE = """
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import PartitionSpec as P
from eqstate.nn import BatchNorm

x = jax.random.normal(jax.random.key(0), (8, 4)) * 3 + 1
whole_y, whole = BatchNorm(4)(x)
mesh = jax.make_mesh((2,), ("dev",))
step = jax.jit(jax.shard_map(
    lambda bn, xs: bn(xs), mesh=mesh, in_specs=(P(), P("dev")), out_specs=(P("dev"), P()))
)
y, bn = step(BatchNorm(4, axis_name="dev"), jax.device_put(x, jax.NamedSharding(mesh, P("dev"))))
np.testing.assert_allclose(y, whole_y, rtol=1e-5, atol=1e-5)
np.testing.assert_allclose(bn.running_var, whole.running_var, rtol=1e-5)
# the same model trains on one device when the call unbinds the axis
y1, bn1 = bn(x, axis_name=None)
np.testing.assert_allclose(bn1.running_mean, 0.99 * bn.running_mean + 0.01 * x.mean(0), rtol=1e-5)
print("ok")
"""


def test_batch_norm_cross_device_statistics():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _CROSS_DEVICE], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]


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


def test_batch_norm_refuses_what_it_cannot_normalise():
    bn = BatchNorm(3)
    with pytest.raises(
        TypeError,
        match=r"BatchNorm: x has dtype int32, but batch normalisation needs a floating-point "
        r"input .* `bn\(x\.astype\(jnp\.float32\)\)`",
    ):
        bn(jnp.ones((4, 3), jnp.int32))
    with pytest.raises(
        ValueError,
        match=r"BatchNorm in training got a batch of shape \(1, 3\): one value per feature, so "
        r"its variance is 0.*`running_var` would decay to 0.*`eqstate\.eval\(model\)`",
    ):
        bn(jnp.ones((1, 3)))
    # one example with spatial axes has several values per feature; inference is fine
    _, after = BatchNorm(3)(jnp.arange(12.0).reshape(1, 3, 4))
    assert float(after.running_var[0]) > 0.99
    y, _ = bn(jnp.ones((1, 3)), inference=True)
    assert y.shape == (1, 3)
    y, _ = eqstate.eval(bn)(jnp.ones((1, 3)))
    # per example inside jax.vmap with no axis to reduce over: say what to do instead
    per_example = (
        r"BatchNorm was called per example .* no mapped axis to take its batch statistics "
        r"over\. Map the model with `eqstate\.vmap\(model\)\(xs\)`.*`bn\(x, axis_name='batch'\)`"
    )
    with pytest.raises(ValueError, match=per_example):
        jax.vmap(lambda x: bn(x)[0])(jnp.ones((4, 3)))
    with pytest.raises(ValueError, match=r"a single example\. Call it on the whole batch"):
        bn(jnp.ones(3))
    with pytest.raises(ValueError, match=r"got shape \(4, 5\)\. Set `axis=` to the feature axis"):
        bn(jnp.ones((4, 5)))


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"num_features": 3.0},
            TypeError,
            r"num_features=\.\.\.\) must be a positive int, .* got 3\.0 \(float\)\. Pass e\.g\. `BatchNorm\(3\)`",
        ),
        ({"num_features": True}, TypeError, r"num_features=\.\.\.\) must be a positive int"),
        (
            {"num_features": 0},
            ValueError,
            r"num_features=\.\.\.\) must be a positive int, .* got 0 \(int\)",
        ),
        (
            {"num_features": 3, "momentum": "0.9"},
            TypeError,
            r"BatchNorm\(momentum=\.\.\.\) must be a number in \[0, 1\], got '0\.9' \(str\)",
        ),
        (
            {"num_features": 3, "eps": -1.0},
            ValueError,
            r"BatchNorm\(eps=\.\.\.\) must be non-negative",
        ),
        (
            {"num_features": 3, "eps": None},
            TypeError,
            r"BatchNorm\(eps=\.\.\.\) must be a non-negative number",
        ),
        (
            {"num_features": 3, "axis": 1.0},
            TypeError,
            r"BatchNorm\(axis=\.\.\.\) must be an int \(the feature axis",
        ),
        (
            {"num_features": 3, "dtype": jnp.int32},
            TypeError,
            r"BatchNorm\(dtype=\.\.\.\) must be a floating dtype .* got int32",
        ),
    ],
)
def test_batch_norm_constructor_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        BatchNorm(**kwargs)


def test_batch_norm_accepts_numpy_ints():
    bn = BatchNorm(np.int64(3), axis=np.int32(-1), dtype=jnp.bfloat16)
    assert bn.running_mean.shape == (3,) and bn.axis == -1 and type(bn.axis) is int
    assert bn.running_mean.dtype == jnp.bfloat16


def test_dropout_refuses_what_it_cannot_drop():
    d = Dropout(0.5, key=jax.random.key(0))
    with pytest.raises(
        TypeError,
        match=r"Dropout: x has dtype int32, but dropout scales the kept values by 1 / \(1 - p\).*"
        r"`drop\(x\.astype\(jnp\.float32\)\)`",
    ):
        d(jnp.ones(4, jnp.int32))
    with pytest.raises(
        TypeError,
        match=r"Dropout\(key=\.\.\.\) expects a PRNG key, got 0 \(int\)\. Make one from a seed: "
        r"`Dropout\(p, key=jax\.random\.key\(0\)\)`",
    ):
        Dropout(0.5, key=0)
    with pytest.raises(TypeError, match=r"expects a PRNG key, got an array float32\[2\]"):
        Dropout(0.5, key=jnp.zeros(2))
    with pytest.raises(TypeError, match=r"Dropout\(p=\.\.\.\) must be a Python number in \[0, 1\]"):
        Dropout(jnp.asarray(0.5), key=jax.random.key(0))


def test_dropout_per_example_without_an_axis_is_an_error():
    d = Dropout(0.5, key=jax.random.key(0))
    xs = jnp.ones((8, 16))
    with pytest.raises(
        ValueError,
        match=r"Dropout was called per example inside `jax\.vmap` .* no mapped axis to fold "
        r"its key over, so every example would get the same mask\. Map the model with "
        r"`eqstate\.vmap\(model\)\(xs\)`",
    ):
        jax.vmap(lambda x: d(x)[0])(xs)
    with pytest.raises(ValueError, match="same mask"):  # under jit and grad too
        jax.jit(jax.grad(lambda xs: jnp.sum(jax.vmap(lambda x: d(x)[0])(xs))))(xs)
    # in inference nothing is drawn, so vmapping is fine
    ys, _ = jax.vmap(lambda x: eqstate.eval(d)(x), out_axes=(0, None))(xs)
    np.testing.assert_array_equal(ys, xs)
    # a batch of Dropout modules, each with its own key, is fine
    many = jax.vmap(lambda k: Dropout(0.5, key=k))(jax.random.split(jax.random.key(0), 8))
    ys, _ = jax.vmap(lambda m, x: m(x))(many, xs)
    assert len({tuple(np.asarray(r)) for r in ys}) == 8
    # and on the whole batch, every example gets its own mask
    ys, _ = d(xs)
    assert len({tuple(np.asarray(r)) for r in ys}) == 8


def test_ema_of_bfloat16_parameters_keeps_moving():
    model = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    low = jax.tree_util.tree_map(
        lambda x: x.astype(jnp.bfloat16) if eqx.is_inexact_array(x) else x, model
    )
    target = jax.tree_util.tree_map(lambda x: x + 1 if eqx.is_inexact_array(x) else x, low)
    ema = EMA(low, decay=0.999)
    step = jax.jit(lambda e, m: e.update(m)[1])
    for _ in range(3000):
        ema = step(ema, target)
    moved = ema.apply(low)
    assert moved.weight.dtype == jnp.bfloat16  # the model's dtype; the average is float32
    np.testing.assert_allclose(
        np.asarray(moved.weight, np.float32), np.asarray(low.weight, np.float32) + 0.95, atol=0.02
    )


def test_ema_refuses_models_of_other_shapes_and_trees_to_put_back():
    model = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    ema = EMA(model, decay=0.5)
    halved = eqx.tree_at(lambda m: m.weight, model, model.weight.astype(jnp.complex64))
    fix = r"build the EMA from the model you train: `ema = eqstate\.nn\.EMA\(model, decay=\.\.\.\)`"
    with pytest.raises(
        ValueError,
        match=r"EMA\.update: the model's leaf at \.weight is complex64\[2, 2\], but the average "
        r"holds float32\[2, 2\] there\..*" + fix,
    ):
        ema.update(halved)
    with pytest.raises(
        ValueError, match=r"EMA\.apply: the model's leaf at \.weight is complex64\[2, 2\]"
    ):
        ema.apply(halved)
    wide = eqx.tree_at(lambda m: m.bias, model, jnp.zeros(5))
    with pytest.raises(
        ValueError,
        match=r"EMA\.update: the model's leaf at \.bias is float32\[5\], but the average holds float32\[2\]",
    ):
        ema.update(wide)
    with pytest.raises(ValueError, match=r"EMA\.apply: the model's leaf at \.bias is float32\[5\]"):
        ema.apply(wide)
    frozen = eqx.tree_at(lambda m: m.bias, model, jnp.zeros(2, jnp.int32))
    with pytest.raises(
        ValueError,
        match=r"leaf at \.bias is int32\[2\], not a leaf that wrt=eqstate\.Param selects",
    ):
        ema.update(frozen)
    with pytest.raises(
        ValueError, match=r"EMA\.update: the average does not have the structure of the model"
    ):
        ema.update({"weight": model.weight})
    with pytest.raises(
        TypeError,
        match=r"EMA\.update\(model\) moves the average towards a model, but it was given an EMA "
        r"tree .* use `eqstate\.update\(module, tree\)`, e\.g\. `ema = eqstate\.update\(ema, tree\)`",
    ):
        ema.update(ema.states())
    with pytest.raises(
        ValueError, match=r"EMA: wrt=eqstate\.State matches no inexact-array .* nothing to average"
    ):
        EMA(model, wrt=eqstate.State)
    with pytest.raises(TypeError, match=r"EMA\(decay=\.\.\.\) must be a number in \[0, 1\]"):
        EMA(model, decay="0.99")
    with pytest.raises(ValueError, match=r"EMA\(decay=\.\.\.\) must be a number in \[0, 1\]"):
        EMA(model, decay=1.5)
    # a one-argument filter as wrt=
    both = EMA(model, wrt=eqx.is_inexact_array)
    assert both.params.weight is not None and both.params.bias is not None


@pytest.mark.parametrize(
    ("dtype", "offset", "scale"), [(jnp.bfloat16, 30.0, 1.0), (jnp.float32, 1000.0, 0.1)]
)
def test_batch_norm_statistics_do_not_cancel(dtype, offset, scale):
    x = offset + scale * jax.random.normal(jax.random.key(0), (256, 4))
    y, bn = BatchNorm(4, dtype=dtype, eps=0.0)(x.astype(dtype))
    assert y.dtype == dtype and bn.running_var.dtype == dtype
    np.testing.assert_allclose(np.std(np.asarray(y, np.float32), axis=0), 1.0, atol=0.05)


def test_dropout_call_key_as_in_equinox():
    drop = Dropout(0.5, key=jax.random.key(0))
    x = jnp.ones((4, 16))
    y1, same = drop(x, key=jax.random.key(1))
    y2, _ = drop(x, key=jax.random.key(1))
    y3, _ = drop(x, key=jax.random.key(2))
    np.testing.assert_array_equal(y1, y2)
    assert not np.array_equal(y1, y3)
    # the stored stream does not move
    np.testing.assert_array_equal(jax.random.key_data(same.key), jax.random.key_data(drop.key))
    # eqstate.nn.Sequential passes its split keys on
    seq = eqstate.nn.Sequential([Dropout(0.5, key=jax.random.key(0))])
    a, _ = seq(x, key=jax.random.key(1))
    b, _ = seq(x, key=jax.random.key(2))
    assert not np.array_equal(a, b)
    with pytest.raises(
        TypeError, match=r"Dropout\(x, key=\.\.\.\) expects a PRNG key .* got 3 \(int\)"
    ):
        drop(x, key=3)


def test_an_inference_field_left_unset_is_named():
    class Inner(eqstate.Module):
        w: jax.Array
        inference: bool = False

        def __init__(self):
            self.w = jnp.ones(2)

    class Outer(eqstate.Module):
        inner: Inner
        bn: BatchNorm

    model = Outer(Inner(), BatchNorm(2))
    for fn in (eqstate.eval, eqstate.train):
        with pytest.raises(
            TypeError,
            match=r"eqstate\.(eval|train): Inner at \.inner has an `inference` field that its `__init__` never sets",
        ):
            fn(model)
