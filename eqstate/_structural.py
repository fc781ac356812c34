"""Structural equality for the callables of an optax transformation.

optax transformations are NamedTuples of closures: two `optax.adam(1e-3)` calls give
different function objects with the same code and equal closure contents. As a static
value of a jitted step, each new one would compile again. `Structural` wraps such a
callable so that it compares (and hashes) by what it computes: equal code, defaults and
closure contents, compared recursively by the same rule.
"""

import contextlib
import functools
import hashlib
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.core import Tracer


_BY_VALUE = frozenset({type(None), bool, int, float, complex, str, bytes, type(...)})
_MAX_DEPTH = 64
_SHORT = 40  # characters of a value shown in a message


def _fn_key(fn: types.FunctionType, memo: dict[int, int], depth: int) -> tuple:
    cells = []
    for cell in fn.__closure__ or ():
        try:
            cells.append(_key(cell.cell_contents, memo, depth))
        except ValueError:  # an empty cell: a variable not yet assigned
            cells.append(("empty",))
    return (
        "fn",
        fn.__code__,  # compares by value: the same source compiles to equal code
        id(fn.__globals__),  # ... read in the same module
        _key(fn.__defaults__, memo, depth),
        _key(fn.__kwdefaults__, memo, depth),
        tuple(cells),
        _key(dict(vars(fn)), memo, depth) if vars(fn) else None,
    )


def _array_key(x: Any) -> tuple:
    a = np.ascontiguousarray(np.asarray(x))
    digest = hashlib.blake2b(a.tobytes(), digest_size=16).digest()
    return ("array", a.shape, str(a.dtype), digest)


def _key(x: Any, memo: dict[int, int], depth: int = 0) -> Any:
    """A hashable value equal for structurally equal `x` (see the module docstring).

    Numbers, strings and dtypes compare by type and value; tuples, lists and dicts item
    by item; concrete arrays by shape, dtype and contents; plain functions by code,
    defaults and closure; bound methods and partials by their parts; tracers and
    anything else by identity (kept alive by the wrapped callable that reaches it).
    """
    t = type(x)
    if t in _BY_VALUE or isinstance(x, np.dtype):
        return ("value", t, x)
    if isinstance(x, Structural):
        return x.key()
    if isinstance(x, Tracer) or depth > _MAX_DEPTH:
        return ("id", id(x))
    seen = memo.get(id(x))
    if seen is not None:  # a cycle (a recursive closure) or a shared object
        return ("seen", seen)
    memo[id(x)] = len(memo)
    depth += 1
    if t is types.FunctionType:
        return _fn_key(x, memo, depth)
    if isinstance(x, (np.ndarray, np.generic, jax.Array)):
        try:
            return _array_key(x)
        except Exception:  # deleted, or not addressable from this process
            return ("id", id(x))
    if isinstance(x, (tuple, list)):  # NamedTuples (GradientTransformation) included
        return ("seq", t, tuple(_key(v, memo, depth) for v in x))
    if isinstance(x, dict):
        return (
            "dict",
            t,
            tuple((_key(k, memo, depth), _key(v, memo, depth)) for k, v in x.items()),
        )
    if t is types.MethodType:
        return ("method", _key(x.__func__, memo, depth), _key(x.__self__, memo, depth))
    if isinstance(x, functools.partial):  # jax.tree_util.Partial too
        return ("partial", t, *(_key(v, memo, depth) for v in (x.func, x.args, x.keywords)))
    return ("id", id(x))


class Structural:
    """A callable that compares and hashes structurally (see the module docstring).

    Calling it calls the wrapped function; other attributes are the function's. Its
    key is computed once, when it is wrapped: the settings as given, before any call
    (some optax schedules convert their own closure variables on their first call).
    """

    __slots__ = ("__weakref__", "_hash", "_key", "fn")

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._key: Any = None
        self._hash: int | None = None
        self.key()

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.fn(*args, **kwargs)

    def key(self) -> Any:
        if self._key is None:
            try:
                key = _key(self.fn, {})
                hash(key)
            except Exception:  # an unhashable dtype, a failing __eq__, ...: identity
                key = ("id", id(self.fn))
            self._key = key
        return self._key

    def __hash__(self) -> int:
        h = self._hash
        if h is None:
            h = self._hash = hash(self.key())
        return h

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, Structural):
            return NotImplemented
        if self.fn is other.fn:
            return True
        return hash(self) == hash(other) and self.key() == other.key()

    def __getattr__(self, name: str) -> Any:
        if name in Structural.__slots__:  # not yet set (e.g. while copying)
            raise AttributeError(name)
        return getattr(self.fn, name)

    @property
    def __wrapped__(self) -> Callable[..., Any]:
        return self.fn

    def __reduce__(self) -> Any:
        return (Structural, (self.fn,))

    def __repr__(self) -> str:
        return repr(self.fn)


def structural(tx: Any) -> Any:
    """`tx` (a `GradientTransformation`, of its own type) with structural callables."""
    names = getattr(tx, "_fields", None)
    if not isinstance(tx, tuple) or names is None:
        return tx
    fields = {
        name: v if isinstance(v, Structural) else Structural(v)
        for name, v in zip(names, tx)
        if callable(v)
    }
    return getattr(tx, "_replace")(**fields)  # a NamedTuple's  # noqa: B009


# --- descriptions, for reprs and retrace messages ------------------------------------------


def _unwrap(x: Any) -> Any:
    return x.fn if isinstance(x, Structural) else x


def _factory(fn: Any) -> str:
    """`scale_by_adam` for `scale_by_adam.<locals>.update_fn`; a plain function's name."""
    qual = getattr(fn, "__qualname__", None) or type(fn).__name__
    return qual.split(".<locals>.")[0] if ".<locals>." in qual else qual


def _closure(fn: Any) -> list[tuple[str, Any]]:
    fn = _unwrap(fn)
    if type(fn) is types.MethodType:
        fn = fn.__func__
    if type(fn) is not types.FunctionType:
        return []
    out = []
    for name, cell in zip(fn.__code__.co_freevars, fn.__closure__ or ()):
        with contextlib.suppress(ValueError):  # an empty cell
            out.append((name, cell.cell_contents))
    return out


def _transparent(fn: Any) -> Any:
    """Look through optax's `with_extra_args_support` wrapper."""
    while _factory(_unwrap(fn)) == "with_extra_args_support":
        inner = dict(_closure(fn)).get("tx")
        if inner is None or not hasattr(inner, "update"):
            break
        fn = inner.update
    return fn


def _children(fn: Any) -> list[Any]:
    """The update functions of the transformations `fn` closes over."""
    out = []
    for _, v in _closure(fn):
        values = list(v.values()) if isinstance(v, dict) else [v]
        for item in values:
            items = item if type(item) in (tuple, list) else [item]
            for y in items:
                if isinstance(y, tuple) and hasattr(y, "update") and hasattr(y, "init"):
                    out.append(getattr(y, "update"))  # a transformation  # noqa: B009
                elif getattr(_unwrap(y), "__name__", None) in ("update", "update_fn"):
                    out.append(y)  # the update function of one (`chain`'s)
    return out


def _name(fn: Any, depth: int = 0) -> str:
    fn = _transparent(fn)
    name = _factory(_unwrap(fn))
    if name == "inject_hyperparams":
        inner = dict(_closure(fn)).get("inner_factory")
        return f"inject_hyperparams({_factory(inner)})" if inner is not None else name
    kids = [_name(k, depth + 1) for k in _children(fn)] if depth < 3 else []
    kids = [k for k in kids if k]
    return f"{name}({', '.join(kids)})" if kids else name


def short(text: str, limit: int = _SHORT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def describe_tx(tx: Any, limit: int = 60) -> str:
    """A short name of an optax transformation: `chain(scale_by_adam, scale)`."""
    fn = getattr(tx, "update", None)
    if fn is None or not callable(fn):
        return short(type(tx).__name__, limit)
    return short(_name(fn), limit)


def _value(x: Any) -> str:
    x = _unwrap(x)
    if isinstance(x, types.FunctionType):
        return f"function {_factory(x)}"
    if isinstance(x, (np.ndarray, np.generic, jax.Array)) and not isinstance(x, Tracer):
        values = f" {np.asarray(x).tolist()}" if np.size(x) <= 4 else ""
        return short(f"{x.dtype}{list(np.shape(x))}{values}")
    return short(repr(x))


def _diff(a: Any, b: Any, trail: tuple, memo: set[int], depth: int) -> Any:
    """The first place where `a` and `b` differ structurally, as `(trail, a, b)` where
    `trail` holds `(is_function, name)` pairs; `None` if they do not differ."""
    if id(a) in memo or depth > _MAX_DEPTH:
        return None
    memo.add(id(a))
    if _key(a, {}) == _key(b, {}):
        return None
    a, b = _unwrap(a), _unwrap(b)
    ta = type(a)
    if ta is not type(b):
        return trail, a, b
    parts: list[tuple[Any, Any, tuple]] = []
    if ta is types.FunctionType:
        if a.__code__ != b.__code__ or a.__globals__ is not b.__globals__:
            return trail, a, b
        here = (*trail, (True, _factory(a))) if ".<locals>." in a.__qualname__ else trail
        parts = [
            (getattr(a, name), getattr(b, name), (*here, (False, name)))
            for name in ("__defaults__", "__kwdefaults__")
        ]
        parts += [
            (x, y, (*here, (False, name))) for (name, x), (_, y) in zip(_closure(a), _closure(b))
        ]
    elif isinstance(a, (tuple, list)) and len(a) == len(b):
        names = getattr(a, "_fields", None) or [f"[{i}]" for i in range(len(a))]
        parts = [(x, y, (*trail, (False, str(n)))) for n, x, y in zip(names, a, b)]
    elif isinstance(a, dict) and list(a) == list(b):
        parts = [(a[k], b[k], (*trail, (False, f"[{k!r}]"))) for k in a]
    elif isinstance(a, types.MethodType) and isinstance(b, types.MethodType):
        parts = [(a.__func__, b.__func__, trail), (a.__self__, b.__self__, trail)]
    for x, y, where in parts:
        found = _diff(x, y, where, memo, depth + 1)
        if found is not None:
            return found
    return trail, a, b


def _where(trail: tuple) -> str:
    """`in scale, step_size` for a trail ending in the closure of `scale`'s function."""
    last = max((i for i, (is_fn, _) in enumerate(trail) if is_fn), default=-1)
    fn = trail[last][1] if last >= 0 else ""
    rest = "".join(n if n.startswith("[") else f".{n}" for _, n in trail[last + 1 :])
    rest = rest.lstrip(".")
    return short(f"in {fn}, {rest}" if fn and rest else fn or rest or "its code", 60)


def explain_difference(a: Any, b: Any) -> str | None:
    """In words, how two optax transformations (or structural callables) differ, in at
    most about 250 characters; `None` if they are not such objects."""
    if not (_is_structural(a) and _is_structural(b)):
        return None
    if _is_tx(a) and _is_tx(b):
        what = "a different optax transformation"
        old, new = describe_tx(a, 50), describe_tx(b, 50)
        if old != new:  # the names say what changed
            return f"{what} ({old} -> {new})"
        names = old
    else:
        what, names = "a different function", short(_factory(_unwrap(a)), 50)
    try:
        found = _diff(a, b, (), set(), 0)
    except Exception:  # a failing repr or comparison: say less
        found = None
    if found is None:
        return f"{what} ({names})"
    trail, x, y = found
    return f"{what} ({names}; {_where(trail)}: {_value(x)} -> {_value(y)})"


def _is_tx(x: Any) -> bool:
    return isinstance(x, tuple) and any(isinstance(v, Structural) for v in x)


def _is_structural(x: Any) -> bool:
    return isinstance(x, Structural) or _is_tx(x)
