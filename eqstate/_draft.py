"""Drafts: the private copies that `@eqstate.mutating` methods assign to.

A draft is a copy of the module and of everything mutable reachable from it, at any
depth, children's included, so nothing a method does to `self` reaches the caller's
model:

- lists, dicts (any subclass: `OrderedDict`, `defaultdict`), sets, deques, NumPy arrays;
- other pytree nodes (such as `eqx.nn.State` or `jax.tree_util.Partial`), rebuilt from
  their children;
- objects of unhashable classes (`bytearray`, `types.SimpleNamespace`, `UserList`, ...),
  copied with their attributes.

Immutable parts are shared: JAX arrays, tuples and modules that hold nothing mutable,
and objects of hashable classes (functions, optax transformations, ...), which may be
part of a jit cache key. Drafts are per thread: a draft made in one thread accepts
assignments in that thread only.
"""

import collections
import contextlib
import copy
import threading
import weakref
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer


# never copied: immutable values, and JAX arrays and tracers (unhashable, but immutable)
_ATOMIC = (
    int,
    float,
    complex,
    bool,
    str,
    bytes,
    type(None),
    type(...),
    type,
    np.generic,
    jax.Array,
    Tracer,
)
_CONTAINERS = (
    (list, "list"),
    (dict, "dict"),
    (tuple, "tuple"),
    (set, "set"),
    (collections.deque, "deque"),
    (np.ndarray, "ndarray"),
)


def _thaw_kind(t: type, x: Any) -> str:
    """How `thaw` treats instances of `t` (`x` is one of them)."""
    if issubclass(t, eqx.Module):
        return "module"
    if issubclass(t, _ATOMIC):
        return "atomic"
    for base, name in _CONTAINERS:
        if issubclass(t, base):
            return name
    children, _ = jtu.tree_flatten(x, is_leaf=lambda y: y is not x)
    if not (len(children) == 1 and children[0] is x):
        return "node"  # a registered pytree node
    if t.__hash__ is None:
        return "object"  # mutable: never a jit cache key, so safe to copy
    return "atomic"  # functions and hashable objects: shared as they are


_KINDS: dict[type, str] = {}


def kind_of(x: Any) -> str:
    t = type(x)
    try:
        return _KINDS[t]
    except KeyError:
        kind = _KINDS[t] = _thaw_kind(t, x)
        return kind


# Modules found to hold nothing mutable, by id: (weak reference, the modules inside).
# Modules are frozen, so this stays true for as long as the module lives.
_SEALED: dict[int, tuple[weakref.ref, dict[int, Any]]] = {}


def _seal(x: Any, inner: dict[int, Any]) -> None:
    key = id(x)
    drafts_now = _local.drafts
    if any(drafts_now.get(k) is v for k, v in inner.items()) or drafts_now.get(key) is x:
        return  # a draft is still being assigned to: not sealed yet

    def forget(ref: weakref.ref) -> None:
        hit = _SEALED.get(key)
        if hit is not None and hit[0] is ref:
            del _SEALED[key]

    with contextlib.suppress(TypeError):  # not weakly referenceable: never cached
        _SEALED[key] = (weakref.ref(x, forget), inner)  # not `x` itself: it must die


def sealed(x: Any) -> dict[int, Any] | None:
    """The modules inside `x` if `x` is a module known to hold nothing mutable."""
    hit = _SEALED.get(id(x))
    return hit[1] if hit is not None and hit[0]() is x else None


def thaw(x: Any, memo: dict[int, Any], owned: dict[int, Any] | None = None) -> Any:
    """A copy of `x` that shares nothing mutable with it (see the module docstring).

    Tuples and modules are rebuilt only if something inside them was copied. `memo`
    keeps aliasing (the same list twice stays one list). Every module met, original and
    copy, is added to `owned` by id.
    """
    kind = kind_of(x)
    if kind == "atomic":
        return x
    key = id(x)
    if key in memo:
        return memo[key]
    t = type(x)
    if kind == "module":
        inside = sealed(x)
        if inside is not None:
            if owned is not None:
                owned.update(inside)
                owned[key] = x
            return x
        inner: dict[int, Any] = {}
        values = vars(x)
        new = {k: thaw(v, memo, inner) for k, v in values.items()}
        if any(new[k] is not v for k, v in values.items()):
            out = object.__new__(t)
            vars(out).update(new)
        else:
            out = x
            _seal(x, dict(inner))
        inner[key] = x
        inner[id(out)] = out
        if owned is not None:
            owned.update(inner)
    elif kind == "list":
        out = [thaw(v, memo, owned) for v in x] if t is list else copy.copy(x)
        if t is not list:
            out[:] = [thaw(v, memo, owned) for v in x]
    elif kind == "dict":
        out = copy.copy(x)  # keeps OrderedDict / defaultdict and its factory
        for k, v in x.items():
            out[k] = thaw(v, memo, owned)
    elif kind == "tuple":
        items = [thaw(v, memo, owned) for v in x]
        if all(a is b for a, b in zip(items, x)):
            out = x
        elif t is tuple:
            out = tuple(items)
        elif hasattr(t, "_fields"):
            out = t(*items)  # a NamedTuple
        else:
            out = t(items)
    elif kind == "set":
        out = copy.copy(x)
    elif kind == "deque":
        out = t((thaw(v, memo, owned) for v in x), maxlen=x.maxlen)
    elif kind == "ndarray":
        out = copy.deepcopy(x) if x.dtype == object else x.copy()
    elif kind == "node":
        children, treedef = jtu.tree_flatten(x, is_leaf=lambda y: y is not x)
        out = treedef.unflatten([thaw(c, memo, owned) for c in children])  # always new
    else:  # an object of an unhashable class
        out = copy.copy(x)
        if hasattr(out, "__dict__"):
            for k, v in vars(x).items():
                vars(out)[k] = thaw(v, memo, owned)
    memo[key] = out
    return out


def snapshot(x: Any, out: list[tuple[Any, Any]], seen: set[int]) -> None:
    """Record, for every mutable object reachable from `x`, its current contents, so
    that `restore` can put them back in place (references to them stay valid)."""
    kind = kind_of(x)
    if kind == "atomic" or kind == "node" or id(x) in seen:
        return
    seen.add(id(x))
    if kind == "module":
        if sealed(x) is None:
            for v in vars(x).values():
                snapshot(v, out, seen)
        return
    if kind in ("list", "deque", "tuple", "set"):
        items = list(x)
    elif kind == "dict":
        items = list(x.items())
    elif kind == "ndarray":
        items = x.copy()
    else:
        items = dict(vars(x)) if hasattr(x, "__dict__") else copy.copy(x)
    if kind != "tuple":
        out.append((x, items))
    if kind in ("list", "deque", "tuple", "set"):
        for v in items:
            snapshot(v, out, seen)
    elif kind == "dict":
        for _, v in items:
            snapshot(v, out, seen)
    elif kind == "object" and isinstance(items, dict):
        for v in items.values():
            snapshot(v, out, seen)


def restore(saved: list[tuple[Any, Any]]) -> None:
    """Put back, in place, the contents `snapshot` recorded."""
    for x, items in saved:
        kind = kind_of(x)
        if kind == "list":
            x[:] = items
        elif kind == "dict" or kind == "set":
            x.clear()
            x.update(items)
        elif kind == "deque":
            x.clear()
            x.extend(items)
        elif kind == "ndarray":
            if x.shape == items.shape:
                x[...] = items
        elif isinstance(items, dict):
            vars(x).clear()
            vars(x).update(items)
        else:
            with contextlib.suppress(TypeError):
                x[:] = items  # bytearray, array.array


class Frame:
    """One running mutating call: its draft, the caller's original, and what it saw."""

    __slots__ = ("args", "draft", "original", "owned", "pending")

    def __init__(self, draft: Any, original: Any, owned: dict[int, Any], args: Any):
        self.draft = draft
        self.original = original
        self.owned = owned  # the modules reachable from the draft, by id
        # id(new child) -> (new child, the child it came from, [(path, new leaf, old
        # leaf)] of its changed state, the method called, whether the change is only
        # possible: decided when the step runs)
        self.pending: dict[int, tuple[Any, Any, list[tuple[tuple, Any, Any]], str, bool]] = {}
        self.args = args  # the call's `(args, kwargs)`


class _Local(threading.local):
    def __init__(self) -> None:
        self.drafts: dict[int, Any] = {}
        self.frames: list[Frame] = []


_local = _Local()


class _Drafts:
    """`obj in drafts`: whether `obj` is a draft of this thread (by identity)."""

    __slots__ = ()

    def __contains__(self, obj: object) -> bool:
        return _local.drafts.get(id(obj)) is obj


drafts = _Drafts()


def push(frame: Frame) -> None:
    _local.drafts[id(frame.draft)] = frame.draft
    _local.frames.append(frame)


def pop(frame: Frame) -> None:
    _local.frames.pop()
    del _local.drafts[id(frame.draft)]


def current() -> Frame | None:
    """The innermost running mutating call of this thread, if any."""
    frames = _local.frames
    return frames[-1] if frames else None


def frame_of(draft: Any) -> Frame | None:
    """The running call whose draft is `draft`."""
    for f in reversed(_local.frames):
        if f.draft is draft:
            return f
    return None
