"""Round trips of eqstate trees through orbax-checkpoint, as the README's recipe does them.

The recipe: save `stored(tree)` (arrays, typed PRNG keys and Python numbers such as the
`inference` flags; functions and other leaves orbax cannot store become `None`), restore
into `stored(eqstate.abstract(fresh))` for a freshly built tree of the same structure,
and `eqx.combine` the result with `fresh` for the leaves orbax did not store.
"""

import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqstate
from eqstate.nn import BatchNorm, Dropout


ocp = pytest.importorskip("orbax.checkpoint")


def stored(tree):  # what orbax keeps: arrays, typed PRNG keys, Python numbers (`inference`)
    return eqx.filter(tree, lambda x: eqx.is_array_like(x) or isinstance(x, jax.ShapeDtypeStruct))


class Net(eqstate.Module):
    mlp: eqx.nn.MLP  # its activations are function leaves, which orbax cannot store
    bn: BatchNorm
    drop: Dropout

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.mlp = eqx.nn.MLP(3, 4, 8, 1, key=k1)
        self.bn = BatchNorm(4)
        self.drop = Dropout(0.5, key=k2)  # a typed key: jax.random.split of jax.random.key

    @eqstate.mutating
    def __call__(self, x):
        x = jax.vmap(self.mlp)(x)
        x, self.bn = self.bn(x)
        x, self.drop = self.drop(x)
        return x


def make(seed):
    model = Net(jax.random.key(seed))
    return model, eqstate.Optimizer(optax.adam(1e-2), model)


def loss_fn(model, x, y):
    pred, model = model(x)
    return jnp.mean((pred - y) ** 2), model


@eqstate.jit(max_traces=1)
def train_step(model, opt, x, y):
    (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
    model, opt = opt.update(grads, model)
    return model, opt, loss


def batch(i):
    kx, ky = jax.random.split(jax.random.key(100 + i))
    return jax.random.normal(kx, (16, 3)), jax.random.normal(ky, (16, 4))


def assert_identical(restored, saved):
    """Same treedef, leaf types, dtypes, shardings and bits (keys by their key data)."""
    leaves, treedef = jax.tree_util.tree_flatten(restored)
    want, want_def = jax.tree_util.tree_flatten(saved)
    assert treedef == want_def
    for a, b in zip(leaves, want, strict=True):
        assert type(a) is type(b), (type(a), type(b))
        if isinstance(b, jax.Array):
            assert a.dtype == b.dtype and a.shape == b.shape and a.sharding == b.sharding
            assert getattr(a, "weak_type", False) == getattr(b, "weak_type", False)
            if jnp.issubdtype(b.dtype, jax.dtypes.prng_key):
                assert jax.random.key_impl(a) == jax.random.key_impl(b)
                a, b = jax.random.key_data(a), jax.random.key_data(b)
            assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
        else:
            assert a == b


def test_checkpoint_manager_round_trip(tmp_path, standard_promotion):
    directory = tmp_path
    model, opt = make(0)
    # --- the README's code block, as written there ---
    options = ocp.CheckpointManagerOptions(max_to_keep=2)
    with ocp.CheckpointManager(directory, options=options) as mngr:
        for step in range(4):
            model, opt, _ = train_step(model, opt, *batch(step))
            mngr.save(step, args=ocp.args.StandardSave(stored({"model": model, "opt": opt})))

    # later, in a new process: build the tree as before (its values do not matter)
    new_model = Net(jax.random.key(1))
    fresh = {"model": new_model, "opt": eqstate.Optimizer(optax.adam(1e-2), new_model)}
    with ocp.CheckpointManager(directory, options=options) as mngr:
        target = stored(eqstate.abstract(fresh))  # shapes, dtypes, shardings; flags stay bools
        restored = mngr.restore(mngr.latest_step(), args=ocp.args.StandardRestore(target))
    restored = eqx.combine(restored, fresh)  # with what orbax does not store (functions)
    # --- end of the README's code block ---
    assert sorted(p.name for p in directory.iterdir()) == ["2", "3"]  # max_to_keep
    assert_identical(restored, {"model": model, "opt": opt})
    assert isinstance(restored["model"].bn.inference, bool)
    assert eqstate.kinds(restored) == eqstate.kinds(fresh)
    assert jax.tree_util.tree_structure(restored) == jax.tree_util.tree_structure(fresh)
    # the same compiled step continues from the checkpoint, bit for bit
    assert train_step.traces == 1
    ours = train_step(restored["model"], restored["opt"], *batch(4))
    theirs = train_step(model, opt, *batch(4))
    assert train_step.traces == 1
    assert_identical(ours, theirs)

    # a target from eqx.filter_eval_shape, without building the arrays, restores the same
    with ocp.CheckpointManager(directory, options=options) as mngr:
        assert mngr.all_steps() == [2, 3]
        shapes = eqx.filter_eval_shape(lambda: dict(zip(("model", "opt"), make(2), strict=True)))
        again = mngr.restore(3, args=ocp.args.StandardRestore(stored(shapes)))
    assert_identical(eqx.combine(again, fresh), restored)


def test_python_numbers_and_eval_mode_come_from_the_checkpoint(tmp_path):
    model = eqstate.eval(Net(jax.random.key(0)))
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(stored(model)))
        mngr.wait_until_finished()
        fresh = Net(jax.random.key(1))  # built in training mode
        raw = mngr.restore(0, args=ocp.args.StandardRestore(stored(eqstate.abstract(fresh))))
    restored = eqx.combine(raw, fresh)
    assert restored.bn.inference is True and restored.drop.inference is True
    assert_identical(restored, model)


def test_eval_shape_targets_lose_the_flags(tmp_path):
    # Why the recipe restores into `eqstate.abstract(...)`: under `jax.eval_shape` the
    # `inference` flags become abstract arrays, come back as NumPy arrays of kind Param,
    # and a jitted step sees new leaves and compiles again.
    model = Dropout(0.5, key=jax.random.key(0))
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(stored(model)))
        mngr.wait_until_finished()
        shapes = jax.eval_shape(lambda: Dropout(0.5, key=jax.random.key(1)))
        bad = mngr.restore(0, args=ocp.args.StandardRestore(shapes))
        good = mngr.restore(0, args=ocp.args.StandardRestore(stored(eqstate.abstract(model))))
    assert isinstance(bad.inference, np.ndarray) and good.inference is False
    assert eqstate.filter(bad, eqstate.Param).inference is not None  # an array of kind Param
    assert eqstate.filter(good, eqstate.Param).inference is None
    step = eqstate.jit(lambda d: d(jnp.ones(8)), max_traces=1)
    step(eqx.combine(good, model))
    with pytest.raises(RuntimeError, match="max_traces=1"):
        step(eqx.combine(bad, model))


def test_restore_the_model_alone_from_composite_items(tmp_path):
    model, opt = make(0)
    step = 0
    # --- the README's code block ---
    with ocp.CheckpointManager(tmp_path) as mngr:  # the parts as separate items...
        mngr.save(
            step,
            args=ocp.args.Composite(
                model=ocp.args.StandardSave(stored(model)), opt=ocp.args.StandardSave(stored(opt))
            ),
        )

    new_model = Net(jax.random.key(1))
    with ocp.CheckpointManager(tmp_path) as mngr:  # ...to restore one of them
        target = stored(eqstate.abstract(new_model))
        out = mngr.restore(step, args=ocp.args.Composite(model=ocp.args.StandardRestore(target)))
    restored_model = eqx.combine(out.model, new_model)
    # --- end of the README's code block ---
    assert set(out.keys()) == {"model"}
    assert_identical(restored_model, model)
    with ocp.CheckpointManager(tmp_path) as mngr:
        assert set(mngr.item_metadata(step).keys()) == {"model", "opt"}


def test_restore_the_model_alone_from_one_tree(tmp_path):
    model, opt = make(0)
    with ocp.CheckpointManager(tmp_path) as mngr:
        mngr.save(0, args=ocp.args.StandardSave(stored({"model": model, "opt": opt})))
        mngr.wait_until_finished()
    fresh = Net(jax.random.key(1))
    target = {"model": stored(eqstate.abstract(fresh))}
    # StandardRestore has no partial restore (its strict=False is about shapes)
    with (
        ocp.CheckpointManager(tmp_path) as mngr,
        pytest.raises(ValueError, match="partial_restore=True"),
    ):
        mngr.restore(0, args=ocp.args.StandardRestore(target))
    # PyTreeRestore has, in a manager that has not saved with StandardSave (a new one);
    # restore_args carry the target's shardings (without them orbax reads them from the
    # checkpoint, with a warning)
    with ocp.CheckpointManager(tmp_path) as mngr:
        out = mngr.restore(
            0,
            args=ocp.args.PyTreeRestore(
                target,
                restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True,
            ),
        )
    assert set(out.keys()) == {"model"}
    assert_identical(eqx.combine(out["model"], fresh), model)


_SHARDED = textwrap.dedent(
    """
    import tempfile
    import warnings

    warnings.simplefilter("error")
    import equinox as eqx
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import orbax.checkpoint as ocp
    from jax.sharding import NamedSharding, PartitionSpec as P

    import eqstate
    from eqstate.nn import BatchNorm, Dropout

    assert jax.device_count() == 4
    mesh = jax.make_mesh((4,), ("d",), axis_types=(jax.sharding.AxisType.Auto,))


    def stored(tree):
        return eqx.filter(
            tree, lambda x: eqx.is_array_like(x) or isinstance(x, jax.ShapeDtypeStruct)
        )


    def make(seed):
        k1, k2 = jax.random.split(jax.random.key(seed))
        model = (eqx.nn.Linear(8, 16, key=k1), BatchNorm(16), Dropout(0.5, key=k2))
        with jax.numpy_dtype_promotion("standard"):
            return model, eqstate.Optimizer(optax.adam(1e-2), model)


    def shard(tree, spec):  # the leading axis across the devices where it divides
        def one(x):
            if not eqx.is_array(x):
                return x
            ok = x.ndim and x.shape[0] % 4 == 0
            return jax.device_put(x, NamedSharding(mesh, spec if ok else P()))

        return jax.tree.map(one, tree)


    @eqx.filter_jit
    def train_step(model, opt, x):
        def loss_fn(model, x):
            linear, bn, drop = model
            h, bn = bn(jax.vmap(linear)(x))
            h, drop = drop(h)
            return jnp.mean(h**2), (linear, bn, drop)

        (_, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x)
        return opt.update(grads, model)


    def check(restored, saved, target):
        leaves, treedef = jax.tree.flatten(restored)
        want, want_def = jax.tree.flatten(saved)
        assert treedef == want_def
        for a, b, t in zip(leaves, want, jax.tree.leaves(target), strict=True):
            if isinstance(b, jax.Array):
                assert a.sharding == t.sharding, (a.sharding, t.sharding)
                if jax.dtypes.issubdtype(b.dtype, jax.dtypes.prng_key):
                    assert a.dtype == b.dtype
                    a, b = jax.random.key_data(a), jax.random.key_data(b)
                assert np.asarray(a).tobytes() == np.asarray(b).tobytes()
            else:
                assert type(a) is type(b) and a == b


    model, opt = shard(make(0), P("d"))
    x = jax.device_put(jnp.ones((8, 8)), NamedSharding(mesh, P("d")))
    with jax.numpy_dtype_promotion("standard"):
        model, opt = train_step(model, opt, x)
    saved = stored((model, opt))
    assert saved[0][0].weight.sharding.spec == P("d") and saved[0][1].inference is False
    assert len(saved[1].opt_leaves[1].sharding.device_set) == 4  # Adam's mu
    fresh = make(1)
    with tempfile.TemporaryDirectory() as d:
        options = ocp.CheckpointManagerOptions(max_to_keep=1)
        with ocp.CheckpointManager(d, options=options) as mngr:
            mngr.save(0, args=ocp.args.StandardSave(saved))
            mngr.wait_until_finished()
        with ocp.CheckpointManager(d, options=options) as mngr:
            # the layout it was saved with, then every leaf replicated on every device
            for spec in (P("d"), P()):
                target = stored(eqstate.abstract(shard(fresh, spec)))
                out = mngr.restore(0, args=ocp.args.StandardRestore(target))
                check(out, saved, target)
                restored = eqx.combine(out, fresh)
                assert restored[0][0].weight.sharding.spec == spec
                assert restored[0][2].key.sharding.is_fully_replicated
    print("ok")
    """
)


def test_sharded_round_trip_keeps_the_target_shardings():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    env["JAX_PLATFORMS"] = "cpu"
    proc = subprocess.run(
        [sys.executable, "-c", _SHARDED], env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-3000:]
