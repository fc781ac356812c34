"""`eqstate.nn.SpectralNorm` against its oracle, `eqx.nn.SpectralNorm`."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import count_traces, tree_allclose
from hypothesis import given, settings, strategies as st

import eqstate
from eqstate.nn import BatchNorm
from eqstate.nn._spectral_norm import SpectralNorm


def tol(dtype=jnp.float32):
    return {"rtol": 1e-2, "atol": 1e-2} if dtype == jnp.bfloat16 else {"rtol": 1e-5, "atol": 1e-6}


def linear(key=1, dtype=None):
    return eqx.nn.Linear(3, 5, key=jax.random.key(key), dtype=dtype)


def conv(key=1):
    return eqx.nn.Conv2d(2, 4, 3, key=jax.random.key(key))


LAYERS = {
    "linear": (linear, (3,)),
    "conv2d": (conv, (2, 6, 6)),
}


def both(make, *args, key=0, scramble=True, **kwargs):
    """Ours and Equinox's, from the same layer and key; Equinox's with its state.

    With `scramble`, both get the same random vectors instead of the initial ones:
    those have converged (15 steps at initialisation), so a missed or extra step would
    hardly show.
    """
    layer = make()
    k = jax.random.key(key)
    ours = SpectralNorm(layer, "weight", *args, key=k, **kwargs)
    ref, state = eqx.nn.make_with_state(eqx.nn.SpectralNorm)(
        layer, "weight", *args, key=k, **kwargs
    )
    if scramble:
        ours, state = scrambled(ours, ref, state, key + 1)
    return ours, ref, state


def scrambled(ours, ref, state, seed):
    ku, kv = jax.random.split(jax.random.key(seed))
    u = jax.random.normal(ku, ours.u.shape, ours.u.dtype)
    v = jax.random.normal(kv, ours.v.shape, ours.v.dtype)
    return eqx.tree_at(lambda m: (m.u, m.v), ours, (u, v)), state.set(ref.uv_index, (u, v))


def clone(state):
    """A copy of an Equinox state (Equinox invalidates a state once it is used)."""
    leaves, treedef = jax.tree_util.tree_flatten(state)
    return jax.tree_util.tree_unflatten(treedef, leaves)


def uv(ref, state):
    return state.get(ref.uv_index)


def inputs(shape, n=4, seed=3):
    return list(jax.random.normal(jax.random.key(seed), (n, *shape)))


def assert_same_state(ours, ref, state, dtype=jnp.float32):
    u, v = uv(ref, state)
    assert ours.u.dtype == u.dtype and ours.v.dtype == v.dtype
    np.testing.assert_allclose(ours.u.astype(jnp.float32), u.astype(jnp.float32), **tol(dtype))
    np.testing.assert_allclose(ours.v.astype(jnp.float32), v.astype(jnp.float32), **tol(dtype))


# initialisation


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize(("iters", "eps"), [(1, 1e-12), (0, 1e-12), (3, 1e-3)])
def test_initial_vectors_match_equinox(name, iters, eps):
    ours, ref, state = both(LAYERS[name][0], iters, eps, scramble=False)
    assert_same_state(ours, ref, state)
    assert ours.weight_name == "weight" and ours.num_power_iterations == iters
    assert ours.eps == eps and ours.inference is False


def test_defaults_and_kinds():
    layer = linear()
    sn = SpectralNorm(layer, "weight", key=jax.random.key(0))
    assert (sn.num_power_iterations, sn.eps, sn.inference) == (1, 1e-12, False)
    assert sn.layer is layer
    assert sn.u.shape == (5,) and sn.v.shape == (3,)
    kinds = {jax.tree_util.keystr(p): k for p, k in zip(_paths(sn), eqstate.kinds(sn))}
    assert kinds == {
        ".layer.weight": eqstate.Param,
        ".layer.bias": eqstate.Param,
        ".u": eqstate.State,
        ".v": eqstate.State,
        ".inference": eqstate.Param,
    }
    params, states = sn.parameters(), sn.states()
    assert params.u is None and params.v is None and params.layer.weight is layer.weight
    assert states.u is sn.u and states.layer.weight is None


def _paths(tree):
    return [p for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_raw_uint32_key_gives_the_same_vectors():
    a = SpectralNorm(linear(), "weight", key=jax.random.key(4))
    b = SpectralNorm(linear(), "weight", key=jax.random.PRNGKey(4))
    assert tree_allclose(a, b, rtol=0, atol=0)


# training and inference, step by step


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("iters", [0, 1, 2])
def test_training_matches_equinox_over_steps(name, iters):
    make, shape = LAYERS[name]
    ours, ref, state = both(make, iters)
    for x in inputs(shape):
        y, ours = ours(x)
        y_ref, state = ref(x, state)
        np.testing.assert_allclose(y, y_ref, **tol())
        assert_same_state(ours, ref, state)
    assert ours.layer is ref.layer or tree_allclose(ours.layer, ref.layer)  # un-normalised


@pytest.mark.parametrize("name", LAYERS)
def test_state_is_interchangeable_with_equinox(name):
    """Each library continues from the other's vectors and gets the same numbers."""
    make, shape = LAYERS[name]
    ours, ref, state = both(make)
    solo_ours, solo_state = ours, clone(state)
    for i, x in enumerate(inputs(shape, n=6)):
        if i % 2:  # Equinox's step, from our vectors
            state = state.set(ref.uv_index, (ours.u, ours.v))
            y, state = ref(x, state)
            ours = eqx.tree_at(lambda m: (m.u, m.v), ours, uv(ref, state))
        else:  # our step, from Equinox's vectors
            ours = eqx.tree_at(lambda m: (m.u, m.v), ours, uv(ref, state))
            y, ours = ours(x)
            state = state.set(ref.uv_index, (ours.u, ours.v))
        y_solo, solo_ours = solo_ours(x)
        y_ref, solo_state = ref(x, solo_state)
        np.testing.assert_allclose(y, y_solo, **tol())
        np.testing.assert_allclose(y, y_ref, **tol())
        assert_same_state(solo_ours, ref, solo_state)
        assert_same_state(ours, ref, state)


def inference_variants(sn):
    """Every way to call `sn` in inference: `(y, new_sn)` for each."""
    x_fixed = {}

    def run(x):
        x_fixed["x"] = x
        return {
            "eqstate.eval": eqstate.eval(sn)(x),
            "inference_mode": eqx.nn.inference_mode(sn)(x),
            "call-time": sn(x, inference=True),
            "constructor": eqx.tree_at(lambda m: m.inference, sn, True)(x),
            "bool array": sn(x, inference=jnp.array(True)),
        }

    return run


@pytest.mark.parametrize("name", LAYERS)
def test_inference_matches_equinox_and_changes_nothing(name):
    make, shape = LAYERS[name]
    ours, ref, state = both(make)
    xs = inputs(shape)
    for x in xs[:2]:  # move the vectors away from their initial values first
        _, ours = ours(x)
        _, state = ref(x, state)
    ref_eval = eqx.nn.inference_mode(ref)
    for x in xs[2:]:
        y_ref, state_after = ref_eval(x, state)
        assert tree_allclose(uv(ref, state_after), uv(ref, state), rtol=0, atol=0)
        for how, (y, after) in inference_variants(ours)(x).items():
            np.testing.assert_allclose(y, y_ref, **tol(), err_msg=how)
            assert after.u is ours.u and after.v is ours.v, how
    # a training override on an inference module updates
    y, after = eqstate.eval(ours)(xs[0], inference=False)
    y_ref, state = ref(xs[0], state)
    np.testing.assert_allclose(y, y_ref, **tol())
    assert_same_state(after, ref, state)


def test_constructed_in_inference_mode():
    ours, ref, state = both(linear, inference=True)
    x = inputs((3,))[0]
    y, after = ours(x)
    y_ref, state_after = ref(x, state)
    np.testing.assert_allclose(y, y_ref, **tol())
    assert after.u is ours.u
    assert_same_state(after, ref, state_after)
    y, after = eqstate.train(ours)(x)
    y_ref, state_after = eqx.nn.inference_mode(ref, value=False)(x, state)
    np.testing.assert_allclose(y, y_ref, **tol())
    assert_same_state(after, ref, state_after)


def test_bfloat16_weight_keeps_bfloat16_state():
    ours, ref, state = both(lambda: linear(dtype=jnp.bfloat16), scramble=False)
    assert ours.u.dtype == jnp.bfloat16
    assert_same_state(ours, ref, state, jnp.bfloat16)
    ours, state = scrambled(ours, ref, state, 1)
    for x in inputs((3,), n=2):
        x = x.astype(jnp.bfloat16)
        y, ours = ours(x)
        y_ref, state = ref(x, state)
        assert y.dtype == y_ref.dtype == jnp.bfloat16
        np.testing.assert_allclose(y.astype(float), y_ref.astype(float), **tol(jnp.bfloat16))
        assert_same_state(ours, ref, state, jnp.bfloat16)


# gradients


def loss(sn, x):
    y, _ = sn(x)
    return jnp.sum(jnp.sin(y))


def loss_ref(sn, state, x):
    y, _ = sn(x, state)
    return jnp.sum(jnp.sin(y))


@pytest.mark.parametrize("name", LAYERS)
@pytest.mark.parametrize("inference", [False, True])
def test_gradients_match_equinox(name, inference):
    make, shape = LAYERS[name]
    ours, ref, state = both(make)
    x0, x = inputs(shape, n=2)
    _, ours = ours(x0)
    _, state = ref(x0, state)
    ours = eqx.nn.inference_mode(ours, inference)
    ref = eqx.nn.inference_mode(ref, inference)
    grads_ref = eqx.filter_grad(loss_ref)(ref, state, x)
    grads = eqx.filter_grad(loss)(ours, x)
    assert tree_allclose(grads.layer, grads_ref.layer, rtol=1e-4, atol=1e-6)
    # the vectors are state: no gradient reaches them
    np.testing.assert_array_equal(grads.u, np.zeros_like(ours.u))
    np.testing.assert_array_equal(grads.v, np.zeros_like(ours.v))
    kind_aware = eqstate.grad(loss)(ours, x)
    assert kind_aware.u is None and kind_aware.v is None
    assert tree_allclose(kind_aware.layer, grads_ref.layer, rtol=1e-4, atol=1e-6)


def test_gradient_goes_through_sigma():
    """Like Equinox's: the normalised weight is differentiated through sigma too, so the
    gradient differs from that of a fixed scale."""
    ours, _, _ = both(linear)
    x = inputs((3,))[0]
    _, ours = ours(x)
    sn = eqstate.eval(ours)
    grads = eqx.filter_grad(loss)(sn, x)
    sigma = jnp.einsum("i,ij,j->", sn.u, sn.layer.weight, sn.v)
    fixed = eqx.filter_grad(lambda lin: jnp.sum(jnp.sin(lin(x))))(
        eqx.tree_at(lambda m: m.weight, sn.layer, sn.layer.weight / sigma)
    )
    assert not np.allclose(grads.layer.weight, fixed.weight / sigma)


# jit and vmap


def test_filter_jit_matches_equinox_and_compiles_once():
    ours, ref, state = both(conv)

    @eqx.filter_jit
    @count_traces
    def step(sn, x):
        return sn(x)

    for x in inputs((2, 6, 6)):
        y, ours = step(ours, x)
        y_ref, state = ref(x, state)
        np.testing.assert_allclose(y, y_ref, **tol())
        assert_same_state(ours, ref, state)
    assert step.__wrapped__.traces == 1


def test_plain_jit_with_traced_inference_flag_selects_the_branch():
    ours, ref, state = both(linear)
    x = inputs((3,))[0]
    step = jax.jit(lambda sn, x: sn(x))
    y, trained = step(ours, x)  # `inference` is a traced bool[] here
    y_ref, state_trained = ref(x, clone(state))
    np.testing.assert_allclose(y, y_ref, **tol())
    assert_same_state(trained, ref, state_trained)

    y, same = step(eqstate.eval(ours), x)
    y_ref, _ = ref(x, state, inference=True)
    np.testing.assert_allclose(y, y_ref, **tol())
    assert_same_state(same, ref, state)

    by_arg = jax.jit(lambda sn, x, flag: sn(x, inference=flag))
    for flag, ref_state in [(True, state), (False, state_trained)]:
        y, after = by_arg(ours, x, jnp.array(flag))
        y_ref, _ = ref(x, state, inference=flag)
        np.testing.assert_allclose(y, y_ref, **tol())
        assert_same_state(after, ref, ref_state)
    # the flag comes back as a concrete bool[] array; calling again works eagerly
    y, again = trained(x)
    y_ref, state_again = ref(x, state_trained)
    np.testing.assert_allclose(y, y_ref, **tol())
    assert_same_state(again, ref, state_again)


def test_vmap_per_example_returns_unmapped_state():
    ours, ref, state = both(linear)
    xs = jnp.stack(inputs((3,), n=5))
    y, new = jax.vmap(ours, out_axes=(0, None))(xs)
    y_ref, state_ref = jax.vmap(ref, in_axes=(0, None), out_axes=(0, None))(xs, state)
    assert y.shape == (5, 5) and new.u.shape == (5,)
    np.testing.assert_allclose(y, y_ref, **tol())
    assert_same_state(new, ref, state_ref)
    _, single = ours(xs[0])  # the state does not depend on x
    assert tree_allclose(new, single)
    y_eval, _ = jax.vmap(eqstate.eval(new), out_axes=(0, None))(xs)
    y_ref, _ = jax.vmap(eqx.nn.inference_mode(ref), in_axes=(0, None), out_axes=(0, None))(
        xs, state_ref
    )
    np.testing.assert_allclose(y_eval, y_ref, **tol())


def test_vmap_over_an_ensemble_of_modules():
    keys = jax.random.split(jax.random.key(0), 3)
    make = lambda k: SpectralNorm(eqx.nn.Linear(3, 4, key=k), "weight", key=k)  # noqa: E731
    ensemble = eqx.filter_vmap(make)(keys)
    xs = jnp.stack(inputs((3,), n=3))
    ys, ensemble = eqx.filter_vmap(lambda sn, x: sn(x))(ensemble, xs)
    for i, k in enumerate(keys):
        y, one = make(k)(xs[i])
        np.testing.assert_allclose(ys[i], y, **tol())
        np.testing.assert_allclose(ensemble.u[i], one.u, **tol())


# migration: Equinox's stateful.ipynb model


class NotebookModel(eqstate.Module):
    norm1: BatchNorm
    spectral_linear: SpectralNorm[eqx.nn.Linear]
    norm2: BatchNorm
    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear

    def __init__(self, ref, key):
        """The layers of Equinox's model `ref`; `key` as `ref`'s spectral norm had."""
        self.norm1 = BatchNorm(3)  # Equinox's defaults: momentum 0.99, eps 1e-5
        self.spectral_linear = SpectralNorm(ref.spectral_linear.layer, "weight", key=key)
        self.norm2 = BatchNorm(32)
        self.linear1 = ref.linear1
        self.linear2 = ref.linear2

    @eqstate.mutating
    def __call__(self, x):  # a batch
        x, self.norm1 = self.norm1(x)
        x, self.spectral_linear = jax.vmap(self.spectral_linear, out_axes=(0, None))(x)
        x = jax.nn.relu(x)
        x, self.norm2 = self.norm2(x)
        x = jax.vmap(self.linear1)(x)
        x = jax.nn.relu(x)
        return jax.vmap(self.linear2)(x)


class RefModel(eqx.Module):
    norm1: eqx.nn.BatchNorm
    spectral_linear: eqx.nn.SpectralNorm[eqx.nn.Linear]
    norm2: eqx.nn.BatchNorm
    linear1: eqx.nn.Linear
    linear2: eqx.nn.Linear

    def __init__(self, key):
        key1, key2, key3, key4 = jax.random.split(key, 4)
        self.norm1 = eqx.nn.BatchNorm(input_size=3, axis_name="batch", mode="batch")
        self.spectral_linear = eqx.nn.SpectralNorm(
            layer=eqx.nn.Linear(in_features=3, out_features=32, key=key1),
            weight_name="weight",
            key=key2,
        )
        self.norm2 = eqx.nn.BatchNorm(input_size=32, axis_name="batch", mode="batch")
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


def test_notebook_model_trains_as_in_equinox():
    key = jax.random.key(5678)
    ref_key, xkey = jax.random.split(key)
    _, key2, _, _ = jax.random.split(ref_key, 4)
    ref, state = eqx.nn.make_with_state(RefModel)(ref_key)
    model = NotebookModel(ref, key2)
    assert_same_state(model.spectral_linear, ref.spectral_linear, state)
    optim = optax.sgd(0.1)
    opt_ref = optim.init(eqx.filter(ref, eqx.is_inexact_array))
    opt = optim.init(model.parameters())
    xs = jax.random.normal(xkey, (4, 8, 3))
    ys = jnp.sin(xs)

    def loss_ref(m, s, x, y):
        pred, s = jax.vmap(m, axis_name="batch", in_axes=(0, None), out_axes=(0, None))(x, s)
        return jnp.mean((pred - y) ** 2), s

    def loss_ours(m, x, y):
        pred, m = m(x)
        return jnp.mean((pred - y) ** 2), m

    for x, y in zip(xs, ys):
        (value_ref, state), g_ref = eqx.filter_value_and_grad(loss_ref, has_aux=True)(
            ref, state, x, y
        )
        (value, model), g = eqstate.value_and_grad(loss_ours, has_aux=True)(model, x, y)
        np.testing.assert_allclose(value, value_ref, rtol=1e-5)
        for name in ("spectral_linear.layer", "linear1", "linear2"):
            ours_g, ref_g = g, g_ref
            for attr in name.split("."):
                ours_g, ref_g = getattr(ours_g, attr), getattr(ref_g, attr)
            assert tree_allclose(ours_g, ref_g, rtol=1e-4, atol=1e-6), name
        updates, opt_ref = optim.update(g_ref, opt_ref)
        ref = eqx.apply_updates(ref, updates)
        updates, opt = optim.update(g, opt)
        model = eqx.apply_updates(model, updates)
        assert_same_state(model.spectral_linear, ref.spectral_linear, state)
    assert tree_allclose(
        model.spectral_linear.layer, ref.spectral_linear.layer, rtol=1e-4, atol=1e-6
    )


# wrapped layers


class Counting(eqstate.Module):
    """An eqstate layer whose `__call__` is mutating."""

    weight: jax.Array
    calls: jax.Array = eqstate.State.field(default=0)

    @eqstate.mutating
    def __call__(self, x):
        self.calls += 1
        return self.weight @ x


def test_wrapped_mutating_layer_keeps_its_state_and_weight():
    w = jax.random.normal(jax.random.key(0), (4, 3))
    sn = SpectralNorm(Counting(w), "weight", key=jax.random.key(1))
    lin = eqx.tree_at(
        lambda m: m.weight, eqx.nn.Linear(3, 4, use_bias=False, key=jax.random.key(9)), w
    )
    plain = SpectralNorm(lin, "weight", key=jax.random.key(1))
    x = inputs((3,))[0]
    for step in (1, 2):
        y, sn = sn(x)
        y_plain, plain = plain(x)
        np.testing.assert_allclose(y, y_plain, **tol())
        assert int(sn.layer.calls) == step
        assert sn.layer.weight is w  # not the normalised weight


class KeyUser(eqx.Module):
    weight: jax.Array

    def __call__(self, x, *, key=None):
        y = self.weight @ x
        return y if key is None else y + jax.random.normal(key, y.shape)


class NoKey(eqx.Module):
    weight: jax.Array

    def __call__(self, x):
        return self.weight @ x


def test_key_is_passed_on_to_the_layer_when_given():
    w = jax.random.normal(jax.random.key(0), (4, 3))
    x, k = inputs((3,))[0], jax.random.key(7)
    sn = SpectralNorm(KeyUser(w), "weight", key=jax.random.key(1))
    y0, _ = sn(x)
    y1, _ = sn(x, key=k)
    np.testing.assert_allclose(y1 - y0, jax.random.normal(k, (4,)), **tol())
    no_key = SpectralNorm(NoKey(w), "weight", key=jax.random.key(1))
    y, _ = no_key(x)  # a layer without `key` is called as `layer(x)`
    np.testing.assert_allclose(y, y0, **tol())
    linear_sn = SpectralNorm(linear(), "weight", key=jax.random.key(1))
    np.testing.assert_allclose(linear_sn(x, key=k)[0], linear_sn(x)[0], rtol=0, atol=0)


class Parent(eqstate.Module):
    sn: SpectralNorm[eqx.nn.Linear]

    @eqstate.mutating
    def __call__(self, x):
        y, self.sn = self.sn(x)
        return y

    @eqstate.mutating
    def forgetful(self, x):
        y, _ = self.sn(x)
        return y


def test_inside_a_parent_model():
    sn = SpectralNorm(linear(), "weight", key=jax.random.key(0))
    parent = Parent(sn)
    x = inputs((3,))[0]
    y, parent = parent(x)
    y_direct, sn = sn(x)
    np.testing.assert_allclose(y, y_direct, **tol())
    assert tree_allclose(parent.sn, sn)
    with pytest.raises(RuntimeError, match="dropped an update"):
        parent.forgetful(x)
    eqstate.eval(parent).forgetful(x)  # nothing to drop in inference


# errors


def test_errors_name_the_argument():
    key = jax.random.key(0)
    lin = linear()
    with pytest.raises(
        AttributeError, match=r"no attribute 'kernel'.*'weight' \(float32\[5, 3\]\), 'bias'"
    ):
        SpectralNorm(lin, "kernel", key=key)
    with pytest.raises(ValueError, match=r"Linear.bias has shape \(5,\).*at least 2 dimensions"):
        SpectralNorm(lin, "bias", key=key)
    with pytest.raises(TypeError, match=r"Linear.bias is None.*floating-point array"):
        SpectralNorm(eqx.nn.Linear(3, 5, use_bias=False, key=key), "bias", key=key)
    with pytest.raises(TypeError, match=r"Linear.in_features is 3 .*'weight' \(float32"):
        SpectralNorm(lin, "in_features", key=key)
    with pytest.raises(TypeError, match=r"an array int32\[2, 2\].*floating"):
        SpectralNorm(NoKey(jnp.ones((2, 2), jnp.int32)), "weight", key=key)
    with pytest.raises(TypeError, match=r"weight_name=...\) must be a string"):
        SpectralNorm(lin, 0, key=key)  # pyright: ignore[reportArgumentType]
    for bad in (-1, 1.5, True, "1"):
        with pytest.raises(
            (TypeError, ValueError), match=r"num_power_iterations=...\) must be a non-negative int"
        ):
            SpectralNorm(lin, "weight", bad, key=key)  # pyright: ignore[reportArgumentType]
    for bad in (-1e-12, float("nan"), float("inf"), "1e-12", None, True):
        with pytest.raises(
            (TypeError, ValueError), match=r"eps=...\) must be a finite non-negative number"
        ):
            SpectralNorm(lin, "weight", eps=bad, key=key)  # pyright: ignore[reportArgumentType]
    for bad in (0, jnp.zeros(2), None):
        with pytest.raises(TypeError, match=r"SpectralNorm\(key=...\) expects a PRNG key"):
            SpectralNorm(lin, "weight", key=bad)  # pyright: ignore[reportArgumentType]
    sn = SpectralNorm(lin, "weight", key=key)
    with pytest.raises(TypeError, match=r"__call__\(x, key=...\) expects a PRNG key or None"):
        sn(jnp.ones(3), key=0)  # pyright: ignore[reportArgumentType]


def test_a_failed_call_leaves_the_module_unchanged():
    sn = SpectralNorm(linear(), "weight", key=jax.random.key(0))
    u = sn.u
    with pytest.raises(TypeError):
        sn(jnp.ones(4))  # the Linear rejects the shape
    assert sn.u is u


# property: random shapes


@settings(max_examples=12, deadline=None)
@given(
    out=st.integers(1, 5),
    rest=st.lists(st.integers(1, 3), min_size=1, max_size=3),
    iters=st.integers(0, 3),
    seed=st.integers(0, 2**16),
    inference=st.booleans(),
    scramble=st.booleans(),
)
def test_matches_equinox_on_random_shapes(out, rest, iters, seed, inference, scramble):
    class Dense(eqx.Module):  # a kernel of any rank: y = W(out, -1) @ x
        weight: jax.Array

        def __call__(self, x):
            return self.weight.reshape(self.weight.shape[0], -1) @ x

    kw, kx, ks = jax.random.split(jax.random.key(seed), 3)
    layer = Dense(jax.random.normal(kw, (out, *rest)))
    ours = SpectralNorm(layer, "weight", iters, inference=inference, key=ks)
    ref, state = eqx.nn.make_with_state(eqx.nn.SpectralNorm)(
        layer, "weight", iters, inference=inference, key=ks
    )
    assert_same_state(ours, ref, state)
    if scramble:
        ours, state = scrambled(ours, ref, state, seed + 1)
    for x in jax.random.normal(kx, (2, int(np.prod(rest)))):
        y, ours = ours(x)
        y_ref, state = ref(x, state)
        np.testing.assert_allclose(y, y_ref, rtol=1e-4, atol=1e-5)
        assert_same_state(ours, ref, state)
