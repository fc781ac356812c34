"""`eqstate.jit`: `eqx.filter_jit` semantics at the cost of `jax.jit` over flat leaves.

Per call, for each argument: its leaves and a small-integer token for its structure and
static part (from a memo of the objects the last call returned, or else one C++
`tree_flatten` and one pass over the leaves); then one dict lookup keyed by the tokens,
the compiled call on the traced leaves, and a generated function that rebuilds the
outputs. Which leaves are traced, the static part and donation are worked out once per
cache key; how to rebuild the outputs once per trace. JAX traces one cache key again for
new shapes or dtypes, and each trace's outputs may differ in structure and static values,
so the compiled call returns its trace's `Plan` (a pytree node without leaves) next to
the traced outputs: a call is rebuilt by the trace that served it, from any thread, at
no cost beyond one C++ unflatten.
"""

import functools as ft
import inspect
import itertools
import sys
import threading
import warnings
import weakref
from collections.abc import Callable
from typing import Any, Concatenate, Generic, Literal, ParamSpec, TypeVar, overload

import jax
import jax.tree_util as jtu

from ._rebuild import Plan, getter, snapshot
from ._retrace import argpath, explain, skeleton
from ._tokens import ARRAY_TOKEN, DYN, KWARGS, Memo, Parts, is_array, key_static, part


_Donate = Literal["all", "all-except-first", "none"]
_P = ParamSpec("_P")
_Q = ParamSpec("_Q")
_R = TypeVar("_R")
_S = TypeVar("_S")

_MAX_ENTRIES = 128  # compiled cache keys kept per `Jit`; the least recently used go first
_WARN_TRACES = 8  # without `max_traces`, warn once when a `Jit` traces more often
_MAX_REASONS = 100  # retrace reasons kept per `Jit`


class RetraceWarning(UserWarning):
    """An `eqstate.jit` function keeps compiling again: its calls keep changing a shape,
    a dtype or a static (non-array) value.

    Warned once per function, on its ninth trace, with the reason of the last retrace.
    `max_traces=` turns it into an error at the count you choose.

    !!! example

        ```python
        import warnings

        warnings.simplefilter("error", eqstate.RetraceWarning)  # fail at the ninth trace
        ```
    """


_MSG_UNHASHABLE = (
    "eqstate.jit: {path} is a non-array leaf of type {type} that is not hashable. "
    "Non-array leaves are static: they are part of the compilation cache key, as under "
    "eqx.filter_jit. Make it an array (`jnp.asarray`) or a hashable value (a tuple "
    "instead of a list, a frozen dataclass, ...)."
)
_MSG_MAX_TRACES = (
    "eqstate.jit({name}) traced {n} times, more than max_traces={limit}. {reason} "
    "Each trace compiles again; keep shapes, dtypes and non-array values fixed between "
    "calls (a Python int or bool leaf that changes every step is a common cause)."
)
_MSG_RETRACES = (
    "eqstate.jit({name}) has traced {n} times: each trace compiles again. The latest "
    "retrace: {reason} Pass Python numbers that change between calls as arrays "
    "(`jnp.asarray(x)`), keep shapes fixed (pad or drop a short last batch), or pass "
    "`max_traces=` the number of traces you expect (this warning then becomes an error "
    "past that number)."
)


class _Entry:
    """One cache key: its jitted function, and which tokens it uses."""

    __slots__ = ("__weakref__", "call", "give", "keep", "live", "ok", "stamp")

    def __init__(self, keep_pos: list[int], give_pos: list[int], n: int, key: tuple):
        self.keep = getter(keep_pos, n)  # traced leaves kept by the caller
        self.give = getter(give_pos, n)  # traced leaves donated
        self.call: Callable[..., Any] = _unset
        self.live = {t for t in key if t != KWARGS}  # tokens of its key and outputs
        self.ok = False  # whether a trace has succeeded
        self.stamp = 0  # when last called, for least-recently-used eviction


def _unset(*args: Any) -> Any:
    raise AssertionError("jitted function used before it was built")


class Jit(Generic[_P, _R]):
    """A function compiled with `eqstate.jit`. Call it like the function it wraps: to a
    type checker, `Jit[P, R]` takes the parameters `P` and returns the `R` of that
    function.

    **Attributes:**

    - `traces`: how many times JAX has traced (and so compiled) the function.
    - `retrace_reasons`: for each trace after the first (the latest 100), what changed
        in the arguments.
    """

    def __init__(
        self,
        fn: Callable[_P, _R],
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
        # the function's own fields: never `__dict__`, which would shadow ours
        ft.update_wrapper(self, fn, updated=())  # pyright: ignore[reportArgumentType]
        for attr in ("__name__", "__qualname__"):  # a callable module's: its class's
            if attr not in vars(self):
                setattr(self, attr, getattr(type(fn), attr))
        self.fn = fn
        self.donate = donate
        self.max_traces = max_traces
        self.traces = 0
        self.retrace_reasons: list[str] = []
        self._last: Any = None
        self._warned = False
        self._cache: dict[tuple[int, ...], _Entry] = {}
        self._max_entries = _MAX_ENTRIES
        self._memo = Memo()
        self._parts = Parts()
        self._plans: dict[tuple, tuple[str, ...]] = {}
        self._lock = threading.RLock()
        self._clock = itertools.count(1)
        # A pytree function (a callable module) is split once, as eqx.filter_jit does:
        # its arrays are traced (never donated), the rest is static.
        fn_leaves, self._fn_def = jtu.tree_flatten(fn)
        self._fn_is_tree = not jtu.treedef_is_leaf(self._fn_def)
        self._fn_leaves = tuple(fn_leaves) if self._fn_is_tree else ()

    @overload
    def __get__(self, instance: None, owner: type | None = None) -> "Jit[_P, _R]": ...

    @overload
    def __get__(
        self: "Jit[Concatenate[_S, _Q], _R]", instance: _S, owner: type | None = None
    ) -> Callable[_Q, _R]: ...

    def __get__(self, instance: Any, owner: Any = None) -> Any:
        # A method binds its instance (passed first, so `donate="all-except-first"`
        # keeps it); a callable module or partial stored on a class binds nothing,
        # as it would without the jit.
        if instance is None or not hasattr(type(self.fn), "__get__"):
            return self
        return ft.partial(self, instance)

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if kwargs:  # the same call, split anew: no longer `_P`'s split (hence the ignore)
            args, kwargs = self._bind(args, kwargs)  # pyright: ignore[reportAssignmentType]
        memo, parts = self._memo, self._parts
        leaves = [*self._fn_leaves]
        toks = []
        try:
            for a in args:
                a_leaves, tok = part(a, memo, parts)
                leaves += a_leaves
                toks.append(tok)
            if kwargs:
                k_leaves, tok = part(kwargs, memo, parts)
                leaves += k_leaves
                toks += (KWARGS, tok)
        except TypeError:
            self._raise_unhashable((args, kwargs))
            raise
        entry = self._cache.get(tuple(toks))
        if entry is None:
            entry, leaves = self._miss(args, kwargs)
        entry.stamp = next(self._clock)
        if self.donate == "none":
            dyn, out = entry.call(entry.keep(leaves), entry.give(leaves))
        else:  # as Equinox: inputs with no output to reuse them are donated in vain
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Some donated buffers were not usable")
                dyn, out = entry.call(entry.keep(leaves), entry.give(leaves))
        merge = out.merge
        full = dyn if merge is None else merge(dyn)
        result, groups = out.build(full)
        if groups is None:  # rebuilt by JAX: contents unknown, nothing to memoise
            return result
        parts = out.parts
        if parts is None:
            if out.token != ARRAY_TOKEN and groups[0] is not None:
                memo.put(result, full, out.token, snapshot(groups[0]))
        else:
            for obj, (lo, hi, tok), group in zip(result, parts, groups):
                if tok != ARRAY_TOKEN and group is not None:
                    memo.put(obj, full[lo:hi], tok, snapshot(group))
        return result

    # --- arguments ---------------------------------------------------------------------

    def _bind(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        """Pass positional-or-keyword parameters given by keyword positionally, as
        `eqx.filter_jit` does (so `donate="all-except-first"` keeps the first parameter
        however it is passed). Worked out once per `(len(args), keyword names)`."""
        plan = self._plans.get((len(args), *kwargs))
        if plan is None:
            plan = self._plan(args, kwargs)
        if not plan:
            return args, kwargs
        kwargs = dict(kwargs)
        return (*args, *[kwargs.pop(name) for name in plan]), kwargs

    def _plan(self, args: tuple, kwargs: dict) -> tuple[str, ...]:
        try:
            signature = inspect.signature(self.fn)
        except (TypeError, ValueError):  # some builtins have none: keep the call as is
            plan: tuple[str, ...] = ()
        else:
            bound = signature.bind(*args, **kwargs)  # TypeError, as under eqx.filter_jit
            names, position = [], 0
            for p in signature.parameters.values():
                if p.kind in (p.KEYWORD_ONLY, p.VAR_KEYWORD) or p.name not in bound.arguments:
                    break
                if p.kind is p.VAR_POSITIONAL:
                    position += len(bound.arguments[p.name])
                    continue
                position += 1
                if position > len(args):
                    names.append(p.name)
            plan = tuple(names)
        self._plans[(len(args), *kwargs)] = plan
        return plan

    def _miss(self, args: tuple, kwargs: dict) -> tuple[_Entry, list]:
        """The entry for a call that missed the cache, and its leaves: flattened again
        without the memo (whose tokens may have been dropped), built if new."""
        with self._lock:
            parts = self._parts
            flat = [jtu.tree_flatten(a) for a in args]
            toks = [parts.token(d, key_static(leaves)) for leaves, d in flat]
            defs = [self._fn_def] if self._fn_is_tree else []
            defs += [d for _, d in flat]
            leaves = [*self._fn_leaves]
            for a_leaves, _ in flat:
                leaves += a_leaves
            k_def = None
            if kwargs:
                k_leaves, k_def = jtu.tree_flatten(kwargs)
                leaves += k_leaves
                toks += (KWARGS, parts.token(k_def, key_static(k_leaves)))
            key = tuple(toks)
            entry = self._cache.get(key)
            if entry is None:
                entry = self._build(key, defs, k_def, leaves, len(args))
            return entry, leaves

    def _build(self, key: tuple, defs: list, k_def: Any, leaves: list, n_args: int) -> _Entry:
        template = [DYN if is_array(x) else x for x in leaves]
        n_fn = len(self._fn_leaves)
        if self.donate == "none":
            first = len(template)
        elif self.donate == "all" or not n_args:
            first = n_fn  # the function's own arrays are never donated
        else:
            first = n_fn + defs[1 if self._fn_is_tree else 0].num_leaves
        dyn_pos = [i for i, s in enumerate(template) if s is DYN]
        keep_pos = [i for i in dyn_pos if i < first]
        give_pos = [i for i in dyn_pos if i >= first]
        entry = _Entry(keep_pos, give_pos, len(template), key)
        entry.stamp = next(self._clock)  # not the first to go before its first call
        traced = _tracer(self, entry, key, template, keep_pos + give_pos, defs, k_def)
        entry.call = jax.jit(traced, donate_argnums=(1,) if give_pos else ())
        if len(self._cache) >= self._max_entries:
            self._evict(len(self._cache) - self._max_entries + 1, entry)
        self._cache[key] = entry
        return entry

    # --- bookkeeping (under the lock) ----------------------------------------------------

    def _evict(self, n: int, new: _Entry) -> None:
        """Drop the `n` least recently used entries and the tokens only they used (not
        those of `new`, about to be added)."""
        by_age = sorted(self._cache.items(), key=lambda item: item[1].stamp)
        for key, _ in by_age[:n]:
            del self._cache[key]
        live = set(new.live)
        for entry in self._cache.values():
            live |= entry.live
        self._parts.keep_only(live)
        self._memo.clear()  # its tokens may have been dropped

    def _drop(self, key: tuple, entry: _Entry) -> None:
        """Forget an entry whose every trace failed (or was refused)."""
        with self._lock:
            if not entry.ok and self._cache.get(key) is entry:
                del self._cache[key]

    def _intern_outputs(self, entry: _Entry, treedef: Any, leaves: list) -> int:
        """The token of an output part; `ARRAY_TOKEN` (never memoised) if unhashable."""
        with self._lock:
            try:
                tok = self._parts.token(treedef, key_static(leaves))
            except TypeError:
                return ARRAY_TOKEN
            entry.live.add(tok)
            return tok

    def _before_trace(self, args: tuple, kwargs: dict) -> tuple[Any, Any, str | None]:
        """Enforce `max_traces` (and warn past `_WARN_TRACES`) before tracing the call
        `(args, kwargs)` (as the caller passed them); nothing is counted yet."""
        now = skeleton((args, kwargs), is_array)
        with self._lock:
            last = self._last
            reason = None if last is None else explain(last, now)
            self._check_limit(reason)
            warn = self.max_traces is None and self.traces >= _WARN_TRACES and not self._warned
            self._warned |= warn
        if warn:
            warnings.warn(
                _MSG_RETRACES.format(name=self._name(), n=self.traces + 1, reason=reason),
                RetraceWarning,
                stacklevel=_user_stacklevel(),
            )
        return now, last, reason

    def _after_trace(self, entry: _Entry, pending: tuple[Any, Any, str | None]) -> None:
        """Count a trace that succeeded and say what changed since the last one."""
        now, last, reason = pending
        with self._lock:
            if self._last is not last:  # another thread traced meanwhile
                reason = explain(self._last, now)
            self._check_limit(reason)
            self.traces += 1
            if reason is not None:
                self.retrace_reasons.append(reason)
                del self.retrace_reasons[:-_MAX_REASONS]
            self._last = now
            entry.ok = True

    def _check_limit(self, reason: str | None) -> None:
        if self.max_traces is not None and self.traces >= self.max_traces:
            raise RuntimeError(
                _MSG_MAX_TRACES.format(
                    name=self._name(), n=self.traces + 1, limit=self.max_traces, reason=reason or ""
                )
            )

    def _name(self) -> str:
        return getattr(self.fn, "__qualname__", type(self.fn).__qualname__)

    def _raise_unhashable(self, tree: Any) -> None:
        for path, x in jtu.tree_flatten_with_path(tree)[0]:
            if is_array(x):
                continue
            try:
                hash(x)
            except TypeError:
                raise TypeError(
                    _MSG_UNHASHABLE.format(path=argpath(path), type=type(x).__name__)
                ) from None


def _tracer(
    owner: Jit, entry: _Entry, key: tuple, template: list, pos: list[int], defs: list, k_def: Any
) -> Callable[[tuple, tuple], tuple[list, Plan]]:
    """The function `jax.jit` traces for one cache key (`pos`: where its traced leaves go
    in `template`). It returns its trace's `Plan` with the traced outputs. It holds its
    `Jit` and entry weakly, so that deleting the `Jit` frees every compiled function
    at once, without waiting for the garbage collector."""
    owner_ref, entry_ref = weakref.ref(owner), weakref.ref(entry)
    fn = None if owner._fn_is_tree else owner.fn  # a pytree function comes from its leaves
    sizes = [d.num_leaves for d in defs]

    def traced(keep: tuple, give: tuple) -> tuple[list, Plan]:
        owner, entry = owner_ref(), entry_ref()
        # under `jax.disable_jit()` every call runs `traced`: that is not a trace (the
        # ignore: JAX sets its config flags dynamically, unknown to the type checker)
        eager = jax.config.jax_disable_jit  # pyright: ignore[reportAttributeAccessIssue]
        if entry is None or eager:
            owner = None  # evicted meanwhile, or run eagerly: record nothing
        full = list(template)
        for i, x in zip(pos, (*keep, *give)):
            full[i] = x
        args, kwargs = _unflatten(full, defs, sizes, k_def)
        call, call_args = (args[0], args[1:]) if fn is None else (fn, args)
        try:
            pending = None if owner is None else owner._before_trace(call_args, kwargs)
            out = call(*call_args, **kwargs)
            out_leaves = jtu.tree_leaves(out)
            flags = [is_array(x) for x in out_leaves]
            if owner is not None and entry is not None and pending is not None:
                plan = Plan(out, flags, ft.partial(owner._intern_outputs, entry))
                owner._after_trace(entry, pending)
            else:
                plan = Plan(out, flags, lambda treedef, leaves: ARRAY_TOKEN)
        except BaseException:
            if owner is not None and entry is not None:
                owner._drop(key, entry)
            raise
        return [x for x, f in zip(out_leaves, flags) if f], plan

    return traced


def _user_stacklevel() -> int:
    """The `stacklevel` at which `warnings.warn`, called by our caller, names the first
    frame outside eqstate.jit and JAX: the user's call."""
    skip = (__file__, *jax.__path__)
    frame, level = sys._getframe(2), 2
    while frame.f_back is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    return level


def _unflatten(full: list, defs: list, sizes: list[int], k_def: Any) -> tuple[tuple, dict]:
    args = []
    start = 0
    for d, n in zip(defs, sizes):
        args.append(d.unflatten(full[start : start + n]))
        start += n
    kwargs = {} if k_def is None else k_def.unflatten(full[start:])
    return tuple(args), kwargs


@overload
def jit(
    fn: Callable[_P, _R], *, donate: _Donate = "none", max_traces: int | None = None
) -> Jit[_P, _R]: ...


@overload
def jit(
    fn: None = None, *, donate: _Donate = "none", max_traces: int | None = None
) -> Callable[[Callable[_P, _R]], Jit[_P, _R]]: ...


def jit(
    fn: Callable[_P, _R] | None = None,
    *,
    donate: _Donate = "none",
    max_traces: int | None = None,
) -> Jit[_P, _R] | Callable[[Callable[_P, _R]], Jit[_P, _R]]:
    """Compile `fn` with `eqx.filter_jit`'s semantics and `jax.jit`'s per-call cost.

    Array leaves of the arguments (JAX and NumPy arrays) are traced; every other leaf is
    static and part of the cache key, as under `eqx.filter_jit` (with its type: `1`,
    `1.0` and `True` compile separately). Outputs are rebuilt by the trace that served
    the call, so their structure and static values may depend on shapes; their lists,
    dicts and other containers are new objects on every call. Parameters given by
    keyword are bound to the signature as `eqx.filter_jit` binds them. The call returns
    without waiting for the computation (JAX's asynchronous dispatch): a training loop
    overlaps host and device work, and `jax.block_until_ready` waits when needed.

    Objects a call returned are remembered with their leaves while they live, so passing
    them back skips flattening them; their lists and dicts are checked for in-place
    changes. Modules are frozen: changing one's fields behind Equinox's back
    (`object.__setattr__`) is not seen; build a new one (`eqx.tree_at`) instead.

    **Arguments:**

    - `fn`: the function (or method, or callable module) to compile. A callable module
        is split once, here: its arrays are traced (and never donated), the rest is
        static.
    - `donate`: `"none"` (default), `"all"`, or `"all-except-first"` (everything but the
        first argument, e.g. the optimizer and metrics but not the model), as in
        Equinox. Donated buffers are reused for the outputs on backends that support it;
        do not use a donated argument after the call.
    - `max_traces`: raise `RuntimeError` when `fn` would be traced more than this many
        times, naming the argument whose structure, shape, dtype or static value
        changed. Without it, a `RetraceWarning` says so once, on the ninth trace.

    **Returns:**

    A `Jit` callable; `traces` counts compilations and `retrace_reasons` says why each
    retrace happened. It keeps the 128 most recently used static configurations
    compiled; deleting it frees them all.

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
