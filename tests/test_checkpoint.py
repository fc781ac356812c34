"""`eqstate.save` / `eqstate.load`: round trips bit for bit, kind subsets, validation."""

import os

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings, strategies as st

import eqstate
from eqstate.metrics import Accuracy, Collection, Mean
from eqstate.nn import BatchNorm, Dropout


class NoDecay(eqstate.Param):
    pass


class Net(eqstate.Module):
    lin: eqx.nn.Linear
    bn: BatchNorm
    drop: Dropout
    scale: jax.Array = NoDecay.field()
    steps: jax.Array = eqstate.State.field(default=0)

    def __init__(self, key, width=4):
        k1, k2 = jax.random.split(key)
        self.lin = eqx.nn.Linear(3, width, key=k1)
        self.bn = BatchNorm(width)
        self.drop = Dropout(0.5, key=k2)
        self.scale = jnp.ones(width)

    @eqstate.mutating
    def __call__(self, x):
        x, self.bn = self.bn(jax.vmap(self.lin)(x))
        x, self.drop = self.drop(x)
        self.steps += 1
        return x * self.scale


def bits(tree):
    """Every array leaf as raw bytes (keys as their data), for bit-for-bit equality."""

    def one(x):
        if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return (str(x.dtype), x.shape, np.asarray(x).tobytes())

    return [one(x) for x in jax.tree.leaves(eqx.filter(tree, eqx.is_array))]


def trained(key=0, steps=2):
    net = Net(jax.random.key(key))
    opt = eqstate.Optimizer(optax.adam(1e-2), net)
    x = jnp.arange(15.0).reshape(5, 3)

    def loss(net):
        y, net = net(x)
        return jnp.sum(y**2), net

    with jax.numpy_dtype_promotion("standard"):
        for _ in range(steps):
            (_, net), grads = eqstate.value_and_grad(loss, has_aux=True)(net)
            net, opt = opt.update(grads, net)
    return net, opt


def fresh(key=1):
    net = Net(jax.random.key(key))
    return net, eqstate.Optimizer(optax.adam(1e-2), net)


def test_round_trip_is_bit_for_bit(tmp_path):
    path = tmp_path / "ckpt.eqs"
    saved = trained()
    eqstate.save(path, saved)
    for like in (fresh(), eqstate.abstract(fresh())):
        back = eqstate.load(path, like)
        assert bits(back) == bits(saved)
        assert jax.tree.structure(back) == jax.tree.structure(saved)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.eqs"]


def test_restored_step_does_not_recompile(tmp_path):
    path = tmp_path / "ckpt.eqs"
    x = jnp.ones((5, 3))

    @eqstate.jit(max_traces=1)
    def step(net, opt):
        (_, net), grads = eqstate.value_and_grad(
            lambda n: (jnp.sum(n(x)[0]), n(x)[1]), has_aux=True
        )(net)
        return opt.update(grads, net)

    with jax.numpy_dtype_promotion("standard"):
        net, opt = step(*fresh(0))
        eqstate.save(path, (net, opt))
        # a freshly built optimizer (new optax object, same settings) and its restore
        net, opt = step(*eqstate.load(path, fresh(5)))
        net, opt = step(*eqstate.load(path, eqstate.abstract(fresh(5))))
    assert step.traces == 1


def test_dtypes_keys_and_numbers_round_trip(tmp_path):
    tree = {
        "bf16": jnp.arange(5, dtype=jnp.bfloat16) / 3,
        "f16": jnp.arange(3, dtype=jnp.float16),
        "i8": jnp.array([-128, 0, 127], jnp.int8),
        "u8": jnp.array([0, 255], jnp.uint8),
        "bool": jnp.array([True, False]),
        "c64": jnp.array([1 + 2j], jnp.complex64),
        "typed": jax.random.split(jax.random.key(3), 4),
        "rbg": jax.random.key(7, impl="rbg"),
        "raw": jax.random.PRNGKey(9),
        "numpy": np.arange(4, dtype=np.int16),
        "scalars": (3, 2.5, True, 1j),
        "empty": jnp.zeros((0, 3)),
    }
    path = tmp_path / "dtypes.eqs"
    eqstate.save(path, tree)
    back = eqstate.load(path, tree)
    assert bits(back) == bits(tree)
    assert back["scalars"] == tree["scalars"] and type(back["scalars"][2]) is bool
    assert jax.random.key_impl(back["rbg"]) == jax.random.key_impl(tree["rbg"])
    assert isinstance(back["numpy"], np.ndarray)
    abstract_back = eqstate.load(path, eqstate.abstract(tree))
    assert bits(abstract_back) == bits(tree)


def test_metrics_and_ema_round_trip(tmp_path):
    metrics = Collection(loss=Mean(argname="loss"), acc=Accuracy())
    _, metrics = metrics.update(loss=jnp.array(2.0), logits=jnp.eye(3), labels=jnp.array([0, 1, 1]))
    net, _ = trained()
    ema = eqstate.nn.EMA(net, decay=0.9)
    _, ema = ema.update(net)
    path = tmp_path / "m.eqs"
    eqstate.save(path, {"metrics": metrics, "ema": ema})
    like = {
        "metrics": Collection(loss=Mean(argname="loss"), acc=Accuracy()),
        "ema": eqstate.nn.EMA(Net(jax.random.key(4)), decay=0.9),
    }
    back = eqstate.load(path, like)
    assert bits(back) == bits({"metrics": metrics, "ema": ema})
    assert float(back["metrics"]["acc"].compute()) == pytest.approx(2 / 3)


def test_kind_subsets(tmp_path):
    net, opt = trained()
    new_net, new_opt = fresh()
    path = tmp_path / "all.eqs"
    eqstate.save(path, (net, opt))
    # parameters and running statistics restored, optimizer state reset
    back_net, back_opt = eqstate.load(path, (new_net, new_opt), eqstate.Param, eqstate.BatchStat)
    assert bits(eqstate.filter(back_net, eqstate.Param)) == bits(eqstate.filter(net, eqstate.Param))
    assert bits(back_net.bn) == bits(net.bn)
    assert bits(back_opt) == bits(new_opt)  # OptState left as built
    assert bits(back_net.drop) == bits(new_net.drop)  # Rng left as built
    # ship only the BatchStats
    stats = tmp_path / "stats.eqs"
    eqstate.save(stats, net, eqstate.BatchStat)
    assert os.path.getsize(stats) < os.path.getsize(path)
    back = eqstate.load(stats, new_net, eqstate.BatchStat)
    stats_of = lambda m: bits(eqstate.filter(m, eqstate.BatchStat))  # noqa: E731
    assert stats_of(back) == stats_of(net) and bits(back.lin) == bits(new_net.lin)
    with pytest.raises(
        ValueError,
        match=r"has no leaf at \.lin\.weight .*saved with the filters eqstate\.BatchStat: pass the same ones",
    ):
        eqstate.load(stats, new_net)
    # a user kind is a filter like any other
    eqstate.save(stats, net, NoDecay)
    assert bits(eqstate.load(stats, new_net, NoDecay).scale) == bits(net.scale)


def test_part_of_a_checkpoint(tmp_path):
    net, opt = trained()
    path = tmp_path / "pair.eqs"
    eqstate.save(path, {"model": net, "opt": opt})
    model = eqstate.load(path, {"model": fresh()[0], "opt": None})["model"]
    assert bits(model) == bits(net)
    with pytest.raises(
        ValueError,
        match=r"holds \['opt'\]\.opt_leaves\[0\] .* which `like` does not have.*put `None` in `like`",
    ):
        eqstate.load(path, {"model": fresh()[0]})


def test_mismatches_name_the_path_and_both_sides(tmp_path):
    path = tmp_path / "net.eqs"
    eqstate.save(path, Net(jax.random.key(0)))
    with pytest.raises(
        ValueError,
        match=r"at \.lin\.weight, the checkpoint .* holds float32\[4, 3\] of kind eqstate\.Param, but `like` has float32\[8, 3\] of kind eqstate\.Param",
    ):
        eqstate.load(path, Net(jax.random.key(0), width=8))
    half = eqx.tree_at(lambda n: n.scale, Net(jax.random.key(0)), jnp.ones(4, jnp.bfloat16))
    with pytest.raises(
        ValueError, match=r"at \.scale, .* holds float32\[4\] .* but `like` has bfloat16\[4\]"
    ):
        eqstate.load(path, half)

    class Other(eqstate.Module):
        scale: jax.Array = eqstate.State.field()

    eqstate.save(path, Other(jnp.ones(4)))

    class Other2(eqstate.Module):
        scale: jax.Array

    with pytest.raises(
        ValueError,
        match=r"at \.scale, .* of kind eqstate\.State, but `like` has float32\[4\] of kind eqstate\.Param",
    ):
        eqstate.load(path, Other2(jnp.ones(4)))
    with pytest.raises(ValueError, match=r"has no leaf at \[0\]"):
        eqstate.load(path, (jnp.ones(4),))


def test_damaged_files_are_named_errors(tmp_path):
    path = tmp_path / "net.eqs"
    net = trained()[0]
    eqstate.save(path, net)
    data = path.read_bytes()
    like = fresh()[0]
    for damaged, why in [
        (data[: len(data) // 2], "checksum"),
        (data[:10], "not an eqstate checkpoint"),
        (data[:-1], "checksum"),
        (data[:-40] + bytes([data[-40] ^ 1]) + data[-39:], "checksum"),
        (b"", "not an eqstate checkpoint"),
        (b"\x93NUMPY" + data[6:], "not an eqstate checkpoint"),
    ]:
        path.write_bytes(damaged)
        with pytest.raises(ValueError, match=why):
            eqstate.load(path, like)
    # an Equinox leaf file is not ours
    eqx.tree_serialise_leaves(path, like.lin)
    with pytest.raises(ValueError, match=r"is not an eqstate checkpoint"):
        eqstate.load(path, like)


def test_bad_arguments(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"the directory .*missing of .* does not exist"):
        eqstate.save(tmp_path / "missing" / "x.eqs", fresh()[0])
    with pytest.raises(
        TypeError, match=r"eqstate\.save\(path=\.\.\.\) must be a str or os\.PathLike, got 3"
    ):
        eqstate.save(3, fresh()[0])  # pyright: ignore[reportArgumentType]
    with pytest.raises(
        ValueError, match=r"no leaf of the tree matches the filters eqstate\.OptState"
    ):
        eqstate.save(tmp_path / "x.eqs", fresh()[0], eqstate.OptState)
    with pytest.raises(FileNotFoundError):
        eqstate.load(tmp_path / "absent.eqs", fresh()[0])


def test_caller_tree_is_not_changed_and_load_is_not_half_done(tmp_path):
    net, opt = trained()
    before = bits((net, opt))
    path = tmp_path / "x.eqs"
    eqstate.save(path, (net, opt))
    like = fresh()
    like_bits = bits(like)
    eqstate.save(tmp_path / "small.eqs", (Net(jax.random.key(0), width=2), like[1]))
    with pytest.raises(ValueError):
        eqstate.load(tmp_path / "small.eqs", like)
    assert bits(like) == like_bits and bits((net, opt)) == before


@settings(max_examples=25, deadline=None)
@given(
    shapes=st.lists(st.lists(st.integers(0, 4), max_size=3), min_size=1, max_size=4),
    dtype=st.sampled_from(["float32", "bfloat16", "int8", "uint32", "bool", "float16", "int32"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_property_round_trip(tmp_path_factory, shapes, dtype, seed):
    rng = np.random.default_rng(seed)
    tree = [
        jnp.asarray((rng.standard_normal(tuple(s)) * 100).astype(np.float32)).astype(dtype)
        for s in shapes
    ]
    tree.append(jax.random.key(seed))
    path = tmp_path_factory.mktemp("p") / "t.eqs"
    eqstate.save(path, tree)
    assert bits(eqstate.load(path, eqstate.abstract(tree))) == bits(tree)


def test_numpy_leaves_keep_their_dtype_and_stay_writeable(tmp_path):
    tree = {
        "f64": np.linspace(0, 1, 3),
        "i64": np.arange(3, dtype=np.int64),
        "f32": np.ones(2, np.float32),
    }
    path = tmp_path / "np.eqs"
    eqstate.save(path, tree)
    back = eqstate.load(path, tree)
    for k, v in tree.items():
        assert back[k].dtype == v.dtype and np.array_equal(back[k], v)
        assert back[k].flags.writeable


def test_file_permissions_follow_the_umask_and_the_old_file(tmp_path):
    old = os.umask(0o022)
    try:
        path = tmp_path / "perm.eqs"
        eqstate.save(path, fresh()[0])
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o640)
        eqstate.save(path, fresh()[0])
        assert path.stat().st_mode & 0o777 == 0o640
    finally:
        os.umask(old)


def test_odd_names_and_leftovers(tmp_path):
    # glob characters in the name, and a leftover of a dead writer: removed
    path = tmp_path / "ckpt[1]*.eqs"
    dead = tmp_path / ".ckpt[1]*.eqs.999999999.abcd.eqstate-tmp"
    dead.write_bytes(b"partial")
    other = tmp_path / ".other.eqs.999999999.abcd.eqstate-tmp"
    other.write_bytes(b"partial")
    live = tmp_path / f".ckpt[1]*.eqs.{os.getpid()}.abcd.eqstate-tmp"  # a concurrent save
    live.write_bytes(b"in progress")
    eqstate.save(path, fresh()[0])
    assert not dead.exists() and other.exists() and live.exists()
    assert bits(eqstate.load(path, fresh()[0])) == bits(fresh()[0])
    # a long (valid) name
    long = tmp_path / ("x" * 240)
    eqstate.save(long, fresh()[0])
    assert bits(eqstate.load(long, fresh()[0])) == bits(fresh()[0])


def test_weak_scalars_come_back_weak(tmp_path):
    class Scale(eqstate.Module):
        s: jax.Array

        def __call__(self, x):
            return self.s * x

    model = Scale(jnp.asarray(2.0))  # weakly typed, as a Python number makes it
    step = eqstate.jit(lambda m, x: m(x), max_traces=1)
    step(model, jnp.ones(3))
    path = tmp_path / "weak.eqs"
    eqstate.save(path, model)
    for like in (model, eqstate.abstract(model)):
        back = eqstate.load(path, like)
        assert back.s.weak_type
        step(back, jnp.ones(3))


def test_load_keeps_likes_inference_flags(tmp_path):
    path = tmp_path / "train.eqs"
    net = trained()[0]
    eqstate.save(path, net)  # in training mode
    back = eqstate.load(path, eqstate.eval(fresh()[0]))
    assert back.bn.inference is True and back.drop.inference is True
    assert bits(back) == bits(net)
    back = eqstate.load(path, eqstate.abstract(eqstate.eval(fresh()[0])))
    assert back.drop.inference is True


def test_malformed_headers_directories_and_lookalike_keys(tmp_path):
    import hashlib
    import json

    path = tmp_path / "h.eqs"
    for header in (b"{not json", json.dumps([1, 2]).encode(), json.dumps({"format": 1}).encode()):
        body = b"EQSTATE-CHECKPOINT\n" + len(header).to_bytes(8, "little") + header
        path.write_bytes(body + hashlib.blake2b(body, digest_size=32).digest())
        with pytest.raises(ValueError, match=r"is damaged: its header is not an eqstate header"):
            eqstate.load(path, fresh()[0])
    with pytest.raises(IsADirectoryError, match=r"eqstate\.save\(path=\.\.\.\) is the directory"):
        eqstate.save(tmp_path, fresh()[0])

    class K:
        def __init__(self, v):
            self.v = v

        def __repr__(self):
            return "K"

        def __hash__(self):
            return self.v

        def __eq__(self, other):
            return isinstance(other, K) and other.v == self.v

        def __lt__(self, other):
            return self.v < other.v

    with pytest.raises(ValueError, match=r"two leaves have the same path"):
        eqstate.save(path, {K(1): jnp.ones(1), K(2): jnp.zeros(1)})
