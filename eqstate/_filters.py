"""`filter` / `partition` / `combine` / `spec`: split a pytree by kind and put it back."""

import contextlib
import inspect
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeAlias, TypeVar, overload

import equinox as eqx
import jax.tree_util as jtu


if TYPE_CHECKING:  # jax.tree_util.PyTreeDef is a variable to type checkers
    from jaxlib._jax.pytree import PyTreeDef
else:
    PyTreeDef = jtu.PyTreeDef

from ._kinds import Kind
from ._resolve import Plan, plan


Filter: TypeAlias = (
    type[Kind]
    | Callable[[tuple, type[Kind], Any], bool]
    | Callable[[Any], bool]
    | tuple[Any, ...]
    | Any
)
"""A kind class, `...`, a callable `(path, kind, leaf) -> bool` or `leaf -> bool`, or a
tuple of these."""

_T = TypeVar("_T")

_MSG_BAD_FILTER = (
    "{where}: {filter!r} is not a filter. A filter is a subclass of eqstate.Kind (such "
    "as eqstate.Param or eqstate.State), `...` (everything), a callable "
    "`(path, kind, leaf) -> bool` or `leaf -> bool` (such as `eqx.is_array`), or a tuple "
    "of these (any of them)."
)
_MSG_FILTER_ARITY = (
    "{where}: the callable filter {name} has the signature {sig}, which takes neither one "
    "argument nor three. A callable filter is called as `f(leaf)` (like `eqx.is_array` or "
    "`eqx.is_inexact_array`) or as `f(path, kind, leaf)`. Wrap it, e.g. "
    "`lambda path, kind, leaf: ...`."
)
_MSG_NO_FILTER = "{where} needs at least one filter, e.g. `{where}(tree, eqstate.State)`."

_ON_PATHS = 3
_ON_LEAF = 1
_ARITY: "weakref.WeakKeyDictionary[Any, int | None]" = weakref.WeakKeyDictionary()
_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)


def _arity(f: Callable[..., Any]) -> int | None:
    """How `f` is called as a filter: `_ON_PATHS`, `_ON_LEAF`, or `None` (neither)."""
    try:
        return _ARITY[f]
    except (KeyError, TypeError):  # TypeError: not weakly referenceable or unhashable
        pass
    n = _count_arity(f)
    with contextlib.suppress(TypeError):
        _ARITY[f] = n
    return n


def _count_arity(f: Callable[..., Any]) -> int | None:
    try:
        params = inspect.signature(f).parameters.values()
    except (TypeError, ValueError):  # no signature (some builtins): the documented form
        return _ON_PATHS
    positional = [p for p in params if p.kind in _POSITIONAL]
    required = sum(p.default is p.empty for p in positional)
    star = any(p.kind is inspect.Parameter.VAR_POSITIONAL for p in params)
    if any(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is p.empty for p in params):
        return None
    for n in (_ON_PATHS, _ON_LEAF):
        if required <= n and (len(positional) >= n or star):
            return n
    return None


class _OnLeaf:
    """A one-argument filter `leaf -> bool`, as Equinox's filter functions are."""

    __slots__ = ("fn",)

    def __init__(self, fn: Callable[[Any], Any]):
        self.fn = fn


def _compile(f: Any, where: str) -> Any:
    """`f` checked, with each one-argument callable wrapped in `_OnLeaf`."""
    if f is ... or (isinstance(f, type) and issubclass(f, Kind)):
        return f
    if isinstance(f, tuple):
        return tuple(_compile(g, where) for g in f)
    if isinstance(f, type) or not callable(f):
        raise TypeError(_MSG_BAD_FILTER.format(where=where, filter=f))
    n = _arity(f)
    if n is None:
        raise TypeError(_MSG_FILTER_ARITY.format(where=where, name=describe(f), sig=_sig(f)))
    return _OnLeaf(f) if n == _ON_LEAF else f


def _sig(f: Callable[..., Any]) -> str:
    try:
        return str(inspect.signature(f))
    except (TypeError, ValueError):
        return "(?)"


def describe(f: Any) -> str:
    """A short name of a filter, for messages: `eqstate.Param`, `is_array`, `(a, b)`."""
    if f is ...:
        return "..."
    if isinstance(f, tuple):
        return "(" + ", ".join(describe(g) for g in f) + ("," if len(f) == 1 else "") + ")"
    if isinstance(f, type):
        prefix = "eqstate." if f.__module__.startswith("eqstate.") else ""
        return prefix + f.__qualname__
    if isinstance(f, _OnLeaf):
        return describe(f.fn)
    return getattr(f, "__name__", None) or repr(f)


def _needs_paths(f: Any) -> bool:
    if isinstance(f, tuple):
        return any(_needs_paths(g) for g in f)
    return f is not ... and not isinstance(f, (type, _OnLeaf))


def _matches(f: Any, path: tuple | None, kind: type[Kind], leaf: Any) -> bool:
    if f is ...:
        return True
    if isinstance(f, type):
        return issubclass(kind, f) and eqx.is_array(leaf)
    if isinstance(f, _OnLeaf):
        return bool(f.fn(leaf))
    if isinstance(f, tuple):
        return any(_matches(g, path, kind, leaf) for g in f)
    return bool(f(path, kind, leaf))


def _assign(leaves: list, p: Plan, filters: tuple, where: str) -> list[int]:
    """For each leaf, the index of the first filter it matches (`len(filters)` if none)."""
    if not filters:
        raise TypeError(_MSG_NO_FILTER.format(where=where))
    filters = tuple(_compile(f, where) for f in filters)
    paths = p.paths if any(_needs_paths(f) for f in filters) else (None,) * len(leaves)
    n = len(filters)
    out = []
    for leaf, kind, path in zip(leaves, p.kinds, paths):
        for i, f in enumerate(filters):
            if _matches(f, path, kind, leaf):
                out.append(i)
                break
        else:
            out.append(n)
    return out


def select(tree: Any, f: Filter, name: str) -> tuple[list, PyTreeDef, list[bool]]:
    """Flatten `tree`; return its leaves, treedef and which leaves match filter `f`."""
    leaves, p = plan(tree)
    which = _assign(leaves, p, (f,), name)
    return leaves, p.treedef, [i == 0 for i in which]


def filter(tree: _T, *filters: Filter) -> _T:
    """Keep the leaves of `tree` that match any of `filters`; replace the rest by `None`.

    **Arguments:**

    - `tree`: any pytree, usually an `eqstate.Module`.
    - `*filters`: kinds, tuples of filters, `...`, or callables `(path, kind, leaf) -> bool`
        or `leaf -> bool` (Equinox's `eqx.is_array`, `eqx.is_inexact_array`, ...). A kind
        matches array leaves of that kind or a subclass of it only; a callable sees every
        leaf. A callable's number of parameters is read once, from its signature.

    **Returns:**

    A pytree with the structure of `tree`, as `eqx.filter` returns.

    !!! example

        ```python
        state = eqstate.filter(model, eqstate.State)
        ```
    """
    leaves, p = plan(tree)
    which = _assign(leaves, p, filters, "eqstate.filter")
    n = len(filters)
    return p.treedef.unflatten([x if i < n else None for x, i in zip(leaves, which)])


# One overload per common number of filters, so that unpacking the wrong number of
# trees is a type error.
@overload
def partition(tree: _T, filter: Filter, /) -> tuple[_T, _T]: ...


@overload
def partition(tree: _T, filter1: Filter, filter2: Filter, /) -> tuple[_T, _T, _T]: ...


@overload
def partition(
    tree: _T, filter1: Filter, filter2: Filter, filter3: Filter, /
) -> tuple[_T, _T, _T, _T]: ...


@overload
def partition(tree: _T, *filters: Filter) -> tuple[_T, ...]: ...


def partition(tree: _T, *filters: Filter) -> tuple[_T, ...]:
    """Split a pytree into one tree per filter, plus one tree for everything left.

    **Arguments:**

    - `tree`: any pytree, usually an `eqstate.Module`.
    - `*filters`: kinds, tuples of filters, `...`, or callables `(path, kind, leaf) -> bool`
        or `leaf -> bool`, as for `eqstate.filter`.

    **Returns:**

    A tuple of `len(filters) + 1` trees with the structure of `tree`; each leaf appears in
    exactly one of them (the first filter it matches) and is `None` in the others.

    !!! example

        ```python
        params, state, rest = eqstate.partition(model, eqstate.Param, eqstate.State)
        model = eqstate.combine(params, state, rest)
        ```
    """
    leaves, p = plan(tree)
    which = _assign(leaves, p, filters, "eqstate.partition")
    return tuple(
        p.treedef.unflatten([x if i == j else None for x, i in zip(leaves, which)])
        for j in range(len(filters) + 1)
    )


def spec(tree: _T, *filters: Filter) -> _T:
    """A `bool` pytree, `True` where a leaf matches any of `filters`.

    Usable as the `filter_spec` of `eqx.partition` / `eqx.filter`.

    **Arguments:**

    - `tree`: any pytree, usually an `eqstate.Module`.
    - `*filters`: kinds, tuples of filters, `...`, or callables `(path, kind, leaf) -> bool`
        or `leaf -> bool`, as for `eqstate.filter`.

    **Returns:**

    A pytree with the structure of `tree` holding a `bool` at every leaf.

    !!! example

        ```python
        dynamic, static = eqx.partition(model, eqstate.spec(model, eqstate.Param))
        ```
    """
    leaves, p = plan(tree)
    which = _assign(leaves, p, filters, "eqstate.spec")
    return p.treedef.unflatten([i < len(filters) for i in which])


def is_none(x: Any) -> bool:
    return x is None


def leaf_path(tree: Any, index: int) -> tuple:
    """The key path of leaf `index` of `tree`, `None` counted as a leaf (as in
    `check_same_structure`'s flattening)."""
    return jtu.tree_flatten_with_path(tree, is_leaf=is_none)[0][index][0]


def first_mismatch(
    a: Any,
    b: Any,
    path: tuple = (),
    where: Callable[[tuple], str] = jtu.keystr,
    leaf: Callable[[Any], str] = lambda x: f"a leaf ({type(x).__name__})",
) -> str | None:
    """The key path where `a` and `b` first differ in structure, with what differs.

    `None` counts as a leaf. Returns `None` when the structures are equal. `where`
    formats a key path and `leaf` describes a leaf, for the message.
    """
    ka, da = jtu.tree_flatten_with_path(a, is_leaf=lambda x: x is not a)
    kb, db = jtu.tree_flatten_with_path(b, is_leaf=lambda x: x is not b)
    if da != db:
        return (
            f"at {where(path) or 'the root'}: {_describe(a, da, leaf)} != {_describe(b, db, leaf)}"
        )
    if da.num_nodes == 1 and da.num_leaves <= 1 and (not ka or ka[0][1] is a):
        return None  # both leaves (or both empty)
    for (k, ca), (_, cb) in zip(ka, kb):
        found = first_mismatch(ca, cb, path + k, where, leaf)
        if found is not None:
            return found
    return None


def _describe(x: Any, treedef: PyTreeDef, leaf: Callable[[Any], str]) -> str:
    if x is None:
        return "None"
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        return leaf(x)
    return str(treedef)


_HINT_SAME_MODEL = "Pass trees made by eqstate.partition / eqstate.filter from the same model."


def check_same_structure(
    trees: tuple, where: str, names: Callable[[int], str], hint: str = _HINT_SAME_MODEL
) -> list:
    """Flatten `trees` with `None` as a leaf; raise naming the first mismatch if needed."""
    flat = [jtu.tree_flatten(t, is_leaf=is_none) for t in trees]
    treedef = flat[0][1]
    for i, (_, d) in enumerate(flat[1:], 1):
        if d != treedef:
            detail = first_mismatch(trees[0], trees[i]) or f"{treedef} != {d}"
            raise ValueError(
                f"{where}: {names(i)} does not have the structure of {names(0)}; they "
                f"first differ {detail}. {hint}"
            )
    return flat


def combine(*trees: _T) -> _T:
    """Inverse of `eqstate.partition`: merge trees of the same structure.

    Each leaf is taken from the first tree where it is not `None`.

    **Arguments:**

    - `*trees`: pytrees of the same structure, with `None` where a leaf is absent.

    **Returns:**

    One pytree of that structure.

    !!! example

        ```python
        params, rest = eqstate.partition(model, eqstate.Param)
        model = eqstate.combine(params, rest)
        ```
    """
    if not trees:
        raise TypeError("eqstate.combine needs at least one tree.")
    return merge(check_same_structure(trees, "eqstate.combine", lambda i: f"tree {i}"))


def merge(flat: list) -> Any:
    """Combine trees already flattened by `check_same_structure`: first non-`None` wins."""
    columns = zip(*(leaves for leaves, _ in flat))
    merged = [next((x for x in col if x is not None), None) for col in columns]
    return flat[0][1].unflatten(merged)
