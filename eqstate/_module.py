"""`eqstate.Module`, its metaclass, and putting trees back into a model (`update`)."""

import dataclasses
from typing import TYPE_CHECKING, Any, ParamSpec, Self, TypeVar

import equinox as eqx
import jax
import jax.tree_util as jtu
from typing_extensions import dataclass_transform

from ._checks import check_static, fit_tree, is_array
from ._convert import canonical_dtype, is_key_like, to_strong
from ._draft import drafts
from ._filters import Filter, check_same_structure, filter as filter_, leaf_path, merge
from ._kinds import FIXED_SHAPE_KEY, Kind, Param, Rng, State, field, field_kind


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
    "`y, self.child = self.child(x)`. (A `jax.jit` or `eqx.filter_jit` applied to the "
    "method inside `@eqstate.mutating` rebuilds `self` as a frozen module: put the jit "
    "outside, or jit the function that calls the method.)"
)
_MSG_SHADOWS = (
    "{cls}.{name}: a field named '{name}' would hide the method `Module.{name}` of "
    "eqstate.Module. Rename the field (e.g. '{name}_')."
)
_MSG_RNG = (
    "{cls}.{name} is an `Rng` field but holds {value}, not a PRNG key. "
    "Pass a key, e.g. `jax.random.key(0)` (or `jax.random.PRNGKey(0)`), or "
    "`default_factory=lambda: jax.random.key(0)` in its declaration."
)
_MSG_UPDATE_LEAF = (
    "{where}: tree {i} has {new} at {path}, where the model has {old}. The trees put "
    "back must hold leaves of the model's shapes and dtypes, as `parameters()`, "
    "`states()` and `eqstate.partition` of this model give."
)

_METHODS = frozenset({"filter", "parameters", "states", "update"})


@dataclass_transform(field_specifiers=(dataclasses.field, eqx.field, field, Kind.field))
class _ModuleMeta(type(eqx.Module)):
    def __new__(mcs, name: str, bases: tuple[type, ...], namespace: dict[str, Any], **kwargs: Any):
        cls = super().__new__(mcs, name, bases, namespace, **kwargs)
        for f in dataclasses.fields(cls):
            if f.name in _METHODS:
                raise TypeError(_MSG_SHADOWS.format(cls=name, name=f.name))
        return cls

    if not TYPE_CHECKING:  # hidden, so that type checkers check `Model(...)` against the
        # dataclass `__init__` and give a `Model`, not this `__call__`'s `Any`

        def __call__(cls, *args: Any, **kwargs: Any) -> Any:
            obj = super().__call__(*args, **kwargs)
            for name in _rng_fields(cls):
                bad = [x for x in jtu.tree_leaves(vars(obj).get(name)) if not is_key_like(x)]
                if bad:
                    value = bad[0]
                    what = (
                        f"an array of dtype {value.dtype}"
                        if is_array(value)
                        else f"{value!r} of type {type(value).__name__}"
                    )
                    raise TypeError(_MSG_RNG.format(cls=cls.__name__, name=name, value=what))
            return obj


def _rng_fields(cls: type) -> tuple[str, ...]:
    try:
        return _RNG_FIELDS[cls]
    except KeyError:
        out = _RNG_FIELDS[cls] = tuple(
            n
            for n, f in _fields(cls).items()
            if not f.metadata.get("static", False) and issubclass(field_kind(f) or Kind, Rng)
        )
        return out


_RNG_FIELDS: dict[type, tuple[str, ...]] = {}


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
    try:
        f = _fields(cls)[name]
    except KeyError:
        raise AttributeError(_not_a_field(cls, name)) from None
    where = f"{cls.__name__}.{name}"
    if f.metadata.get("static", False):
        check_static(value, where)
        return value
    value = fit_tree(value, vars(obj).get(name), where, f.metadata.get(FIXED_SHAPE_KEY, True))
    kind = field_kind(f)
    if kind is not None and issubclass(kind, State):
        value = jtu.tree_map(_no_grad, to_strong(value))
    return value


def _no_grad(x: Any) -> Any:
    return jax.lax.stop_gradient(x) if eqx.is_inexact_array(x) else x


def _is_trainable(path: tuple, kind: type[Kind], leaf: Any) -> bool:
    return issubclass(kind, Param) and eqx.is_inexact_array(leaf)


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
            if self in drafts:
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

    def filter(self, *filters: Filter) -> Self:
        """`eqstate.filter(self, *filters)`: this model with non-matching leaves `None`.

        **Arguments:**

        - `*filters`: kinds, `...`, callables `(path, kind, leaf) -> bool` or
            `leaf -> bool`, or tuples of these, as for `eqstate.filter`.

        **Returns:**

        A model of this structure holding the leaves that match any of `filters`, and
        `None` elsewhere.

        !!! example

            ```python
            stats = model.filter(eqstate.BatchStat)  # the running statistics only
            ```
        """
        return filter_(self, *filters)

    def parameters(self) -> Self:
        """The trainable parameters: the floating (or complex) `Param` arrays of this
        model; every other leaf is `None`.

        Integer and boolean arrays are left out even where they are `Param`s (an
        `inference` flag becomes a `bool[]` array under `jax.jit`), so
        `jax.grad(loss)(model.parameters(), ...)` works. `eqstate.filter(model,
        eqstate.Param)` gives every `Param` array.

        **Returns:**

        A model of this structure holding the trainable arrays, and `None` elsewhere.

        !!! example

            ```python
            @functools.partial(jax.value_and_grad, has_aux=True)
            def loss(params, model, x, y):
                return loss_fn(model.update(params), x, y)

            (value, model), grads = loss(model.parameters(), model, x, y)
            ```
        """
        return filter_(self, _is_trainable)

    def states(self) -> Self:
        """The array leaves of every `State` kind; every other leaf is `None`.

        **Returns:**

        A model of this structure holding the arrays of `State` kinds (`BatchStat`,
        `Rng`, `OptState` and your own subclasses included), and `None` elsewhere.

        !!! example

            ```python
            saved = model.states()  # running statistics and Dropout's key
            model = model.update(saved)
            ```
        """
        return filter_(self, State)

    def update(self: _M, *trees: Any) -> _M:
        """A new model with the non-`None` leaves of `trees` put in.

        **Arguments:**

        - `*trees`: pytrees of this model's structure with `None` where nothing changes,
            as returned by `parameters()`, `states()`, `filter()` or `eqstate.partition`.
            Where several trees hold a leaf, the first wins.

        **Returns:**

        A new model of the same class; `self` is unchanged. `eqstate.update(model,
        *trees)` does the same for any module, including those whose own `update`
        method does something else (`Optimizer`, `EMA`, metrics).

        !!! example

            ```python
            params = model.parameters()
            model = model.update(params)
            ```
        """
        return _update(self, trees, f"{type(self).__name__}.update")


_T = TypeVar("_T")


def update(model: _T, *trees: Any) -> _T:
    """Put the non-`None` leaves of `trees` into `model`: a new model, `model` unchanged.

    The free-function form of `Module.update`; it works on every module, including
    those whose own `update` method means something else (`eqstate.Optimizer`,
    `eqstate.nn.EMA`, metrics), and on any pytree.

    **Arguments:**

    - `model`: the model (any pytree) to put leaves into.
    - `*trees`: pytrees of `model`'s structure with `None` where nothing changes, as
        `eqstate.filter` / `eqstate.partition` / `model.states()` give. Where several
        trees hold a leaf, the first wins. Each leaf put in place of an array must have
        its shape (unless its field is declared `fixed_shape=False`) and dtype.

    **Returns:**

    A new tree of `model`'s structure with the leaves of `trees` put in.

    !!! example

        ```python
        ema = eqstate.nn.EMA(model, decay=0.999)
        averaged = ema.states()  # e.g. saved earlier
        ema = eqstate.update(ema, averaged)  # ema.update(...) would step the average
        ```
    """
    return _update(model, trees, "eqstate.update")


def _update(model: _T, trees: tuple, where: str) -> _T:
    if not trees:
        return model
    flat = check_same_structure(
        (model, *trees), where, lambda i: "the model" if i == 0 else f"tree {i - 1}"
    )
    olds = flat[0][0]
    for i, (leaves, _) in enumerate(flat[1:]):
        for j, (new, old) in enumerate(zip(leaves, olds)):
            if new is None or new is old or not is_array(old):
                continue
            shape, dtype = getattr(new, "shape", None), getattr(new, "dtype", None)
            same_dtype = dtype is not None and canonical_dtype(dtype) == canonical_dtype(old.dtype)
            if same_dtype and shape == old.shape:
                continue
            path = leaf_path(model, j)
            if same_dtype and not _fixed_at(model, path):
                continue
            desc = f"an array {dtype}{list(shape)}" if shape is not None else repr(new)
            raise ValueError(
                _MSG_UPDATE_LEAF.format(
                    where=where,
                    i=i,
                    new=desc,
                    path=jtu.keystr(path),
                    old=f"{old.dtype}{list(old.shape)}",
                )
            )
    return merge([*flat[1:], flat[0]])  # the trees' leaves win over the model's


def _fixed_at(model: Any, path: tuple) -> bool:
    """Whether the leaf of `model` at key path `path` keeps a fixed shape."""
    node, fixed = model, True
    for key in path:
        if isinstance(key, jtu.GetAttrKey):
            f = _fields(type(node)).get(key.name) if dataclasses.is_dataclass(node) else None
            if f is not None:
                fixed = f.metadata.get(FIXED_SHAPE_KEY, fixed)
            node = getattr(node, key.name)
        elif isinstance(key, jtu.SequenceKey):
            node = node[key.idx]
        elif isinstance(key, jtu.DictKey):
            node = node[key.key]
        else:
            break
    return fixed
