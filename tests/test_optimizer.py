import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import count_traces, tree_allclose

import eqstate


class Net(eqstate.Module):
    linear: eqx.nn.Linear
    bn: eqstate.nn.BatchNorm
    head: jax.Array

    def __init__(self, key):
        self.linear = eqx.nn.Linear(3, 4, key=key)
        self.bn = eqstate.nn.BatchNorm(4)
        self.head = jnp.ones(4)

    @eqstate.mutating
    def __call__(self, x):
        h, self.bn = self.bn(jax.vmap(self.linear)(x))
        return h @ self.head


def loss_fn(model, x, y):
    pred, model = model(x)
    return jnp.mean((pred - y) ** 2), model


# optax itself mixes Python floats with int32 step counts, which strict promotion rejects.
pytestmark = pytest.mark.usefixtures("standard_promotion")

X = jax.random.normal(jax.random.key(1), (16, 3))
Y = jnp.sum(X, axis=1)
vg = eqstate.value_and_grad(loss_fn, has_aux=True)


def test_sgd_step_matches_manual_and_leaves_state_alone():
    model = Net(jax.random.key(0))
    opt = eqstate.Optimizer(optax.sgd(0.1), model)
    (_, new_model), grads = vg(model, X, Y)
    stepped, opt2 = opt.update(grads, new_model)
    np.testing.assert_allclose(stepped.head, new_model.head - 0.1 * grads.head, rtol=1e-6)
    assert stepped.bn.running_mean is new_model.bn.running_mean
    assert int(opt2.step) == 1 and int(opt.step) == 0


def test_weight_decay_never_decays_running_statistics():
    model = Net(jax.random.key(0))
    # statistics far from zero, so decay would show
    stats = eqx.tree_at(lambda m: m.bn.running_mean, model, jnp.full(4, 5.0))
    opt = eqstate.Optimizer(optax.adamw(1e-1, weight_decay=10.0), stats)
    zero_grads = jax.tree_util.tree_map(jnp.zeros_like, stats.parameters())
    new, _ = opt.update(zero_grads, stats)
    np.testing.assert_array_equal(new.bn.running_mean, np.full(4, 5.0))
    np.testing.assert_array_equal(new.bn.running_var, np.ones(4))
    assert not np.allclose(new.head, stats.head)  # parameters did decay
    # gradients for state (as eqx.filter_grad gives them) are ignored
    all_grads = eqx.filter_grad(lambda m: loss_fn(m, X, Y)[0])(stats)
    assert all_grads.bn.running_mean is not None
    new, _ = opt.update(all_grads, stats)
    np.testing.assert_array_equal(new.bn.running_mean, np.full(4, 5.0))


def test_round_trip_through_jit_and_serialisation(tmp_path):
    model = Net(jax.random.key(0))
    tx = optax.adam(1e-2)
    opt = eqstate.Optimizer(tx, model)

    @count_traces
    def step(model, opt, x, y):
        (loss, model), grads = vg(model, x, y)
        model, opt = opt.update(grads, model)
        return model, opt, loss

    jstep = eqx.filter_jit(step)
    losses = []
    for _ in range(5):
        model, opt, loss = jstep(model, opt, X, Y)
        losses.append(float(loss))
    assert step.traces == 1 and int(opt.step) == 5
    assert losses[-1] < losses[0]
    path = tmp_path / "opt.eqx"
    eqx.tree_serialise_leaves(path, opt)
    fresh = eqstate.Optimizer(tx, Net(jax.random.key(9)))
    loaded = eqx.tree_deserialise_leaves(path, fresh)
    assert tree_allclose(loaded.opt_state, opt.opt_state) and int(loaded.step) == 5
    assert isinstance(loaded.opt_state[0], optax.ScaleByAdamState)
    # built from the same transformation, the two optimizers have one structure
    assert jax.tree_util.tree_structure(fresh) == jax.tree_util.tree_structure(opt)
    # the loaded optimizer continues exactly like the original
    a = jstep(model, opt, X, Y)
    b = jstep(model, loaded, X, Y)
    assert tree_allclose(a, b)
    assert step.traces == 1


def _labels(params):
    return jax.tree_util.tree_map(lambda x: "head" if x.ndim == 1 else "body", params)


TRANSFORMS = {
    "chain": optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2)),
    "multi_transform": optax.multi_transform(
        {"head": optax.sgd(1e-2), "body": optax.adam(1e-2)}, _labels
    ),
    "multisteps": optax.MultiSteps(optax.adam(1e-2), every_k_schedule=2),
    "masked_decay": optax.adamw(
        1e-2, weight_decay=1e-1, mask=lambda p: jax.tree_util.tree_map(lambda x: x.ndim > 1, p)
    ),
}


@pytest.mark.parametrize("name", sorted(TRANSFORMS))
def test_every_optax_transformation(name):
    model = Net(jax.random.key(0))
    opt = eqstate.Optimizer(TRANSFORMS[name], model)
    step = eqx.filter_jit(lambda m, o: o.update(vg(m, X, Y)[1], m))
    first_loss = float(vg(model, X, Y)[0][0])
    for _ in range(6):
        model, opt = step(model, opt)
    assert float(vg(model, X, Y)[0][0]) < first_loss
    assert int(opt.step) == 6


def test_extra_args_reduce_on_plateau_and_lbfgs():
    model = Net(jax.random.key(0))
    tx = optax.chain(optax.sgd(1e-2), optax.contrib.reduce_on_plateau(patience=1))
    opt = eqstate.Optimizer(tx, model)
    (loss, _), grads = vg(model, X, Y)
    _new, opt = opt.update(grads, model, value=loss)
    assert int(opt.step) == 1

    params_model = eqstate.eval(model)  # fixed running statistics: a deterministic loss
    opt = eqstate.Optimizer(optax.lbfgs(), params_model)

    def value_fn(params):
        return loss_fn(params_model.update(params), X, Y)[0]

    m = params_model
    for _ in range(5):
        (loss, _), grads = vg(m, X, Y)
        m, opt = opt.update(grads, m, value=loss, grad=grads, value_fn=value_fn)
    assert float(loss_fn(m, X, Y)[0]) < float(loss_fn(params_model, X, Y)[0])


def test_errors():
    model = Net(jax.random.key(0))
    with pytest.raises(TypeError, match="expects an optax GradientTransformation"):
        eqstate.Optimizer("adam", model)
    opt = eqstate.Optimizer(optax.sgd(0.1), model)
    grads = eqx.tree_at(lambda g: g.head, model.parameters(), None)
    with pytest.raises(ValueError, match=r"grads has no gradient at \.head"):
        opt.update(grads, model)
    with pytest.raises(ValueError, match="Optimizer.update: grads does not have the structure"):
        opt.update({"head": jnp.ones(4)}, model)
