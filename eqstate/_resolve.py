"""Leaf -> kind resolution, computed once per tree structure and cached."""

import dataclasses
from typing import TYPE_CHECKING, Any

import equinox as eqx
import jax.tree_util as jtu


if TYPE_CHECKING:  # jax.tree_util.PyTreeDef is a variable to type checkers
    from jaxlib._jax.pytree import PyTreeDef
else:
    PyTreeDef = jtu.PyTreeDef

from ._kinds import Kind, Param, field_kind


class Plan:
    """What is known of one tree structure: its kinds and key paths, leaf by leaf."""

    __slots__ = ("_paths", "kinds", "treedef")

    def __init__(self, treedef: PyTreeDef, kinds: tuple[type[Kind], ...]):
        self.treedef = treedef
        self.kinds = kinds
        self._paths: tuple | None = None

    @property
    def paths(self) -> tuple:
        """Key paths of the leaves, as from `jax.tree_util.tree_flatten_with_path`."""
        if self._paths is None:
            # a skeleton of the structure: the cache holds no arrays of the user's
            skeleton = self.treedef.unflatten([_Leaf()] * self.treedef.num_leaves)
            self._paths = tuple(p for p, _ in jtu.tree_flatten_with_path(skeleton)[0])
        return self._paths


class _Leaf:
    """A stand-in leaf."""


_PLANS: dict[PyTreeDef, Plan] = {}
_MAX_PLANS = 4096


def _kinds_of(node: Any, kind: type[Kind], out: list[type[Kind]]) -> None:
    if isinstance(node, eqx.Module):
        values = vars(node)  # as Equinox flattens: a class-level default is no leaf
        for f in dataclasses.fields(node):
            if f.metadata.get("static", False) or f.name not in values:
                continue
            _kinds_of(values[f.name], field_kind(f) or kind, out)
        return
    children, treedef = jtu.tree_flatten(node, is_leaf=lambda x: x is not node)
    if treedef.num_nodes == 1 and treedef.num_leaves == 1 and children[0] is node:
        out.append(kind)  # a leaf
        return
    for child in children:
        _kinds_of(child, kind, out)


def plan(tree: Any) -> tuple[list[Any], Plan]:
    """Flatten `tree`; return its leaves and the (cached) plan of its structure."""
    leaves, treedef = jtu.tree_flatten(tree)
    try:
        return leaves, _PLANS[treedef]
    except KeyError:
        pass
    except (TypeError, ValueError):  # static data that cannot be hashed or compared
        return leaves, _make_plan(tree, treedef, len(leaves))
    p = _make_plan(tree, treedef, len(leaves))
    if len(_PLANS) >= _MAX_PLANS:
        _PLANS.clear()
    _PLANS[treedef] = p
    return leaves, p


def _make_plan(tree: Any, treedef: PyTreeDef, num_leaves: int) -> Plan:
    kinds: list[type[Kind]] = []
    _kinds_of(tree, Param, kinds)
    if len(kinds) != num_leaves:  # a custom pytree node that flattens unusually
        raise AssertionError(
            f"eqstate could not resolve kinds: found {len(kinds)} leaves by walking the "
            f"fields, but JAX flattens the tree into {num_leaves}. Please report this "
            "with the type of the tree."
        )
    return Plan(treedef, tuple(kinds))


def kinds(tree: Any) -> list[type[Kind]]:
    """The kind of every leaf of `tree`, in `jax.tree_util.tree_leaves` order.

    **Arguments:**

    - `tree`: any pytree, usually an `eqstate.Module`. Leaves under no declared field
        are `Param`.

    **Returns:**

    A list of kinds (subclasses of `eqstate.Kind`), one per leaf.

    !!! example

        ```python
        leaves = jax.tree_util.tree_leaves(model)
        for leaf, kind in zip(leaves, eqstate.kinds(model)):
            print(kind.__name__, getattr(leaf, "shape", leaf))
        ```
    """
    return list(plan(tree)[1].kinds)
