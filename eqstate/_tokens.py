"""`eqstate.jit`'s arguments as cache keys: each argument becomes its leaves and a
small integer (a token) for its structure and static part.

Tokens come from interning `(treedef, static key)` pairs per `Jit`, so the cache key of
a call is a short tuple of integers however large the model. Objects the last call
returned are remembered (the memo) with their leaves and token, so passing them back
skips the flatten.
"""

import functools as ft
import itertools
import weakref
from typing import Any

import jax
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer

from ._rebuild import unchanged


class Dyn:
    """Marks where a traced leaf goes in a static template."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<traced>"


DYN = Dyn()


class _Kind(dict):
    """`type -> marker` for a leaf: `DYN` if it is traced (as `eqx.is_array`), the type
    itself for numbers and strings (whose values compare equal across types: `1 == 1.0
    == True`, so the cache key holds them with their type), else `None`."""

    def __missing__(self, t: type) -> Any:
        if issubclass(t, (np.ndarray, np.generic, Tracer, jax.Array)):
            value = DYN
        elif issubclass(t, (bool, int, float, complex, str, bytes)):
            value = t
        else:
            value = None
        self[t] = value
        return value


_KIND = _Kind()


def is_array(x: Any) -> bool:
    return _KIND[type(x)] is DYN


def key_static(leaves: list) -> tuple:
    """The static part of some leaves as a cache key: `DYN` for each traced leaf."""
    kind = _KIND
    return tuple(
        [DYN if (k := kind[type(x)]) is DYN else (x if k is None else (k, x)) for x in leaves]
    )


ARRAY_TOKEN = 0  # the token of a lone array (never memoised)
KWARGS = -1  # separates positional tokens from the keyword-arguments token


class Parts:
    """Interns `(treedef, static key)` pairs of one `Jit`'s arguments as small integers.

    The cache key of a call is the tuple of its arguments' tokens: cheap to hash and
    compare however large the model. A number is never given to two pairs, so a token
    that outlived its pair (see `keep_only`) can only miss the cache.
    """

    __slots__ = ("_ids", "_next")

    def __init__(self) -> None:
        self._ids: dict[tuple[Any, tuple], int] = {(jtu.tree_structure(0), (DYN,)): ARRAY_TOKEN}
        self._next = itertools.count(ARRAY_TOKEN + 1)

    def token(self, treedef: Any, static: tuple) -> int:
        key = (treedef, static)
        tok = self._ids.get(key)  # TypeError for an unhashable static leaf
        if tok is None:
            tok = self._ids.setdefault(key, next(self._next))
        return tok

    def keep_only(self, live: set[int]) -> None:
        self._ids = {k: t for k, t in self._ids.items() if t in live or t == ARRAY_TOKEN}

    def __len__(self) -> int:
        return len(self._ids)


class Memo:
    """Leaves and token of the objects a `Jit` returned, by identity, while they live.

    Modules are immutable, so an object returned by the last step and passed to the
    next needs no second flatten (Equinox modules flatten in Python, node by node). The
    lists and dicts inside are mutable: a hit also checks they were not changed.
    """

    __slots__ = ("_d",)

    def __init__(self) -> None:
        self._d: dict[int, tuple[weakref.ref, Any, int, tuple]] = {}

    def get(self, obj: Any) -> tuple[Any, int] | None:
        hit = self._d.get(id(obj))
        if hit is not None and hit[0]() is obj and unchanged(hit[3]):
            return hit[1], hit[2]
        return None

    def put(self, obj: Any, leaves: Any, tok: int, snap: tuple) -> None:
        try:
            ref = weakref.ref(obj, ft.partial(_forget, self._d, id(obj)))
        except TypeError:  # tuples, lists, ... cannot be weakly referenced
            return
        if len(self._d) > 1024:
            self._d.clear()
        self._d[id(obj)] = (ref, leaves, tok, snap)

    def clear(self) -> None:
        self._d.clear()


def _forget(d: dict, key: int, ref: weakref.ref) -> None:
    hit = d.get(key)
    if hit is not None and hit[0] is ref:
        del d[key]


def part(x: Any, memo: Memo, parts: Parts) -> tuple[Any, int]:
    """The leaves of one argument and the token of its structure and static part."""
    if _KIND[type(x)] is DYN:
        return (x,), ARRAY_TOKEN
    hit = memo.get(x)
    if hit is not None:
        return hit
    leaves, treedef = jtu.tree_flatten(x)
    return leaves, parts.token(treedef, key_static(leaves))
