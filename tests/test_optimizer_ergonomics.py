"""Optimizer ergonomics: rebuilt optimizers hit the jit cache, retrace messages name the
changed field on one line, hyperparameters change without recompiling, labels by kind,
a short repr."""

import copy
import pickle
import timeit

import cloudpickle
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import count_traces, tree_allclose

import eqstate


# optax itself mixes Python floats with int32 step counts, which strict promotion rejects.
pytestmark = pytest.mark.usefixtures("standard_promotion")


class NoDecay(eqstate.Param):
    pass


class Net(eqstate.Module):
    w: jax.Array
    b: jax.Array = NoDecay.field()
    bn: eqstate.nn.BatchNorm

    def __init__(self):
        self.w = jnp.arange(6.0).reshape(2, 3) / 10
        self.b = jnp.array([0.5, -0.5])
        self.bn = eqstate.nn.BatchNorm(2)

    @eqstate.mutating
    def __call__(self, x):
        h, self.bn = self.bn(x @ self.w.T)
        return h + self.b  # after the normalisation, so that `b` has a gradient


X = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)


def loss(model, x):
    out, model = model(x)
    return jnp.mean((out - 1.0) ** 2) + jnp.sum(model.w**2), model


vg = eqstate.value_and_grad(loss, has_aux=True)


def step(model, opt, x):
    (value, model), grads = vg(model, x)
    model, opt = opt.update(grads, model)
    return model, opt, value


def one_line(message: str) -> str:
    """The reason inside a `max_traces` error."""
    reason = message.split("max_traces=1. ", 1)[1].split(" Each trace compiles again", 1)[0]
    assert "\n" not in reason and len(reason) < 300, reason
    return reason


# --- rebuilt optimizers ----------------------------------------------------------------


SETTINGS = {
    "adam": lambda lr: optax.adam(lr),
    "adamw_masked": lambda lr: optax.adamw(lr, mask=eqstate.labels({NoDecay: False}, default=True)),
    "chain": lambda lr: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(lr, momentum=0.9)),
    "injected": lambda lr: optax.inject_hyperparams(optax.adam)(learning_rate=lr),
    "multi_transform": lambda lr: optax.multi_transform(
        {"a": optax.adam(lr), "b": optax.sgd(lr)}, eqstate.labels({NoDecay: "b"}, default="a")
    ),
    "schedule": lambda lr: optax.adam(optax.cosine_decay_schedule(lr, 100)),
    "array_lr": lambda lr: optax.sgd(np.float32(lr)),
}


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_rebuilt_optimizer_does_not_recompile(name):
    make = SETTINGS[name]
    model = Net()
    jstep = eqstate.jit(step, max_traces=1)
    model, opt, _ = jstep(model, eqstate.Optimizer(make(1e-3), model), X)
    # a notebook cell run again: a new transformation with the same settings
    rebuilt = eqstate.Optimizer(make(1e-3), model)
    assert rebuilt.tx == opt.tx and hash(rebuilt.tx) == hash(opt.tx)
    _, opt2, _ = jstep(model, rebuilt, X)
    assert jstep.traces == 1 and int(opt2.step) == 1
    # eqx.filter_jit compares static values the same way
    counted = count_traces(step)
    fstep = eqx.filter_jit(counted)
    fstep(model, eqstate.Optimizer(make(1e-3), model), X)
    fstep(model, eqstate.Optimizer(make(1e-3), model), X)
    assert counted.traces == 1
    # different settings are a different optimizer, and the error names the field
    other = eqstate.Optimizer(make(1e-2), model)
    assert other.tx != opt.tx
    with pytest.raises(RuntimeError, match=r"args\[1\]\.tx changed") as info:
        jstep(model, other, X)
    one_line(str(info.value))


def test_retrace_message_names_the_setting_that_changed():
    model = Net()
    jstep = eqstate.jit(step, max_traces=1)
    jstep(model, eqstate.Optimizer(optax.adam(1e-3), model), X)
    with pytest.raises(RuntimeError) as info:
        jstep(model, eqstate.Optimizer(optax.adam(1e-2), model), X)
    assert one_line(str(info.value)) == (
        "The static field args[1].tx changed: a different optax transformation "
        "(chain(scale_by_adam, scale); in scale, step_size: -0.001 -> -0.01)."
    )
    with pytest.raises(RuntimeError) as info:
        jstep(model, eqstate.Optimizer(optax.sgd(1e-3), model), X)
    assert one_line(str(info.value)) == (
        "The static field args[1].tx changed: a different optax transformation "
        "(chain(scale_by_adam, scale) -> chain(identity, scale))."
    )
    injected = eqstate.jit(step, max_traces=1)
    tx = optax.inject_hyperparams(optax.adam)
    injected(model, eqstate.Optimizer(tx(learning_rate=1e-3), model), X)
    with pytest.raises(RuntimeError) as info:
        injected(model, eqstate.Optimizer(tx(learning_rate=1e-3, b1=0.8), model), X)
    assert "in inject_hyperparams, numeric_hps['b1']: 0.9 -> 0.8" in one_line(str(info.value))
    # by keyword too; another static field; a long static value is cut where it differs
    with pytest.raises(RuntimeError) as info:
        jstep(model, opt=eqstate.Optimizer(optax.adam(1e-3), model, wrt=NoDecay), x=X)
    reason = one_line(str(info.value))
    assert reason.startswith("The static field args[1].wrt changed: from <class")
    assert jstep.traces == 1


class Config(eqstate.Module):
    w: jax.Array
    names: tuple = eqx.field(static=True)


def test_long_static_values_are_cut_to_where_they_differ():
    f = eqstate.jit(lambda c: c.w * len(c.names), max_traces=1)
    names = tuple(f"layer_{i}" for i in range(200))
    f(Config(jnp.ones(2), names))
    with pytest.raises(RuntimeError) as info:
        f(Config(jnp.ones(2), (*names[:100], "other", *names[101:])))
    reason = one_line(str(info.value))
    assert reason.startswith("The static field args[0].names changed: a tuple differing: …")
    assert "'layer_100'" in reason and "'other'" in reason
    # a non-module node with long static data is cut too
    g = eqstate.jit(lambda t: t[0], max_traces=1)
    g((jnp.ones(2), {f"key_{i}": 0 for i in range(100)}))
    with pytest.raises(RuntimeError) as info:
        g((jnp.ones(2), {f"key_{i}": 0 for i in range(1, 101)}))
    one_line(str(info.value))


def test_structural_equality_rules():
    assert optax.adam(1e-3) != optax.adam(1e-3)  # optax's own: by identity
    a = eqstate.Optimizer(optax.adam(1e-3), Net()).tx
    assert a == eqstate.Optimizer(optax.adam(1e-3), Net()).tx
    assert isinstance(a, optax.GradientTransformationExtraArgs)
    # numbers compare with their type: 1 and 1.0 compile separately under jit too
    sgd = lambda lr: eqstate.Optimizer(optax.sgd(lr), Net()).tx  # noqa: E731
    assert sgd(1) != sgd(1.0)
    assert sgd(np.float32(0.1)) == sgd(np.float32(0.1)) != sgd(np.float32(0.2))
    assert sgd(jnp.asarray(0.1)) == sgd(jnp.asarray(0.1)) != sgd(jnp.asarray(0.1, jnp.bfloat16))
    # a function reaching an unknown object compares by identity, as a whole: a rebuilt
    # one is different even with the same object (which may have changed meanwhile)
    marker = object()
    tx = lambda m: optax.chain(optax.sgd(0.1), optax.stateless(lambda u, p: (m, u)[1]))  # noqa: E731
    wrap = lambda t: eqstate.Optimizer(t, Net()).tx  # noqa: E731
    assert wrap(tx(marker)) != wrap(tx(marker))
    same = tx(marker)
    assert wrap(same) == wrap(same)

    # a recursive closure terminates
    def make():
        def f(u, p):
            return (u, f)[0]

        return optax.stateless(f)

    assert wrap(make()) == wrap(make())
    # cached hash: cheap on every call
    assert timeit.timeit(lambda: hash(a), number=1000) < 0.05


def test_optimizer_copies_and_pickles():
    model = Net()
    opt = eqstate.Optimizer(optax.adamw(1e-3), model)
    assert copy.deepcopy(opt).tx == opt.tx and copy.copy(opt).tx == opt.tx
    # optax's closures need cloudpickle, as before; the copy is a working optimizer.
    # (A dict model: the structure of a BatchNorm does not survive pickling in Equinox.)
    params = {"w": jnp.ones(3), "b": jnp.zeros(2)}
    grads = {"w": jnp.full(3, 0.5), "b": jnp.ones(2)}
    opt = eqstate.Optimizer(optax.adamw(1e-3), params)
    loaded = cloudpickle.loads(cloudpickle.dumps(opt))
    (new_a, opt_a), (new_b, opt_b) = loaded.update(grads, params), opt.update(grads, params)
    assert tree_allclose(new_a, new_b) and tree_allclose(opt_a.opt_leaves, opt_b.opt_leaves)
    # a transformation of module-level functions pickles, and compares equal after
    plain = eqstate.Optimizer(optax.GradientTransformation(_init, _update), params)
    again = pickle.loads(pickle.dumps(plain))
    assert again.tx == plain.tx and again.tx.init is not plain.tx.init
    assert tree_allclose(again.update(grads, params), plain.update(grads, params))


def _init(params):
    return optax.EmptyState()


def _update(updates, state, params=None):
    return jax.tree_util.tree_map(lambda g: -0.1 * g, updates), state


# --- hyperparameters ---------------------------------------------------------------------


def test_learning_rate_changes_every_step_without_retrace():
    model = Net()
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=0.1)
    opt = eqstate.Optimizer(tx, model)
    jstep = eqstate.jit(step, max_traces=1)
    model, opt, _ = jstep(model, opt, X)  # as built, then with new values
    for lr in (0.1, 0.05, 0.01, 0.2):
        opt = opt.with_hyperparams(learning_rate=lr)
        (_, before), grads = vg(model, X)
        model, opt, _ = jstep(model, opt, X)
        np.testing.assert_allclose(model.w, before.w - lr * grads.w, rtol=1e-5, atol=1e-7)
        assert float(opt.opt_state.hyperparams["learning_rate"]) == pytest.approx(lr)
    assert jstep.traces == 1 and int(opt.step) == 5

    # or inside the step, from an array argument
    @eqstate.jit(max_traces=1)
    def step_lr(model, opt, x, lr):
        return step(model, opt.with_hyperparams(learning_rate=lr), x)

    for lr in (0.3, 0.02):
        (_, before), grads = vg(model, X)
        model, opt, _ = step_lr(model, opt, X, jnp.float32(lr))
        np.testing.assert_allclose(model.w, before.w - lr * grads.w, rtol=1e-5, atol=1e-7)
    assert step_lr.traces == 1


def test_adamw_learning_rate_and_weight_decay_schedule_by_hand():
    model = Net()
    tx = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-2, weight_decay=1e-4)
    opt = eqstate.Optimizer(tx, model)
    params = model.parameters()
    oracle_state = tx.init(params)
    jstep = eqstate.jit(step, max_traces=1)
    for i in range(3):
        lr, wd = 1e-2 * 0.5**i, 1e-4 * (i + 1)
        opt = opt.with_hyperparams(learning_rate=lr, weight_decay=wd)
        (_, stepped), grads = vg(model, X)
        model, opt, _ = jstep(model, opt, X)
        hp = dict(oracle_state.hyperparams, learning_rate=jnp.float32(lr), weight_decay=wd)
        oracle_state = oracle_state._replace(hyperparams=hp)
        updates, oracle_state = tx.update(grads, oracle_state, stepped.parameters())
        params = optax.apply_updates(stepped.parameters(), updates)
        assert tree_allclose(model.parameters(), params, rtol=1e-5, atol=1e-7)
    assert jstep.traces == 1


# --- labels ------------------------------------------------------------------------------


def _dict(model):
    return {"w": model.w, "b": model.b}


def test_no_weight_decay_on_a_user_kind_matches_optax_on_plain_arrays():
    model = Net()
    mask = eqstate.labels({NoDecay: False}, default=True)
    opt = eqstate.Optimizer(optax.adamw(1e-2, weight_decay=0.5, mask=mask), model)
    oracle = optax.adamw(1e-2, weight_decay=0.5, mask={"w": True, "b": False})
    params = _dict(model)
    state = oracle.init(params)
    jstep = eqstate.jit(step, max_traces=1)
    for _ in range(3):
        grads = vg(model, X)[1]
        model, opt, _ = jstep(model, opt, X)
        updates, state = oracle.update(_dict(grads), state, params)
        params = optax.apply_updates(params, updates)
        assert tree_allclose(_dict(model), params, rtol=1e-5, atol=1e-7)
    # the mask mattered: decaying everything gives another result
    all_decay = eqstate.Optimizer(optax.adamw(1e-2, weight_decay=0.5), Net())
    m = Net()
    for _ in range(3):
        m, all_decay, _ = step(m, all_decay, X)
    assert not np.allclose(m.b, model.b)
    # labels of the model itself: the label tree has the model's structure
    tree = mask(eqx.filter(model, eqx.is_inexact_array))
    assert tree.w is True and tree.b is False and tree.bn.weight is True


def test_labels_with_multi_transform_match_optax():
    model = Net()
    is_matrix = lambda path, kind, leaf: leaf.ndim == 2  # noqa: E731
    label_fn = eqstate.labels({NoDecay: "frozen", is_matrix: "adam"}, default="sgd")
    transforms = {"frozen": optax.set_to_zero(), "adam": optax.adam(1e-2), "sgd": optax.sgd(0.1)}
    opt = eqstate.Optimizer(optax.multi_transform(transforms, label_fn), model)
    oracle = optax.multi_transform(
        transforms, {"w": "adam", "b": "frozen", "scale": "sgd", "bias": "sgd"}
    )
    params = {**_dict(model), "scale": model.bn.weight, "bias": model.bn.bias}
    state = oracle.init(params)
    for _ in range(2):
        (_, stepped), grads = vg(model, X)
        model, opt = opt.update(grads, stepped)
        g = {**_dict(grads), "scale": grads.bn.weight, "bias": grads.bn.bias}
        updates, state = oracle.update(g, state, params)
        params = optax.apply_updates(params, updates)
        got = {**_dict(model), "scale": model.bn.weight, "bias": model.bn.bias}
        assert tree_allclose(got, params, rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(model.b, Net().b)  # frozen
    # first match wins: NoDecay leaves are vectors, the matrix rule comes second
    first = eqstate.labels({(NoDecay, is_matrix): "x", ...: "y"})(model.parameters())
    assert first.w == "x" and first.b == "x" and first.bn.weight == "y"


def test_labels_errors():
    model = Net()
    with pytest.raises(TypeError, match=r"eqstate\.labels\(mapping\): expects a dict .* got list"):
        eqstate.labels([(NoDecay, "a")])  # pyright: ignore[reportArgumentType]
    with pytest.raises(TypeError, match=r"eqstate\.labels\(mapping\): 'decay' is not a filter"):
        eqstate.labels({"decay": NoDecay})
    with pytest.raises(ValueError, match=r"the mapping is empty and no `default=`"):
        eqstate.labels({})
    assert eqstate.labels({}, default="all")({"a": jnp.ones(1)}) == {"a": "all"}
    label_fn = eqstate.labels({NoDecay: "plain"})
    with pytest.raises(
        ValueError,
        match=r"eqstate\.labels: the leaf at \.w \(Param, float32\[2, 3\]\) matches none of the "
        r"filters NoDecay, and no `default=` was given",
    ):
        eqstate.Optimizer(optax.multi_transform({"plain": optax.sgd(0.1)}, label_fn), model)


# --- repr --------------------------------------------------------------------------------


def test_short_repr():
    class Big(eqstate.Module):
        layers: list

    big = Big([eqx.nn.Linear(8, 8, key=jax.random.key(i)) for i in range(12)])
    opt = eqstate.Optimizer(optax.adam(1e-3), big)
    text = repr(opt)
    assert text == (
        "Optimizer(tx=chain(scale_by_adam, scale), wrt=eqstate.Param, "
        "params=24 arrays (864 values), state=49 leaves, step=0)"
    )
    injected = eqstate.Optimizer(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), big)
    assert repr(injected).startswith("Optimizer(tx=inject_hyperparams(sgd), wrt=eqstate.Param")
    # inside a larger tree, and after filtering
    assert "Optimizer(tx=chain(scale_by_adam, scale)" in eqx.tree_pformat({"opt": opt})
    assert len(eqx.tree_pformat({"opt": opt})) < 200
    assert "step=None" in repr(eqstate.filter(opt, eqstate.Param))
    seen = []
    eqx.filter_jit(lambda o: seen.append(repr(o)))(opt)
    assert seen[0].endswith("state=49 leaves, step=int32[])")
