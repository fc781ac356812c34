"""Rebuild a jitted function's outputs from leaves faster than `treedef.unflatten`.

`treedef.unflatten` calls Equinox's Python unflatten once per module node, setting each
field with `object.__setattr__`. For a fixed output structure, one generated function
that creates every module and sets its whole `__dict__` at once does the same work in a
fraction of the time. It is generated from the output seen at trace time and checked
against `treedef.unflatten` before use; any structure it does not know is rebuilt by
JAX for that subtree. Every container it returns is new on every call.

A `Plan` holds all that for one trace: the compiled call returns it next to the traced
outputs, so that each call is rebuilt by the trace that served it.
"""

import dataclasses
import operator
from collections.abc import Callable
from typing import Any, cast

import equinox as eqx
import jax.tree_util as jtu


class Plan:
    """How to rebuild the outputs of one trace from its traced outputs.

    The compiled call returns it next to them: a pytree node without leaves, which
    JAX's C++ fast path rebuilds by calling `lambda plan, _: plan`, so a call always
    gets the plan of the trace that served it (whatever its shapes, from any thread).

    - `build`: all output leaves -> `(outputs, groups)`, see `builder`.
    - `merge`: traced outputs -> all output leaves; `None` if every leaf is traced.
    - `parts`: for a tuple output, each element's `(start, end, token)`, else `None`.
    - `token`: the token of any other output (what `token` gave for it).
    """

    __slots__ = ("build", "merge", "parts", "token")

    def __init__(self, out: Any, traced: list[bool], token: Callable[[Any, list], int]) -> None:
        leaves, out_def = jtu.tree_flatten(out)
        self.build = builder(out, out_def)
        self.merge = _merger(leaves, traced)
        self.parts: list[tuple[int, int, int]] | None = None
        self.token = 0
        if type(out) is tuple:
            self.parts, start = [], 0
            for child in out_def.children():
                end = start + child.num_leaves
                self.parts.append((start, end, token(child, leaves[start:end])))
                start = end
        else:
            self.token = token(out_def, leaves)


jtu.register_pytree_node(Plan, lambda p: ((), p), lambda p, _: p)


def getter(positions: list[int], n: int | None = None) -> Callable[[Any], tuple]:
    """`f(seq) -> tuple(seq[i] for i in positions)`, at C speed (`seq` has `n` items)."""
    if not positions:
        return lambda seq: ()
    if positions == list(range(n or 0)):
        return tuple
    if len(positions) == 1:
        (i,) = positions
        return lambda seq: (seq[i],)
    return operator.itemgetter(*positions)


def _merger(leaves: list, traced: list[bool]) -> Callable[[Any], Any] | None:
    """`f(traced outputs) -> all output leaves`, at C speed; `None` if all are traced."""
    if all(traced):
        return None
    dyn = [i for i, t in enumerate(traced) if t]
    static = [i for i, t in enumerate(traced) if not t]
    values = [leaves[i] for i in static]
    source = [0] * len(leaves)
    for j, i in enumerate(dyn + static):
        source[i] = j
    get = getter(source)
    return lambda out: get([*out, *values])


def _is_plain_module(x: Any) -> bool:
    cls = type(x)
    return (
        isinstance(x, eqx.Module)
        and hasattr(x, "__dict__")
        and "__slots__" not in cls.__dict__
        and dataclasses.is_dataclass(cls)
    )


class _Gen:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self.containers: list[str] = []  # the mutable lists and dicts built
        self.opaque = False  # whether some subtree is rebuilt by JAX, contents unseen
        self.n = 0

    def const(self, value: Any) -> str:
        name = f"c{len(self.consts)}"
        self.consts[name] = value
        return name

    def var(self) -> str:
        self.n += 1
        return f"v{self.n}"

    def container(self, expr: str) -> str:
        v = self.var()
        self.lines.append(f"    {v} = {expr}")
        self.containers.append(v)
        return v

    def node(self, x: Any, start: int) -> tuple[str, int]:
        """An expression building `x` from `L[start:...]`, and the next leaf index."""
        treedef = jtu.tree_structure(x)
        n = treedef.num_leaves
        if treedef.num_nodes == 1:  # a leaf, or a node without children
            if n == 1:
                return f"L[{start}]", start + 1
            if type(x) in (list, dict):
                return self.container("[]" if type(x) is list else "{}"), start
            if x is None or type(x) is tuple:
                return repr(x), start  # immutable singletons, as JAX returns them
            # other empty nodes (an empty module, namedtuple, OrderedDict, ...) are built
            # afresh on every call below: a constant would be one object for all calls
        if isinstance(x, tuple) and type(x) is not tuple and hasattr(type(x), "_fields"):
            parts = []  # a NamedTuple, rebuilt as JAX does: cls(*children)
            i = start
            for child in x:
                expr, i = self.node(child, i)
                parts.append(expr)
            return f"{self.const(type(x))}({', '.join(parts)})", i
        if type(x) is dict and all(type(k) is str for k in x):
            parts = []  # JAX rebuilds dicts with sorted keys
            i = start
            for k in sorted(x):
                expr, i = self.node(x[k], i)
                parts.append(f"{k!r}: {expr}")
            return self.container("{" + ", ".join(parts) + "}"), i
        if type(x) in (tuple, list) and n == len(x) and treedef.num_nodes == n + 1:
            expr = f"{type(x).__name__}(L[{start}:{start + n}])"  # all leaves
            return (self.container(expr) if type(x) is list else expr), start + n
        if type(x) in (tuple, list):
            parts = []
            i = start
            for child in x:
                expr, i = self.node(child, i)
                parts.append(expr)
            inner = ", ".join(parts) + ("," if type(x) is tuple and len(parts) == 1 else "")
            if type(x) is tuple:
                return "(" + inner + ")", i
            return self.container("[" + inner + "]"), i
        if _is_plain_module(x):
            fields = dataclasses.fields(cast(Any, x))
            values = vars(x)
            items = []
            i = start
            static = {}
            for f in fields:
                if f.name not in values:
                    continue
                if f.metadata.get("static", False):
                    static[f.name] = values[f.name]
                    continue
                expr, i = self.node(values[f.name], i)
                items.append(f"{f.name!r}: {expr}")
            names = {f.name for f in fields}
            extra = {k: v for k, v in values.items() if k not in names}
            static.update(extra)
            if static:
                items.append("**" + self.const(static))
            v = self.var()
            cls = self.const(type(x))
            self.lines.append(f"    {v} = new({cls})")
            self.lines.append(f"    setattr_({v}, '__dict__', {{{', '.join(items)}}})")
            return v, i
        # anything else (custom nodes, dicts with other keys): JAX rebuilds the subtree
        self.opaque = True
        return f"{self.const(treedef)}.unflatten(L[{start}:{start + n}])", start + n


def builder(out: Any, out_def: Any) -> Callable[[Any], tuple[Any, tuple | None]]:
    """A function `leaves -> (output, groups)` for outputs like `out`.

    `output` equals `out_def.unflatten(leaves)`. `groups` has one entry per element of a
    tuple output (one in all for any other output): the lists and dicts built for that
    element (mutable, so a memo of its leaves must check them), or `None` where JAX
    rebuilt part of it and they are unknown. `groups` is `None` when JAX rebuilt it all.
    """

    def by_jax(leaves: Any) -> tuple[Any, None]:
        return out_def.unflatten(leaves), None

    gen = _Gen()
    parts = list(out) if type(out) is tuple else [out]
    exprs, groups, used = [], [], 0
    try:
        for part in parts:
            first, gen.opaque = len(gen.containers), False
            expr, used = gen.node(part, used)
            exprs.append(expr)
            made = "".join(c + ", " for c in gen.containers[first:])
            groups.append("None" if gen.opaque else f"({made})")
    except Exception:  # an unusual node: let JAX do it
        return by_jax
    if used != out_def.num_leaves:
        return by_jax
    result = f"({''.join(e + ', ' for e in exprs)})" if type(out) is tuple else exprs[0]
    src = (
        "def build(L):\n"
        + "\n".join(gen.lines)
        + f"\n    return {result}, ({''.join(g + ', ' for g in groups)})\n"
    )
    namespace = {"new": object.__new__, "setattr_": object.__setattr__, **gen.consts}
    exec(compile(src, "<eqstate rebuild>", "exec"), namespace)
    build = namespace["build"]
    try:
        ok = jtu.tree_structure(build(jtu.tree_leaves(out))[0]) == out_def
    except Exception:
        ok = False
    return build if ok else by_jax


def snapshot(containers: tuple) -> tuple:
    """What `unchanged` compares: each list's items and each dict's keys and values."""
    return tuple(
        (c, tuple(c), tuple(c.values())) if type(c) is dict else (c, tuple(c), ())
        for c in containers
    )


def unchanged(snap: tuple) -> bool:
    """Whether no list or dict in `snap` was modified in place since the snapshot.

    Items are compared by identity (at C speed), so an equal but new array counts as a
    change.
    """
    for c, items, values in snap:
        if len(c) != len(items):
            return False
        if type(c) is dict:
            if tuple(c) != items or not all(map(operator.is_, c.values(), values)):
                return False
        elif not all(map(operator.is_, c, items)):
            return False
    return True
