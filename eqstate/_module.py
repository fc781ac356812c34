"""`eqstate.Module` and the `mutating` decorator."""

import dataclasses
import functools as ft
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
from typing_extensions import dataclass_transform

from ._convert import cast_like, is_array_like, is_key, to_strong
from ._filters import Filter, check_same_structure, filter as filter_, merge
from ._kinds import FIXED_SHAPE_KEY, Kind, Param, State, field, field_kind


_P = ParamSpec("_P")
_R = TypeVar("_R")
_M = TypeVar("_M", bound="Module")

_MSG_NOT_A_FIELD = (
    "{cls}.{name} is not a field. You can assign only to declared fields: {fields}. "
    "Declare it on the class, e.g. `{name}: jax.Array = eqstate.State.field()`."
)
_MSG_FROZEN = (
    "cannot assign to field '{name}': {cls} is frozen outside `@eqstate.mutating` "
    "methods. Decorate the method that assigns with `@eqstate.mutating` (it then "
    "returns `(result, new_model)`), or build a new model with `model.update(...)` / "
    "`eqx.tree_at`. A child's fields change through the child's own mutating method: "
    "`y, self.child = self.child(x)`."
)
_MSG_SHAPE = (
    "{where} has shape {old} but was assigned a value of shape {new}. An array "
    "field keeps its shape inside `@eqstate.mutating` methods (a new shape would "
    "recompile a jitted step). If this state's shape legitimately changes, declare it "
    "with `fixed_shape=False`."
)
_MSG_KEY = (
    "{where} holds a PRNG key of dtype {old} but was assigned a value of dtype {new}. "
    "Assign a key of the same kind, e.g. `key, self.key = jax.random.split(self.key)` "
    "or `key = eqstate.next_key(self)`."
)


class _Drafts:
    """The objects a mutating method is currently allowed to assign to (by identity)."""

    __slots__ = ("_objs",)

    def __init__(self) -> None:
        self._objs: dict[int, Any] = {}

    def __contains__(self, obj: object) -> bool:
        return id(obj) in self._objs

    def add(self, obj: object) -> None:
        self._objs[id(obj)] = obj

    def remove(self, obj: object) -> None:
        del self._objs[id(obj)]


_drafts = _Drafts()


@dataclass_transform(field_specifiers=(dataclasses.field, eqx.field, field, Kind.field))
class _ModuleMeta(type(eqx.Module)):
    pass


def _fields(cls: type) -> dict[str, dataclasses.Field]:
    try:
        return _FIELDS[cls]
    except KeyError:
        out = _FIELDS[cls] = {f.name: f for f in dataclasses.fields(cls)}
        return out


_FIELDS: dict[type, dict[str, dataclasses.Field]] = {}


def _not_a_field(cls: type, name: str) -> str:
    fields = ", ".join(_fields(cls)) or "(none)"
    return _MSG_NOT_A_FIELD.format(cls=cls.__name__, name=name, fields=fields)


def _checked(obj: "Module", name: str, value: Any) -> Any:
    """`value` made fit to be stored in field `name` of the draft `obj`, or an error."""
    cls = type(obj)
    fields = _fields(cls)
    try:
        f = fields[name]
    except KeyError:
        raise AttributeError(_not_a_field(cls, name)) from None
    if f.metadata.get("static", False):
        return value
    old = vars(obj).get(name)
    where = f"{cls.__name__}.{name}"
    fixed = f.metadata.get(FIXED_SHAPE_KEY, True)
    if _is_array(old):
        value = _fit(value, old, where, fixed)
    elif old is not None and jtu.tree_structure(value) == jtu.tree_structure(old):
        # a container or child module: its arrays keep their dtypes; their shapes are the
        # business of the fields that hold them (a child's own `fixed_shape`)
        value = jtu.tree_map_with_path(
            lambda path, new, prev: (
                _fit(new, prev, where + jtu.keystr(path), False) if _is_array(prev) else new
            ),
            value,
            old,
        )
    kind = field_kind(f)
    if kind is not None and issubclass(kind, State):
        value = jtu.tree_map(_no_grad, to_strong(value))
    return value


def _is_array(x: Any) -> bool:
    return isinstance(x, (jax.Array, np.ndarray))


def _no_grad(x: Any) -> Any:
    return jax.lax.stop_gradient(x) if eqx.is_inexact_array(x) else x


def _fit(value: Any, old: Any, where: str, fixed_shape: bool) -> Any:
    """`value` with `old`'s dtype (a key stays a key), checked for `old`'s shape."""
    if not is_array_like(value):
        return value
    if is_key(old) or is_key(value):
        if getattr(value, "dtype", None) != old.dtype:
            new = getattr(value, "dtype", type(value).__name__)
            raise TypeError(_MSG_KEY.format(where=where, old=old.dtype, new=new))
    else:
        value = cast_like(value, old)
    if fixed_shape and jnp.shape(value) != old.shape:
        raise ValueError(_MSG_SHAPE.format(where=where, old=old.shape, new=jnp.shape(value)))
    return value


class Module(eqx.Module, metaclass=_ModuleMeta):
    """An `eqx.Module` whose fields can carry kinds, with kind-aware helpers.

    Everything Equinox promises holds: it is a frozen dataclass and a pytree that
    flattens, jits and serialises like an `eqx.Module` with the same fields. Fields are
    declared with `eqstate.State.field()` (or any kind's `.field()`, or
    `eqstate.field(kind=...)`); undeclared fields are `Param`.

    Assignment is allowed in `__init__` (as in Equinox) and inside
    `@eqstate.mutating` methods, which return `(result, new_model)`.

    !!! example

        ```python
        class Average(eqstate.Module):
            count: jax.Array = eqstate.State.field(default=0)
            total: jax.Array = eqstate.State.field(default=0.0)

            @eqstate.mutating
            def __call__(self, x):
                self.count += x.size
                self.total += jnp.sum(x)
                return self.total / self.count

        avg = Average()
        y, avg = avg(jnp.arange(4.0))
        ```
    """

    if not TYPE_CHECKING:

        def __setattr__(self, name: str, value: Any) -> None:
            if self in _drafts:
                object.__setattr__(self, name, _checked(self, name, value))
                return
            try:
                super().__setattr__(name, value)
            except dataclasses.FrozenInstanceError:
                cls = type(self)
                if name not in _fields(cls):  # also in `__init__`
                    msg = _not_a_field(cls, name)
                else:
                    msg = _MSG_FROZEN.format(name=name, cls=cls.__name__)
                raise dataclasses.FrozenInstanceError(msg) from None

    def filter(self, *filters: Filter) -> "Module":
        """`eqstate.filter(self, *filters)`: this model with non-matching leaves `None`."""
        return filter_(self, *filters)

    def parameters(self) -> "Module":
        """The `Param` array leaves of this model; every other leaf is `None`."""
        return filter_(self, Param)

    def states(self) -> "Module":
        """The array leaves of every `State` kind; every other leaf is `None`."""
        return filter_(self, State)

    def update(self: _M, *trees: Any) -> _M:
        """A new model with the non-`None` leaves of `trees` put in.

        **Arguments:**

        - `*trees`: pytrees of this model's structure with `None` where nothing changes,
            as returned by `parameters()`, `states()`, `filter()` or `eqstate.partition`.
            Where several trees hold a leaf, the first wins.

        **Returns:**

        A new model of the same class; `self` is unchanged.

        !!! example

            ```python
            params = model.parameters()
            model = model.update(params)
            ```
        """
        if not trees:
            return self
        flat = check_same_structure(
            (self, *trees),
            f"{type(self).__name__}.update",
            lambda i: "the model" if i == 0 else f"tree {i - 1}",
        )
        return merge([*flat[1:], flat[0]])  # the trees' leaves win over the model's


def _draft(obj: _M) -> _M:
    new = object.__new__(type(obj))
    vars(new).update(vars(obj))
    return new


def mutating(
    method: Callable[Concatenate[_M, _P], _R],
) -> Callable[Concatenate[_M, _P], tuple[_R, _M]]:
    """Let a method assign to its module's fields; calling it returns `(result, new)`.

    Inside the method, `self` is a fresh copy that accepts assignments to its declared
    fields (`self.count += 1`). Arrays keep their field's dtype and shape. The caller's
    module is never modified; if the method raises, nothing is kept.

    A child's mutating method returns `(result, new_child)`; assign it back:
    `x, self.bn = self.bn(x)`. Calling another mutating method on `self` from inside
    one changes the same copy.

    Works under `jax.jit`, `eqx.filter_jit`, `jax.vmap`, `jax.grad` and `lax.scan`, as a
    pure function of the module.

    !!! example

        ```python
        class Counter(eqstate.Module):
            count: jax.Array = eqstate.State.field(default=0)

            @eqstate.mutating
            def __call__(self, x):
                self.count += 1
                return x

        y, counter = counter(x)
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
        if self in _drafts:  # nested call on the same copy
            return method(self, *args, **kwargs), self
        new = _draft(self)
        _drafts.add(new)
        try:
            result = method(new, *args, **kwargs)
        finally:
            _drafts.remove(new)
        return result, new

    _advertise_pair_return(wrapper, method)
    return wrapper


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
