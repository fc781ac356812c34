"""`@eqstate.mutating`: methods that assign to a private copy and return it.

The copy (a draft) and what is copied are in `_draft.py`; the checks every assignment
goes through in `_checks.py`. Here: the decorator, the undo of a nested call that
raises, the checks made when a method returns, and the tracking of children's updates.
"""

import functools as ft
import inspect
import warnings
from collections.abc import Callable
from typing import Any, Concatenate, ParamSpec, TypeVar

import jax
import jax.tree_util as jtu
import numpy as np
from jax.core import Tracer

from . import _draft
from ._checks import check_static, fit_tree
from ._convert import is_key
from ._draft import Frame, drafts, restore, snapshot, thaw
from ._kinds import FIXED_SHAPE_KEY, State
from ._module import Module, _fields
from ._resolve import plan


_P = ParamSpec("_P")
_R = TypeVar("_R")
_M = TypeVar("_M", bound=Module)

_MSG_DROPPED = (
    "{cls}.{method} {dropped} an update: `{call}(...)` returned a new {child} whose "
    "state changed ({changed}), but the returned model still holds the old {child} and "
    "the new one is not in the result either, so the change would be lost. Assign it "
    "back, e.g. "
    "`y, {callee} = {call}(x)`. To discard it on purpose, call the layer in inference "
    "mode or pass the new module to `eqstate.discard(...)`."
)


_MAYBE = (
    " (Its `inference` flag is traced, as under plain `jax.jit`, so whether its state "
    "changes is known only when the step runs: if it is in inference mode, nothing is "
    "lost. `eqx.filter_jit` and `eqstate.jit` keep the flag static and tell for sure.)"
)


class DroppedUpdateWarning(UserWarning):
    """A child's new state may have been dropped inside a `@eqstate.mutating` method:
    the child's `inference` flag is traced (plain `jax.jit`), so whether its state
    changed is known only when the step runs. Where it certainly changed, the call
    raises instead.

    `eqx.filter_jit` and `eqstate.jit` keep `inference` flags static, so under them a
    dropped update is always an error and this warning never shows.

    !!! example

        ```python
        import warnings

        warnings.simplefilter("error", eqstate.DroppedUpdateWarning)  # fail loudly instead
        ```
    """


def discard(*models: Any) -> None:
    """Say that the new modules returned by children's mutating calls are dropped on
    purpose.

    Inside a `@eqstate.mutating` method, a child's new module whose state changed must
    reach the returned model (or the result), or the call raises: the update would be
    lost. `eqstate.discard(new_child)` lets it go. Outside a mutating method it does
    nothing.

    **Arguments:**

    - `*models`: the new modules to drop, as returned by the children's calls.

    **Returns:**

    `None`.

    !!! example

        ```python
        class Probe(eqstate.Module):
            bn: eqstate.nn.BatchNorm

            @eqstate.mutating
            def __call__(self, x):
                y, new_bn = self.bn(x)  # batch statistics, without keeping them
                eqstate.discard(new_bn)
                return y

        y, probe = Probe(eqstate.nn.BatchNorm(3))(x)  # probe.bn's statistics unchanged
        ```
    """
    frame = _draft.current()
    if frame is not None:
        for m in models:
            frame.pending.pop(id(m), None)


def mutating(
    method: Callable[Concatenate[_M, _P], _R],
) -> Callable[Concatenate[_M, _P], tuple[_R, _M]]:
    """Let a method assign to its module's fields; calling it returns `(result, new)`.

    Inside the method, `self` is a private copy: the module and every list, dict, set
    and NumPy array reachable from it (children's included) are copied, so nothing the
    method does reaches the caller's module, whether it returns or raises, in any
    thread, under any JAX transformation. Assignments are checked: an array keeps its
    field's shape (unless `fixed_shape=False`) and dtype (values are cast, but a cast
    that would lose information, such as float to int, raises), a key stays a key, a
    static field never holds an array. Items set into lists and dicts
    (`self.layers[i] = ...`) get the same checks when the method returns; `append`,
    `pop` and `del` work on the copy.

    A child's mutating method returns `(result, new_child)`; assign it back:
    `x, self.bn = self.bn(x)`. A new child whose state changed but that reaches neither
    the returned model nor the result raises (the update would be lost); see
    `eqstate.discard`. (Under plain `jax.jit`, where `inference` flags are traced and a
    layer may or may not change its state, it warns instead: `DroppedUpdateWarning`.)
    Calling another mutating method on `self` changes the same copy; if it raises, its
    changes are undone.

    Works under `jax.jit`, `eqx.filter_jit`, `jax.vmap`, `jax.grad` and `lax.scan`, as a
    pure function of the module.

    **Arguments:**

    - `method`: a method of an `eqstate.Module` subclass (`__call__` or any other),
        whose body may assign to `self`'s declared fields.

    **Returns:**

    The method, wrapped: a call `module.method(*args, **kwargs)` returns the pair
    `(result, new_module)`, where `result` is what the body returned and `new_module`
    the module with the body's assignments; `module` itself is unchanged.

    !!! example

        ```python
        class Counter(eqstate.Module):
            count: jax.Array = eqstate.State.field(default=0)

            @eqstate.mutating
            def __call__(self, x):
                self.count += 1
                return x

        counter = Counter()
        y, counter = counter(x)  # counter.count == 1
        ```
    """
    if not callable(method):
        raise TypeError(f"eqstate.mutating decorates a method, got {method!r}.")

    @ft.wraps(method)
    def wrapper(self: _M, *args: _P.args, **kwargs: _P.kwargs) -> tuple[_R, _M]:
        if not isinstance(self, Module):
            raise TypeError(
                f"@eqstate.mutating method {method.__qualname__} was called on a "
                f"{type(self).__name__}; it works on subclasses of eqstate.Module only."
            )
        if self in drafts:  # a nested call on the same copy
            return _call_on_draft(method, self, args, kwargs), self
        owned: dict[int, Any] = {id(self): self}
        memo: dict[int, Any] = {}
        new = object.__new__(type(self))
        vars(new).update({k: thaw(v, memo, owned) for k, v in vars(self).items()})
        owned[id(new)] = new
        frame = Frame(new, self, owned, (args, kwargs))
        _draft.push(frame)
        try:
            result = method(new, *args, **kwargs)
            new = _settle(frame, method, result)
        finally:
            _draft.pop(frame)
        parent = _draft.current()
        if parent is not None:
            _track(parent, self, new, method.__name__, (args, kwargs))
        return result, new

    _advertise_pair_return(wrapper, method)
    setattr(wrapper, _MARK, True)
    return wrapper


_MARK = "__eqstate_mutating__"


def is_mutating(fn: Any) -> bool:
    """Whether `fn` (a function or method) is a `@mutating` method."""
    return getattr(fn, _MARK, False) is True


def _call_on_draft(method: Callable, draft: Any, args: tuple, kwargs: dict) -> Any:
    """Run `method` on a draft already being mutated; undo its changes if it raises.

    The draft's fields and the contents of every list, dict, ... reachable from it are
    put back in place, so references the caller holds to them stay valid.
    """
    values = vars(draft)
    fields = dict(values)
    contents: list[tuple[Any, Any]] = []
    seen: set[int] = set()
    for v in fields.values():
        snapshot(v, contents, seen)
    frame = _draft.frame_of(draft)
    pending = dict(frame.pending) if frame is not None else None
    try:
        return method(draft, *args, **kwargs)
    except BaseException:
        restore(contents)
        values.clear()
        values.update(fields)
        if frame is not None and pending is not None:
            frame.pending = pending
        raise


def _settle(frame: Frame, method: Callable, result: Any) -> Any:
    """The draft, checked once the method has returned: items set into its containers
    and children's updates that went missing."""
    draft, original = frame.draft, frame.original
    cls = type(original)
    values, old_values = vars(draft), vars(original)
    changed = {}
    for name, f in _fields(cls).items():
        v, o = values.get(name), old_values.get(name)
        if v is o:
            continue
        if f.metadata.get("static", False):
            check_static(v, f"{cls.__name__}.{name}")  # items set into a static container
            continue
        new = fit_tree(v, o, f"{cls.__name__}.{name}", f.metadata.get(FIXED_SHAPE_KEY, True))
        if new is not v:
            changed[name] = new
    if changed:
        values.update(changed)
    if frame.pending:
        _check_dropped(frame, method, result)
    return draft


def _track(parent: Frame, callee: Any, new: Any, name: str, call: Any) -> None:
    """Record, in the enclosing call, a child's new module whose state changed.

    `name` is the child's method and `call` its `(args, kwargs)`. The call may run
    inside a transformation of the parent's (`jax.checkpoint`, `lax.cond`, an inner
    jit): its new state is then reachable only through the transformation's outputs,
    so `_check_dropped` looks for the old child still in place.
    """
    if parent.owned.get(id(callee)) is not callee:
        return  # not one of the parent's children (e.g. a scan carry rebuilt by JAX)
    old_leaves, p = plan(callee)
    new_leaves, q = plan(new)
    if _same_structure(p.treedef, q.treedef):
        changed = [
            (i, x)
            for i, (x, y, kind) in enumerate(zip(new_leaves, old_leaves, q.kinds))
            if x is not y and issubclass(kind, State)
        ]
    else:
        old_ids = {id(y) for y in old_leaves}
        changed = [
            (i, x)
            for i, (x, kind) in enumerate(zip(new_leaves, q.kinds))
            if id(x) not in old_ids and issubclass(kind, State)
        ]
    root = parent.pending.pop(id(callee), None)
    parent.owned[id(new)] = new
    if changed:
        # with a traced `inference` flag, whether the state changes is known only when
        # the step runs: a drop is then only possible, and warned about
        maybe = _traced_flag(old_leaves, p.paths) or _traced_bool(call)
        origin, name = (callee, name) if root is None else (root[1], root[3])
        olds = old_leaves if len(old_leaves) == len(new_leaves) else [None] * len(new_leaves)
        entries = [(q.paths[i], x, olds[i]) for i, x in changed]
        parent.pending[id(new)] = (new, origin, entries, name, maybe)


def _traced_flag(leaves: list, paths: tuple) -> bool:
    """Whether an `inference` flag among `leaves` is traced (plain `jax.jit`, a scan
    carry): layers then compute both branches and select, so their state may not change."""
    return any(
        isinstance(x, Tracer) and path and getattr(path[-1], "name", None) == "inference"
        for x, path in zip(leaves, paths)
    )


def _traced_bool(call: Any) -> bool:
    """Whether the call got a traced boolean (such as `inference=flag` under jit)."""
    return any(isinstance(x, Tracer) and x.dtype == bool for x in jtu.tree_leaves(call))


def _really_changed(new: Any, old: Any) -> bool:
    """Whether `new` differs from `old` in value, as far as can be told (a traced
    value may differ). Layers may rebuild equal arrays: a select between two branches,
    a private copy of a NumPy leaf."""
    if old is None or isinstance(new, Tracer) or isinstance(old, Tracer):
        return True
    try:
        if is_key(new) or is_key(old):
            new, old = jax.random.key_data(new), jax.random.key_data(old)
        a, b = np.asarray(new), np.asarray(old)
        return a.shape != b.shape or a.dtype != b.dtype or not np.array_equal(a, b)
    except Exception:
        return True


def _same_structure(a: Any, b: Any) -> bool:
    try:
        return a == b
    except Exception:  # static metadata that cannot be compared (NumPy arrays)
        return False


def _check_dropped(frame: Frame, method: Callable, result: Any) -> None:
    """Raise if a child's update went missing while the old child is still in place."""
    reachable = {id(x) for x in jtu.tree_leaves((frame.draft, result))}
    for new, origin, changed, name, maybe in frame.pending.values():
        if any(id(x) in reachable for _, x, _ in changed):
            continue
        where = _path_of(frame.draft, origin)
        if where is None:
            continue  # the child was replaced or removed on purpose
        changed = [(p, x, y) for p, x, y in changed if _really_changed(x, y)]
        if not changed:
            continue  # rebuilt with the same values: nothing is lost
        paths = ", ".join(jtu.keystr(p).lstrip(".") for p, _, _ in changed[:4])
        call = where if name == "__call__" else f"{where}.{name}"
        message = _MSG_DROPPED.format(
            dropped="may have dropped" if maybe else "dropped",
            cls=type(frame.original).__name__,
            method=method.__name__,
            call=call,
            callee=where,
            child=type(new).__name__,
            changed=paths + (", ..." if len(changed) > 4 else ""),
        )
        if not maybe:
            raise RuntimeError(message)
        warnings.warn(message + _MAYBE, DroppedUpdateWarning, stacklevel=4)


def _path_of(root: Any, target: Any) -> str | None:
    """How `self` reaches `target` (`self.bn`, `self.norms[0]`), or `None`."""
    for p, x in jtu.tree_flatten_with_path(root, is_leaf=lambda x: x is target)[0]:
        if x is target:
            return "self" + jtu.keystr(p)
    return None


def _advertise_pair_return(wrapper: Callable, method: Callable) -> None:
    """Make `wrapper`'s signature say it returns `(result, model)`.

    Decorators stacked outside `mutating` (such as `jaxtyping.jaxtyped`) then check the
    pair against `tuple[<declared return>, Any]` instead of the bare result.
    """
    try:
        sig = inspect.signature(method)
    except (TypeError, ValueError):
        return
    ret = sig.return_annotation
    pair = Any if ret is inspect.Signature.empty else tuple[ret, Any]
    wrapper.__signature__ = sig.replace(return_annotation=pair)  # pyright: ignore[reportFunctionMemberAccess]
    wrapper.__annotations__ = {**getattr(method, "__annotations__", {}), "return": pair}
