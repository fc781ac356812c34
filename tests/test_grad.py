import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import eqstate


class Scaled(eqstate.Module):
    w: jax.Array
    n: jax.Array  # an integer parameter: never differentiated
    scale: jax.Array = eqstate.State.field(default=3.0)
    derived: jax.Array = eqstate.State.field(default=0.0)
    act: object = jax.nn.relu

    @eqstate.mutating
    def __call__(self, x):
        self.derived = jnp.sum(self.w) * 2.0  # state computed from parameters
        return jnp.sum(self.act(x * self.w) * self.scale)


def loss_fn(model, x):
    y, model = model(x)
    return y, model


def test_grad_excludes_state_ints_and_non_arrays():
    m = Scaled(jnp.ones(3), jnp.array([1, 2]))
    (loss, m2), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(m, jnp.arange(3.0))
    assert float(loss) == pytest.approx(9.0)
    np.testing.assert_allclose(grads.w, 3.0 * np.arange(3.0))
    assert grads.scale is None and grads.derived is None
    assert grads.n is None and grads.act is None
    assert float(m2.derived) == 6.0 and float(m.derived) == 0.0


def test_grad_and_wrt_filter():
    m = Scaled(jnp.ones(3), jnp.array([1, 2]))
    g = eqstate.grad(lambda m, x: m(x)[0])(m, jnp.ones(3))
    np.testing.assert_allclose(g.w, 3.0 * np.ones(3))
    g, aux = eqstate.grad(loss_fn, has_aux=True, wrt=eqstate.State)(m, jnp.ones(3))
    assert g.w is None and float(g.scale) == pytest.approx(3.0)
    assert isinstance(aux, Scaled)
    by_path = eqstate.grad(
        lambda m, x: m(x)[0], wrt=lambda path, kind, leaf: jax.tree_util.keystr(path) == ".w"
    )(m, jnp.ones(3))
    assert by_path.scale is None and by_path.w is not None
    with pytest.raises(TypeError, match="wrt=: 3 is not a filter"):
        eqstate.grad(loss_fn, wrt=3)(m, jnp.ones(3))


def test_no_gradient_flows_out_of_state():
    m = Scaled(jnp.ones(3), jnp.array([1, 2]))

    def through_state(model, x):
        _, model = model(x)
        return model.derived  # depends on w, but only through a State assignment

    g = eqstate.grad(through_state)(m, jnp.ones(3))
    np.testing.assert_array_equal(g.w, np.zeros(3))


def test_works_under_filter_jit_and_jit():
    m = Scaled(jnp.ones(3), jnp.array([1, 2]))
    f = eqx.filter_jit(eqstate.value_and_grad(loss_fn, has_aux=True))
    (loss, _), grads = f(m, jnp.arange(3.0))
    np.testing.assert_allclose(grads.w, 3.0 * np.arange(3.0))
    assert float(loss) == pytest.approx(9.0)


@pytest.mark.parametrize("fn", [eqstate.grad, eqstate.value_and_grad])
def test_wrt_that_selects_nothing_is_an_error(fn):
    m = Scaled(jnp.ones(3), jnp.array([1, 2]))
    with pytest.raises(
        ValueError,
        match=r"eqstate\.(value_and_)?grad: wrt=eqstate\.Rng matches no inexact-array .* leaf of "
        r"the model \(Scaled\), so there is nothing to differentiate\. Its array leaves are: "
        r"\.w \(Param, float32\[3\]\), \.n \(Param, int32\[2\]\), \.scale \(State, float32\[\]\).*"
        r"Pass a `wrt=` filter",
    ):
        fn(lambda m: m(jnp.ones(3))[0], wrt=eqstate.Rng)(m)
    ints = Scaled(jnp.array([1, 2, 3]), jnp.array([1, 2]))  # no float parameter at all
    with pytest.raises(ValueError, match=r"wrt=eqstate\.Param matches no inexact-array"):
        fn(lambda m: 0.0)(ints)
    with pytest.raises(
        ValueError, match=r"wrt=is_array matches no .* It has no array leaves at all"
    ):
        fn(lambda m: 0.0, wrt=eqx.is_array)({"a": 1.0, "b": None})
    # a one-argument Equinox filter function selects
    _, g = eqstate.value_and_grad(lambda m: m(jnp.ones(3))[0], wrt=eqx.is_inexact_array)(m)
    assert g.scale is not None and g.w is not None and g.n is None


def test_a_forgotten_has_aux_is_named():
    class Scale(eqstate.Module):
        w: jax.Array

    def loss_fn(model, x):
        return jnp.sum(model.w * x), model

    for transform, where in ((eqstate.value_and_grad, "value_and_grad"), (eqstate.grad, "grad")):
        with pytest.raises(
            TypeError,
            match=rf"eqstate\.{where}: the function returned a tuple of 2 \(\w+, Scale\), not a scalar loss.*has_aux=True",
        ):
            transform(loss_fn)(Scale(jnp.ones(3)), jnp.ones(3))
