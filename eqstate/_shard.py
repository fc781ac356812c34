"""Kind-aware sharding: `eqstate.shardings` turns `(filter, PartitionSpec)` rules into a
pytree of `NamedSharding`s, with each optimizer's state following its parameters."""

import math
from collections.abc import Sequence
from typing import Any, TypeVar

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
import optax
from jax.core import Tracer
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from ._convert import is_array_or_abstract, is_key, stand_in
from ._filters import Filter, describe, is_none, select
from ._optimizer import Optimizer, optimizers_in
from ._resolve import plan


_T = TypeVar("_T")
_REPLICATED = PartitionSpec()

_MSG_RULES = (
    "eqstate.shardings(rules=...) takes a sequence of `(filter, PartitionSpec)` pairs, "
    "e.g. `[(eqstate.Param, P('model')), (..., P())]`; {what}."
)
_MSG_MESH = "eqstate.shardings(mesh=...) must be a jax.sharding.Mesh, got {value!r} ({type})."
_MSG_RANK = (
    "eqstate.shardings: rules[{i}] ({filter}: {spec}) shards {n} axes of the leaf at "
    "{path}, which has shape {shape}. Give that leaf a spec with at most {ndim} entries, "
    "e.g. a rule before it that matches it."
)
_MSG_DIVIDE = (
    "eqstate.shardings: rules[{i}] ({filter}: {spec}) splits axis {axis} of the leaf at "
    "{path} (shape {shape}) over mesh axes {names} of size {size}, which does not divide "
    "{dim}. Choose another spec for it, or a mesh axis whose size divides {dim}."
)


def _axis_size(mesh: Mesh, names: Any) -> int:
    names = names if isinstance(names, tuple) else (names,)
    for n in names:
        if n is not None and n not in mesh.shape:
            raise ValueError(
                f"eqstate.shardings: a rule's PartitionSpec names the mesh axis {n!r}, but "
                f"the mesh has the axes {tuple(mesh.shape)}."
            )
    return math.prod(mesh.shape[n] for n in names if n is not None)


def _fits(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> str | None:
    """Why `spec` cannot shard an array of `shape` on `mesh`, or `None` if it can."""
    if len(spec) > len(shape):
        return "rank"
    for axis, names in enumerate(spec):
        if names is not None and shape[axis] % _axis_size(mesh, names):
            return f"divide:{axis}"
    return None


def _specs(
    tree: Any, mesh: Mesh, rules: list[tuple[Any, PartitionSpec]], default: PartitionSpec
) -> list[PartitionSpec | None]:
    """A spec for every leaf of `tree` (`None` for leaves that are not arrays)."""
    leaves, p = plan(tree)
    stand_ins = p.treedef.unflatten([stand_in(x) for x in leaves])
    matches = [select(stand_ins, f, "eqstate.shardings rules")[2] for f, _ in rules]
    out: list[PartitionSpec | None] = []
    for j, (leaf, path) in enumerate(zip(leaves, p.paths)):
        if not is_array_or_abstract(leaf):
            out.append(None)
            continue
        i = next((i for i, m in enumerate(matches) if m[j]), None)
        spec = default if i is None else rules[i][1]
        why = _fits(spec, tuple(leaf.shape), mesh)
        if why is not None:
            where = jtu.keystr(path) or "the root"
            filt = "default" if i is None else describe(rules[i][0])
            k = "default" if i is None else i
            if why == "rank":
                raise ValueError(
                    _MSG_RANK.format(
                        i=k,
                        filter=filt,
                        spec=spec,
                        n=len(spec),
                        path=where,
                        shape=tuple(leaf.shape),
                        ndim=leaf.ndim,
                    )
                )
            axis = int(why.split(":")[1])
            raise ValueError(
                _MSG_DIVIDE.format(
                    i=k,
                    filter=filt,
                    spec=spec,
                    axis=axis,
                    path=where,
                    shape=tuple(leaf.shape),
                    names=spec[axis],
                    size=_axis_size(mesh, spec[axis]),
                    dim=leaf.shape[axis],
                )
            )
        out.append(spec)
    return out


def _follow_params(
    opt: Optimizer, mesh: Mesh, rules: list[tuple[Any, PartitionSpec]], default: PartitionSpec
) -> list[PartitionSpec | None]:
    """For each of `opt.opt_leaves`, the spec of the parameter it belongs to (Adam's
    moments have their parameters' structure), else `None`."""
    p_def = opt.shapes.treedef
    if p_def is None:
        return [None] * len(opt.opt_leaves)
    skeleton = p_def.unflatten(
        [None if e is None else jax.ShapeDtypeStruct(e[0], e[1]) for e in opt.shapes.entries]
    )
    param_specs = _specs(skeleton, mesh, rules, default)
    # param_specs is in the order of skeleton's leaves (None not counted); spread it
    # over the entries, which count None
    it = iter(param_specs)
    spread = [None if e is None else next(it) for e in opt.shapes.entries]
    indices = opt.opt_def.unflatten(list(range(len(opt.opt_leaves))))
    out: list[PartitionSpec | None] = [None] * len(opt.opt_leaves)

    def walk(node: Any) -> None:
        if node is None or isinstance(node, int):
            return
        # optax.multi_transform masks the parameters of other labels with MaskedNode
        node = jtu.tree_map(
            lambda x: -1 if isinstance(x, optax.MaskedNode) else x,
            node,
            is_leaf=lambda x: isinstance(x, optax.MaskedNode),
        )
        if jtu.tree_structure(node, is_leaf=is_none) == p_def:
            for index, spec, e in zip(
                jtu.tree_leaves(node, is_leaf=is_none), spread, opt.shapes.entries
            ):
                if isinstance(index, int) and index >= 0 and e is not None and spec is not None:
                    shape = tuple(np.shape(opt.opt_leaves[index]))
                    if _fits(spec, shape, mesh) is None and shape == tuple(e[0]):
                        out[index] = spec
            return
        for child in jtu.tree_flatten(node, is_leaf=lambda x: x is not node)[0]:
            walk(child)

    walk(indices)
    return out


def shardings(
    tree: _T,
    mesh: Mesh,
    rules: Sequence[tuple[Filter, PartitionSpec]],
    *,
    default: PartitionSpec = _REPLICATED,
) -> _T:
    """A `NamedSharding` for every array of `tree`, chosen by kind (or any filter).

    **Arguments:**

    - `tree`: a model, an optimizer, or any pytree of them (`(model, opt)`), concrete or
        `eqstate.abstract`.
    - `mesh`: a `jax.sharding.Mesh`.
    - `rules`: `(filter, PartitionSpec)` pairs, the first matching filter wins: kinds,
        `...`, callables `(path, kind, leaf) -> bool` or `leaf -> bool`, as in
        `eqstate.filter`. A spec must fit the leaves it matches (rank, and mesh axis sizes
        dividing the sharded dimensions); an error names the leaf and the rule.
    - `default`: the spec of arrays no rule matches (replicated).

    Each `eqstate.Optimizer`'s state follows its parameters: a leaf of optax's state
    that belongs to a parameter (Adam's moments) gets that parameter's sharding, other
    leaves (step counts) the rules' or the default.

    **Returns:**

    A pytree of `tree`'s structure with a `NamedSharding` at each array and `None`
    elsewhere, for `eqx.filter_shard(tree, shardings)` (inside or outside jit) or
    `eqstate.place(tree, shardings)`.

    !!! example

        ```python
        # doctest: +SKIP (needs 8 devices)
        mesh = jax.make_mesh((2, 4), ("data", "model"))
        rules = [(eqstate.State, P()), (eqstate.Param, P("model"))]  # stats replicated
        model, opt = eqstate.place((model, opt), eqstate.shardings((model, opt), mesh, rules))
        ```
    """
    if not isinstance(mesh, Mesh):
        raise TypeError(_MSG_MESH.format(value=mesh, type=type(mesh).__name__))
    if isinstance(rules, (str, bytes, dict)) or not isinstance(rules, Sequence):
        raise TypeError(_MSG_RULES.format(what=f"got {type(rules).__name__}"))
    checked: list[tuple[Any, PartitionSpec]] = []
    for i, rule in enumerate(rules):
        if not (isinstance(rule, tuple) and len(rule) == 2):
            raise TypeError(_MSG_RULES.format(what=f"rules[{i}] is {rule!r}"))
        f, spec = rule
        if spec is None:
            spec = PartitionSpec()
        if not isinstance(spec, PartitionSpec):
            raise TypeError(
                _MSG_RULES.format(what=f"rules[{i}][1] is {spec!r}, not a PartitionSpec")
            )
        checked.append((f, spec))
    specs = _specs(tree, mesh, checked, default)
    # optimizers: their state follows their parameters
    for offset, opt in optimizers_in(tree):
        for k, spec in enumerate(_follow_params(opt, mesh, checked, default)):
            if spec is not None:
                specs[offset + k] = spec
    treedef = plan(tree)[1].treedef
    return treedef.unflatten([None if s is None else NamedSharding(mesh, s) for s in specs])


def put(value: Any, sharding: jax.sharding.Sharding) -> Any:
    """`value` (a local array or key array holding the whole value) on `sharding`, also
    when the sharding spans other processes, where `jax.device_put` refuses."""
    if sharding.is_fully_addressable:
        return jax.device_put(value, sharding)
    if is_key(value):
        impl = jax.random.key_impl(value)
        data = np.asarray(jax.random.key_data(value))
        wrap = jax.jit(lambda d: jax.random.wrap_key_data(d, impl=impl), out_shardings=sharding)
        return wrap(data)
    local = np.asarray(value)
    return jax.make_array_from_callback(local.shape, sharding, lambda index: local[index])


def _constrain(x: Any, sharding: NamedSharding) -> Any:
    explicit = all(t == AxisType.Explicit for t in sharding.mesh.axis_types)
    if explicit:
        return jax.sharding.reshard(x, sharding)
    return jax.lax.with_sharding_constraint(x, sharding)


def place(tree: _T, shardings: Any) -> _T:
    """`tree` with each array put on its sharding (from `eqstate.shardings`); everything
    else (static settings, `inference` flags) is left as it is, where
    `jax.device_put(tree, ...)` would turn Python bools into arrays that a jitted step
    then traces.

    Inside a jitted function it constrains the layouts instead: end a step with
    `return eqstate.place((model, opt), shardings)` so that its outputs keep their
    layouts (XLA may otherwise choose another one, e.g. shard a running mean).

    **Arguments:**

    - `tree`: a model, an optimizer, or any pytree of them.
    - `shardings`: a tree of `tree`'s structure with a `jax.sharding.Sharding` at each
        array (and `None` elsewhere), as `eqstate.shardings` returns.

    **Returns:**

    `tree` with its arrays on their shardings (outside jit), or constrained to them
    (inside jit).

    !!! example

        ```python
        mesh = jax.make_mesh((jax.device_count(),), ("data",))
        shardings = eqstate.shardings((model, opt), mesh, [])  # all replicated
        model, opt = eqstate.place((model, opt), shardings)
        ```
    """
    dynamic, static = eqx.partition(tree, eqx.is_array)
    if any(isinstance(x, Tracer) for x in jtu.tree_leaves(dynamic)):
        dynamic = jtu.tree_map(_constrain, dynamic, shardings)
    else:
        dynamic = jtu.tree_map(put, dynamic, shardings)
    return eqx.combine(dynamic, static)
