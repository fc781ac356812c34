import weakref
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import count_traces, tree_allclose

import eqstate
from eqstate._jit import RetraceWarning
from eqstate.nn import BatchNorm, Dropout


class Net(eqstate.Module):
    linear: eqx.nn.Linear
    bn: BatchNorm
    drop: Dropout
    act: object = jax.nn.relu

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.linear = eqx.nn.Linear(3, 4, key=k1)
        self.bn = BatchNorm(4)
        self.drop = Dropout(0.2, key=k2)

    @eqstate.mutating
    def __call__(self, x):
        h, self.bn = self.bn(jax.vmap(self.linear)(x))
        h, self.drop = self.drop(self.act(h))
        return jnp.sum(h, axis=1)


def loss_fn(model, x, y):
    pred, model = model(x)
    return jnp.mean((pred - y) ** 2), model


def train_step(model, opt, x, y):
    (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
    model, opt = opt.update(grads, model)
    return model, opt, loss


X = jax.random.normal(jax.random.key(1), (8, 3))
Y = jnp.sum(X, axis=1)


@pytest.mark.usefixtures("standard_promotion")
def test_same_results_as_filter_jit_and_compiles_once():
    model = Net(jax.random.key(0))
    opt = eqstate.Optimizer(optax.adam(1e-2), model)
    ours = eqstate.jit(train_step, max_traces=1)
    ref = eqx.filter_jit(train_step)
    a = (model, opt)
    b = (model, opt)
    for _ in range(4):
        *a, loss_a = ours(*a, X, Y)
        *b, loss_b = ref(*b, X, Y)
        np.testing.assert_allclose(loss_a, loss_b, rtol=1e-6)
    assert tree_allclose(tuple(a), tuple(b))
    assert ours.traces == 1 and ours.retrace_reasons == []
    # outputs keep their non-array leaves (functions, bools, static fields)
    assert a[0].act is jax.nn.relu and a[0].bn.inference is False


def test_static_and_dynamic_leaves_kwargs():
    f = count_traces(lambda x, n, *, scale, flag=False: (x * n * scale, flag))
    jf = eqstate.jit(f)
    y, flag = jf(jnp.ones(2), 3, scale=np.float32(2.0))
    np.testing.assert_array_equal(y, [6.0, 6.0])
    assert flag is False  # a static output stays a Python value
    jf(jnp.zeros(2), 3, scale=np.float32(5.0))  # new array values: no retrace
    assert f.traces == 1
    jf(jnp.zeros(2), 4, scale=np.float32(5.0))  # a new static value: retrace
    assert f.traces == 2 and jf.traces == 2
    assert "static value of args[1] changed from 3 to 4" in jf.retrace_reasons[-1]
    _, flag = jf(jnp.zeros(2), 4, scale=np.float32(5.0), flag=True)
    assert flag is True


class Counter(eqstate.Module):
    count: jax.Array = eqstate.State.field(default=0)

    @eqstate.jit
    @eqstate.mutating
    def step(self, x):
        self.count += 1
        return x * 2

    @eqstate.jit
    def double(self, x):
        return x * 2


def test_methods_and_callable_modules():
    c = Counter()
    y, c = c.step(jnp.ones(2))
    y, c = c.step(y)
    assert int(c.count) == 2
    np.testing.assert_array_equal(y, [4.0, 4.0])
    np.testing.assert_array_equal(c.double(jnp.ones(1)), [2.0])
    linear = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    out = eqstate.jit(linear)(jnp.ones(2))
    np.testing.assert_allclose(out, linear(jnp.ones(2)), rtol=1e-6)
    bound = eqstate.jit(c.double)
    np.testing.assert_array_equal(bound(jnp.ones(1)), [2.0])


def test_donation():
    f = eqstate.jit(lambda a, b: (a + 1, b + 1), donate="all-except-first")
    a, b = jnp.ones(3), jnp.ones(3)
    f(a, b)
    assert not a.is_deleted() and b.is_deleted()
    g = eqstate.jit(lambda a, b: (a + 1, b + 1), donate="all")
    a, b = jnp.ones(3), jnp.ones(3)
    g(a, b)
    assert a.is_deleted() and b.is_deleted()
    with pytest.raises(
        ValueError, match=r"donate=\.\.\.\) must be 'all', 'all-except-first' or 'none', got 'some'"
    ):
        eqstate.jit(lambda a: a, donate="some")  # pyright: ignore[reportArgumentType]


@pytest.mark.usefixtures("standard_promotion")
def test_donated_training_loop_reuses_outputs():
    model = Net(jax.random.key(0))
    opt = eqstate.Optimizer(optax.adam(1e-2), model)
    ref = eqx.filter_jit(train_step)
    step = eqstate.jit(train_step, donate="all-except-first", max_traces=1)
    m, o = model, jax.tree_util.tree_map(jnp.copy, opt)  # own buffers: opt is donated
    for _ in range(5):
        model, opt, loss = step(model, opt, X, Y)
        m, o, loss_ref = ref(m, o, X, Y)
        np.testing.assert_allclose(loss, loss_ref, rtol=1e-6)
    assert int(opt.step) == 5 and tree_allclose(opt, o)


def test_async_dispatch_returns_before_the_result_is_ready():
    @eqstate.jit
    def slow(x):
        return jax.lax.fori_loop(0, 40, lambda i, y: jnp.tanh(y @ x), x)

    x = jax.random.normal(jax.random.key(0), (600, 600)) / 30
    jax.block_until_ready(slow(x))  # compile
    out = slow(x)
    assert not out.is_ready()  # 40 matmuls of 600x600 take far longer than dispatch
    jax.block_until_ready(out)
    assert out.is_ready()


def test_max_traces_names_what_changed():
    def f(model, x):
        return model.count.astype(jnp.float32) + x.sum()

    jf = eqstate.jit(f, max_traces=1)
    c = Counter()
    jf(c, jnp.ones(2))
    with pytest.raises(
        RuntimeError,
        match=r"The shape/dtype of args\[1\] changed from float32\[2\] to float32\[3\]",
    ):
        jf(c, jnp.ones(3))
    with pytest.raises(
        RuntimeError, match=r"args\[0\]\.count changed from int32\[\] to float32\[\]"
    ):
        jf(eqx.tree_at(lambda m: m.count, c, jnp.zeros((), jnp.float32)), jnp.ones(2))
    with pytest.raises(
        RuntimeError,
        match=r"traced 2 times, more than max_traces=1\. The structure of the arguments changed at args\[1\]: an array float32\[2\] != PyTreeDef\(\(\*,\)\)",
    ):
        jf(c, (jnp.ones(2),))
    assert jf.traces == 1
    jf(c, jnp.ones(2))  # the first signature still works


def test_retrace_reasons_name_arguments_of_a_callable_module():
    jl = eqstate.jit(eqx.nn.Lambda(lambda x: x * 2))  # a module: its leaves go in too
    jl(jnp.ones(2))
    jl(jnp.ones(3))
    assert jl.retrace_reasons == [
        "The shape/dtype of args[0] changed from float32[2] to float32[3]."
    ]


def test_errors():
    class Unhashable:
        __hash__ = None  # pyright: ignore[reportAssignmentType]

    with pytest.raises(
        TypeError,
        match=r"args\[0\]\['bad'\] is a non-array leaf of type Unhashable that is not hashable",
    ):
        eqstate.jit(lambda d: 1)({"bad": Unhashable()})
    with pytest.raises(TypeError, match="expects a callable"):
        eqstate.jit(3)  # pyright: ignore[reportArgumentType]
    with pytest.raises(ValueError, match=r"max_traces=\.\.\.\) must be >= 1"):
        eqstate.jit(lambda: 1, max_traces=0)


def test_inside_another_trace():
    inner = eqstate.jit(lambda x, n: x * n)
    out = jax.jit(lambda x: inner(x, 3))(jnp.ones(2))
    np.testing.assert_array_equal(out, [3.0, 3.0])
    g = jax.grad(lambda x: inner(x, 2.0).sum())(jnp.ones(2))
    np.testing.assert_array_equal(g, [2.0, 2.0])


# --- regressions: each of these gave a wrong result silently ---------------------------


def test_static_outputs_follow_the_trace_that_served_the_call():
    count = eqstate.jit(lambda x: (x.sum(), x.shape[0]))
    assert [count(jnp.ones(n))[1] for n in (32, 7, 32, 7)] == [32, 7, 32, 7]
    assert count.traces == 2  # one cache key, traced again by JAX for each shape
    rows = eqstate.jit(lambda x: tuple(x[i] for i in range(x.shape[0])))
    assert [len(rows(jnp.ones(n))) for n in (2, 3, 2)] == [2, 3, 2]  # was an IndexError
    named = eqstate.jit(lambda x: {f"k{n}": x for n in range(x.shape[0])})
    assert sorted(named(jnp.ones(2))) == ["k0", "k1"] and sorted(named(jnp.ones(1))) == ["k0"]
    assert sorted(named(jnp.ones(2))) == ["k0", "k1"]
    only = eqstate.jit(lambda x: x.shape)  # no traced output at all
    assert [only(jnp.ones((n, 2))) for n in (4, 5, 4)] == [(4, 2), (5, 2), (4, 2)]
    weak = eqstate.jit(lambda x: (x, x.weak_type))  # weak types are another trace too
    assert weak(jnp.asarray(1.0))[1] is True and weak(jnp.ones(()))[1] is False
    assert weak(jnp.asarray(1.0))[1] is True


class Sized(eqx.Module):
    x: jax.Array
    n: int = eqx.field(static=True)


def test_static_fields_of_returned_modules_follow_their_trace():
    step = eqstate.jit(lambda m: Sized(m.x + 1, m.x.shape[0]))
    a = step(Sized(jnp.zeros(3), 0))
    b = step(Sized(jnp.zeros(5), 0))
    assert (a.n, b.n) == (3, 5)
    assert step(Sized(jnp.zeros(3), 0)).n == 3  # after the trace for 5
    a2, b2 = step(a), step(b)  # returned objects passed back (the memo path)
    assert (a2.n, b2.n) == (3, 5) and a2.x.shape == (3,) and b2.x.shape == (5,)


def test_threads_with_different_shapes_get_their_own_static_outputs():
    f = eqstate.jit(lambda x: (x * 2, x.shape[0], [x] * (x.shape[0] % 3)))

    def work(n):
        outs = [f(jnp.ones(n)) for _ in range(30)]
        return [(y.shape[0], m, len(items)) for y, m, items in outs]

    sizes = [1, 2, 3, 4, 5, 6] * 2
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(work, sizes))
    for n, res in zip(sizes, results):
        assert res == [(n, n, n % 3)] * 30


class Residual(eqx.Module):
    fn: eqx.Module
    max_traces: int = 5

    def __call__(self, x):
        return x + self.fn(x)


def test_a_callable_module_keeps_its_fields_to_itself():
    linear = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    res = Residual(linear)
    jres = eqstate.jit(res, max_traces=1)
    np.testing.assert_allclose(jres(jnp.ones(2)), res(jnp.ones(2)), rtol=1e-6)
    assert jres.fn is res and jres.max_traces == 1  # not the module's fields
    assert jres.__wrapped__ is res and jres.__name__ == "Residual"
    assert jres.__doc__ == res.__doc__

    def documented(x):
        """Docs."""
        return x

    jd = eqstate.jit(documented)
    assert (jd.__name__, jd.__doc__, jd.__wrapped__) == ("documented", "Docs.", documented)


class Shift(eqx.Module):
    w: jax.Array

    def __call__(self, x):
        return self.w + x  # an output with the shape of w: a usable donation


@pytest.mark.parametrize("donate", ["all", "all-except-first"])
def test_donation_never_takes_the_wrapped_modules_arrays(donate):
    shift = Shift(jnp.ones(3))
    f = eqstate.jit(shift, donate=donate)
    x, y = jnp.ones(3), jnp.ones(3)
    f(x)
    out = f(y)
    assert not shift.w.is_deleted() and y.is_deleted() == (donate == "all")
    np.testing.assert_array_equal(out, [2.0, 2.0, 2.0])


def test_donation_keeps_the_first_parameter_given_by_keyword():
    f = eqstate.jit(lambda model, opt: (model + 1, opt + 1), donate="all-except-first")
    model, opt = jnp.ones(3), jnp.ones(3)
    f(model=model, opt=opt)  # eqx.filter_jit binds the signature: model is still first
    assert not model.is_deleted() and opt.is_deleted()


def test_keyword_arguments_bind_to_the_signature():
    def f(x, n=2, *, k=3):
        return x * n * k

    jf = eqstate.jit(f, max_traces=1)
    x = jnp.ones(1)
    assert [float(jf(x, 2)[0]), float(jf(x, n=2)[0]), float(jf(x=x, n=2)[0])] == [6.0] * 3
    assert jf.traces == 1  # positional or by name: one cache key
    with pytest.raises(TypeError, match="multiple values for argument 'n'"):
        jf(x, 2, n=3)  # rejected before tracing, as eqx.filter_jit does
    assert jf.traces == 1


def test_a_python_float_that_changes_every_call_keeps_the_cache_bounded():
    f = eqstate.jit(lambda x, lr: x * lr, max_traces=100)
    f._max_entries = 4
    x = jnp.ones(2)
    calls = [weakref.ref(f(x, 0.5))]  # something created per call, for the count below
    for i in range(12):
        np.testing.assert_allclose(f(x, i / 10), [i / 10] * 2, rtol=1e-6)
    assert len(f._cache) <= 4 and len(f._parts) <= 6
    entries = [weakref.ref(e.call) for e in f._cache.values()]
    np.testing.assert_allclose(f(x, 1.1), [1.1] * 2, rtol=1e-6)  # evicted ones still work
    del f, calls
    assert all(ref() is None for ref in entries)  # freed with the Jit, no gc needed


def test_repeated_retraces_warn_once_with_the_reason_and_the_fix():
    f = eqstate.jit(lambda x, lr: x * lr)
    x = jnp.ones(2)
    for i in range(8):
        f(x, float(i))
    with pytest.warns(RetraceWarning) as record:
        f(x, 8.0)
        f(x, 9.0)
    assert len(record) == 1 and record[0].filename == __file__
    message = str(record[0].message)
    assert "traced 9 times" in message
    assert "The static value of args[1] changed from 7.0 to 8.0." in message
    assert "jnp.asarray(x)" in message and "max_traces=" in message
    assert f.traces == 10


def test_returned_containers_are_new_objects_every_call():
    f = eqstate.jit(
        lambda: (
            OrderedDict(),
            defaultdict(list),
            [],
            {},
            eqx.nn.Identity(),
            OrderedDict(a=1),
            {"a": [None]},
        )
    )
    first, second = f(), f()
    for a, b in zip(first, second):
        assert (a is not b and type(a) is type(b) and a == b) or isinstance(a, eqx.Module)
    first[0]["x"] = 1  # changing one call's output leaves the next call's alone
    first[1]["y"].append(1)
    first[6]["a"].append(2)
    third = f()
    assert third[0] == OrderedDict() and third[1] == {} and third[6] == {"a": [None]}


def test_the_memo_does_not_trust_containers_it_cannot_check():
    step = eqstate.jit(lambda d: OrderedDict((k, v + 1) for k, v in d.items()))
    d = step(OrderedDict(a=jnp.zeros(1), b=jnp.zeros(1)))
    d["a"] = jnp.full(1, 10.0)  # changed in place between calls
    out = step(d)
    assert float(out["a"][0]) == 11.0 and float(out["b"][0]) == 2.0


class Mode(eqx.Module):
    inference: object


def test_retrace_reason_names_a_static_value_that_became_an_array():
    f = eqstate.jit(lambda m, x: x, max_traces=1)
    f(Mode(False), jnp.ones(1))
    with pytest.raises(
        RuntimeError,
        match=r"args\[0\]\.inference changed from the static value False to an array bool\[\]\.",
    ):
        f(Mode(jnp.asarray(False)), jnp.ones(1))
    g = eqstate.jit(lambda m, x: x)
    g(Mode(jnp.asarray(False)), jnp.ones(1))
    g(Mode(True), jnp.ones(1))
    assert g.retrace_reasons == [
        "args[0].inference changed from an array bool[] to the static value True."
    ]


@pytest.mark.usefixtures("standard_promotion")  # int32 array + Python float
def test_static_values_of_another_type_are_another_trace():
    # eqx.filter_jit reuses the trace for 1 when called with True or 1.0 (equal, same hash)
    f = eqstate.jit(lambda x, n: (x if n is True else x + n, type(n).__name__, n))
    x = jnp.ones(1, jnp.int32)
    got = [f(x, n) for n in (1, True, 1.0, 1)]
    assert [(r[1], r[2]) for r in got] == [("int", 1), ("bool", True), ("float", 1.0), ("int", 1)]
    assert [r[0].dtype for r in got] == [jnp.int32, jnp.int32, jnp.float32, jnp.int32]
    assert type(got[1][2]) is bool and f.traces == 3
    assert f.retrace_reasons[0] == "The static value of args[1] changed from 1 to True."


def test_a_trace_that_raises_is_not_counted():
    def f(x, n):
        if n < 0:
            raise ValueError("negative")
        return x * n

    jf = eqstate.jit(f, max_traces=1)
    with pytest.raises(ValueError, match="negative"):
        jf(jnp.ones(1), -1)
    assert jf.traces == 0 and jf.retrace_reasons == [] and jf._cache == {}
    np.testing.assert_array_equal(jf(jnp.ones(1), 2), [2.0])  # the one allowed trace
    assert jf.traces == 1
    with pytest.raises(RuntimeError, match="more than max_traces=1"):
        jf(jnp.ones(1), 3)
    with pytest.raises(RuntimeError, match=r"changed from 2 to 4\."):  # not from 3
        jf(jnp.ones(1), 4)
    assert jf.traces == 1 and jf.retrace_reasons == [] and len(jf._cache) == 1
    np.testing.assert_array_equal(jf(jnp.ones(1), 2), [2.0])


def test_methods_bind_the_instance_first():
    class Scaler(eqx.Module):
        w: jax.Array

        @eqstate.jit(donate="all-except-first")
        def apply(self, x):
            return self.w * x

    assert isinstance(Scaler.__dict__["apply"], eqstate._jit.Jit)
    s = Scaler(jnp.full(2, 3.0))
    x = jnp.ones(2)
    np.testing.assert_array_equal(s.apply(x=x), [3.0, 3.0])  # self stays first
    assert not s.w.is_deleted() and x.is_deleted()


def test_under_disable_jit_calls_run_eagerly_and_are_not_traces():
    f = eqstate.jit(lambda x, n: (x * n, x.shape[0]), max_traces=1)
    with jax.disable_jit():
        for n in range(12):  # no max_traces error, no RetraceWarning
            y, size = f(jnp.ones(n + 1), 2)
            assert size == n + 1 and y.shape == (n + 1,)
    assert f.traces == 0
    f(jnp.ones(2), 2)
    assert f.traces == 1


def test_under_vmap_and_grad():
    f = eqstate.jit(lambda x, n: (x * n, x.shape), max_traces=1)
    ys = jax.vmap(lambda x: f(x, 2)[0])(jnp.ones((3, 2)))
    np.testing.assert_array_equal(ys, np.full((3, 2), 2.0))
    g = jax.grad(lambda x: f(x, 2)[0].sum())(jnp.ones(2))
    np.testing.assert_array_equal(g, [2.0, 2.0])
    assert f(jnp.ones(2), 2)[1] == (2,)


def test_only_functions_bind_as_methods():
    linear = eqx.nn.Linear(2, 2, key=jax.random.key(0))

    class Holder:
        apply = eqstate.jit(linear)  # a module, not a function: no instance to bind

        @eqstate.jit
        def twice(self, x):
            return 2 * x

    h = Holder()
    np.testing.assert_allclose(h.apply(jnp.ones(2)), linear(jnp.ones(2)), rtol=1e-6)
    np.testing.assert_array_equal(h.twice(jnp.ones(1)), [2.0])
