"""The generated output rebuild equals `treedef.unflatten` on every kind of output."""

from collections import OrderedDict, defaultdict
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
import pytest

import eqstate
from eqstate._rebuild import builder, snapshot, unchanged


class Pair(NamedTuple):
    a: object
    b: object


class WithStatic(eqstate.Module):
    w: jax.Array
    tag: str = eqx.field(static=True, default="t")
    act: object = jax.nn.relu  # class-level default: absent from the instance dict
    opt: object = None


class Holder(eqx.Module):
    items: list
    table: dict
    pair: Pair


def outputs():
    linear = eqx.nn.Linear(2, 3, key=jax.random.key(0))
    ws = WithStatic(jnp.ones(2))
    ws_set = WithStatic(jnp.ones(2), "u", jax.nn.gelu, (jnp.zeros(1), None))
    holder = Holder([linear, jnp.ones(1)], {"b": ws, "a": 3.0}, Pair(None, ws_set))
    model = eqstate.nn.BatchNorm(3)
    opt = eqstate.Optimizer(optax.adam(1e-3), holder)
    return {
        "array": jnp.ones(2),
        "tuple": (linear, jnp.ones(1), 2.0),
        "single": (linear,),
        "module_static": ws,
        "module_set": ws_set,
        "containers": holder,
        "optimizer": opt,
        "batch_norm": eqstate.eval(model),
        "bound_method": linear.__call__,
        "nested": [{"x": (ws, [None, ()])}, Pair(1, 2)],
    }


@pytest.mark.parametrize("name", sorted(outputs()))
def test_builder_matches_unflatten(name):
    out = outputs()[name]
    leaves, treedef = jax.tree_util.tree_flatten(out)
    build = builder(out, treedef)
    rebuilt, groups = build(leaves)
    assert groups is not None and None not in groups  # all built by the generated code
    reference = treedef.unflatten(leaves)
    assert jax.tree_util.tree_structure(rebuilt) == treedef
    assert all(a is b for a, b in zip(jax.tree_util.tree_leaves(rebuilt), leaves, strict=True))
    for a, b in zip(
        jax.tree_util.tree_leaves(rebuilt, is_leaf=lambda x: isinstance(x, eqx.Module)),
        jax.tree_util.tree_leaves(reference, is_leaf=lambda x: isinstance(x, eqx.Module)),
        strict=True,
    ):
        assert type(a) is type(b)
        if isinstance(a, eqx.Module):
            assert vars(a).keys() == vars(b).keys()


def test_builder_falls_back_to_unflatten_for_unknown_nodes():
    class Odd:
        def __init__(self, x):
            self.x = x

    jax.tree_util.register_pytree_node(Odd, lambda o: ((o.x,), None), lambda _, c: Odd(*c))
    out = (Odd(jnp.ones(1)), eqx.nn.Identity())
    leaves, treedef = jax.tree_util.tree_flatten(out)
    rebuilt, groups = builder(out, treedef)(leaves)
    assert groups == (None, ())  # the custom node's contents are unknown; Identity has none
    assert isinstance(rebuilt[0], Odd) and rebuilt[0].x is leaves[0]
    assert isinstance(rebuilt[1], eqx.nn.Identity)


def test_snapshot_sees_in_place_changes():
    items, table = [jnp.ones(1), 2.0], {"a": jnp.zeros(1)}
    snap = snapshot((items, table))
    assert unchanged(snap)
    items[1] = 3.0
    assert not unchanged(snap)
    items[1] = 2.0  # an equal value, but another object is not the same leaf
    snap = snapshot((items, table))
    table["a"] = jnp.zeros(1)
    assert not unchanged(snap)
    snap = snapshot((items, table))
    items.append(1)
    assert not unchanged(snap)


def test_jit_sees_a_list_changed_in_place_between_calls():
    class Layers(eqstate.Module):
        layers: list

    step = eqstate.jit(lambda m: Layers([x + 1 for x in m.layers]))
    m = step(Layers([jnp.zeros(1), jnp.zeros(1)]))
    m.layers[0] = jnp.full(1, 10.0)  # not how Equinox models should change, but possible
    out = step(m)
    assert float(out.layers[0][0]) == 11.0 and float(out.layers[1][0]) == 2.0


def test_jit_memo_checks_each_returned_element_on_its_own():
    class Layers(eqstate.Module):
        layers: list

    def bump(m):
        return Layers([x + 1 for x in m.layers])

    step = eqstate.jit(lambda a, b: (bump(a), bump(b)))
    a, b = step(Layers([jnp.zeros(1)]), Layers([jnp.zeros(1)]))
    b.layers[0] = jnp.full(1, 10.0)
    a2, b2 = step(a, b)
    assert float(a2.layers[0][0]) == 2.0 and float(b2.layers[0][0]) == 11.0
    del a2  # the other element's memo entry holds none of a2's containers
    assert [float(x[0]) for x in step(b2, b2)[0].layers] == [12.0]


class Empty(NamedTuple):
    pass


def test_builder_builds_empty_containers_afresh():
    out = (OrderedDict(), defaultdict(list), [], {}, Empty(), eqx.nn.Identity(), None, ())
    leaves, treedef = jax.tree_util.tree_flatten(out)
    build = builder(out, treedef)
    (first, groups), (second, _) = build(leaves), build(leaves)
    for a, b in zip(first[:6], second[:6], strict=True):
        assert a is not b and type(a) is type(b)
    assert first[6] is None and first[7] == ()
    # JAX built the OrderedDict and defaultdict: the memo may not trust those elements
    assert groups[0] is None and groups[1] is None and groups[2] is not None
