"""Drafts: the private copies that `@eqstate.mutating` methods assign to.

A draft is a copy of the module and of every mutable container reachable from it
(lists, dicts, sets, NumPy arrays, at any depth, children's included), so nothing a
method does to `self` reaches the caller's model. Immutable parts (JAX arrays, modules
that hold no containers) are shared. Drafts are per thread: a draft made in one thread
accepts assignments in that thread only.
"""

import contextlib
import copy
import threading
import weakref
from typing import Any

import equinox as eqx
import jax
import numpy as np
from jax.core import Tracer
from jax.extend.core import get_opaque_trace_state


_ATOMIC = (int, float, complex, bool, str, bytes, type(None), type(...), type, jax.Array)


def _thaw_kind(t: type) -> str:
    """How `thaw` treats instances of `t`: atomic, module, list, dict, tuple, set, ndarray."""
    if issubclass(t, eqx.Module):
        return "module"
    if issubclass(t, _ATOMIC):
        return "atomic"
    for base, name in (
        (list, "list"),
        (dict, "dict"),
        (tuple, "tuple"),
        (set, "set"),
        (np.ndarray, "ndarray"),
    ):
        if issubclass(t, base):
            return name
    return "atomic"  # functions, custom objects: shared as they are


_KINDS: dict[type, str] = {}

# Modules found to hold nothing mutable, by id: (weak reference, the modules inside).
# Modules are frozen, so this stays true for as long as the module lives.
_SEALED: dict[int, tuple[weakref.ref, dict[int, Any]]] = {}


def _seal(x: Any, inner: dict[int, Any]) -> None:
    key = id(x)

    def forget(ref: weakref.ref) -> None:
        hit = _SEALED.get(key)
        if hit is not None and hit[0] is ref:
            del _SEALED[key]

    with contextlib.suppress(TypeError):  # not weakly referenceable: never cached
        _SEALED[key] = (weakref.ref(x, forget), inner)  # not `x` itself: it must die


def thaw(x: Any, memo: dict[int, Any], owned: dict[int, Any] | None = None) -> Any:
    """A copy of `x` that shares nothing mutable with it.

    Lists, dicts, sets and NumPy arrays are copied at every depth; tuples and modules
    are rebuilt only if something inside them was copied. `memo` keeps aliasing (the
    same list twice stays one list). The ids of every module met, original and copy,
    are added to `owned`.
    """
    t = type(x)
    try:
        kind = _KINDS[t]
    except KeyError:
        kind = _KINDS[t] = _thaw_kind(t)
    if kind == "atomic":
        return x
    key = id(x)
    if key in memo:
        return memo[key]
    if kind == "module":
        hit = _SEALED.get(key)
        if hit is not None and hit[0]() is x:  # known to hold nothing mutable
            if owned is not None:
                owned.update(hit[1])
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
    else:  # ndarray
        out = x.copy()
    memo[key] = out
    return out


class Frame:
    """One running mutating call: its draft, the caller's original, and what it saw."""

    __slots__ = ("args", "draft", "original", "owned", "pending", "trace")

    def __init__(self, draft: Any, original: Any, owned: dict[int, Any], args: Any):
        self.draft = draft
        self.original = original
        self.owned = owned  # the modules reachable from the draft, by id
        self.trace = get_opaque_trace_state()
        # id(new child) -> (new child, the object it was called on, changed leaves)
        self.pending: dict[int, tuple[Any, Any, list[tuple[tuple, Any]]]] = {}
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


def same_trace(frame: Frame) -> bool:
    """Whether JAX is at the trace level where `frame`'s call started (not inside a
    `vmap`, `scan` or `cond` body that began within it)."""
    return get_opaque_trace_state() == frame.trace


EAGER = get_opaque_trace_state()


def is_mapped(x: Any) -> bool:
    """Whether `x` carries a `jax.vmap` batch axis (duck-typed on the tracer)."""
    return isinstance(x, Tracer) and getattr(x, "batch_dim", None) is not None


def per_example(frame: Frame) -> bool:
    """Whether `frame`'s call runs per example: under `jax.vmap`, with mapped arguments
    and a module that is not mapped."""
    if frame.trace == EAGER or not any(map(is_mapped, jax.tree_util.tree_leaves(frame.args))):
        return False
    return not any(map(is_mapped, jax.tree_util.tree_leaves(frame.original)))
