# ruff: noqa: E402  (the device count is set before JAX is imported)
import os
import re


os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P


jax.config.update("jax_numpy_dtype_promotion", "standard")
import eqstate
from eqstate.nn import BatchNorm, Dropout


class Net(eqstate.Module):
    lin1: eqx.nn.Linear
    bn: BatchNorm
    drop: Dropout
    lin2: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3 = jax.random.split(key, 3)
        self.lin1 = eqx.nn.Linear(8, 32, use_bias=False, key=k1)  # no bias before BatchNorm
        self.bn = BatchNorm(32)
        self.drop = Dropout(0.2, key=k2)
        self.lin2 = eqx.nn.Linear(32, 4, key=k3)

    @eqstate.mutating
    def __call__(self, x):
        x, self.bn = self.bn(jax.vmap(self.lin1)(x))
        x, self.drop = self.drop(jax.nn.relu(x))
        return jax.vmap(self.lin2)(x)


def loss_fn(model, x, y):
    pred, model = model(x)
    return jnp.mean((pred - y) ** 2), model


def make_step(out_shardings=None):
    @eqstate.jit(max_traces=1)
    def step(model, opt, x, y):
        (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
        model, opt = opt.update(grads, model)
        if out_shardings is not None:
            model, opt = eqstate.place((model, opt), out_shardings)
        return loss, model, opt

    return step


def data(i):
    kx, ky = jax.random.split(jax.random.key(100 + i))
    return jax.random.normal(kx, (16, 8)), jax.random.normal(ky, (16, 4))


def train(model, opt, step, place_batch=lambda a: a, steps=4):
    losses = []
    for i in range(steps):
        x, y = data(i)
        loss, model, opt = step(model, opt, place_batch(x), place_batch(y))
        losses.append(float(loss))
    return losses, model, opt


net = Net(jax.random.key(0))
opt = eqstate.Optimizer(optax.adam(1e-2), net)
ref_losses, ref_model, ref_opt = train(net, opt, make_step())

mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto, AxisType.Auto))
rules = [
    (eqstate.State, P()),  # running statistics and keys replicated
    (lambda path, kind, leaf: getattr(leaf, "ndim", 0) == 2, P("model", None)),
    (eqstate.Param, P("model")),
]
sh = eqstate.shardings((net, opt), mesh, rules)
# the optimizer state follows the parameters: Adam's moments as their parameters
assert sh[1].opt_leaves[0].spec == P()  # the count
specs = [s.spec for s in sh[1].opt_leaves]
assert specs.count(P("model", None)) == 4 and specs.count(P("model")) == 6, specs
assert sh[0].bn.running_mean.spec == P() and sh[0].drop.key.spec == P()
assert sh[0].bn.inference is None  # no sharding for static flags

model, sopt = eqstate.place((net, opt), sh)
assert type(model.bn.inference) is bool and model.lin1.weight.sharding == sh[0].lin1.weight
batch = NamedSharding(mesh, P("data"))
step = make_step(sh)
losses, model, sopt = train(model, sopt, step, lambda a: jax.device_put(a, batch))
assert step.traces == 1
np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
flat = lambda t: jax.tree.leaves(eqx.filter(t, eqx.is_inexact_array))  # noqa: E731
for a, b in zip(flat((model, sopt)), flat((ref_model, ref_opt))):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)
np.testing.assert_array_equal(
    jax.random.key_data(model.drop.key), jax.random.key_data(ref_model.drop.key)
)
# layouts kept on the outputs: state never resharded behind the user's back
for got, want in zip(
    jax.tree.leaves(eqx.filter((model, sopt), eqx.is_array)), jax.tree.leaves(sh), strict=True
):
    assert got.sharding.is_equivalent_to(want, got.ndim), (got.sharding, want)
assert type(model.bn.inference) is bool
# errors name the rule and the leaf


def raises(fn, pattern):
    try:
        fn()
    except (ValueError, TypeError, RuntimeError) as err:
        assert re.search(pattern, str(err), re.DOTALL), str(err)
    else:
        raise AssertionError(f"no error for {pattern}")


raises(
    lambda: eqstate.shardings(net, mesh, [(eqstate.Param, P("model", None, None))]),
    r"rules\[0\] \(eqstate\.Param: P\('model', None, None\)\) shards 3 axes of the leaf at \.lin1\.weight, which has shape \(32, 8\)",
)
raises(
    lambda: eqstate.shardings(
        net, mesh, [(lambda p, k, leaf: getattr(leaf, "ndim", 0) == 2, P(("data", "model"), None))]
    ),
    r"rules\[0\] \(<lambda>: P\(\('data', 'model'\), None\)\) splits axis 0 of the leaf at \.lin2\.weight \(shape \(4, 32\)\) over mesh axes \('data', 'model'\) of size 8, which does not divide 4",
)
raises(lambda: eqstate.shardings(net, mesh, [eqstate.Param]), r"rules\[0\] is <class")
raises(
    lambda: eqstate.shardings(net, mesh, [(eqstate.Param, "model")]),
    r"rules\[0\]\[1\] is 'model', not a PartitionSpec",
)
raises(
    lambda: eqstate.shardings(net, "mesh", rules), r"mesh=\.\.\.\) must be a jax\.sharding\.Mesh"
)
# abstract trees work too, and give the same shardings
assert jax.tree.leaves(
    eqstate.shardings(eqstate.abstract((net, opt)), mesh, rules)
) == jax.tree.leaves(sh)


# multi_transform's state (MaskedNode for the other labels' parameters) follows too
class NoDecay(eqstate.Param):
    pass


class Two(eqstate.Module):
    w: jax.Array
    b: jax.Array = NoDecay.field()


two = Two(jnp.ones((8, 4)), jnp.ones(8))
labels = eqstate.labels({NoDecay: "plain", eqstate.Param: "decay"})
multi = optax.multi_transform({"decay": optax.adamw(1e-3), "plain": optax.adam(1e-3)}, labels)
specs = [
    s.spec
    for s in eqstate.shardings(
        eqstate.Optimizer(multi, two), mesh, [(eqstate.Param, P("model"))]
    ).opt_leaves
]
assert specs.count(P("model")) == 4, specs  # each label's mu and nu
raises(
    lambda: eqstate.shardings(two, mesh, [(..., P("nope"))]),
    r"names the mesh axis 'nope', but the mesh has the axes \('data', 'model'\)",
)

# a retrace caused by a new layout says so
double = eqstate.jit(lambda x: x * 2, max_traces=1)
double(jnp.ones(16))
raises(
    lambda: double(jax.device_put(jnp.ones(16), batch)),
    r"most often a new placement of an input .*`eqstate\.place`",
)
print("ok")
