"""Structural equality for the callables of an optax transformation.

optax transformations are NamedTuples of closures: two `optax.adam(1e-3)` calls give
different function objects with the same code and equal closure contents. As a static
value of a jitted step, each new one would compile again. `Structural` wraps such a
callable so that it compares (and hashes) by what it computes.

Equal keys must mean equal behaviour, so a key is defined only over a closed world of
values:

- `None`, `...`, bools, ints, floats (by `float.hex`: `-0.0` is not `0.0`, a NaN equals
    itself), complex numbers, strings, bytes, NumPy dtypes and Enum members: by type
    and value;
- classes, modules, builtin functions and JAX's function objects (jitted functions,
    `custom_jvp`, ...): by identity (a redefined one is a new object);
- tuples (NamedTuples with their type), lists, dicts and sets of such values;
- concrete NumPy and JAX arrays: by family (NumPy or JAX), shape, dtype, weak type and
    contents;
- plain functions: by code, defaults, attributes, closure contents and the globals their
    code reads (with the code nested in it): values by value, functions of the same
    module by these rules, other functions, classes and modules by identity, with the
    attributes the code may read from those modules and classes;
- `functools.partial`s by function, arguments and keywords; methods bound to a class.

Anything else reachable (an instance of a user class, a method bound to one, a tracer,
nesting deeper than `_MAX_DEPTH`) makes the whole callable compare by identity, as any
static value of a jitted function does: a rebuilt one compiles again, slow but right.

The key is computed when first needed (at the first call, comparison or hash), then
kept: so it holds the settings the first trace saw, and some optax schedules may convert
their own closure variables during that call.
"""

import contextlib
import enum
import functools
import hashlib
import re
import types
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
from jax.core import Tracer


_MSG_CHANGED = (
    "eqstate.Optimizer: a setting of its optax transformation changed after the "
    "optimizer was first compared (as a jitted step does to find its compiled trace) and "
    "before its first step ({change}), so that step would run the new setting under the "
    "old one's cache key. Build the optimizer again after changing a setting: "
    "`opt = eqstate.Optimizer(tx, model)`."
)
_MAX_DEPTH = 64
_SHORT = 40  # characters of a value shown in a message
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
_SCALARS = frozenset({type(None), bool, int, str, bytes, type(...)})
_PARTIALS = (functools.partial, jax.tree_util.Partial)
_EMPTY = ("empty",)  # a closure variable not yet assigned
_HEAPTYPE = 1 << 9  # `Py_TPFLAGS_HEAPTYPE`: a class defined in Python, whose attributes can change


class _OpaqueError(Exception):
    """Something outside the closed world: the callable compares by identity. `trail`
    says where, as `(is_function, name)` pairs, filled in while the error unwinds."""

    def __init__(self, what: str):
        super().__init__(what)
        self.what = what
        self.trail: list[tuple[bool, str]] = []

    def at(self, is_function: bool, name: str) -> "_OpaqueError":
        self.trail.insert(0, (is_function, name))
        return self


class _Id(int):
    """An object in a key, compared by identity: its `id`, as an int (compared and
    hashed in C), holding the object so that no other object takes its address while
    the key exists."""

    obj: Any

    def __new__(cls, obj: Any) -> "_Id":
        self = super().__new__(cls, id(obj))
        self.obj = obj
        return self

    def __repr__(self) -> str:
        return f"_Id({_short_repr(self.obj)})"


class _OpaqueKey:
    """The key of a callable that reaches something outside the closed world."""

    __slots__ = ("fn", "trail", "what")

    def __init__(self, fn: Any, what: str, trail: list[tuple[bool, str]]):
        self.fn, self.what, self.trail = fn, what, trail

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _OpaqueKey) and self.fn is other.fn

    def __hash__(self) -> int:
        return id(self.fn)


def _by_identity(x: Any) -> bool:
    """Objects that are their own definition: classes, modules, type annotations,
    builtin functions of a module, NumPy ufuncs, and JAX's function objects (jitted or
    with custom rules)."""
    if isinstance(x, (type, types.ModuleType, np.ufunc, types.GenericAlias, types.UnionType)):
        return True
    t = type(x)
    if t.__module__ == "typing":  # `Optional[float]`, a `TypeVar`, ...: immutable
        return True
    if t is types.BuiltinFunctionType:
        return x.__self__ is None or isinstance(x.__self__, types.ModuleType)
    return (
        callable(x)
        and t.__module__.startswith(("jax.", "jaxlib."))
        and not isinstance(x, (jax.Array, *_PARTIALS))
    )


def _key(x: Any, memo: dict[Any, Any], depth: int = 0) -> Any:
    """A hashable value, equal for `x` that behave the same (see the module docstring);
    raises `_OpaqueError` for anything outside the closed world."""
    t = type(x)
    if t in _SCALARS:
        return (t.__name__, x)
    if t is float:
        return ("float", x.hex())
    if t is complex:
        return ("complex", x.real.hex(), x.imag.hex())
    if isinstance(x, np.dtype):
        return ("dtype", x)
    if isinstance(x, enum.Enum):
        return ("enum", _Id(t), x.name)
    if t is Structural:
        key = x.key()
        if isinstance(key, _OpaqueKey):
            raise _OpaqueError(key.what)
        return key
    if _by_identity(x):
        return ("id", _Id(x))
    if isinstance(x, Tracer):
        raise _OpaqueError("a tracer")
    if depth > _MAX_DEPTH:
        raise _OpaqueError(f"values nested more than {_MAX_DEPTH} levels deep")
    seen = memo.get(id(x))
    if seen is not None:  # a cycle (a recursive closure) or a shared object
        return ("seen", seen)
    memo[id(x)] = len(memo)
    depth += 1
    if t is types.FunctionType:
        return _fn_key(x, memo, depth)
    if t is np.ndarray or isinstance(x, (np.generic, jax.Array)):
        return _array_key(x)
    if t is tuple or t is list:
        return ("seq", _Id(t), _items(x, memo, depth), None)
    if issubclass(t, tuple) and hasattr(t, "_fields"):  # a NamedTuple, and what is set on it
        return ("seq", _Id(t), _items(x, memo, depth), _attrs(x, memo, depth))
    if t is dict:
        return ("dict", tuple(_dict_items(x, memo, depth)))
    if t is set or t is frozenset:
        try:  # elements are hashable, so acyclic: each keyed on its own
            return ("set", _Id(t), frozenset(_key(v, {}, depth) for v in x))
        except _OpaqueError as e:
            raise e.at(False, "an element") from None
    if t is types.MethodType:
        if not isinstance(x.__self__, type):
            raise _OpaqueError(f"a method bound to a {type(x.__self__).__name__} instance")
        return ("method", _key(x.__func__, memo, depth), ("id", _Id(x.__self__)))
    if t in _PARTIALS:
        parts = []
        for name in ("func", "args", "keywords"):
            try:
                parts.append(_key(getattr(x, name), memo, depth))
            except _OpaqueError as e:
                raise e.at(False, name) from None
        return ("partial", _Id(t), *parts, _attrs(x, memo, depth))
    raise _OpaqueError(f"a {t.__qualname__} instance")


def _items(x: Any, memo: dict[Any, Any], depth: int) -> tuple:
    out = []
    for i, v in enumerate(x):
        try:
            out.append(_key(v, memo, depth))
        except _OpaqueError as e:
            fields = getattr(type(x), "_fields", None)
            raise e.at(False, fields[i] if fields else f"[{i}]") from None
    return tuple(out)


def _dict_items(x: dict, memo: dict[Any, Any], depth: int) -> list:
    out = []
    for k, v in x.items():
        try:
            out.append((_key(k, memo, depth), _key(v, memo, depth)))
        except _OpaqueError as e:
            raise e.at(False, f"[{_short_repr(k)}]") from None
    return out


def _attrs(x: Any, memo: dict[Any, Any], depth: int) -> Any:
    """The attributes set on a function, partial or NamedTuple (`__wrapped__`, ...)."""
    d = getattr(x, "__dict__", None)
    if not d:
        return None
    try:
        return ("dict", tuple(_dict_items(d, memo, depth)))
    except _OpaqueError as e:
        raise e.at(False, "attributes") from None


def _array_key(x: Any) -> tuple:
    family = "jax" if isinstance(x, jax.Array) else "numpy"
    dtype: Any = x.dtype
    try:
        if family == "jax" and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
            a, dtype = np.asarray(jax.random.key_data(x)), str(dtype)  # `key<fry>`
        else:
            a = np.asarray(x)
    except Exception:  # deleted, not addressable from this process, ...
        raise _OpaqueError(f"a {type(x).__name__} that NumPy cannot read") from None
    if a.dtype.hasobject:
        raise _OpaqueError("an array of Python objects")
    digest = hashlib.blake2b(np.ascontiguousarray(a).tobytes(), digest_size=16).digest()
    weak = bool(getattr(x, "weak_type", False))
    shown = _numbers(a) if a.size <= 4 else ""  # for messages; follows the bytes
    return ("array", family, a.shape, dtype, weak, digest, shown)


def _numbers(a: np.ndarray) -> str:
    try:
        return np.array2string(a, separator=", ", floatmode="unique")
    except Exception:  # a dtype NumPy cannot print
        return ""


def _fn_key(fn: types.FunctionType, memo: dict[Any, Any], depth: int) -> tuple:
    code = fn.__code__
    try:
        cells = []
        for name, cell in zip(code.co_freevars, fn.__closure__ or ()):
            try:
                value = cell.cell_contents
            except ValueError:
                cells.append(_EMPTY)
                continue
            try:
                if isinstance(value, (type, types.ModuleType)):  # and what is read of it
                    ns = _namespace(value, _names(code), memo, depth, set())
                    cells.append(("id", _Id(value), ns))
                else:
                    cells.append(_key(value, memo, depth))
            except _OpaqueError as e:
                raise e.at(False, name) from None
        parts = []
        for name in ("__defaults__", "__kwdefaults__"):
            try:
                parts.append(_key(getattr(fn, name), memo, depth))
            except _OpaqueError as e:
                raise e.at(False, name) from None
        return (
            "fn",
            code,  # compares by value: the same source compiles to equal code
            *parts,
            tuple(cells),
            _globals_key(fn, code, memo, depth),
            _attrs(fn, memo, depth),
        )
    except _OpaqueError as e:
        if ".<locals>." in code.co_qualname:
            e.at(True, _factory_name(code.co_qualname))
        raise


_NAMES: dict[int, tuple[types.CodeType, tuple[str, ...]]] = {}


def _names(code: types.CodeType) -> tuple[str, ...]:
    """The names `code` (and the code nested in it) loads: globals and attributes."""
    hit = _NAMES.get(id(code))
    if hit is not None and hit[0] is code:
        return hit[1]
    names = dict.fromkeys(code.co_names)
    for c in code.co_consts:
        if isinstance(c, types.CodeType):
            names.update(dict.fromkeys(_names(c)))
    if len(_NAMES) > 4096:
        _NAMES.clear()
    _NAMES[id(code)] = (code, tuple(names))
    return tuple(names)


def _globals_key(fn: types.FunctionType, code: types.CodeType, memo: dict, depth: int) -> tuple:
    """The globals the code of `fn` reads, and what it may read from them: the same for
    all functions of one code and module within one key (nothing changes meanwhile)."""
    g = fn.__globals__
    cached = memo.get(("globals", id(code), id(g)))
    if cached is not None:
        return cached
    names = _names(code)
    out = []
    for name in names:
        if name not in g:  # an attribute name, or a builtin
            continue
        value = g[name]
        try:
            if type(value) is types.FunctionType and value.__globals__ is not g:
                out.append((name, ("id", _Id(value))))  # another module's function
            elif isinstance(value, (type, types.ModuleType)):
                out.append((name, ("id", _Id(value), _namespace(value, names, memo, depth, set()))))
            else:  # a value, or a function of this module: by what it computes
                out.append((name, _key(value, memo, depth)))
        except _OpaqueError as e:
            raise e.at(False, f"global {name}") from None
    memo[("globals", id(code), id(g))] = out = tuple(out)
    return out


def _namespace(obj: Any, names: tuple[str, ...], memo: dict, depth: int, done: set[int]) -> tuple:
    """The attributes named in `names` of a module or class (`config.LR`), read without
    running any code: values by value, code by identity, modules and classes in turn."""
    if id(obj) in done or depth > _MAX_DEPTH:
        return ()
    done.add(id(obj))
    if isinstance(obj, types.ModuleType):
        space = vars(obj)
    else:  # a class, and the classes it inherits from (builtin ones cannot change)
        space = {}
        for c in reversed(obj.__mro__):
            if c.__flags__ & _HEAPTYPE:
                space.update(vars(c))
    out = []
    for name in names:
        if name not in space:
            continue
        value = space[name]
        try:
            if isinstance(value, (type, types.ModuleType)):
                key = ("id", _Id(value), _namespace(value, names, memo, depth + 1, done))
            elif _by_identity(value) or hasattr(type(value), "__get__"):
                key = ("id", _Id(value))  # code: a function, method, property, ...
            else:
                key = _key(value, memo, depth)
        except _OpaqueError as e:
            raise e.at(False, f"{getattr(obj, '__name__', '?')}.{name}") from None
        out.append((name, key))
    return tuple(out)


class Structural:
    """A callable that compares and hashes structurally (see the module docstring).

    Calling it calls the wrapped function; other attributes are the function's. Its
    key is computed at its first call, comparison or hash, then kept. (The first call
    matters: a jitted call does not hash static values itself, as JAX hashes a
    treedef without its node data, so the first trace may come before any comparison.)
    """

    __slots__ = ("__weakref__", "_called", "_hash", "_key", "fn")

    def __init__(self, fn: Callable[..., Any]):
        self.fn = fn
        self._key: Any = None
        self._hash: int | None = None
        self._called = False

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        if not self._called:  # the settings this call (or trace) sees, before it runs
            if self._key is None:
                self.key()
            else:
                self._check_unchanged()
            self._called = True
        return self.fn(*args, **kwargs)

    def _check_unchanged(self) -> None:
        """Refuse a first call that would see other settings than the key, computed
        at an earlier comparison: its trace would be filed under the old settings."""
        old = self._key
        if isinstance(old, _OpaqueKey):
            return
        try:
            new = _key(self.fn, {})
        except _OpaqueError as e:
            new = _OpaqueKey(self.fn, e.what, e.trail)
        found = _diff(old, new, (), 0)
        if found is not None:
            raise ValueError(_MSG_CHANGED.format(change=_words(*found)))

    def key(self) -> Any:
        key = self._key
        if key is None:
            try:
                key = _key(self.fn, {})
                hash(key)
            except _OpaqueError as e:
                key = _OpaqueKey(self.fn, e.what, e.trail)
            except Exception as e:  # an unhashable dtype, a failing conversion, ...
                key = _OpaqueKey(self.fn, f"a value that cannot be keyed ({type(e).__name__})", [])
            self._key = key
        return key

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
    """`tx` (a `GradientTransformation`, of its own type) with structural callables,
    each keyed anew when first compared (a callable may have changed since)."""
    names = getattr(tx, "_fields", None)
    if not isinstance(tx, tuple) or names is None:
        return tx
    fields = {name: Structural(_unwrap(v)) for name, v in zip(names, tx) if callable(v)}
    return getattr(tx, "_replace")(**fields)  # a NamedTuple's  # noqa: B009


# --- descriptions, for reprs and retrace messages ------------------------------------------


def _unwrap(x: Any) -> Any:
    return x.fn if isinstance(x, Structural) else x


def _factory_name(qual: str) -> str:
    """`scale_by_adam` for `scale_by_adam.<locals>.update_fn`; a plain function's name."""
    return qual.split(".<locals>.")[0] if ".<locals>." in qual else qual


def _factory(fn: Any) -> str:
    return _factory_name(getattr(fn, "__qualname__", None) or type(fn).__name__)


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


def _short_repr(x: Any, limit: int = _SHORT) -> str:
    """`repr(x)` on one short line, without object addresses."""
    try:
        text = repr(x)
    except Exception:
        text = f"<{type(x).__name__}>"
    return short(_ADDRESS.sub("", text), limit)


def describe_tx(tx: Any, limit: int = 60) -> str:
    """A short name of an optax transformation: `chain(scale_by_adam, scale)`."""
    fn = getattr(tx, "update", None)
    if fn is None or not callable(fn):
        return short(type(tx).__name__, limit)
    return short(_name(fn), limit)


def _show(k: Any) -> str:
    """A key in words: `0.1`, `JAX float32[] weak-typed 0.1`, `function base`."""
    tag = k[0]
    if tag == "float":
        return repr(float.fromhex(k[1]))
    if tag == "complex":
        return repr(complex(float.fromhex(k[1]), float.fromhex(k[2])))
    if tag == "dtype":
        return f"dtype {k[1]}"
    if tag == "enum":
        return f"{k[1].obj.__name__}.{k[2]}"
    if tag == "id":
        obj = k[1].obj
        if isinstance(obj, types.ModuleType):
            return f"module {obj.__name__}"
        kind = "class" if isinstance(obj, type) else "function"
        name = getattr(obj, "__qualname__", None)
        return f"{kind} {name}" if isinstance(name, str) else _short_repr(obj)
    if tag == "array":
        _, family, shape, dtype, weak, _, shown = k
        text = f"{'JAX' if family == 'jax' else 'NumPy'} {dtype}{list(shape)}"
        return short(text + " weak-typed" * weak + f" {shown}" * bool(shown))
    if tag == "fn":
        code = k[1]
        lam = code.co_name == "<lambda>"
        return f"a lambda (line {code.co_firstlineno})" if lam else f"function {code.co_name}"
    if tag == "seq":
        return f"a {k[1].obj.__name__} of {len(k[2])}"
    if tag in ("dict", "set"):
        return f"a {tag} of {len(k[-1])}"
    if tag == "seen":
        return "an object reached earlier"
    if tag == "empty":
        return "an unassigned variable"
    if tag in ("partial", "method"):
        return f"a {tag} of {_show(k[2] if tag == 'partial' else k[1])}"
    return _short_repr(k[1])  # None, bool, int, str, bytes, ...


def _parts(a: tuple, b: tuple, trail: tuple) -> list[tuple[Any, Any, tuple]] | None:
    """The parts of two keys of the same kind, with where they are; `None` if their
    shapes differ (then they differ as a whole)."""
    tag = a[0]
    if tag == "fn":
        code = a[1]
        if code != b[1]:
            return None
        qual = code.co_qualname
        here = (*trail, (True, _factory_name(qual))) if ".<locals>." in qual else trail
        out = [
            (a[i], b[i], (*here, (False, n)))
            for i, n in ((2, "__defaults__"), (3, "__kwdefaults__"))
        ]
        out += [(x, y, (*here, (False, n))) for n, x, y in zip(code.co_freevars, a[4], b[4])]
        ga, gb = dict(a[5]), dict(b[5])
        if list(ga) != list(gb):
            return None
        out += [(ga[n], gb[n], (*here, (False, f"global {n}"))) for n in ga]
        return [*out, (a[6], b[6], (*here, (False, "attributes")))]
    if tag == "seq":
        if a[1] != b[1] or len(a[2]) != len(b[2]):
            return None
        fields = getattr(a[1].obj, "_fields", None)
        out = [
            (x, y, (*trail, (False, fields[i] if fields else f"[{i}]")))
            for i, (x, y) in enumerate(zip(a[2], b[2]))
        ]
        return [*out, (a[3], b[3], (*trail, (False, "attributes")))]
    if tag == "dict":
        if [k for k, _ in a[1]] != [k for k, _ in b[1]]:
            return None
        return [(x, y, (*trail, (False, f"[{_show(k)}]"))) for (k, x), (_, y) in zip(a[1], b[1])]
    if tag == "id" and len(a) == 3 and a[1] == b[1]:  # a module or class, what is read of it
        na, nb = dict(a[2]), dict(b[2])
        if list(na) != list(nb):
            return None
        return [(na[n], nb[n], (*trail, (False, n))) for n in na]
    if tag == "partial":
        names = ("func", "args", "keywords", "attributes")
        return [(x, y, (*trail, (False, n))) for n, x, y in zip(names, a[2:], b[2:])]
    if tag == "method":
        return [(a[1], b[1], trail)]
    return None


def _diff(a: Any, b: Any, trail: tuple, depth: int) -> tuple[tuple, Any, Any] | None:
    """The first place where two keys differ, as `(trail, a, b)` where `trail` holds
    `(is_function, name)` pairs; `None` if they do not differ."""
    if a == b:
        return None
    plain = type(a) is tuple and type(b) is tuple and a[0] == b[0] and depth < 4 * _MAX_DEPTH
    parts = _parts(a, b, trail) if plain else None
    for x, y, where in parts or ():
        if x != y:
            return _diff(x, y, where, depth + 1)
    return trail, a, b


def _where(trail: Any) -> str:
    """`in scale, step_size` for a trail ending in the closure of `scale`'s function."""
    last = max((i for i, (is_fn, _) in enumerate(trail) if is_fn), default=-1)
    fn = trail[last][1] if last >= 0 else ""
    rest = ""
    for _, n in trail[last + 1 :]:
        if n.startswith("global "):
            rest += f", {n}" if rest else n
        else:
            rest += n if n.startswith("[") or not rest else f".{n}"
    fn, rest = short(fn, 30), rest if len(rest) <= 40 else "…" + rest[-39:]  # the end says most
    return f"in {fn}, {rest}" if fn and rest else fn or rest or "its code"


def _words(trail: tuple, x: Any, y: Any) -> str:
    """How the key `x` became `y` at `trail`, in words."""
    opaque = y if isinstance(y, _OpaqueKey) else x if isinstance(x, _OpaqueKey) else None
    if opaque is not None:
        where = _where((*trail, *opaque.trail))
        return (
            f"{where} is {short(opaque.what)}, compared by identity: a rebuilt one is "
            "a new object, even with the same settings"
        )
    where = _where(trail)
    old, new = _show(x), _show(y)
    if old != new:
        return f"{where}: {short(old)} -> {short(new)}"
    tag = x[0] if isinstance(x, tuple) else None
    if tag == "fn":
        return f"{where}: the code of {short(old)} changed"
    if tag == "id":
        return f"{where}: {short(old)} is another object (redefined?)"
    return f"{where}: {short(old)}, with other contents"


def _stored(x: Any) -> Any:
    """The key `x` was compared by: kept from its first comparison."""
    if isinstance(x, Structural):
        return x.key()
    if _is_tx(x):
        return ("seq", _Id(type(x)), tuple(_stored(v) for v in x), None)
    try:
        return _key(x, {})
    except Exception as e:
        return _OpaqueKey(x, getattr(e, "what", "an object"), getattr(e, "trail", []))


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
        found = _diff(_stored(a), _stored(b), (), 0)
    except Exception:  # a failing comparison: say less
        found = None
    if found is None:
        return f"{what} ({names})"
    return f"{what} ({names}; {_words(*found)})"


def _is_tx(x: Any) -> bool:
    return isinstance(x, tuple) and any(isinstance(v, Structural) for v in x)


def _is_structural(x: Any) -> bool:
    return isinstance(x, Structural) or _is_tx(x)
