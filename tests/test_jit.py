import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers import count_traces, tree_allclose

import eqstate
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
