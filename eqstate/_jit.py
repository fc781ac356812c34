"""`eqstate.jit`: `eqx.filter_jit` semantics at the cost of `jax.jit` over flat leaves.

Per call, for each argument: its leaves and a small-integer token for its structure and
static part (from a memo of the objects the last call returned, or else one C++
`tree_flatten` and one pass over the leaves); then one dict lookup keyed by the tokens,
the compiled call on the traced leaves, and a generated function that rebuilds the
outputs. Everything else (which leaves are traced, the static part, the output
structure, donation) is worked out once per cache key, when JAX traces.
"""

import functools as ft
import operator
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Literal, overload

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer

from ._filters import first_mismatch
from ._rebuild import builder, snapshot, unchanged


_Donate = Literal["all", "all-except-first", "none"]


class _Dyn:
    """Marks where a traced leaf goes in a static template."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<traced>"


_DYN = _Dyn()


class _IsArray(dict):
    """`type -> bool`: whether leaves of that type are traced (as `eqx.is_array`)."""

    def __missing__(self, t: type) -> bool:
        value = issubclass(t, (np.ndarray, np.generic, Tracer, jax.Array))
        self[t] = value
        return value


_is_array = _IsArray()

_MSG_UNHASHABLE = (
    "eqstate.jit: {path} is a non-array leaf of type {type} that is not hashable. "
    "Non-array leaves are static: they are part of the compilation cache key, as under "
    "eqx.filter_jit. Make it an array, make it hashable, or declare its field with "
    "`eqx.field(static=True)`."
)
_MSG_MAX_TRACES = (
    "eqstate.jit({name}) traced {n} times, more than max_traces={limit}. {reason} "
    "Each trace compiles again; keep shapes, dtypes and non-array values fixed between "
    "calls (a Python int or bool leaf that changes every step is a common cause)."
)


def _weak(x: Any) -> bool:
    return bool(getattr(x, "weak_type", False))


def _fmt(x: Any) -> str:
    if isinstance(x, jax.ShapeDtypeStruct):
        weak = ", weak" if x.weak_type else ""
        return f"{x.dtype}{list(x.shape)}{weak}"
    return repr(x)


def _leaf(x: Any) -> str:
    return f"an array {_fmt(x)}" if isinstance(x, jax.ShapeDtypeStruct) else repr(x)


def _explain(old: Any, new: Any) -> str:
    """Name the first argument path where two skeletons differ."""
    where = first_mismatch(old, new, where=_argpath, leaf=_leaf)
    if where is not None:
        return f"The structure of the arguments changed {where}."
    a, _ = jtu.tree_flatten_with_path(old)
    b = jtu.tree_leaves(new)
    for (path, x), y in zip(a, b):
        if not (x is y or (type(x) is type(y) and x == y)):
            what = "shape/dtype" if isinstance(y, jax.ShapeDtypeStruct) else "static value"
            name = _argpath(path)
            return f"The {what} of {name} changed from {_fmt(x)} to {_fmt(y)}."
    return "Nothing in the arguments changed (JAX retraced for another reason)."


def _argpath(path: tuple) -> str:
    """`((args, kwargs), ...)` key path -> `args[0].bn.mean` / `kwargs['x']`."""
    if not path:
        return "the arguments"
    head, *rest = path
    name = "args" if getattr(head, "idx", None) == 0 else "kwargs"
    rest_path = rest[1:] if name == "kwargs" else rest
    prefix = f"kwargs[{rest[0].key!r}]" if name == "kwargs" and rest else name
    return prefix + jtu.keystr(tuple(rest_path))


class _Parts:
    """Interns `(treedef, static template)` pairs of one argument as small integers.

    The cache key of a call is the tuple of its arguments' tokens: cheap to hash and
    compare however large the model.
    """

    def __init__(self) -> None:
        self._ids: dict[tuple[Any, tuple], int] = {}
        self.info: list[tuple[Any, tuple]] = []

    def token(self, treedef: Any, static: tuple) -> int:
        key = (treedef, static)
        tok = self._ids.get(key)  # TypeError for an unhashable static leaf
        if tok is None:
            tok = self._ids[key] = len(self.info)
            self.info.append(key)
        return tok


_PARTS = _Parts()
_ARRAY_TOKEN = _PARTS.token(jtu.tree_structure(0), (_DYN,))
_KWARGS = -1  # separates positional tokens from the keyword-arguments token


class _Memo:
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


def _forget(d: dict, key: int, ref: weakref.ref) -> None:
    hit = d.get(key)
    if hit is not None and hit[0] is ref:
        del d[key]


def _part(x: Any, memo: _Memo) -> tuple[Any, int]:
    """The leaves of one argument and the token of its structure and static part."""
    if _is_array[type(x)]:
        return (x,), _ARRAY_TOKEN
    hit = memo.get(x)
    if hit is not None:
        return hit
    leaves, treedef = jtu.tree_flatten(x)
    is_array = _is_array
    static = tuple([_DYN if is_array[type(leaf)] else leaf for leaf in leaves])
    return leaves, _PARTS.token(treedef, static)


class _Entry:
    """One cache key: its jitted function and how to rebuild its outputs."""

    __slots__ = ("build", "call", "give", "keep", "merge", "out_def", "out_parts", "out_token")

    def __init__(self, keep_pos: list[int], give_pos: list[int], n: int):
        self.keep = _getter(keep_pos, n)  # traced leaves kept by the caller
        self.give = _getter(give_pos, n)  # traced leaves donated
        self.call: Callable[..., Any] = _unset
        self.merge: Callable[[Any], Any] | None = None
        self.out_def: Any = None
        self.build: Callable[[Any], Any] = _unset
        self.out_parts: list[tuple[int, int, int]] | None = None
        self.out_token = _ARRAY_TOKEN


def _unset(*args: Any) -> Any:
    raise AssertionError("jitted function used before it was built")


def _getter(positions: list[int], n: int | None = None) -> Callable[[Any], tuple]:
    """`f(seq) -> tuple(seq[i] for i in positions)`, at C speed (`seq` has `n` items)."""
    if not positions:
        return lambda seq: ()
    if positions == list(range(n or 0)):
        return tuple
    if len(positions) == 1:
        (i,) = positions
        return lambda seq: (seq[i],)
    return operator.itemgetter(*positions)


class Jit:
    """A function compiled with `eqstate.jit`. Call it like the function it wraps.

    **Attributes:**

    - `traces`: how many times JAX has traced (and so compiled) the function.
    - `retrace_reasons`: for each trace after the first, what changed in the arguments.
    """

    def __init__(
        self,
        fn: Callable[..., Any],
        donate: _Donate,
        max_traces: int | None,
    ):
        if donate not in ("all", "all-except-first", "none"):
            raise ValueError(
                f"eqstate.jit(donate=...) must be 'all', 'all-except-first' or 'none', "
                f"got {donate!r}."
            )
        if max_traces is not None and max_traces < 1:
            raise ValueError(f"eqstate.jit(max_traces=...) must be >= 1, got {max_traces}.")
        self.fn = fn
        self.donate = donate
        self.max_traces = max_traces
        self.traces = 0
        self.retrace_reasons: list[str] = []
        self._last: Any = None
        self._cache: dict[tuple[int, ...], _Entry] = {}
        self._memo = _Memo()
        self._fn_is_tree = isinstance(fn, eqx.Module)
        ft.update_wrapper(self, fn)  # pyright: ignore[reportArgumentType]

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        if instance is None:
            return self
        return ft.partial(self, instance)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        memo = self._memo
        if self._fn_is_tree:
            args = (self.fn, *args)
        leaves: list = []
        toks = []
        try:
            for a in args:
                a_leaves, tok = _part(a, memo)
                leaves += a_leaves
                toks.append(tok)
            if kwargs:
                k_leaves, tok = _part(kwargs, memo)
                leaves += k_leaves
                toks += (_KWARGS, tok)
        except TypeError:
            self._raise_unhashable((args, kwargs))
            raise
        key = tuple(toks)
        try:
            entry = self._cache[key]
        except KeyError:
            entry = self._build(key)
        if self.donate == "none":
            out = entry.call(entry.keep(leaves), entry.give(leaves))
        else:  # as Equinox: inputs with no output to reuse them are donated in vain
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
                out = entry.call(entry.keep(leaves), entry.give(leaves))
        merge = entry.merge
        full = out if merge is None else merge(out)
        result, groups = entry.build(full)
        if groups is None:  # rebuilt by JAX: contents unknown, nothing to memoise
            return result
        parts = entry.out_parts
        if parts is None:
            if entry.out_token != _ARRAY_TOKEN and groups[0] is not None:
                memo.put(result, full, entry.out_token, snapshot(groups[0]))
        else:
            for obj, (lo, hi, tok), group in zip(result, parts, groups):
                if tok != _ARRAY_TOKEN and group is not None:
                    memo.put(obj, full[lo:hi], tok, snapshot(group))
        return result

    def _build(self, key: tuple[int, ...]) -> _Entry:
        defs, k_def, static = _unpack(key)
        dyn_pos = [i for i, s in enumerate(static) if s is _DYN]
        first = self._donated_from(defs, len(static))
        keep_pos = [i for i in dyn_pos if i < first]
        give_pos = [i for i in dyn_pos if i >= first]
        entry = _Entry(keep_pos, give_pos, len(static))
        fn, fn_is_tree, owner = self.fn, self._fn_is_tree, self
        sizes = [d.num_leaves for d in defs]
        dyn_pos = keep_pos + give_pos

        def traced(keep: tuple, give: tuple) -> list[Any]:
            full = list(static)
            for i, x in zip(dyn_pos, (*keep, *give)):
                full[i] = x
            args, kwargs = _rebuild(full, defs, sizes, k_def)
            owner._count_trace(args[1:] if fn_is_tree else args, kwargs)
            out = fn(*args, **kwargs) if not fn_is_tree else args[0](*args[1:], **kwargs)
            out_leaves, out_def = jtu.tree_flatten(out)
            flags = [_is_array[type(x)] for x in out_leaves]
            out_static = tuple(_DYN if f else x for x, f in zip(out_leaves, flags))
            entry.out_def = out_def
            entry.build = builder(out, out_def)
            entry.out_parts = _out_parts(out, out_def, out_static)
            entry.merge = _merger(out_static)
            entry.out_token = _token_or_array(out_def, out_static)
            return [x for x, f in zip(out_leaves, flags) if f]

        entry.call = jax.jit(traced, donate_argnums=(1,) if give_pos else ())
        self._cache[key] = entry
        return entry

    def _donated_from(self, defs: list, n_leaves: int) -> int:
        """The index of the first donated leaf (`n_leaves` if none is donated)."""
        if self.donate == "none":
            return n_leaves
        if self.donate == "all":
            return 0
        return sum(d.num_leaves for d in defs[: 2 if self._fn_is_tree else 1])

    def _count_trace(self, args: tuple, kwargs: dict) -> None:
        """Count a trace of the call `(args, kwargs)` (as the caller passed them), say
        what changed since the last one, and enforce `max_traces`."""
        skeleton = jtu.tree_map(
            lambda x: (
                jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=_weak(x))
                if _is_array[type(x)]
                else x
            ),
            (args, kwargs),
        )
        self.traces += 1
        if self._last is not None:
            self.retrace_reasons.append(_explain(self._last, skeleton))
        self._last = skeleton
        if self.max_traces is not None and self.traces > self.max_traces:
            reason = self.retrace_reasons[-1] if self.retrace_reasons else ""
            self.traces -= 1
            raise RuntimeError(
                _MSG_MAX_TRACES.format(
                    name=getattr(self.fn, "__qualname__", repr(self.fn)),
                    n=self.traces + 1,
                    limit=self.max_traces,
                    reason=reason,
                )
            )

    def _raise_unhashable(self, tree: Any) -> None:
        for path, x in jtu.tree_flatten_with_path(tree)[0]:
            if _is_array[type(x)]:
                continue
            try:
                hash(x)
            except TypeError:
                raise TypeError(
                    _MSG_UNHASHABLE.format(path=_argpath(path), type=type(x).__name__)
                ) from None


def _unpack(key: tuple[int, ...]) -> tuple[list, Any, tuple]:
    """The treedefs of the positional arguments, of the kwargs, and the whole static part."""
    defs, static, k_def = [], (), None
    toks = list(key)
    if _KWARGS in toks:
        k_def, k_static = _PARTS.info[toks[-1]]
        toks = toks[:-2]
    else:
        k_static = ()
    for tok in toks:
        d, s = _PARTS.info[tok]
        defs.append(d)
        static += s
    return defs, k_def, static + k_static


def _merger(out_static: tuple) -> Callable[[Any], Any] | None:
    """`f(dyn_outputs) -> all output leaves`, at C speed; `None` if all are traced."""
    dyn = [i for i, s in enumerate(out_static) if s is _DYN]
    if len(dyn) == len(out_static):
        return None
    statics = [s for s in out_static if s is not _DYN]
    n = len(dyn)
    src_index = [0] * len(out_static)
    for j, i in enumerate(dyn):
        src_index[i] = j
    for j, i in enumerate(i for i, s in enumerate(out_static) if s is not _DYN):
        src_index[i] = n + j
    get = _getter(src_index)
    return lambda out: get([*out, *statics])


def _rebuild(full: list, defs: list, sizes: list[int], k_def: Any) -> tuple[tuple, dict]:
    args = []
    start = 0
    for d, n in zip(defs, sizes):
        args.append(d.unflatten(full[start : start + n]))
        start += n
    kwargs = {} if k_def is None else k_def.unflatten(full[start:])
    return tuple(args), kwargs


def _token_or_array(treedef: Any, static: tuple) -> int:
    """The token of an output part; `_ARRAY_TOKEN` (never memoised) if it is unhashable."""
    try:
        return _PARTS.token(treedef, static)
    except TypeError:
        return _ARRAY_TOKEN


def _out_parts(out: Any, out_def: Any, out_static: tuple) -> list[tuple[int, int, int]] | None:
    """For a tuple output: each element's slice of the output leaves and its token."""
    if type(out) is not tuple:
        return None
    parts, start = [], 0
    for child in out_def.children():
        end = start + child.num_leaves
        parts.append((start, end, _token_or_array(child, out_static[start:end])))
        start = end
    return parts


@overload
def jit(
    fn: Callable[..., Any], *, donate: _Donate = "none", max_traces: int | None = None
) -> Jit: ...


@overload
def jit(
    fn: None = None, *, donate: _Donate = "none", max_traces: int | None = None
) -> Callable[[Callable[..., Any]], Jit]: ...


def jit(
    fn: Callable[..., Any] | None = None,
    *,
    donate: _Donate = "none",
    max_traces: int | None = None,
) -> Jit | Callable[[Callable[..., Any]], Jit]:
    """Compile `fn` with `eqx.filter_jit`'s semantics and `jax.jit`'s per-call cost.

    Array leaves of the arguments (JAX and NumPy arrays) are traced; every other leaf is
    static and part of the cache key, as under `eqx.filter_jit`. The call returns
    without waiting for the computation (JAX's asynchronous dispatch): a training loop
    overlaps host and device work, and `jax.block_until_ready` waits when needed.

    **Arguments:**

    - `fn`: the function (or method, or callable module) to compile.
    - `donate`: `"none"` (default), `"all"`, or `"all-except-first"` (everything but the
        first argument, e.g. the optimizer and metrics but not the model), as in
        Equinox. Donated buffers are reused for the outputs on backends that support it;
        do not use a donated argument after the call.
    - `max_traces`: raise `RuntimeError` when `fn` would be traced more than this many
        times, naming the argument whose structure, shape, dtype or static value
        changed.

    **Returns:**

    A `Jit` callable; `traces` counts compilations and `retrace_reasons` says why each
    retrace happened.

    !!! example

        ```python
        @eqstate.jit(donate="all-except-first", max_traces=1)
        def train_step(model, opt, x, y):
            (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
            model, opt = opt.update(grads, model)
            return model, opt, loss
        ```
    """
    if fn is None:
        return ft.partial(jit, donate=donate, max_traces=max_traces)  # pyright: ignore[reportReturnType]
    if not callable(fn):
        raise TypeError(f"eqstate.jit expects a callable, got {type(fn).__name__}.")
    return Jit(fn, donate, max_traces)
