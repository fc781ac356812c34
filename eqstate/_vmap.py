"""`eqstate.vmap`, and the mapped axes a layer called per example reduces over."""

import functools as ft
import inspect
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, NamedTuple, ParamSpec, TypeVar

import equinox as eqx
import jax
import jax.tree_util as jtu
from jax.core import Tracer


_P = ParamSpec("_P")
_R = TypeVar("_R")

_MSG_MAPPED_STATE = (
    "eqstate.vmap: output{path} is returned unmapped ({why}), but it differs between "
    "examples. Reduce it over the mapped axis inside the method, e.g. "
    "`self.total += jax.lax.psum(jnp.sum(x), 'batch')` under "
    "`eqstate.vmap(model, axis_name='batch')` (eqstate's layers reduce by themselves), "
    "or return it mapped with `out_axes=`."
)
_MSG_AXES = (
    "eqstate.vmap({name}=...) must be an int, None, or a callable `leaf -> int | None` at "
    "each leaf of its tree (as in `eqx.filter_vmap`), got {value!r}{where}."
)
_MSG_IN_AXES_LENGTH = (
    "eqstate.vmap(in_axes=...) has {n} entries but the call has {m} positional "
    "arguments; give one entry per positional argument (or one int/None for all)."
)
_MSG_IN_AXES_NAME = (
    "eqstate.vmap(in_axes={{...}}) names {names}, which {are} not {a}parameter{s} of "
    "{fun} ({params})."
)
_MSG_NOTHING = (
    "eqstate.vmap: nothing to map: no array outside a module among the positional "
    "arguments (keyword arguments are unmapped by default). Pass the data positionally, "
    "name it, e.g. `in_axes={'x': 0}`, or give `axis_size=`."
)
_MSG_UNBOUND = (
    "{who}: axis_name {name!r} is not a mapped axis here. Map with "
    "`eqstate.vmap(model, axis_name={name!r})` (or `jax.vmap(..., axis_name={name!r})`, "
    "or `shard_map` over a mesh axis of that name), or unbind it for this call: "
    "`layer(x, axis_name=None)`."
)


class _Local(threading.local):
    def __init__(self):
        self.axes: list[Hashable] = []  # the axes layers reduce over
        self.depth = 0  # eqstate.vmap calls being traced
        self.devices: list[Hashable] = []  # mesh axes eqstate.data_parallel splits over


_local = _Local()


def device_axes() -> tuple[Hashable, ...]:
    """The mesh axes of the `eqstate.data_parallel` calls being traced, over which the
    batch is split (layers reduce over them too, but the calls are not per example)."""
    return tuple(_local.devices)


class _Unset:
    """The default of a call's `axis_name`: the module's own, else the mapped axis."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "<the module's axis_name>"


UNSET: Any = _Unset()

AxisName = Hashable | Sequence[Hashable] | None

_UNKNOWN = object()  # a vmap axis whose name the tracer does not show


def _as_names(names: Any) -> tuple[Hashable, ...]:
    if names is None:
        return ()
    return tuple(names) if isinstance(names, (list, tuple)) else (names,)


def mapped_axes(tree: Any) -> set[Hashable]:
    """The `jax.vmap` axes along which some leaf of `tree` is mapped, as far as its
    tracers show (inside `lax.scan`, `jax.checkpoint`, `lax.cond` or an inner jit they
    show none).

    Duck-typed on JAX's tracers (it has no public test): a batch tracer's `batch_dim`
    and its trace's axis name, through the tracers of transformations inside the vmap.
    """
    out: set[Hashable] = set()
    for x in jtu.tree_leaves(tree):
        for _ in range(16):
            if not isinstance(x, Tracer):
                break
            if getattr(x, "batch_dim", None) is not None:
                data = getattr(getattr(x, "_trace", None), "axis_data", None)
                out.add(getattr(data, "name", _UNKNOWN))
            inner = getattr(x, "val", None)
            x = getattr(x, "primal", None) if inner is None else inner
    return out


class Axes(NamedTuple):
    """How a layer call relates to the mapped axes around it."""

    per_example: bool  # its input is mapped (or an `eqstate.vmap` is) and its state not
    names: tuple[Hashable, ...]  # what to reduce statistics / fold keys over
    uncovered: bool  # per example along an axis that has no name to reduce over
    explicit: tuple[Hashable, ...]  # the layer's own (or the call's) axis names
    who: str  # the layer, for messages
    devices: tuple[Hashable, ...] = ()  # the device axes among `names`


def layer_axes(who: str, own: AxisName, given: Any, inputs: Any, state: Any) -> Axes:
    """The axes a layer reduces over: those of the enclosing `eqstate.vmap` calls along
    which its state is not mapped, the device axes of `eqstate.data_parallel`, then its
    own `axis_name` (or the call's, `given`)."""
    explicit = _as_names(own if given is UNSET else given)
    state_axes = mapped_axes(state)
    visible = mapped_axes(inputs) - state_axes
    bound = tuple(a for a in _local.axes if a not in state_axes)
    devices = tuple(a for a in _local.devices if a not in bound)
    names = bound + devices + tuple(n for n in explicit if n not in bound + devices)
    unnamed = visible - set(names)
    uncovered = bool(unnamed - {_UNKNOWN}) or (_UNKNOWN in unnamed and not names)
    return Axes(bool(visible or bound), names, uncovered, explicit, who, devices)


def check_bound(axes: Axes) -> None:
    """Raise a clear error if a layer's own `axis_name` is not a mapped axis here (JAX's
    own is a `NameError` deep inside `pmean`); call it only when reducing over them."""
    for name in axes.explicit:
        try:
            jax.lax.axis_index(name)
        except NameError:
            raise ValueError(_MSG_UNBOUND.format(who=axes.who, name=name)) from None


class _Axis:
    """The name of an `eqstate.vmap` axis when the caller gives none: its nesting depth,
    so nested maps never shadow each other, while equal names across calls keep JAX's
    caches (an eager op compiles once per axis name). Not a tuple: JAX reads a tuple
    axis name as several axes."""

    __slots__ = ("depth",)

    def __init__(self, depth: int):
        self.depth = depth

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Axis) and other.depth == self.depth

    def __hash__(self) -> int:
        return hash((_Axis, self.depth))

    def __repr__(self) -> str:
        return f"<eqstate.vmap axis {self.depth}>"


class _Static(eqx.Module):
    value: Any = eqx.field(static=True)


def is_module(x: Any) -> bool:
    return isinstance(x, eqx.Module)


def _default_in(tree: Any) -> Any:
    """Modules unmapped, other arrays mapped over their leading axis."""
    return jtu.tree_map(
        lambda x: None if is_module(x) else eqx.if_array(0), tree, is_leaf=is_module
    )


def _maps_a_module(tree: Any, axes: Any) -> bool:
    """Whether the resolved `axes` map a leaf inside an `eqx.Module` of `tree`."""
    mapped = jtu.tree_map(lambda a: a is not None, axes, is_leaf=lambda a: a is None)
    return any(
        jtu.tree_leaves(
            jtu.tree_map(
                lambda node, flags: is_module(node) and any(jtu.tree_leaves(flags)),
                tree,
                mapped,
                is_leaf=lambda x: is_module(x) or x is None,
            )
        )
    )


def _resolve(tree: Any, axes: Any, name: str) -> Any:
    """An int or `None` for every leaf of `tree`, from a prefix tree of specs."""

    def one(spec: Any, sub: Any) -> Any:
        if spec is None or (isinstance(spec, int) and not isinstance(spec, bool)):
            return jtu.tree_map(lambda x: spec if eqx.is_array(x) else None, sub)
        if not callable(spec):
            raise ValueError(_MSG_AXES.format(name=name, value=spec, where=""))
        return jtu.tree_map(spec, sub)

    try:
        return jtu.tree_map(one, axes, tree, is_leaf=lambda x: x is None)
    except ValueError as err:
        if str(err).startswith("eqstate.vmap"):
            raise
        where = " (its tree does not match the structure of the values)"
        raise ValueError(_MSG_AXES.format(name=name, value=axes, where=where)) from None


_DEFAULT: Any = object()  # in_axes / out_axes not given


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
        self.axis_name = axis_name
        self.axis_size = axis_size
        ft.update_wrapper(self, fun, updated=())

    def _in_spec(self, args: tuple, kwargs: dict) -> tuple[Any, Any]:
        """The `in_axes` prefix trees for `args` and `kwargs` (unmapped by default)."""
        spec = self.in_axes
        unmapped_kwargs = jtu.tree_map(lambda _: None, kwargs)
        if spec is _DEFAULT:
            return _default_in(args), unmapped_kwargs
        if isinstance(spec, dict):
            try:
                params = list(inspect.signature(self.fun).parameters)
            except (TypeError, ValueError):
                params = []
            unknown = [k for k in spec if k not in params]
            if unknown:
                raise ValueError(
                    _MSG_IN_AXES_NAME.format(
                        names=", ".join(map(repr, unknown)),
                        are="is" if len(unknown) == 1 else "are",
                        a="a " if len(unknown) == 1 else "",
                        s="" if len(unknown) == 1 else "s",
                        fun=getattr(self.fun, "__qualname__", repr(self.fun)),
                        params=", ".join(params) or "no signature found",
                    )
                )
            positional = tuple(
                spec[p] if p in spec else _default_in(x) for p, x in zip(params, args)
            )
            positional += tuple(map(_default_in, args[len(positional) :]))
            return positional, {k: spec.get(k) for k in kwargs}
        if isinstance(spec, list):
            spec = tuple(spec)
        if isinstance(spec, tuple):
            if len(spec) != len(args):
                raise ValueError(_MSG_IN_AXES_LENGTH.format(n=len(spec), m=len(args)))
            return spec, unmapped_kwargs
        return (spec,) * len(args), unmapped_kwargs

    def __call__(self, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        in_axes = _resolve((args, kwargs), self._in_spec(args, kwargs), "in_axes")
        unmapped = jtu.tree_map(lambda a: a is None, in_axes, is_leaf=lambda a: a is None)
        static, dynamic = eqx.partition((args, kwargs), unmapped, is_leaf=lambda a: a is None)
        if self.axis_size is None and all(
            a is None for a in jtu.tree_leaves(in_axes, is_leaf=lambda a: a is None)
        ):
            raise ValueError(_MSG_NOTHING)
        # an explicitly mapped module (an ensemble) is not run per example
        modules_mapped = _maps_a_module((args, kwargs), in_axes)
        name = _Axis(_local.depth) if self.axis_name is None else self.axis_name
        mapped_output: list[str] = []
        fun: Callable[..., Any] = self.fun
        default_out = self.out_axes is _DEFAULT

        def inner(dynamic: Any) -> Any:
            a, kw = eqx.combine(dynamic, static)
            if not modules_mapped:
                _local.axes.append(name)
            _local.depth += 1
            try:
                out = fun(*a, **kw)
            finally:
                _local.depth -= 1
                if not modules_mapped:
                    _local.axes.pop()
            spec = _default_in(out) if default_out else self.out_axes
            out_axes = _resolve(out, spec, "out_axes")
            none = jtu.tree_map(lambda a: a is None, out_axes, is_leaf=lambda a: a is None)
            kept, moved = eqx.partition(out, none, is_leaf=lambda a: a is None)
            kept_arrays, kept_static = eqx.partition(kept, eqx.is_array)
            for path, leaf in jtu.tree_leaves_with_path(kept_arrays):
                if name in mapped_axes(leaf):
                    mapped_output.append(jtu.keystr(path))
            return moved, kept_arrays, _Static((kept_static, out_axes))

        try:
            moved, kept_arrays, aux = jax.vmap(
                inner,
                in_axes=(in_axes,),
                out_axes=(0, None, None),
                axis_name=name,
                axis_size=self.axis_size,
            )(dynamic)
        except ValueError as err:
            if "out_axes" not in str(err) or not mapped_output:
                raise
            why = (
                "it is inside a module, which comes back as one model for the whole batch"
                if default_out
                else "`out_axes` gives None there"
            )
            raise ValueError(_MSG_MAPPED_STATE.format(path=mapped_output[0], why=why)) from err
        kept_static, out_axes = aux.value
        moved = jtu.tree_map(
            lambda x, a: jax.numpy.moveaxis(x, 0, a) if a else x,
            moved,
            out_axes,
            is_leaf=lambda a: a is None,
        )
        return eqx.combine(moved, kept_arrays, kept_static)


def vmap(
    fun: Callable[_P, _R],
    *,
    in_axes: Any = _DEFAULT,
    out_axes: Any = _DEFAULT,
    axis_name: Hashable | None = None,
    axis_size: int | None = None,
) -> Vmap[_P, _R]:
    """Map `fun` over examples, with models (any `eqx.Module`) in and out unmapped.

    The per-example style of Equinox: write a model for one example and map it over the
    batch. eqstate's layers inside (`BatchNorm`, `Dropout`, `eqstate.next_key`) run per
    example and reduce over the mapped axis, also inside `lax.scan`, `jax.checkpoint` or
    an inner jit: batch statistics are taken over the whole batch, each example gets its
    own random numbers, and the returned model holds one copy of the state, as the
    batch-level call would return it.

    **Arguments:**

    - `fun`: the function or model to map, e.g. `model` or `lambda m, x: m(x)`.
    - `in_axes`: by default every `eqx.Module` in the positional arguments (and `fun`
        itself) is unmapped, every other array is mapped over its leading axis, and
        keyword arguments (`key=`, `inference=`) are unmapped. Otherwise as in
        `eqx.filter_vmap`: an int, `None` or callable `leaf -> int | None` for every
        positional argument, a tuple with one prefix tree per positional argument, or a
        dict from parameter names to those (keyword arguments too). Mapping a module
        (an ensemble) makes its layers run per member, not per example.
    - `out_axes`: by default every `eqx.Module` in the output is unmapped (it must not
        differ between examples) and every other array is stacked on a leading axis;
        otherwise a prefix tree as in `eqx.filter_vmap` (`None` means unmapped).
    - `axis_name`: the name of the mapped axis, for your own `jax.lax.pmean` or for
        layers built with an `axis_name` (Equinox's `BatchNorm(..., axis_name="batch")`).
        eqstate's layers find the axis without being told. By default a fresh name.
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
