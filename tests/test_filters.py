from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_allclose
from hypothesis import given, settings, strategies as st

import eqstate


class Cache(eqstate.State):
    pass


class Block(eqstate.Module):
    w: jax.Array
    mean: jax.Array = eqstate.BatchStat.field(default_factory=lambda: jnp.zeros(2))
    key: jax.Array = eqstate.Rng.field(default_factory=lambda: jax.random.key(0))
    cache: jax.Array = Cache.field(default_factory=lambda: jnp.zeros(1))
    count: jax.Array = eqstate.State.field(default=0)
    inference: bool = False
    act: object = jax.nn.relu


def leaves_of(tree):
    return [x for x in jax.tree_util.tree_leaves(tree)]


def test_filters_are_subclass_aware():
    b = Block(jnp.ones(2))
    assert leaves_of(eqstate.filter(b, eqstate.Param)) == [b.w]
    state = leaves_of(eqstate.filter(b, eqstate.State))
    assert len(state) == 4  # mean, key, cache, count
    assert leaves_of(eqstate.filter(b, eqstate.BatchStat)) == [b.mean]
    assert leaves_of(eqstate.filter(b, Cache)) == [b.cache]
    assert leaves_of(eqstate.filter(b, (eqstate.Rng, Cache))) == [b.key, b.cache]
    assert leaves_of(eqstate.filter(b, eqstate.Rng, Cache)) == [b.key, b.cache]


def test_kind_filters_match_arrays_only_and_ellipsis_matches_all():
    b = Block(jnp.ones(2))
    params = b.parameters()
    assert params.inference is None and params.act is None
    assert params.w is b.w
    everything = eqstate.filter(b, ...)
    assert everything.inference is False and everything.act is jax.nn.relu
    # parameters() can go straight into jax.grad
    grads = jax.grad(lambda p: jnp.sum(b.update(p).w ** 2))(params)
    np.testing.assert_allclose(grads.w, 2 * np.ones(2))


def test_callable_filter_sees_path_kind_leaf():
    b = Block(jnp.ones(2))
    seen = []

    def f(path, kind, leaf):
        seen.append((jax.tree_util.keystr(path), kind))
        return jax.tree_util.keystr(path) == ".count"

    assert leaves_of(eqstate.filter(b, f)) == [b.count]
    assert (".mean", eqstate.BatchStat) in seen
    assert (".inference", eqstate.Param) in seen


def test_partition_first_match_wins_and_combine_inverts():
    b = Block(jnp.ones(2))
    batch, state, rest = eqstate.partition(b, eqstate.BatchStat, eqstate.State)
    assert leaves_of(batch) == [b.mean]
    assert len(leaves_of(state)) == 3
    assert rest.w is b.w and rest.mean is None and rest.inference is False
    assert tree_allclose(eqstate.combine(batch, state, rest), b)
    # spec is usable with Equinox's own partition
    dyn, static = eqx.partition(b, eqstate.spec(b, eqstate.Param))
    assert dyn.w is b.w and dyn.mean is None and static.mean is b.mean


def test_module_filter_and_states_methods():
    b = Block(jnp.ones(2))
    assert leaves_of(b.states()) == leaves_of(eqstate.filter(b, eqstate.State))
    assert leaves_of(b.filter(Cache, eqstate.Param)) == [b.w, b.cache]


def test_update_puts_leaves_back():
    b = Block(jnp.ones(2))
    new_params = jax.tree_util.tree_map(lambda x: x + 1, b.parameters())
    b2 = b.update(new_params)
    np.testing.assert_array_equal(b2.w, 2 * np.ones(2))
    assert b2.mean is b.mean and b.w[0] == 1
    # first tree wins where several hold a leaf
    b3 = b.update(new_params, b.parameters())
    np.testing.assert_array_equal(b3.w, 2 * np.ones(2))


def test_errors():
    b = Block(jnp.ones(2))
    with pytest.raises(TypeError, match=r"eqstate.filter needs at least one filter"):
        eqstate.filter(b)
    with pytest.raises(TypeError, match=r"eqstate.partition: 3 is not a filter"):
        eqstate.partition(b, 3)
    with pytest.raises(TypeError, match=r"eqstate.spec: <class 'int'> is not a filter"):
        eqstate.spec(b, (eqstate.State, int))
    with pytest.raises(TypeError, match="at least one tree"):
        eqstate.combine()

    other = Block(jnp.ones(2), inference=True)
    with pytest.raises(ValueError, match=r"tree 1 does not have the structure of tree 0"):
        eqstate.combine(b.parameters(), {"w": b.w})
    wrong = eqx.tree_at(lambda m: m.mean, b.states(), replace=None)
    wrong = eqx.tree_at(
        lambda m: m.w, wrong, (jnp.ones(1), jnp.ones(1)), is_leaf=lambda x: x is None
    )
    with pytest.raises(ValueError, match=r"Block.update: tree 0 .* first differ at \.w"):
        b.update(wrong)
    assert other.update(b.parameters()).inference is True


class Leafy(eqstate.Module):
    a: object
    b: object = eqstate.State.field(default=None)


class Stats(eqstate.Module):
    a: object = eqstate.BatchStat.field()
    b: object = eqstate.field(kind=eqstate.Param)


def _trees(depth):
    arrays = st.builds(
        lambda n, d: jnp.zeros((n,), dtype=d),
        st.integers(0, 3),
        st.sampled_from([jnp.float32, jnp.int32]),
    )
    leaves = st.one_of(arrays, st.just(None), st.booleans(), st.just(jax.nn.relu))
    if depth == 0:
        return leaves
    sub = _trees(depth - 1)
    return st.one_of(
        leaves,
        st.lists(sub, max_size=3),
        st.tuples(sub, sub),
        st.dictionaries(st.sampled_from("xyz"), sub, max_size=3),
        st.builds(Leafy, sub, sub),
        st.builds(Stats, sub, sub),
    )


FILTERS = st.lists(
    st.sampled_from(
        [eqstate.Param, eqstate.State, eqstate.BatchStat, ..., (eqstate.Rng, eqstate.Param)]
    ),
    min_size=1,
    max_size=3,
)


@settings(max_examples=60, deadline=None)
@given(tree=_trees(3), filters=FILTERS)
def test_partition_combine_round_trip(tree, filters):
    parts = eqstate.partition(tree, *filters)
    assert len(parts) == len(filters) + 1
    assert tree_allclose(eqstate.combine(*parts), tree)
    # every leaf lands in exactly one part
    n_leaves = len(jax.tree_util.tree_leaves(tree))
    assert sum(len(jax.tree_util.tree_leaves(p)) for p in parts) == n_leaves
    # filter agrees with the first part
    assert tree_allclose(eqstate.filter(tree, filters[0]), parts[0])


def test_one_argument_filters_like_equinox():
    b = Block(jnp.ones(2))
    assert leaves_of(eqstate.filter(b, eqx.is_inexact_array)) == [b.w, b.mean, b.cache]
    assert leaves_of(eqstate.filter(b, eqx.is_array)) == [b.w, b.mean, b.key, b.cache, b.count]
    # a one-argument callable sees every leaf, arrays or not
    seen = []
    eqstate.filter(b, lambda leaf: seen.append(leaf) or False)
    assert any(x is False for x in seen) and jax.nn.relu in seen
    # mixed with kinds and three-argument callables, in tuples too
    params, _ = eqstate.partition(b, (eqstate.Rng, lambda leaf, strict=True: False))
    assert leaves_of(params) == [b.key]
    assert leaves_of(eqstate.filter(b, (Cache, eqx.is_inexact_array))) == [b.w, b.mean, b.cache]
    spec = eqstate.spec(b, lambda *args: eqx.is_array(args[-1]) and args[1] is eqstate.Param)
    assert spec.w is True and spec.mean is False
    # as wrt= of gradients
    g = eqstate.grad(lambda m: jnp.sum(m.w) + jnp.sum(m.mean), wrt=eqx.is_inexact_array)(b)
    np.testing.assert_array_equal(g.mean, np.ones(2))


@pytest.mark.parametrize(
    ("bad", "sig"),
    [
        (lambda: True, r"\(\)"),
        (lambda path, leaf: True, r"\(path, leaf\)"),
        (lambda x, *, k: True, r"\(x, \*, k\)"),
    ],
)
def test_callable_filter_of_the_wrong_arity(bad, sig):
    b = Block(jnp.ones(2))
    with pytest.raises(
        TypeError,
        match=r"eqstate.filter: the callable filter <lambda> has the signature "
        + sig
        + r", which takes neither one argument nor three.*`f\(leaf\)`.*`f\(path, kind, leaf\)`",
    ):
        eqstate.filter(b, bad)
    with pytest.raises(TypeError, match=r"wrt=: the callable filter <lambda>"):
        eqstate.grad(lambda m: jnp.sum(m.w), wrt=bad)(b)


def test_cast_like_keeps_weak_types_with_public_jax_only():
    import eqstate._convert as convert

    weak = jnp.asarray(1.0)
    assert weak.weak_type
    for value in (
        jnp.arange(3),
        jnp.array(2, jnp.int32),
        2,
        jnp.ones((2, 0)),
        jnp.ones(2, jnp.bfloat16),
    ):
        out = convert.cast_like(value, weak)
        assert out.dtype == jnp.float32 and out.weak_type and out.shape == jnp.shape(value)
        jitted = jax.jit(convert.cast_like)(value, weak)
        assert jitted.weak_type and np.array_equal(jitted, np.asarray(value, np.float32))
    strong = convert.cast_like(jnp.asarray(2.5), jnp.zeros((), jnp.int32))
    assert strong.dtype == jnp.int32 and not strong.weak_type
    grads = jax.grad(lambda v: jnp.sum(convert.cast_like(v, weak) ** 2))(jnp.arange(3.0))
    np.testing.assert_array_equal(grads, 2 * np.arange(3.0))
    assert "jax._src" not in Path(convert.__file__).read_text()


class Flagged(eqstate.Module):
    w: jax.Array
    steps: jax.Array
    inference: bool = False


def test_parameters_are_the_trainable_arrays_also_under_plain_jit():
    model = Flagged(jnp.ones(2), jnp.zeros((), jnp.int32))

    @jax.jit
    def step(model, x):  # the Treex page's loss pattern, under plain jax.jit
        def loss_fn(params):
            return jnp.sum(model.update(params).w * x)

        return jax.grad(loss_fn)(model.parameters())

    grads = step(model, jnp.arange(2.0))  # `inference` is a bool[] array in here
    np.testing.assert_array_equal(grads.w, [0.0, 1.0])
    assert grads.steps is None and grads.inference is None
    assert eqstate.filter(model, eqstate.Param).steps is model.steps  # every Param array
