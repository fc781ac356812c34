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


class Wide(eqstate.Module):
    w: jax.Array
    bn: eqstate.nn.BatchNorm

    def __init__(self, width):
        self.w = jnp.ones(width)
        self.bn = eqstate.nn.BatchNorm(2)


def wide_loss(m):
    return jnp.sum(m.w**2) + jnp.sum(m.bn.weight)


def test_model_and_grads_of_other_shapes_are_errors():
    opt = eqstate.Optimizer(optax.adam(1e-2), Wide(3))
    narrow = Wide(1)
    with pytest.raises(
        ValueError,
        match=r"Optimizer\.update: the model's leaf at \.w is float32\[1\], but in the model "
        r"this optimizer was built from it is float32\[3\].*`opt = eqstate\.Optimizer\(tx, model\)`",
    ):
        opt.update(eqstate.grad(wide_loss)(narrow), narrow)
    with pytest.raises(
        ValueError,
        match=r"Optimizer\.update: grads at \.w is float32\[1\], but the model's leaf there is "
        r"float32\[3\]\. Pass the gradients of the model",
    ):
        opt.update(eqstate.grad(wide_loss)(narrow), Wide(3))
    half = eqx.tree_at(lambda m: m.bn.weight, Wide(3), jnp.ones(2, jnp.bfloat16))
    with pytest.raises(
        ValueError, match=r"leaf at \.bn\.weight is bfloat16\[2\], but .* it is float32\[2\]"
    ):
        opt.update(eqstate.grad(wide_loss)(Wide(3)), half)
    ints = eqx.tree_at(lambda m: m.w, Wide(3), jnp.ones(3, jnp.int32))
    with pytest.raises(
        ValueError,
        match=r"leaf at \.w is int32\[3\], not an inexact array that wrt=eqstate\.Param selects",
    ):
        opt.update(eqstate.grad(wide_loss)(Wide(3)), ints)
    # under jit too, at trace time; the right shapes still work
    step = eqx.filter_jit(lambda g, m, o: o.update(g, m))
    with pytest.raises(ValueError, match=r"leaf at \.w is float32\[1\]"):
        step(eqstate.grad(wide_loss)(narrow), narrow, opt)
    model, opt2 = step(eqstate.grad(wide_loss)(Wide(3)), Wide(3), opt)
    assert model.w.shape == (3,) and int(opt2.step) == 1
    assert hash(opt2.shapes) == hash(opt.shapes) and opt2.shapes == opt.shapes


def test_swapped_arguments_are_an_error():
    model = Net(jax.random.key(0))
    opt = eqstate.Optimizer(optax.sgd(0.1), model)
    (_, model), grads = vg(model, X, Y)
    swapped = r"the arguments look swapped\. The order is `opt\.update\(grads, model\)`"
    with pytest.raises(
        ValueError,
        match=r"Optimizer\.update: the `model` argument has None at \.bn\.running_mean, where "
        r"the `grads` argument has float32\[4\]; " + swapped,
    ):
        opt.update(model, grads)  # NNX's order
    all_grads = eqx.filter_grad(lambda m: loss_fn(m, X, Y)[0])(model)
    with pytest.raises(
        ValueError, match=r"has None at \.bn\.inference, where .* has False; " + swapped
    ):
        opt.update(model, all_grads)
    with pytest.raises(TypeError, match=r"the `model` argument is an Optimizer\. The order is"):
        opt.update(grads, opt)


def test_putting_a_tree_back_is_not_a_step():
    model = Net(jax.random.key(0))
    opt = eqstate.Optimizer(optax.adam(1e-2), model)
    put_back = r"To put a tree back into a module, use `eqstate\.update\(module, tree\)`"
    with pytest.raises(
        TypeError,
        match=r"Optimizer\.update\(grads, model\) applies one optimizer step, but it was given an "
        r"Optimizer tree as `grads`.*"
        + put_back
        + r", e\.g\. `opt = eqstate\.update\(opt, tree\)`",
    ):
        opt.update(opt.states())
    with pytest.raises(TypeError, match=put_back):
        opt.update(opt.states(), model)
    with pytest.raises(
        TypeError,
        match=r"Optimizer\.update needs the model: `model, opt = opt\.update\(grads, model\)`",
    ):
        opt.update(vg(model, X, Y)[1])


def test_wrt_that_selects_nothing_and_one_argument_filters():
    model = Net(jax.random.key(0))
    with pytest.raises(
        ValueError,
        match=r"eqstate\.Optimizer: wrt=eqstate\.Rng matches no inexact-array .* nothing to "
        r"optimise\. Its array leaves are: \.linear\.weight \(Param, float32\[4, 3\]\)",
    ):
        eqstate.Optimizer(optax.sgd(0.1), model, wrt=eqstate.Rng)
    with pytest.raises(TypeError, match=r"eqstate\.Optimizer wrt=: the callable filter <lambda>"):
        eqstate.Optimizer(optax.sgd(0.1), model, wrt=lambda a, b: True)
    # Equinox's one-argument filters work as wrt=: here every float leaf, state included
    opt = eqstate.Optimizer(optax.sgd(1.0), model, wrt=eqx.is_inexact_array)
    ones = jax.tree_util.tree_map(jnp.ones_like, eqx.filter(model, eqx.is_inexact_array))
    new, _ = opt.update(ones, model)
    np.testing.assert_allclose(new.bn.running_var, np.zeros(4))


def injected(lr=0.1):
    return optax.inject_hyperparams(optax.sgd)(learning_rate=lr)


def test_hyperparams_change_through_with_hyperparams():
    model = Net(jax.random.key(0))
    opt = eqstate.Optimizer(injected(), model)
    (_, model), grads = vg(model, X, Y)

    @count_traces
    def step(opt, grads, model):
        return opt.update(grads, model)

    jstep = eqx.filter_jit(step)
    slow = opt.with_hyperparams(learning_rate=0.01)
    assert float(opt.opt_state.hyperparams["learning_rate"]) == pytest.approx(0.1)
    assert float(slow.opt_state.hyperparams["learning_rate"]) == pytest.approx(0.01)
    assert slow.opt_state.hyperparams["learning_rate"].dtype == jnp.float32
    fast_model, _ = jstep(opt, grads, model)
    slow_model, slow = jstep(slow, grads, model)
    np.testing.assert_allclose(slow_model.head, model.head - 0.01 * grads.head, rtol=1e-5)
    np.testing.assert_allclose(fast_model.head, model.head - 0.1 * grads.head, rtol=1e-5)
    assert step.traces == 1  # same structure: no recompilation
    assert float(slow.opt_state.hyperparams["learning_rate"]) == pytest.approx(0.01)  # it stays
    # inside jit, with a traced value; optax's tree utilities read the view
    halved = eqx.filter_jit(lambda o, lr: o.with_hyperparams(learning_rate=lr))(opt, 0.05)
    assert float(optax.tree_utils.tree_get(halved.opt_state, "learning_rate")) == pytest.approx(
        0.05
    )
    # the read-only view is still a pytree with the state's leaves
    assert len(jax.tree_util.tree_leaves(opt.opt_state)) == len(opt.opt_leaves)
    # only hyperparams are frozen: moments of a dict model stay dicts, like the params
    params = {"w": jnp.ones(3)}
    plain = eqstate.Optimizer(optax.inject_hyperparams(optax.adam)(learning_rate=0.1), params)
    mu = plain.opt_state.inner_state[0].mu
    assert type(mu) is dict and jax.tree_util.tree_map(jnp.add, mu, params)["w"].shape == (3,)
    # nested in a chain: set wherever it is injected
    chained = eqstate.Optimizer(optax.chain(optax.clip(1.0), injected()), model)
    chained = chained.with_hyperparams(learning_rate=0.5)
    assert float(chained.opt_state[1].hyperparams["learning_rate"]) == pytest.approx(0.5)


def test_opt_state_is_read_only_and_with_hyperparams_errors():
    model = Net(jax.random.key(0))
    opt = eqstate.Optimizer(injected(), model)
    fix = r"`opt = opt\.with_hyperparams\(learning_rate=\.\.\.\)`"
    with pytest.raises(
        TypeError, match=r"opt\.opt_state is a read-only view: .* silently lost\. .*" + fix
    ):
        opt.opt_state.hyperparams["learning_rate"] = 0.01  # optax's idiom, lost on a copy
    with pytest.raises(TypeError, match=fix):
        opt.opt_state.hyperparams.update(learning_rate=0.01)
    with pytest.raises(TypeError, match=r"with_hyperparams\(name=\.\.\.\)"):
        opt.opt_state.hyperparams.clear()
    with pytest.raises(
        ValueError,
        match=r"Optimizer\.with_hyperparams: lr is not among the hyperparameters this optimizer "
        r"holds in its state; it holds learning_rate\. .*optax\.inject_hyperparams",
    ):
        opt.with_hyperparams(lr=0.01)
    with pytest.raises(ValueError, match=r"learning_rate is not among .* it holds none"):
        eqstate.Optimizer(optax.sgd(0.1), model).with_hyperparams(learning_rate=0.01)
    scheduled = eqstate.Optimizer(injected(optax.linear_schedule(0.1, 0.0, 10)), model)
    with pytest.raises(
        ValueError, match=r"learning_rate follows a schedule .* would be overwritten"
    ):
        scheduled.with_hyperparams(learning_rate=0.01)
    with pytest.raises(
        ValueError, match=r"learning_rate must be a value of shape \(\), .* got shape \(2,\)"
    ):
        opt.with_hyperparams(learning_rate=jnp.ones(2))


class F64(eqstate.Module):
    w: np.ndarray


@pytest.mark.usefixtures("standard_promotion")
def test_float64_numpy_leaves_are_their_float32_selves():
    model = F64(np.random.default_rng(0).normal(size=3))  # float64, x64 off
    loss = lambda m: jnp.sum(jnp.asarray(m.w) ** 2)  # noqa: E731
    opt = eqstate.Optimizer(optax.sgd(0.1), model)
    m, o = model, opt
    for _ in range(2):
        m, o = o.update(eqstate.grad(loss)(m), m)
    jitted = eqstate.jit(lambda m, o: o.update(eqstate.grad(loss)(m), m))
    jitted(model, opt)
    ema = eqstate.nn.EMA(model)
    ema.update(model)
    ema.apply(model)
    jax.grad(lambda p: loss(model.update(p)))(model.parameters())


@pytest.mark.usefixtures("standard_promotion")
def test_with_hyperparams_refuses_lossy_values():
    model = F64(np.ones(3, np.float32))
    opt = eqstate.Optimizer(optax.inject_hyperparams(optax.sgd)(learning_rate=1), model)
    with pytest.raises(
        TypeError,
        match=r"learning_rate holds int32 values .* given 0\.5; the cast would lose information.*`learning_rate=1\.0` rather than `learning_rate=1`",
    ):
        opt.with_hyperparams(learning_rate=0.5)
    with pytest.raises(TypeError, match=r"given None; it is not a number"):
        opt.with_hyperparams(learning_rate=None)
