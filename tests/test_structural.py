"""Optimizer settings compare by value only where equal keys mean equal behaviour:
rebuilt optimizers with the same settings hit the jit cache, and different settings
never do (a jitted step then traces again and computes with the new settings)."""

import functools
import sys
import types

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqstate


# optax itself mixes Python floats with int32 step counts, which strict promotion rejects.
pytestmark = pytest.mark.usefixtures("standard_promotion")


class NoDecay(eqstate.Param):
    pass


class Net(eqstate.Module):
    w: jax.Array
    b: jax.Array = NoDecay.field()

    def __init__(self, n: int = 3, dtype=jnp.float32):
        self.w = (jnp.arange(2.0 * n).reshape(2, n) / 10).astype(dtype)
        self.b = jnp.array([0.5, -0.5], dtype)

    def __call__(self, x):
        return x @ self.w.T + self.b


X = jnp.linspace(-1.0, 1.0, 12).reshape(4, 3)


def loss(model, x):
    return jnp.mean((model(x) - 1.0) ** 2)


def step(model, opt, x):
    grads = eqstate.grad(loss)(model, x)
    return opt.update(grads, model)


def tx_of(tx, model=None):
    """The structural `tx` an optimizer holds."""
    return eqstate.Optimizer(tx, Net() if model is None else model).tx


def sgd_ran_with(lr, before, after):
    """`after` is one plain SGD step with learning rate `lr` from `before`."""
    grads = eqstate.grad(loss)(before, X)
    np.testing.assert_allclose(after.w, before.w - lr * grads.w, rtol=1e-5, atol=1e-7)
    return True


def keyed(tx):
    """`tx_of(tx)`, compared now: its key holds the settings as they are now."""
    out = tx_of(tx)
    hash(out)
    return out


def is_identity(tx) -> bool:
    """Whether a structural `tx` fell back to comparing by identity."""
    from eqstate._structural import _OpaqueKey

    return any(isinstance(f.key(), _OpaqueKey) for f in tx)


# --- the same settings: equal ----------------------------------------------------------


def _mask(params):
    return jax.tree.map(lambda _: True, params)


BUILDERS = {
    "adam": lambda: optax.adam(1e-3),
    "adamw": lambda: optax.adamw(1e-3, weight_decay=1e-4),
    "lookahead": lambda: optax.lookahead(optax.adam(0.1), 2, 0.5),
    "reduce_on_plateau": lambda: optax.chain(optax.adam(0.1), optax.contrib.reduce_on_plateau()),
    "lbfgs": lambda: optax.lbfgs(),
    "schedule_free": lambda: optax.contrib.schedule_free_adamw(0.1),
    "sam": lambda: optax.contrib.sam(optax.sgd(0.1), optax.sgd(0.1)),
    "muon": lambda: optax.contrib.muon(0.1),
    "adafactor": lambda: optax.adafactor(0.1),
    "lion": lambda: optax.lion(0.1),
    "apply_if_finite": lambda: optax.apply_if_finite(optax.adam(0.1), 3),
    "ema": lambda: optax.chain(optax.adam(0.1), optax.ema(0.9)),
    "noisy_sgd": lambda: optax.noisy_sgd(0.1, key=jax.random.key(0)),
    "chain": lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(0.1, momentum=0.9)),
    "masked": lambda: optax.masked(optax.adam(0.1), _mask),
    "masked_lambda": lambda: optax.masked(
        optax.adam(0.1), lambda p: jax.tree.map(lambda x: x.ndim == 2, p)
    ),
    "adamw_labels": lambda: optax.adamw(
        1e-3, mask=eqstate.labels({NoDecay: False, eqstate.Param: True})
    ),
    "multi_transform": lambda: optax.multi_transform(
        {"a": optax.adam(0.1), "b": optax.sgd(0.1)}, eqstate.labels({NoDecay: "b"}, default="a")
    ),
    "inject_hyperparams": lambda: optax.inject_hyperparams(optax.adamw)(
        learning_rate=1e-3, weight_decay=jnp.asarray(1e-4)
    ),
    "exponential_decay": lambda: optax.sgd(optax.exponential_decay(0.1, 10, 0.5)),
    "join_schedules": lambda: optax.sgd(
        optax.join_schedules([optax.constant_schedule(0.1), optax.constant_schedule(0.2)], [1])
    ),
    "piecewise": lambda: optax.sgd(optax.piecewise_constant_schedule(0.1, {1: 0.5})),
    "warmup_cosine": lambda: optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 1e-3, 10, 100)),
    "cosine": lambda: optax.adam(optax.cosine_decay_schedule(1e-3, 100)),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_rebuilt_with_the_same_settings_is_equal(name):
    make = BUILDERS[name]
    tx = tx_of(make())
    again = tx_of(make())
    assert again == tx and hash(again) == hash(tx)
    assert not is_identity(tx)


@pytest.mark.parametrize("name", ["cosine", "warmup_cosine", "adam"])
def test_rebuilt_after_a_jitted_step_hits_the_cache(name):
    # optax's cosine schedule turns its closure's int `decay_steps` into a float on its
    # first call, inside the first trace: the key holds the settings before that call
    model = Net()
    jstep = eqstate.jit(step, max_traces=1)
    model, opt = jstep(model, eqstate.Optimizer(BUILDERS[name](), model), X)
    rebuilt = eqstate.Optimizer(BUILDERS[name](), model)
    assert rebuilt.tx == opt.tx and hash(rebuilt.tx) == hash(opt.tx)
    jstep(model, rebuilt, X)
    assert jstep.traces == 1


# --- 1. globals a schedule reads --------------------------------------------------------


DECAY = 0.1


def make_reading_global():
    def schedule(count):
        return DECAY

    return schedule


def helper(count):
    return 0.1


def through_helper(count):
    return helper(count)


def test_a_changed_global_retraces_with_the_new_value():
    global DECAY
    model = Net()
    jstep = eqstate.jit(step)
    opt = eqstate.Optimizer(optax.sgd(make_reading_global()), model)
    assert sgd_ran_with(0.1, model, jstep(model, opt, X)[0])
    try:
        DECAY = 0.9
        rebuilt = eqstate.Optimizer(optax.sgd(make_reading_global()), model)
        assert rebuilt.tx != opt.tx
        assert sgd_ran_with(0.9, model, jstep(model, rebuilt, X)[0])
        assert jstep.traces == 2
        # the message names the global
        strict = eqstate.jit(step, max_traces=1)
        strict(model, opt, X)
        with pytest.raises(
            RuntimeError, match=r"in make_reading_global, global DECAY: 0\.1 -> 0\.9"
        ):
            strict(model, rebuilt, X)
    finally:
        DECAY = 0.1


def test_a_redefined_helper_retraces():
    global helper
    model = Net()
    jstep = eqstate.jit(step)
    schedule = lambda count: helper(count)  # noqa: E731
    opt = eqstate.Optimizer(optax.sgd(schedule), model)
    assert sgd_ran_with(0.1, model, jstep(model, opt, X)[0])
    original = helper
    try:

        def helper(count):  # a notebook cell run again with a new value
            return 0.9

        rebuilt = eqstate.Optimizer(optax.sgd(schedule), model)
        assert rebuilt.tx != opt.tx
        assert sgd_ran_with(0.9, model, jstep(model, rebuilt, X)[0])
        assert jstep.traces == 2
        # a helper of the same module is read by what it computes (here through another
        # helper): a copy with the same code and values is equal
        redefined = keyed(optax.sgd(through_helper))
        helper = types.FunctionType(original.__code__, original.__globals__, "helper")
        copied = keyed(optax.sgd(through_helper))
        helper = original
        assert copied != redefined and copied == keyed(optax.sgd(through_helper))
    finally:
        helper = original


def test_attributes_read_from_a_module_or_class():
    cfg = types.ModuleType("cfg")
    cfg.LR = 0.1

    class Config:
        lr = 0.1

    by_module = lambda: optax.sgd(lambda count: cfg.LR)  # noqa: E731
    by_class = lambda: optax.sgd(lambda count: Config.lr)  # noqa: E731
    a, b = tx_of(by_module()), tx_of(by_class())
    assert a == tx_of(by_module()) and b == tx_of(by_class())
    cfg.LR = 0.9
    Config.lr = 0.9
    assert tx_of(by_module()) != a and tx_of(by_class()) != b
    # and a module-level global module's attribute (here, this test module's `DECAY`)
    this = sys.modules[__name__]
    reads = lambda: optax.sgd(lambda count: this.DECAY)  # noqa: E731
    assert tx_of(reads()) == tx_of(reads())


# --- 2. objects of user classes: compared by identity ----------------------------------


class Scheduled:
    def __init__(self, value):
        self.value = value

    def __call__(self, count):
        return self.value

    def at(self, count):
        return self.value


@pytest.mark.parametrize("bound", [False, True])
def test_a_mutated_object_retraces(bound):
    model = Net()
    jstep = eqstate.jit(step)
    sched = Scheduled(0.1)
    fn = sched.at if bound else sched
    opt = eqstate.Optimizer(optax.sgd(fn), model)
    assert is_identity(opt.tx)
    assert sgd_ran_with(0.1, model, jstep(model, opt, X)[0])
    sched.value = 0.9
    rebuilt = eqstate.Optimizer(optax.sgd(sched.at if bound else sched), model)
    assert rebuilt.tx != opt.tx
    assert sgd_ran_with(0.9, model, jstep(model, rebuilt, X)[0])
    assert jstep.traces == 2
    # with the same settings too: a rebuilt one compiles again, as before the feature
    assert tx_of(optax.sgd(Scheduled(0.1))) != tx_of(optax.sgd(Scheduled(0.1)))
    # the same transformation object wrapped again: the same callables
    same = optax.sgd(sched)
    assert tx_of(same) == tx_of(same)


def test_anything_outside_the_closed_world_compares_by_identity():
    marker = object()
    stateless = lambda m: optax.chain(optax.sgd(0.1), optax.stateless(lambda u, p: (m, u)[1]))  # noqa: E731
    assert tx_of(stateless(marker)) != tx_of(stateless(marker))
    assert is_identity(tx_of(stateless({1, 2}))) is False  # a set of values is a value
    assert is_identity(tx_of(stateless(0.1j))) is False
    for unknown in ({object()}, eqx.nn.Identity(), np.array([0.1], dtype=object)):
        assert is_identity(tx_of(stateless(unknown)))
    # an identity-compared structural callable inside another one makes it opaque too
    inner = tx_of(stateless(marker))
    assert tx_of(optax.chain(inner, optax.scale(1.0))) != tx_of(
        optax.chain(inner, optax.scale(1.0))
    )

    # deeper than the cap: by identity, never an error
    def deep(n):
        tx = optax.scale(1.0)
        for _ in range(n):
            tx = optax.chain(tx, optax.scale(1.0))
        return tx

    assert tx_of(deep(5)) == tx_of(deep(5))
    deep_tx = tx_of(deep(60))
    assert is_identity(deep_tx) and deep_tx != tx_of(deep(60)) and deep_tx == deep_tx


# --- 3. the key holds what the trace sees -----------------------------------------------


@pytest.mark.parametrize("kind", ["list", "numpy"])
@pytest.mark.parametrize("jit", ["eqstate", "equinox"])
def test_mutation_between_building_and_the_first_step(kind, jit):
    def make(value):
        holder = [value] if kind == "list" else np.array(value, np.float32)
        return holder, optax.sgd(lambda count: holder[0] if kind == "list" else holder * 1.0)

    model = Net()
    jstep = eqstate.jit(step) if jit == "eqstate" else eqx.filter_jit(step)
    holder, tx = make(0.1)
    opt = eqstate.Optimizer(tx, model)
    if kind == "list":
        holder[0] = 0.9  # after building, before the first step
    else:
        holder[...] = 0.9
    assert sgd_ran_with(0.9, model, jstep(model, opt, X)[0])
    # a rebuilt optimizer with the old value is not the traced one
    _, old = make(0.1)
    rebuilt = eqstate.Optimizer(old, model)
    assert rebuilt.tx != opt.tx
    assert sgd_ran_with(0.1, model, jstep(model, rebuilt, X)[0])
    if jit == "eqstate":
        assert jstep.traces == 2  # pyright: ignore[reportAttributeAccessIssue]


def test_a_change_after_the_first_comparison_and_before_the_first_step_is_an_error():
    # compared first (here by hand; a jitted step compares it with the optimizers it
    # compiled for), then changed: the step would run 0.9 filed under 0.1
    table = [0.1]
    model = Net()
    opt = eqstate.Optimizer(optax.sgd(lambda count: table[0]), model)
    hash(opt.tx)
    table[0] = 0.9
    with pytest.raises(
        ValueError,
        match=r"changed after the optimizer was first compared .*"
        r"table\[0\]: 0\.1 -> 0\.9\), so that step would run",
    ):
        eqstate.jit(step)(model, opt, X)
    # unchanged, or compared by identity: no error
    table[0] = 0.1
    opt = eqstate.Optimizer(optax.sgd(lambda count: table[0]), model)
    hash(opt.tx)
    assert sgd_ran_with(0.1, model, eqstate.jit(step)(model, opt, X)[0])
    sched = Scheduled(0.1)
    opt = eqstate.Optimizer(optax.sgd(sched), model)
    hash(opt.tx)
    sched.value = 0.9
    assert sgd_ran_with(0.9, model, eqstate.jit(step)(model, opt, X)[0])


# --- 4. and 5. arrays and numbers: by everything that changes the result -----------------


def test_arrays_compare_by_weak_type_and_family():
    sgd = lambda lr: tx_of(optax.sgd(lr))  # noqa: E731
    weak, strong = jnp.asarray(0.1), jnp.float32(0.1)
    assert weak.weak_type and not strong.weak_type
    assert sgd(weak) == sgd(jnp.asarray(0.1)) != sgd(strong)
    assert sgd(np.float32(0.1)) != sgd(strong)  # NumPy and JAX arrays: not the same trace
    assert sgd(np.asarray([0.1], np.float32)) != sgd(jnp.asarray([0.1], jnp.float32))

    # with bfloat16 parameters, the two promote differently: different numbers
    def run(lr, jitted):
        tx = optax.chain(optax.scale(lr), optax.scale(-7.0))
        model = Net(dtype=jnp.bfloat16)
        opt = eqstate.Optimizer(tx, model)
        g = jax.tree.map(lambda x: jnp.full_like(x, 0.013), model)
        f = jitted if jitted is not None else (lambda m, o, g: o.update(g, m))
        for _ in range(3):
            model, opt = f(model, opt, g)
        return model.w

    jupdate = eqstate.jit(lambda m, o, g: o.update(g, m))
    run(weak, jupdate)
    strong_jitted = run(strong, jupdate)
    assert jupdate.traces == 2
    assert jnp.array_equal(strong_jitted, run(strong, None))


def test_floats_compare_by_their_bits():
    scale = lambda x: tx_of(optax.scale(x))  # noqa: E731
    assert scale(-0.0) != scale(0.0)
    assert scale(float("nan")) == scale(float("nan"))  # two NaN objects: the same setting
    assert scale(1) != scale(1.0) != scale(True)
    assert scale(complex(1.0, 0.0)) != scale(complex(1.0, -0.0))
    assert scale(complex(1.0, float("nan"))) == scale(complex(1.0, float("nan")))
    assert scale(np.float64(0.1)) != scale(0.1)


def test_containers_partials_and_enums():
    import enum

    class Mode(enum.Enum):
        A = 1
        B = 2

    def sched(count, table, mode):
        return table[0]

    p = lambda table, mode: tx_of(optax.sgd(functools.partial(sched, table=table, mode=mode)))  # noqa: E731
    assert p([0.1], Mode.A) == p([0.1], Mode.A)
    assert p([0.1], Mode.A) != p([0.1], Mode.B)
    assert p({"a": 0.1}, Mode.A) != p({"a": 0.2}, Mode.A)
    assert p({1: 0.1}, Mode.A) != p({True: 0.1}, Mode.A)
    assert p((0.1,), Mode.A) != p([0.1], Mode.A)
    assert p(frozenset({"a"}), Mode.A) == p(frozenset({"a"}), Mode.A) != p(frozenset({"b"}), Mode.A)

    # function attributes
    def with_attr(v):
        def f(count):
            return f.lr

        f.lr = v
        return f

    assert tx_of(optax.sgd(with_attr(0.1))) != tx_of(optax.sgd(with_attr(0.2)))
    assert tx_of(optax.sgd(with_attr(0.1))) == tx_of(optax.sgd(with_attr(0.1)))
    # typed PRNG keys by their data
    noisy = lambda k: tx_of(optax.noisy_sgd(0.1, key=k))  # noqa: E731
    assert noisy(jax.random.key(0)) == noisy(jax.random.key(0)) != noisy(jax.random.key(1))


# --- 6. and 7. retrace messages -----------------------------------------------------------


def reason(first, second):
    """The retrace reason when the optimizer `second` follows `first`."""
    jstep = eqstate.jit(step, max_traces=1)
    jstep(first[0], first[1], X)
    with pytest.raises(RuntimeError) as info:
        jstep(second[0], second[1], X)
    text = str(info.value).split("max_traces=1. ", 1)[1].split(" Each trace compiles", 1)[0]
    assert "\n" not in text and len(text) < 320 and " at 0x" not in text, text
    return text


def with_model(tx, model=None):
    model = Net() if model is None else model
    return model, eqstate.Optimizer(tx, model)


def test_retrace_message_names_the_setting_as_compared():
    cosine = lambda e: optax.sgd(optax.cosine_decay_schedule(0.1, 100, exponent=e))  # noqa: E731
    assert reason(with_model(cosine(1.0)), with_model(cosine(2.0))) == (
        "The static field args[1].tx changed: a different optax transformation "
        "(chain(identity, scale_by_schedule); in cosine_decay_schedule, exponent: 1.0 -> 2.0)."
    )
    listed = lambda v: optax.sgd(lambda count, table=v: table[-1])  # noqa: E731
    text = reason(with_model(listed([0.1] * 5000)), with_model(listed([0.1] * 4999 + [0.2])))
    assert "__defaults__[0][4999]: 0.1 -> 0.2" in text
    text = reason(with_model(optax.sgd(jnp.asarray(0.1))), with_model(optax.sgd(jnp.float32(0.1))))
    assert "step_size: JAX float32[] weak-typed -0.1 -> JAX float32[] -0.1" in text


def test_retrace_message_for_identity_and_shapes():
    sched = Scheduled(0.1)
    text = reason(with_model(optax.sgd(sched)), with_model(optax.sgd(sched)))
    assert (
        "learning_rate is a Scheduled instance, compared by identity: a rebuilt one is a new"
        in text
    )
    tx = optax.inject_hyperparams(optax.adam)
    text = reason(
        with_model(tx(learning_rate=optax.linear_schedule(0.1, 0.0, 10))),
        with_model(tx(learning_rate=optax.linear_schedule(0.1, 0.0, 10))),
    )
    assert "sched_hps['learning_rate'] is a WrappedSchedule instance, compared by identity" in text
    # a model of other shapes or dtypes
    assert reason(with_model(optax.sgd(0.1)), with_model(optax.sgd(0.1), Net(4))) == (
        "The static field args[1].shapes changed: the optimised leaf at .w is float32[2, 4], "
        "was float32[2, 3] (the optimizer was built for a model of other shapes or dtypes)."
    )


def test_retrace_message_for_a_redefined_function():
    global helper
    schedule = lambda count: helper(count)  # noqa: E731
    first = with_model(optax.sgd(schedule))
    step(*first, X)  # its first step, before the redefinition
    original = helper
    try:
        helper = lambda count: 0.1  # noqa: E731
        text = reason(first, with_model(optax.sgd(schedule)))
    finally:
        helper = original
    assert "global helper: function helper -> a lambda (line " in text
    # redefined under the same name
    second = with_model(optax.sgd(schedule))
    step(*second, X)
    try:

        def helper(count):
            return 0.9

        text = reason(second, with_model(optax.sgd(schedule)))
    finally:
        helper = original
    assert "global helper: the code of function helper changed" in text


# --- 8. labels ------------------------------------------------------------------------------


def test_labels_refuse_a_kind_after_its_base_class():
    with pytest.raises(ValueError) as info:
        eqstate.labels({eqstate.Param: True, NoDecay: False})
    assert str(info.value) == (
        "eqstate.labels(mapping): no leaf can get the label False of NoDecay: NoDecay is a "
        "subclass of eqstate.Param, which comes before it. Each leaf gets the label of the "
        "first filter it matches, in the dict's order; put the more specific filter first: "
        "`{NoDecay: False, eqstate.Param: True}`."
    )
    with pytest.raises(ValueError, match=r"NoDecay is a subclass of eqstate\.Param, in "):
        eqstate.labels({(eqstate.Param, eqstate.State): 1, NoDecay: 2})
    with pytest.raises(ValueError, match=r"\.\.\. matches every leaf"):
        eqstate.labels({...: 1, NoDecay: 2})
    with pytest.raises(ValueError, match=r"NoDecay is also in \(NoDecay, eqstate\.State\)"):
        eqstate.labels({(NoDecay, eqstate.State): 1, NoDecay: 2})
    # fine: the specific kind first; a tuple that still decides some labels; callables
    eqstate.labels({NoDecay: False, eqstate.Param: True})
    eqstate.labels({NoDecay: 1, (eqstate.State, NoDecay): 2})
    eqstate.labels({(lambda leaf: True): 1, NoDecay: 2})


class Settings:
    def __repr__(self):
        return "Settings()"


class WithSettings(eqstate.Module):
    w: jax.Array
    settings: Settings = eqx.field(static=True)


def test_retrace_message_for_equal_looking_static_values():
    f = eqstate.jit(lambda m: m.w * 2, max_traces=1)
    f(WithSettings(jnp.ones(2), Settings()))
    with pytest.raises(RuntimeError) as info:
        f(WithSettings(jnp.ones(2), Settings()))
    assert (
        "The static field args[0].settings changed: another Settings that looks the same, "
        "Settings() (compared by identity: a rebuilt one is a new object, even with the same "
        "contents)."
    ) in str(info.value)
