import html as html_lib
import re

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqstate
from eqstate.nn import BatchNorm, Dropout


class Net(eqstate.Module):
    lin: eqx.nn.Linear
    bn: BatchNorm
    drop: Dropout

    def __init__(self, key):
        k1, k2 = jax.random.split(key)
        self.lin = eqx.nn.Linear(4, 3, key=k1)
        self.bn = BatchNorm(3)
        self.drop = Dropout(0.5, key=k2)

    @eqstate.mutating
    def __call__(self, x):
        x = jax.vmap(self.lin)(x)
        x, self.bn = self.bn(x)
        x, self.drop = self.drop(x)
        return x

    @eqstate.mutating
    def encode(self, x):
        return jax.vmap(self.lin)(x)


class Cache(eqstate.State):
    pass


def loss_fn(model, x):
    y, model = model(x)
    return jnp.mean(y**2), model


@eqx.filter_jit
def train_step(model, opt, x):
    (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x)
    model, opt = opt.update(grads, model)
    return model, opt, loss


@pytest.fixture
def net():
    return Net(jax.random.key(0))


@pytest.fixture
def x():
    return jax.random.normal(jax.random.key(1), (8, 4))


def lines(text):
    """Each line with its runs of spaces collapsed: columns as `a b c`."""
    return [re.sub(r"\s+", " ", line).strip() for line in text.splitlines()]


def html_text(html):
    return html_lib.unescape(re.sub(r"\s+", " ", re.sub(r"<[^>]+>", "", html)))


# summary


def test_summary_rows_and_totals(net):
    s = eqstate.summary(net)
    assert [r.path for r in s.rows] == [
        ".lin.weight",
        ".lin.bias",
        ".bn.weight",
        ".bn.bias",
        ".bn.running_mean",
        ".bn.running_var",
        ".drop.key",
    ]
    kinds = [eqstate.Param] * 4 + [eqstate.BatchStat] * 2 + [eqstate.Rng]
    assert [r.kind for r in s.rows] == kinds
    assert s.rows[0][2:] == ((3, 4), jnp.dtype("float32"), 12, 48)
    key = s.rows[-1]
    assert (key.shape, str(key.dtype), key.size, key.nbytes) == ((), "key<fry>", 1, 8)
    assert s.totals == {
        eqstate.Param: (4, 21, 84),
        eqstate.BatchStat: (2, 6, 24),
        eqstate.Rng: (1, 1, 8),
    }
    assert s.total == (7, 28, 116)
    assert s.others == ((".bn.inference", False), (".drop.inference", False))


def test_summary_text(net):
    text = str(eqstate.summary(net))
    assert repr(eqstate.summary(net)) == text
    got = lines(text)
    assert got[0] == "Net: Param 21 (84 B), BatchStat 6 (24 B), Rng 1 (8 B)"
    assert "path kind shape dtype elements bytes" in got
    assert ".lin.weight Param (3, 4) float32 12 48 B" in got
    assert ".bn.running_mean BatchStat (3,) float32 3 12 B" in got
    assert ".drop.key Rng () key<fry> 1 8 B" in got
    assert "4 arrays Param 21 84 B" in got
    assert "2 arrays BatchStat 6 24 B" in got
    assert "1 array Rng 1 8 B" in got
    assert "7 arrays total 28 116 B" in got
    assert got[-1] == (
        "Not counted: 2 leaves that are not an array (.bn.inference, .drop.inference)"
    )
    assert "\x1b" not in text  # plain text, no terminal colours


def test_summary_html(net):
    html = eqstate.summary(net)._repr_html_()
    assert html.startswith("<pre") and html.endswith("</pre>")
    assert "<span" in html  # styled by rich: bold header, coloured kinds
    text = html_text(html)
    assert "Net: Param 21 (84 B), BatchStat 6 (24 B), Rng 1 (8 B)" in text
    assert ".bn.running_mean BatchStat (3,) float32 3 12 B" in text
    assert "7 arrays total 28 116 B" in text


def test_summary_large_numbers():
    class Big(eqstate.Module):
        w: jax.Array
        stats: jax.Array = eqstate.BatchStat.field()

    s = eqstate.summary(Big(jnp.zeros((349, 250)), jnp.zeros(192)))
    assert lines(str(s))[0] == "Big: Param 87,250 (349.0 KB), BatchStat 192 (768 B)"
    assert "w Param (349, 250) float32 87,250 349.0 KB" in " ".join(lines(str(s)))


def test_summary_of_model_and_optimizer(net):
    opt = eqstate.Optimizer(optax.adam(1e-3), net)
    s = eqstate.summary((net, opt))
    assert s.rows[0].path == "[0].lin.weight"
    assert s.totals[eqstate.Param] == (4, 21, 84)
    assert s.totals[eqstate.OptState].arrays == len(jax.tree_util.tree_leaves(opt))
    assert lines(str(s))[0].startswith("tuple: Param 21 (84 B), BatchStat 6 (24 B), Rng 1 (8 B)")


def test_summary_abstract_tree_matches(net):
    concrete, abstract = eqstate.summary(net), eqstate.summary(eqstate.abstract(net))
    assert abstract.rows == concrete.rows
    assert abstract.totals == concrete.totals
    assert str(abstract) == str(concrete)


def test_summary_user_kinds_keys_numpy_and_scalars():
    class Model(eqstate.Module):
        cache: jax.Array = Cache.field()
        keys: jax.Array = eqstate.Rng.field()
        raw: np.ndarray  # a NumPy array, kept as it is
        scale: float = 2.0  # a Python number: a leaf, not an array

    m = Model(jnp.zeros((2, 5), jnp.bfloat16), jax.random.split(jax.random.key(0), 3), np.ones(4))
    s = eqstate.summary(m)
    assert [(r.path, r.kind, r.size, r.nbytes) for r in s.rows] == [
        (".cache", Cache, 10, 20),
        (".keys", eqstate.Rng, 3, 24),
        (".raw", eqstate.Param, 4, 32),
    ]
    assert s.others == ((".scale", 2.0),)
    text = str(s)
    assert lines(text)[0] == "Model: Cache 10 (20 B), Rng 3 (24 B), Param 4 (32 B)"
    assert ".raw Param (4,) float64 4 32 B" in lines(text)
    assert ".cache Cache (2, 5) bfloat16 10 20 B" in lines(text)
    assert lines(text)[-1] == "Not counted: 1 leaf that is not an array (.scale)"


def test_summary_paths_with_brackets_are_not_markup():
    tree = {"a": [jnp.zeros(2)], "[bold]": jnp.zeros(1)}
    text = str(eqstate.summary(tree))
    assert "['a'][0] Param (2,) float32 2 8 B" in lines(text)
    assert "['[bold]'] Param (1,) float32 1 4 B" in lines(text)


def test_summary_under_jit(net):
    @eqx.filter_jit  # flags stay Python bools (under jax.jit they are traced bool[] arrays)
    def totals(m):
        s = eqstate.summary(m)
        assert s.totals[eqstate.BatchStat] == (2, 6, 24)
        return s.total.size

    assert totals(net) == 28


# diff


def test_diff_of_a_training_step(net, x):
    opt = eqstate.Optimizer(optax.sgd(0.1), net)
    new, _, _ = train_step(net, opt, x)
    d = eqstate.diff(net, new)
    assert d
    assert d.arrays == 7
    # the linear bias before BatchNorm gets no gradient (BatchNorm subtracts the mean)
    assert d.changed == {eqstate.Param: 3, eqstate.BatchStat: 2, eqstate.Rng: 1}
    assert d.headline == "6 of 7 arrays changed: Param 3, BatchStat 2, Rng 1"
    rows = {r.path: r for r in d.rows}
    assert ".lin.bias" not in rows and ".lin.weight" in rows
    mean = rows[".bn.running_mean"]
    expected = float(np.max(np.abs(np.asarray(new.bn.running_mean - net.bn.running_mean))))
    assert mean.kind is eqstate.BatchStat
    assert (mean.changed, mean.size) == (3, 3)
    assert mean.max_abs == pytest.approx(expected)
    key = rows[".drop.key"]
    assert (key.kind, key.changed, key.max_abs, key.change) == (eqstate.Rng, 1, None, "key changed")
    text = str(d)
    got = lines(text)
    assert got[0] == "Net: 6 of 7 arrays changed: Param 3, BatchStat 2, Rng 1"
    assert "path kind shape dtype changed max |Δ| / change" in got
    assert f".bn.running_mean BatchStat (3,) float32 3 of 3 {expected:.3g}" in got
    assert ".drop.key Rng () key<fry> 1 of 1 key changed" in got
    html = html_text(d._repr_html_())
    assert "Net: 6 of 7 arrays changed: Param 3, BatchStat 2, Rng 1" in html
    assert ".drop.key Rng () key<fry> 1 of 1 key changed" in html


def test_diff_of_state_only(net, x):
    _, new = net(x)  # a forward pass: state only
    d = eqstate.diff(net, new)
    assert d.headline == "3 of 7 arrays changed: BatchStat 2, Rng 1"
    assert [r.path for r in d.rows] == [".bn.running_mean", ".bn.running_var", ".drop.key"]


def test_diff_no_change_and_flags(net):
    same = eqstate.diff(net, net)
    assert not same and same.rows == ()
    assert lines(str(same)) == ["Net: 0 of 7 arrays changed"]
    flags = eqstate.diff(net, eqstate.eval(net))
    assert flags.headline == "0 of 7 arrays changed; 2 other leaves changed"
    assert [(r.path, r.kind, r.change) for r in flags.rows] == [
        (".bn.inference", None, "False → True"),
        (".drop.inference", None, "False → True"),
    ]
    assert ".bn.inference not an array False → True" in lines(str(flags))


def test_diff_flag_returned_as_array_by_jit(net):
    jitted = jax.jit(lambda m: m)(net)  # `inference` comes back as a bool[] array
    assert not eqstate.diff(net, jitted)


def test_diff_numbers():
    before = {
        "f": jnp.array([1.0, jnp.nan, 3.0]),
        "i": jnp.array([5, 0, 7], jnp.uint8),
        "b": jnp.array([True, False]),
        "nan": jnp.array([1.0, 2.0]),
        "shape": jnp.zeros(3),
        "same": jnp.ones(2),
        "keys": jax.random.split(jax.random.key(0), 4),
    }
    after = {
        "f": jnp.array([1.5, jnp.nan, 3.0]),  # NaN in both: unchanged
        "i": jnp.array([2, 0, 9], jnp.uint8),  # unsigned: no wrap-around
        "b": jnp.array([False, False]),
        "nan": jnp.array([1.0, jnp.nan]),
        "shape": jnp.zeros(4),
        "same": jnp.ones(2),
        "keys": before["keys"].at[1].set(jax.random.key(9)),
    }
    d = eqstate.diff(before, after)
    rows = {r.path: r for r in d.rows}
    assert set(rows) == {"['f']", "['i']", "['b']", "['nan']", "['shape']", "['keys']"}
    assert (rows["['f']"].changed, rows["['f']"].max_abs, rows["['f']"].change) == (1, 0.5, "0.5")
    assert (rows["['i']"].changed, rows["['i']"].max_abs) == (2, 3)
    assert (rows["['b']"].changed, rows["['b']"].max_abs, rows["['b']"].change) == (1, None, "")
    assert np.isnan(rows["['nan']"].max_abs)
    shape = rows["['shape']"]
    assert (shape.shape, shape.change, shape.changed) == (
        "(3,) → (4,)",
        "shape/dtype changed",
        None,
    )
    assert (rows["['keys']"].changed, rows["['keys']"].change) == (1, "keys changed")
    assert d.headline == "6 of 7 arrays changed: Param 6"


def test_diff_dtype_change():
    d = eqstate.diff([jnp.zeros(2)], [jnp.zeros(2, jnp.int32)])
    assert (d.rows[0].dtype, d.rows[0].change) == ("float32 → int32", "shape/dtype changed")


def test_diff_structure_mismatch_names_the_path(net):
    other = eqx.tree_at(lambda m: m.drop, net, Dropout(0.1, key=jax.random.key(3)))
    with pytest.raises(ValueError, match=r"differ in structure at \.drop"):
        eqstate.diff(net, other)
    with pytest.raises(ValueError, match=r"at \['b'\]"):
        eqstate.diff({"a": 1, "b": [1, 2]}, {"a": 1, "b": [1]})


def test_diff_needs_values(net):
    with pytest.raises(TypeError, match=r"the leaf at \.lin\.weight is a jax\.ShapeDtypeStruct"):
        eqstate.diff(eqstate.abstract(net), net)
    with pytest.raises(TypeError, match="is traced"):
        jax.jit(lambda a, b: eqstate.diff(a, b).arrays)(
            net, eqx.tree_at(lambda m: m.lin.bias, net, net.lin.bias + 1)
        )


# treescope (optional: rendered where it is installed)


@pytest.fixture
def treescope():
    return pytest.importorskip("treescope")


def test_treescope_shows_kinds(treescope, net):
    text = treescope.render_to_text(net)
    assert re.search(r"weight: Param = .*jax\.Array float32\(3, 4\)", text)
    assert "running_mean: BatchStat = <jax.Array" in text
    assert "running_var: BatchStat = " in text
    assert "key: Rng = " in text
    assert "inference=False" in text  # flags: no kind
    assert "p=0.5" in text  # static fields: no kind
    html = treescope.render_to_html(net, compressed=False)
    assert ": BatchStat" in html and ": Rng" in html


def test_treescope_inherited_and_declared_kinds(treescope):
    class Holder(eqx.Module):  # a plain Equinox module declaring a kind
        frozen: eqx.nn.Linear = eqstate.State.field()
        cache: list = Cache.field()
        flag: bool = False

    h = Holder(eqx.nn.Linear(2, 2, key=jax.random.key(0)), [jnp.zeros(2)])
    text = treescope.render_to_text(h)
    assert "frozen: State = Linear(" in text
    assert "weight: State = " in text and "bias: State = " in text
    assert "cache: Cache = [" in text
    assert "flag=False" in text


def test_treescope_leaves_plain_equinox_and_roundtrip_alone(treescope, net):
    plain = eqx.nn.Linear(2, 2, key=jax.random.key(0))
    assert ": Param" not in treescope.render_to_text(plain)
    assert ": Param" not in treescope.render_to_text(net, roundtrip_mode=True)
    assert "Param" not in repr(net)  # the text repr stays Equinox's
    assert repr(net) == eqx.tree_pformat(net)


def test_treescope_in_containers_and_abstract_trees(treescope, net):
    opt = eqstate.Optimizer(optax.adam(1e-3), net)
    text = treescope.render_to_text((net, [BatchNorm(2)], opt))
    assert text.count("running_mean: BatchStat = ") == 2
    assert "step: OptState = " in text
    abstract = treescope.render_to_text(eqstate.abstract(net))
    assert "running_mean: BatchStat = ShapeDtypeStruct(" in abstract
    # a plain Equinox container: its own fields as treescope renders them, ours with kinds
    seq = eqx.nn.Sequential([eqx.nn.Lambda(jnp.tanh)])
    mixed = eqx.tree_at(lambda s: s.layers, seq, (BatchNorm(2),))
    assert "layers=(" in treescope.render_to_text(mixed)
    assert "running_var: BatchStat = " in treescope.render_to_text(mixed)


def test_treescope_shows_summary_and_diff_html(treescope, net):
    html = treescope.render_to_html(eqstate.summary(net), compressed=False)
    assert "running_mean" in html and "7 arrays" in html
    html = treescope.render_to_html(eqstate.diff(net, eqstate.eval(net)), compressed=False)
    assert "2 other leaves changed" in html


# result


def test_result_in_inference(net, x):
    model = eqstate.eval(net)
    y = eqstate.result(model)(x)
    expected, _ = model(x)
    np.testing.assert_array_equal(y, expected)
    np.testing.assert_array_equal(eqstate.result(model.encode)(x), model.encode(x)[0])
    jitted = eqx.filter_jit(lambda m, x: eqstate.result(m)(x))(model, x)
    np.testing.assert_allclose(jitted, expected, rtol=1e-6)


def test_result_when_nothing_changes_in_training(net, x):
    y = eqstate.result(net.encode)(x)  # training mode, but encode changes nothing
    np.testing.assert_array_equal(y, jax.vmap(net.lin)(x))


def test_result_per_example():
    class PerExample(eqstate.Module):
        bn: BatchNorm

        @eqstate.mutating
        def __call__(self, x):
            x, self.bn = self.bn(x)
            return x

    model = eqstate.eval(PerExample(BatchNorm(3)))
    ys = eqstate.result(eqstate.vmap(model))(jnp.ones((5, 3)))
    assert ys.shape == (5, 3)


def test_result_refuses_to_drop_an_update(net, x):
    with pytest.raises(
        RuntimeError,
        match=r"changed the Net \(\.bn\.running_mean, \.bn\.running_var, \.drop\.key\)",
    ):
        eqstate.result(net)(x)
    with pytest.raises(RuntimeError, match=r"counts as changed"):
        eqx.filter_jit(lambda m, x: eqstate.result(m)(x))(net, x)


def test_result_needs_a_mutating_call(net):
    with pytest.raises(TypeError, match="got a Linear. Its call returns just the result"):
        eqstate.result(net.lin)  # pyright: ignore[reportArgumentType]


def test_diff_integer_changes_do_not_wrap_and_unchanged_infs_are_quiet():
    d = eqstate.diff({"q": jnp.array([-100, 5], jnp.int8)}, {"q": jnp.array([100, 5], jnp.int8)})
    assert d.rows[0].max_abs == 200
    d = eqstate.diff({"q": jnp.array([-(2**31) + 5], jnp.int32)}, {"q": jnp.array([10], jnp.int32)})
    assert d.rows[0].max_abs == 2**31 + 5
    d = eqstate.diff({"m": jnp.array([-jnp.inf, 1.0])}, {"m": jnp.array([-jnp.inf, 2.0])})
    assert d.rows[0].max_abs == 1.0  # no RuntimeWarning (an error under the test config)


def test_optimizer_state_is_shown_by_optax_paths():
    class M(eqstate.Module):
        w: jax.Array

    opt = eqstate.Optimizer(optax.adam(1e-3), M(jnp.ones(2)))
    paths = [row.path for row in eqstate.summary(opt).rows]
    assert paths == [".opt_state[0].count", ".opt_state[0].mu.w", ".opt_state[0].nu.w", ".step"]
