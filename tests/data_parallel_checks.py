"""Checks of `eqstate.data_parallel` and of the sharded recipes on 8 CPU devices.

Run by tests/test_data_parallel.py in one subprocess (the device count must be set
before JAX starts); prints one JSON line, `{check: "ok" | traceback}`.
"""

import json
import os
import sys
import traceback


os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

import eqstate
from eqstate.metrics import Accuracy, Collection, Mean
from eqstate.nn import EMA, BatchNorm, Dropout


jax.config.update("jax_numpy_dtype_promotion", "standard")  # optax's

N_DEV, BATCH, FEATURES, CLASSES, STEPS = 8, 32, 16, 10, 4
MESH = jax.make_mesh((N_DEV,), ("data",))
REPLICATED = NamedSharding(MESH, P())
SPLIT = NamedSharding(MESH, P("data"))
CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


class MLP(eqstate.Module):
    """The digits demo's model, smaller: Linear, BatchNorm, ReLU, Dropout, twice."""

    layers: list[eqx.nn.Linear]
    norms: list[BatchNorm]
    drops: list[Dropout]
    head: eqx.nn.Linear

    def __init__(self, key):
        sizes = (FEATURES, 32, 32)
        keys = jax.random.split(key, 6)
        # no bias before BatchNorm: its gradient is 0 up to rounding, which Adam would
        # turn into steps of the learning rate in the rounding's direction
        self.layers = [
            eqx.nn.Linear(i, o, use_bias=False, key=k) for i, o, k in zip(sizes, sizes[1:], keys)
        ]
        self.norms = [BatchNorm(o, momentum=0.9) for o in sizes[1:]]
        self.drops = [Dropout(0.3, key=k) for k in keys[2:4]]
        self.head = eqx.nn.Linear(sizes[-1], CLASSES, key=keys[4])

    @eqstate.mutating
    def __call__(self, x):
        norms, drops = list(self.norms), list(self.drops)
        for i, layer in enumerate(self.layers):
            x, norms[i] = norms[i](jax.vmap(layer)(x))
            x, drops[i] = drops[i](jax.nn.relu(x))
        self.norms, self.drops = norms, drops
        return jax.vmap(self.head)(x)


def loss_fn(model, x, y):
    logits, model = model(x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), (model, logits)


TRACES = {"filter_jit": 0}


def step(model, opt, ema, metrics, x, y):
    (loss, (model, logits)), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
    model, opt = opt.update(grads, model)
    _, ema = ema.update(model)
    _, metrics = metrics.update(loss=loss, logits=logits, labels=y)
    return model, opt, ema, metrics, loss, grads


def counted_step(*args):
    TRACES["filter_jit"] += 1
    return step(*args)


def fresh():
    model = MLP(jax.random.key(0))
    opt = eqstate.Optimizer(optax.adamw(1e-2, weight_decay=1e-4), model)
    ema = EMA(model, decay=0.9, warmup=True)
    metrics = Collection(loss=Mean(argname="loss"), acc=Accuracy())
    return model, opt, ema, metrics


def data():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(STEPS, BATCH, FEATURES)).astype(np.float32)
    return x, rng.integers(0, CLASSES, (STEPS, BATCH)).astype(np.int32)


def place(tree, sharding):
    """`jax.device_put` of the arrays alone: `inference` flags stay Python bools."""
    return eqx.combine(jax.device_put(eqx.filter(tree, eqx.is_array), sharding), tree)


def run(step_fn, placed):
    state = fresh()
    if placed:
        state = place(state, REPLICATED)
        assert all(type(b.inference) is bool for b in state[0].norms + state[0].drops)
    xs, ys = data()
    losses, grads = [], []
    for x, y in zip(xs, ys):
        x, y = (jax.device_put(x, SPLIT), jax.device_put(y, SPLIT)) if placed else (x, y)
        *state, loss, g = step_fn(*state, x, y)
        losses.append(loss)
        grads.append(g)
    return tuple(state), np.asarray(losses), grads


def leaves(tree):
    """Array leaves with their paths; keys as their data."""
    out = []
    for path, x in jax.tree_util.tree_leaves_with_path(eqx.filter(tree, eqx.is_array)):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        out.append((jax.tree_util.keystr(path), np.asarray(x)))
    return out


def assert_close(got, want, what, rtol=2e-5, atol=2e-6):
    g, w = leaves(got), leaves(want)
    assert [p for p, _ in g] == [p for p, _ in w], what
    for (path, a), (_, b) in zip(g, w):
        assert a.dtype == b.dtype, f"{what}{path}: dtype {a.dtype} != {b.dtype}"
        if a.dtype.kind in "iub":
            np.testing.assert_array_equal(a, b, err_msg=f"{what}{path}")
        else:
            np.testing.assert_allclose(a, b, rtol=rtol, atol=atol, err_msg=f"{what}{path}")


def assert_layouts(state, what):
    """Every array replicated over the mesh, as it went in; every flag a Python bool."""
    model = state[0]
    assert all(type(b.inference) is bool for b in model.norms + model.drops), what
    for path, x in jax.tree_util.tree_leaves_with_path(eqx.filter(state, eqx.is_array)):
        sharding = x.sharding
        assert sharding.is_equivalent_to(REPLICATED, x.ndim), (
            f"{what}{jax.tree_util.keystr(path)}: {sharding}"
        )


_SINGLE = {}


def single():
    """Path (a): one device, the whole batch, unsharded."""
    if not _SINGLE:
        _SINGLE["out"] = run(eqstate.jit(step, max_traces=1), placed=False)
    return _SINGLE["out"]


def assert_same_training(out, what):
    (state, losses, grads), (state1, losses1, grads1) = out, single()
    np.testing.assert_allclose(losses, losses1, rtol=2e-5, err_msg=f"{what}: losses")
    for i, (g, g1) in enumerate(zip(grads, grads1)):
        assert_close(g, g1, f"{what}: grads of step {i}", rtol=1e-4, atol=1e-6)
    names = ("model", "opt", "ema", "metrics")
    for name, s, s1 in zip(names, state, state1):
        assert_close(s, s1, f"{what}: {name}")
    values, values1 = state[3].compute(), state1[3].compute()
    np.testing.assert_allclose(values["loss"], values1["loss"], rtol=2e-5)
    assert values["acc"] == values1["acc"] and int(state[3]["acc"].count) == STEPS * BATCH


@check
def single_device_trains():
    state, _, _ = single()
    # Dropout drew masks: its keys moved
    assert not np.array_equal(
        jax.random.key_data(state[0].drops[0].key), jax.random.key_data(fresh()[0].drops[0].key)
    )


@check
def jit_with_sharded_batch():
    fn = eqstate.jit(step, max_traces=1)
    out = run(fn, placed=True)
    assert_same_training(out, "eqstate.jit")
    assert_layouts(out[0], "eqstate.jit: ")
    assert fn.traces == 1


@check
def filter_jit_with_sharded_batch():
    out = run(eqx.filter_jit(counted_step), placed=True)
    assert_same_training(out, "eqx.filter_jit")
    assert_layouts(out[0], "eqx.filter_jit: ")
    assert TRACES["filter_jit"] == 1


@check
def data_parallel_placed():
    fn = eqstate.data_parallel(step, MESH, max_traces=1)
    out = run(fn, placed=True)
    assert_same_training(out, "eqstate.data_parallel")
    assert_layouts(out[0], "eqstate.data_parallel: ")
    assert fn.traces == 1


@check
def data_parallel_unplaced():
    # arrays as they come (on device 0) are split and replicated by the step itself
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
    fn = eqstate.data_parallel(mesh=mesh, max_traces=2)(step)
    out = run(fn, placed=False)
    assert_same_training(out, "eqstate.data_parallel (unplaced)")
    assert_layouts(out[0], "eqstate.data_parallel (unplaced): ")
    assert fn.traces == 2  # unplaced, then replicated: place the state once to save one


# --- the traps, and why data_parallel cannot fall into them ----------------------------


def small_batch():
    model = fresh()[0]
    x, y = (a[0] for a in data())
    return model, x, y


def plain_loss(model, x, y):
    return loss_fn(model, x, y)[0]


def linear_loss(model, x, y):
    return optax.softmax_cross_entropy_with_integer_labels(jax.vmap(model)(x), y).mean()


@check
def trap_gradient_scale():
    model, x, y = small_batch()
    linear = eqx.nn.Linear(FEATURES, CLASSES, key=jax.random.key(5))
    g1 = jax.grad(linear_loss)(linear, x, y)

    def raw(check_vma, reduce):
        def body(model, x, y):
            g = jax.grad(linear_loss)(model, x, y)
            return jax.lax.pmean(g, "data") if reduce else g

        f = jax.shard_map(
            body,
            mesh=MESH,
            in_specs=(P(), P("data"), P("data")),
            out_specs=P(),
            check_vma=check_vma,
        )
        return jax.jit(f)(linear, jax.device_put(x, SPLIT), jax.device_put(y, SPLIT))

    w1 = np.asarray(g1.weight)
    # the traps: check_vma=True sums the devices' gradients (8x), pmean does not help;
    # check_vma=False returns device 0's
    np.testing.assert_allclose(raw(True, False).weight, 8 * w1, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(raw(True, True).weight, 8 * w1, rtol=1e-4, atol=1e-6)
    assert not np.allclose(raw(False, False).weight, w1, rtol=1e-2)
    # data_parallel: the gradient of the whole batch
    g = eqstate.data_parallel(eqstate.grad(linear_loss))(linear, x, y)  # every device
    assert_close(g, g1, "grad", rtol=1e-4, atol=1e-6)

    # and of the model with BatchNorm and Dropout, with has_aux: as on one device
    def with_aux(model, x, y):
        (loss, (model, _)), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
        return loss, model, grads

    got = eqstate.data_parallel(with_aux, MESH)(model, x, y)
    want = eqx.filter_jit(with_aux)(model, x, y)
    assert_close(got, want, "value_and_grad", rtol=1e-4, atol=1e-6)


@check
def trap_metrics_of_device_zero():
    model, x, y = small_batch()
    logits = np.random.default_rng(2).normal(size=(BATCH, CLASSES)).astype(np.float32)
    want = Accuracy().update(logits, y)[1]
    assert int(want.count) == BATCH
    # the trap: replicated out_specs without a reduction, check_vma=False: device 0's
    raw = jax.shard_map(
        lambda m, lg, lb: m.update(lg, lb)[1],
        mesh=MESH,
        in_specs=(P(), P("data"), P("data")),
        out_specs=P(),
        check_vma=False,
    )
    split = jax.device_put((logits, y), SPLIT)
    assert int(jax.jit(raw)(Accuracy(), *split).count) == BATCH // N_DEV
    # data_parallel: the totals of the whole batch, and all_reduce adds nothing
    fn = eqstate.data_parallel(lambda m, lg, lb: m.update(lg, lb)[1], MESH)
    assert_close(fn(Accuracy(), logits, y), want, "Accuracy")
    fn = eqstate.data_parallel(lambda m, lg, lb: m.update(lg, lb)[1].all_reduce("data"), MESH)
    assert_close(fn(Accuracy(), logits, y), want, "Accuracy.all_reduce")
    mean = eqstate.data_parallel(lambda m, v: m.update(v)[1], MESH)(Mean(), x)
    assert_close(mean, Mean().update(x)[1], "Mean", rtol=1e-5, atol=1e-5)
    # returning what differs between devices is an error naming it, never device 0's
    try:
        eqstate.data_parallel(lambda m, x: (m, jnp.sum(x)), MESH)(model, x)
    except ValueError as err:
        assert "output[1] differs between devices" in str(err), err
        assert "jax.lax.pmean(x, 'data')" in str(err), err
    else:
        raise AssertionError("a per-device output returned replicated did not raise")


@check
def trap_identical_dropout_masks():
    drop = Dropout(0.5, key=jax.random.key(3))
    x = jnp.ones((BATCH, 64))
    y1, d1 = drop(x)
    # the trap: under shard_map, a Dropout without axis_name draws one mask per device
    raw = jax.jit(
        jax.shard_map(
            lambda d, x: d(x),
            mesh=MESH,
            in_specs=(P(), P("data")),
            out_specs=(P("data"), P()),
            check_vma=False,
        )
    )
    blocks = np.asarray(raw(drop, jax.device_put(x, SPLIT))[0]).reshape(N_DEV, -1)
    assert all(np.array_equal(b, blocks[0]) for b in blocks)
    # data_parallel: each row draws its row's mask in the whole batch
    fn = eqstate.data_parallel(lambda d, x: d(x), MESH, out_specs=(P("data"), P()))
    y, d = fn(drop, x)
    np.testing.assert_array_equal(y, y1)
    assert_close(d, d1, "Dropout")
    blocks = np.asarray(y).reshape(N_DEV, -1)
    assert len({b.tobytes() for b in blocks}) == N_DEV  # per-device streams


class Noisy(eqstate.Module):
    key: jax.Array = eqstate.Rng.field()

    @eqstate.mutating
    def __call__(self, x):
        return x + jax.random.normal(eqstate.next_key(self), x.shape)


class PerExample(eqstate.Module):
    linear: eqx.nn.Linear
    drop: Dropout
    noisy: Noisy

    @eqstate.mutating
    def __call__(self, x):  # one example
        x, self.drop = self.drop(jax.nn.relu(self.linear(x)))
        x, self.noisy = self.noisy(x)
        return x


@check
def per_example_model_and_next_key():
    # each example draws its own numbers, those it draws on one device with the batch
    # (BatchNorm per example is left out: in JAX 0.10.2 a collective over a vmap axis
    # inside shard_map(check_vma=True) fails in pvary, with or without eqstate)
    k = jax.random.split(jax.random.key(4), 3)
    net = PerExample(eqx.nn.Linear(FEATURES, 8, key=k[0]), Dropout(0.5, key=k[1]), Noisy(k[2]))
    x = data()[0][0]
    ys1, net1 = eqx.filter_jit(lambda n, x: eqstate.vmap(n)(x))(net, x)
    fn = eqstate.data_parallel(lambda n, x: eqstate.vmap(n)(x), MESH, out_specs=(P("data"), P()))
    ys, new = fn(net, x)
    np.testing.assert_allclose(ys, ys1, rtol=1e-5, atol=1e-5)
    assert_close(new, net1, "per-example net")
    # at batch level, next_key gives each device its own numbers
    noisy = eqstate.data_parallel(lambda n, x: n(x), MESH, out_specs=(P("data"), P()))
    z, _ = noisy(Noisy(k[2]), jnp.zeros((N_DEV, 4)))
    assert len({tuple(np.asarray(r)) for r in z}) == N_DEV


@check
def flags_stay_bools():
    model = fresh()[0]
    # the trap: device_put and shard_map turn the flags into arrays
    assert not isinstance(jax.device_put(model, REPLICATED).norms[0].inference, bool)
    ident = jax.shard_map(lambda m: m, mesh=MESH, in_specs=P(), out_specs=P())
    assert not isinstance(jax.jit(ident)(model).norms[0].inference, bool)
    # data_parallel keeps them, and eval/train flips compile once each
    fn = eqstate.data_parallel(lambda m: m, MESH, max_traces=2)
    out = fn(place(model, REPLICATED))
    assert out.norms[0].inference is False and out.drops[1].inference is False
    assert fn(eqstate.eval(out)).norms[0].inference is True
    fn(out)
    assert fn.traces == 2


@check
def errors_are_named():
    model, x, y = small_batch()
    fn = eqstate.data_parallel(eqstate.grad(plain_loss), MESH)
    try:
        fn(model, x[:12], y[:12])
    except ValueError as err:
        assert "args[1] has shape (12, 16)" in str(err) and "multiple of 8" in str(err), err
    else:
        raise AssertionError("12 examples on 8 devices did not raise")
    try:
        eqstate.data_parallel(step, MESH, axis_name="batch")
    except ValueError as err:
        assert "no such axis; its axes are ('data',)" in str(err), err
    else:
        raise AssertionError("an unknown mesh axis did not raise")
    # an array outside a module with other rows than the batch: not split silently
    try:
        fn(model, x, y[:8])
    except ValueError as err:
        assert "args[1] has 32 rows and args[2] has 8" in str(err), err
        assert "belongs in a module" in str(err), err
    else:
        raise AssertionError("arrays of different row counts did not raise")


def main(names):
    results = {}
    for name in names or CHECKS:
        try:
            CHECKS[name]()
            results[name] = "ok"
        except Exception:
            results[name] = traceback.format_exc(limit=-4)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:])
