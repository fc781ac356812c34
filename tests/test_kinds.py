import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import is_strong

import eqstate


class Cache(eqstate.State):
    pass


class Inner(eqstate.Module):
    w: jax.Array
    stat: jax.Array = eqstate.BatchStat.field(default_factory=lambda: jnp.zeros(2))


class Outer(eqstate.Module):
    linear: eqx.nn.Linear
    inner: Inner
    items: list
    table: dict
    ema: eqx.nn.MLP = eqstate.State.field()
    nested: Inner = eqstate.field(kind=Cache)  # Inner's own BatchStat field wins inside
    flag: bool = False


def make_outer():
    k1, k2 = jax.random.split(jax.random.key(0))
    return Outer(
        linear=eqx.nn.Linear(2, 2, key=k1),
        inner=Inner(jnp.ones(2)),
        items=[jnp.zeros(1), (jnp.ones(1), 3.0)],
        table={"a": jnp.ones(3), "b": Inner(jnp.ones(1))},
        ema=eqx.nn.MLP(2, 2, 2, 1, key=k2),
        nested=Inner(jnp.ones(4)),
    )


def named_kinds(tree):
    leaves, _ = jax.tree_util.tree_flatten_with_path(tree)
    return {
        jax.tree_util.keystr(p): k.__name__
        for (p, _), k in zip(leaves, eqstate.kinds(tree), strict=True)
    }


def test_kinds_are_classes_with_subclass_hierarchy():
    assert issubclass(eqstate.BatchStat, eqstate.State)
    assert issubclass(eqstate.Rng, eqstate.State)
    assert issubclass(eqstate.OptState, eqstate.State)
    assert not issubclass(eqstate.Param, eqstate.State)
    with pytest.raises(TypeError, match="is a kind, used as a class"):
        eqstate.State()


def test_kind_resolution_through_nested_modules_lists_dicts():
    kinds = named_kinds(make_outer())
    assert kinds[".linear.weight"] == "Param"
    assert kinds[".inner.w"] == "Param"
    assert kinds[".inner.stat"] == "BatchStat"
    assert kinds[".items[0]"] == "Param"
    assert kinds[".items[1][0]"] == "Param"
    assert kinds[".table['a']"] == "Param"
    assert kinds[".table['b'].stat"] == "BatchStat"
    assert kinds[".ema.layers[0].weight"] == "State"
    assert kinds[".ema.layers[1].bias"] == "State"
    assert kinds[".nested.w"] == "Cache"
    assert kinds[".nested.stat"] == "BatchStat"  # the innermost declared field wins
    assert kinds[".flag"] == "Param"


def test_field_metadata_and_structure_match_plain_equinox():
    class Plain(eqx.Module):
        a: jax.Array
        b: jax.Array = eqx.field(default_factory=lambda: jnp.zeros(2))

    class Tagged(eqstate.Module):
        a: jax.Array
        b: jax.Array = eqstate.State.field(default_factory=lambda: jnp.zeros(2))

    (f,) = [f for f in dataclasses.fields(Tagged) if f.name == "b"]
    assert f.metadata["eqstate.kind"] is eqstate.State
    p = Plain(jnp.ones(2))
    t = Tagged(jnp.ones(2))
    assert jax.tree_util.tree_leaves(p)[1].shape == jax.tree_util.tree_leaves(t)[1].shape
    assert len(jax.tree_util.tree_leaves(t)) == 2


def test_field_specifier_keywords():
    class M(eqstate.Module):
        a: jax.Array = eqstate.State.field(converter=lambda x: x * 2, default=1.0)
        b: int = eqstate.field(kind=eqstate.State, static=True, default=3)
        c: jax.Array = eqstate.Rng.field(init=False, repr=False)

        def __post_init__(self):
            self.c = jax.random.key(1)

    m = M()
    assert is_strong(m.a, jnp.float32) and float(m.a) == 2.0
    assert m.b == 3 and len(jax.tree_util.tree_leaves(m)) == 2
    assert "c=" not in repr(m)
    with pytest.raises(TypeError, match="subclass of eqstate.Kind"):
        eqstate.field(kind=int)


@pytest.mark.parametrize(
    ("value", "dtype"),
    [
        (0, jnp.int32),
        (0.5, jnp.float32),
        (True, jnp.bool_),
        (np.zeros(3, np.float32), jnp.float32),
        (jnp.array(0), jnp.int32),
        (jnp.array(1.0), jnp.float32),
        (jnp.zeros(2, jnp.bfloat16), jnp.bfloat16),
    ],
)
def test_state_values_become_strong_arrays(value, dtype):
    class M(eqstate.Module):
        s: jax.Array = eqstate.State.field()

    m = M(value)
    assert is_strong(m.s, dtype)
    param_m = type("P", (eqstate.Module,), {"__annotations__": {"s": jax.Array}})(value)
    assert param_m.s is value  # parameters are left as given


def test_state_conversion_reaches_subtrees_and_keeps_keys():
    class M(eqstate.Module):
        s: dict = eqstate.State.field()
        key: jax.Array = eqstate.Rng.field()

    key = jax.random.key(3)
    m = M({"n": 1, "f": jnp.array(2.0), "name": None}, key)
    assert is_strong(m.s["n"], jnp.int32) and is_strong(m.s["f"], jnp.float32)
    assert m.key is key
