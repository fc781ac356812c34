"""Why `eqstate.jit` traced again: the first argument path whose structure, shape,
dtype or static value changed between two calls, in words, on one line of bounded length
(a static field of a module is named by its path, `args[1].tx`; long values are cut to
where they differ)."""

import contextlib
import dataclasses
import re
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu

from ._filters import first_mismatch
from ._structural import explain_difference


_SHORT = 60  # characters of a value shown in a message
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")


def _weak(x: Any) -> bool:
    return bool(getattr(x, "weak_type", False))


def _fmt(x: Any) -> str:
    if isinstance(x, jax.ShapeDtypeStruct):
        weak = ", weak" if x.weak_type else ""
        return f"{x.dtype}{list(x.shape)}{weak}"
    return repr(x)


def _leaf(x: Any) -> str:
    return f"an array {_fmt(x)}" if isinstance(x, jax.ShapeDtypeStruct) else _short(x)


def _text(x: Any) -> str:
    """`repr(x)` on one line, without object addresses."""
    try:
        text = repr(x)
    except Exception:
        text = f"<{type(x).__name__}>"
    return _ADDRESS.sub("", " ".join(text.split()))


def _short(x: Any) -> str:
    text = _text(x)
    return text if len(text) <= _SHORT else f"{text[: _SHORT - 1]}…"


def _windows(a: str, b: str) -> tuple[str, str]:
    """Two texts, if long, cut to a window around the first character where they differ."""
    if len(a) <= _SHORT and len(b) <= _SHORT:
        return a, b
    i = next((i for i, (p, q) in enumerate(zip(a, b)) if p != q), min(len(a), len(b)))
    start, width = max(0, i - 20), _SHORT - 20

    def window(t: str) -> str:
        return (
            ("…" if start else "")
            + t[start : start + width]
            + ("…" if start + width < len(t) else "")
        )

    return window(a), window(b)


def _change(x: Any, y: Any) -> str:
    """How the static value `x` became `y`, in at most about 250 characters."""
    special = explain_difference(x, y)
    if special is not None:
        return special
    explain_change = getattr(x, "explain_change", None)  # e.g. an optimizer's shapes
    if type(x) is type(y) and callable(explain_change):
        text = None
        with contextlib.suppress(Exception):
            text = explain_change(y)
        if isinstance(text, str) and text:
            return text
    a, b = _text(x), _text(y)
    if a == b:  # equal-looking, so say why they differ
        why = (
            "compared by identity: a rebuilt one is a new object, even with the same contents"
            if type(x).__eq__ is object.__eq__
            else "its == says they differ"
        )
        shown = b if len(b) <= _SHORT else f"{b[: _SHORT - 1]}…"
        return f"another {type(y).__name__} that looks the same, {shown} ({why})"
    if len(a) <= _SHORT and len(b) <= _SHORT:
        return f"from {a} to {b}"
    kind = type(x).__name__ if type(x) is type(y) else f"{type(x).__name__} -> {type(y).__name__}"
    return "a {} differing: {} -> {}".format(kind, *_windows(a, b))


_MISSING = object()


def _first_change(a: Any, b: Any, path: tuple) -> tuple[bool, tuple, Any, Any] | None:
    """Where two trees of different structure first differ (depth first): `(static,
    path, x, y)`, with `static` true for a static field of a module (`x` and `y` its
    values), false for a node whose type, keys or node data differ (`x` and `y` their
    descriptions)."""
    if type(a) is type(b) and isinstance(a, eqx.Module):
        va, vb = vars(a), vars(b)
        for f in dataclasses.fields(a):
            x, y = va.get(f.name, _MISSING), vb.get(f.name, _MISSING)
            here = (*path, jtu.GetAttrKey(f.name))
            if f.metadata.get("static", False):
                if not _same(x, y):
                    return True, here, x, y
            elif jtu.tree_structure(x) != jtu.tree_structure(y):
                return _first_change(x, y, here)
    ka, da = jtu.tree_flatten_with_path(a, is_leaf=lambda x: x is not a)
    kb, db = jtu.tree_flatten_with_path(b, is_leaf=lambda x: x is not b)
    if da != db:
        return (False, path, *_windows(_node(a, da), _node(b, db)))
    for (k, x), (_, y) in zip(ka, kb):
        if x is not a and jtu.tree_structure(x) != jtu.tree_structure(y):
            return _first_change(x, y, path + k)
    return None


def _node(x: Any, treedef: Any) -> str:
    if x is None:
        return "None"
    if treedef.num_nodes == 1 and treedef.num_leaves == 1:
        return _leaf(x)
    return _ADDRESS.sub("", str(treedef))


def _same(x: Any, y: Any) -> bool:
    try:
        return x is y or (type(x) is type(y) and bool(x == y))
    except Exception:
        return False


def explain(old: Any, new: Any) -> str:
    """Name the first argument path where two skeletons differ, and how."""
    if jtu.tree_structure(old) != jtu.tree_structure(new):
        change = _first_change(old, new, ())
        if change is not None:
            static, path, x, y = change
            if static:
                return f"The static field {argpath(path)} changed: {_change(x, y)}."
            where = argpath(path) if path else "the root"
            return f"The structure of the arguments changed at {where}: {x} != {y}."
        where = first_mismatch(old, new, where=argpath, leaf=_leaf)
        if where is not None:
            return f"The structure of the arguments changed {_cut(where)}."
    a, _ = jtu.tree_flatten_with_path(old)
    b = jtu.tree_leaves(new)
    for (path, x), y in zip(a, b):
        if _same(x, y):
            continue
        name = argpath(path)
        x_array = isinstance(x, jax.ShapeDtypeStruct)
        y_array = isinstance(y, jax.ShapeDtypeStruct)
        if x_array and y_array:
            return f"The shape/dtype of {name} changed from {_fmt(x)} to {_fmt(y)}."
        if y_array:
            return f"{name} changed from the static value {_short(x)} to an array {_fmt(y)}."
        if x_array:
            return f"{name} changed from an array {_fmt(x)} to the static value {_short(y)}."
        return f"The static value of {name} changed {_change(x, y)}."
    return (
        "Nothing in the arguments' structure, shapes, dtypes or static values changed: "
        "JAX retraced for another reason, most often a new placement of an input (an "
        "array put on other devices or another sharding). Place arrays before the first "
        "call (`eqstate.place`) and keep them there (return `eqstate.place(...)` from "
        "the step)."
    )


def _cut(where: str, limit: int = 300) -> str:
    """A structure mismatch (which may print two tree structures) on one short line."""
    where = _ADDRESS.sub("", " ".join(where.split()))
    return where if len(where) <= limit else where[: limit - 1] + "…"


def argpath(path: tuple) -> str:
    """`((args, kwargs), ...)` key path -> `args[0].bn.mean` / `kwargs['x']`."""
    if not path:
        return "the arguments"
    head, *rest = path
    name = "args" if getattr(head, "idx", None) == 0 else "kwargs"
    rest_path = rest[1:] if name == "kwargs" else rest
    prefix = f"kwargs[{rest[0].key!r}]" if name == "kwargs" and rest else name
    return prefix + jtu.keystr(tuple(rest_path))


def skeleton(tree: Any, is_array: Callable[[Any], bool]) -> Any:
    """`tree` with each array (as `is_array` says) replaced by its shape, dtype and weak
    type: what a trace depends on, kept to explain the next retrace."""
    return jtu.tree_map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=_weak(x)) if is_array(x) else x,
        tree,
    )
