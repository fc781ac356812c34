"""`eqstate.vmap`: run a model per example, with its state coming back unmapped."""

import functools as ft
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, ParamSpec, TypeVar

import equinox as eqx
import jax
import jax.tree_util as jtu

from ._draft import is_mapped


_P = ParamSpec("_P")
_R = TypeVar("_R")

_MSG_MAPPED_STATE = (
    "eqstate.vmap: the returned model's {path} differs between examples, but a model "
    "comes back unmapped (one model for the whole batch). Reduce it over the mapped "
    "axis inside the method, e.g. `self.total += jax.lax.psum(jnp.sum(x), axis_name)` "
    "(eqstate's layers do this themselves), or map the model too by passing `out_axes=`."
)
_MSG_AXES = (
    "eqstate.vmap({name}=...) must be an int, None, or a callable `leaf -> int | None` at "
    "each leaf of its tree (as in `eqx.filter_vmap`), got {value!r}."
)


class _Local(threading.local):
    def __init__(self):
        self.axes: list[Hashable] = []


_local = _Local()


def bound_axes() -> tuple[Hashable, ...]:
    """The axis names of the `eqstate.vmap` calls being traced, outermost first.

    A layer called per example (its input mapped, its state not) and given no
    `axis_name` of its own reduces its statistics and folds its keys over these.
    """
    return tuple(_local.axes)


class _Unset:
    """The default of a call's `axis_name`: the module's own, else the mapped axis."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<the module's axis_name>"


UNSET: Any = _Unset()

AxisName = Hashable | Sequence[Hashable] | None


def axis_names(own: AxisName, given: Any, per_example: bool) -> tuple[Hashable, ...]:
    """The axis names a layer reduces (or folds keys) over: those given to the call, else
    the layer's own, else, per example, those of the enclosing `eqstate.vmap` calls."""
    names = own if given is UNSET else given
    if names is None and given is UNSET and per_example:
        return bound_axes()
    if names is None:
        return ()
    if isinstance(names, (list, tuple)):
        return tuple(names)
    return (names,)


class _Axis:
    """The name of an `eqstate.vmap` axis when the caller gives none: unique, so nested
    maps never shadow each other."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<eqstate.vmap axis>"


class _Static(eqx.Module):
    value: Any = eqx.field(static=True)


def _is_module(x: Any) -> bool:
    return isinstance(x, eqx.Module)


def _default_in(tree: Any) -> Any:
    """Modules unmapped, other arrays mapped over their leading axis."""
    return jtu.tree_map(
        lambda x: None if _is_module(x) else eqx.if_array(0), tree, is_leaf=_is_module
    )


def _resolve(tree: Any, axes: Any, name: str) -> Any:
    """An int or `None` for every leaf of `tree`, from a prefix tree of specs."""

    def one(spec: Any, sub: Any) -> Any:
        if spec is not None and not isinstance(spec, int) and not callable(spec):
            raise ValueError(_MSG_AXES.format(name=name, value=spec))
        if spec is None or isinstance(spec, int):
            return jtu.tree_map(lambda x: spec if eqx.is_array(x) else None, sub)
        return jtu.tree_map(spec, sub)

    return jtu.tree_map(one, axes, tree, is_leaf=lambda x: x is None)


class Vmap(Generic[_P, _R]):
    """The callable `eqstate.vmap` returns."""

    def __init__(
        self,
        fun: Callable[_P, _R],
        in_axes: Any,
        out_axes: Any,
        axis_name: Hashable | None,
        axis_size: int | None,
    ):
        self.fun = fun
        self.in_axes = in_axes
        self.out_axes = out_axes
        self.axis_name = _Axis() if axis_name is None else axis_name
        self.axis_size = axis_size
        ft.update_wrapper(self, fun, updated=())

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        if self.in_axes is None:
            in_spec = (_default_in(args), _default_in(kwargs))
        else:
            axes = self.in_axes if isinstance(self.in_axes, tuple) else (self.in_axes,) * len(args)
            in_spec = (axes, _default_in(kwargs))
        in_axes = _resolve((args, kwargs), in_spec, "in_axes")
        unmapped = jtu.tree_map(lambda a: a is None, in_axes, is_leaf=lambda a: a is None)
        static, dynamic = eqx.partition((args, kwargs), unmapped, is_leaf=lambda a: a is None)
        mapped_state: list[str] = []
        fun: Callable[..., Any] = self.fun

        def inner(dynamic: Any) -> Any:
            a, kw = eqx.combine(dynamic, static)
            _local.axes.append(self.axis_name)
            try:
                out = fun(*a, **kw)
            finally:
                _local.axes.pop()
            spec = _default_out(out) if self.out_axes is None else self.out_axes
            out_axes = _resolve(out, spec, "out_axes")
            none = jtu.tree_map(lambda a: a is None, out_axes, is_leaf=lambda a: a is None)
            kept, moved = eqx.partition(out, none, is_leaf=lambda a: a is None)
            kept_arrays, kept_static = eqx.partition(kept, eqx.is_array)
            for path, leaf in jtu.tree_leaves_with_path(kept_arrays):
                if is_mapped(leaf):
                    mapped_state.append(jtu.keystr(path))
            return moved, kept_arrays, _Static((kept_static, out_axes))

        try:
            moved, kept_arrays, aux = jax.vmap(
                inner,
                in_axes=(in_axes,),
                out_axes=(0, None, None),
                axis_name=self.axis_name,
                axis_size=self.axis_size,
            )(dynamic)
        except ValueError as err:
            if "out_axes" not in str(err) or not mapped_state:
                raise
            raise ValueError(_MSG_MAPPED_STATE.format(path=mapped_state[0])) from err
        kept_static, out_axes = aux.value
        moved = jtu.tree_map(
            lambda x, a: jax.numpy.moveaxis(x, 0, a) if a else x,
            moved,
            out_axes,
            is_leaf=lambda a: a is None,
        )
        return eqx.combine(moved, kept_arrays, kept_static)


def _default_out(tree: Any) -> Any:
    return _default_in(tree)


def vmap(
    fun: Callable[_P, _R],
    *,
    in_axes: Any = None,
    out_axes: Any = None,
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
) -> Vmap[_P, _R]:
    """Map `fun` over examples, with models (any `eqx.Module`) in and out unmapped.

    The per-example style of Equinox: write a model for one example and map it over the
    batch. eqstate's layers inside (`BatchNorm`, `Dropout`, `eqstate.next_key`) see that
    they run per example and reduce over the mapped axis: batch statistics are taken
    over the whole batch, each example gets its own random numbers, and the returned
    model holds one copy of the state, as a batch-level call would return it.

    **Arguments:**

    - `fun`: the function or model to map, e.g. `model` or `lambda m, x: m(x)`.
    - `in_axes`: as in `eqx.filter_vmap`, for the positional arguments (a prefix tree of
        ints, `None` and callables `leaf -> int | None`). By default, every `eqx.Module`
        in the arguments (and `fun` itself) is unmapped and every other array is mapped
        over its leading axis.
    - `out_axes`: likewise for the output. By default, every `eqx.Module` in the output
        is unmapped (it must not differ between examples) and every other array is
        stacked on a leading axis.
    - `axis_name`: the name of the mapped axis, for your own `jax.lax.pmean` or
        `eqstate.next_key(self, axis_name=...)`. eqstate's layers find it without being
        told. By default a fresh name.
    - `axis_size`: as in `jax.vmap`, when no argument is mapped.

    **Returns:**

    A callable with `fun`'s signature.

    !!! example

        ```python
        class Net(eqstate.Module):
            linear: eqx.nn.Linear
            bn: eqstate.nn.BatchNorm  # BatchNorm(32): no axis_name needed

            @eqstate.mutating
            def __call__(self, x):  # x: one example, shape (3,)
                x, self.bn = self.bn(self.linear(x))
                return x

        ys, net = eqstate.vmap(net)(xs)  # xs: (batch, 3); net comes back unmapped
        ```
    """
    return Vmap(fun, in_axes, out_axes, axis_name, axis_size)
