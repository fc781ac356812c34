"""`eqstate.data_parallel`: a step under `shard_map` whose gradients, batch statistics,
metrics and random numbers are those of one device with the whole batch."""

import functools as ft
import math
from collections.abc import Callable, Hashable
from typing import Any, Literal, ParamSpec, TypeVar, overload

import equinox as eqx
import jax
import jax.tree_util as jtu
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from ._jit import Jit, jit
from ._retrace import argpath
from ._vmap import _local, device_axes, is_module


_P = ParamSpec("_P")
_R = TypeVar("_R")
_REPLICATED = PartitionSpec()

_MSG_PER_DEVICE = (
    "eqstate.data_parallel({name}): output{path} differs between devices (it depends on "
    "each device's shard of the batch), but it is returned replicated (`out_specs` "
    "{spec}), which would keep device 0's value alone. Reduce it over the devices inside "
    "the function: `jax.lax.pmean(x, {axis!r})` for a mean over the batch, `psum` for a "
    "total. (eqstate's layers, metrics and `eqstate.value_and_grad` / `eqstate.grad` "
    "reduce by themselves.) To return it split by device, e.g. per-example predictions, "
    "pass `out_specs=` with {axis!r} at that output, such as `PartitionSpec({axis!r})`."
)
_MSG_SHARD = (
    "eqstate.data_parallel({name}): {path} has shape {shape}; it is not inside an "
    "`eqx.Module`, so its leading axis is split over the {n} devices of mesh axis "
    "{axis!r}, and {size} is not a multiple of {n}. Give every batch a multiple of {n} "
    "examples (pad or drop a short last batch), or pass an array meant for every device "
    "inside a module, which is replicated."
)
_MSG_AXIS = (
    "eqstate.data_parallel(axis_name={axis!r}): the mesh has no such axis; its axes are "
    "{names}. Pass the mesh axis to split the batch over."
)
_MSG_MESH = (
    "eqstate.data_parallel(mesh=...) must be a jax.sharding.Mesh, got {got}. Make one "
    "with `jax.make_mesh((jax.device_count(),), ('data',))`."
)
_MSG_OLD_JAX = (
    "eqstate.data_parallel needs `jax.shard_map` with `check_vma` (JAX 0.7 or newer); "
    "this is JAX {version}."
)


# --- reductions over the device axes, for layers, metrics and gradients ----------------


def _varying(x: Any) -> frozenset | None:
    """The mesh axes along which `x` may differ under `shard_map(check_vma=True)`, or
    `None` where this JAX does not say (duck-typed: `vma` up to JAX 0.9, then
    `manual_axis_type.varying`)."""
    try:
        aval = jax.typeof(x)
    except TypeError:
        return frozenset()  # not an array: the same everywhere
    vma = getattr(aval, "vma", None)
    if vma is None:
        vma = getattr(getattr(aval, "manual_axis_type", None), "varying", None)
    return None if vma is None else frozenset(vma)


def varying_devices(x: Any) -> tuple[Hashable, ...]:
    """The device axes of `eqstate.data_parallel` along which `x` differs (all of them
    where JAX does not say)."""
    axes = device_axes()
    if not axes:
        return ()
    vma = _varying(x)
    return axes if vma is None else tuple(a for a in axes if a in vma)


def device_sum(x: Any) -> Any:
    """`x` summed over the devices it differs between: the total over the whole batch
    of a total over a device's shard; `x` itself where it is the same everywhere."""
    names = varying_devices(x)
    return jax.lax.psum(x, names) if names else x


def device_mean(x: Any) -> Any:
    """`x` averaged over the devices it differs between (see `device_sum`)."""
    names = varying_devices(x)
    return jax.lax.pmean(x, names) if names else x


def device_count(x: Any) -> int:
    """How many devices' shards `x` stands for: the product of the sizes of the device
    axes it differs along (a count of `x.size` values is `x.size * device_count(x)`)."""
    return math.prod(jax.lax.psum(1, n) for n in varying_devices(x))


_MSG_ROWS = (
    "{name}: every array outside a module is split along its leading axis as the batch "
    "(over mesh axis {axis!r}), but {a} has {na} rows and {b} has {nb}. An array that is "
    "not per example (a lookup table, a PRNG key, a learning rate schedule) belongs in a "
    "module (`eqx.Module` fields are replicated), or in the step's closure."
)


# --- data_parallel ---------------------------------------------------------------------


def _is_spec(x: Any) -> bool:
    return isinstance(x, PartitionSpec)


def _spread(specs: Any, tree: Any) -> list[PartitionSpec]:
    """The spec of each leaf of `tree`, from a prefix tree of specs."""
    full = jtu.tree_map(
        lambda s, sub: jtu.tree_map(lambda _: s, sub), specs, tree, is_leaf=_is_spec
    )
    return jtu.tree_leaves(full, is_leaf=_is_spec)


def _in_specs(dynamic: Any, axis: Hashable, n: int, name: str) -> Any:
    """`PartitionSpec()` for every array inside a module or of rank 0, else
    `PartitionSpec(axis)`; raises, naming the argument, for a leading axis that the
    devices do not divide."""

    def one(path: tuple, x: Any) -> Any:
        if is_module(x):
            return PartitionSpec()
        if np.ndim(x) == 0:
            return PartitionSpec()
        if x.shape[0] % n:
            where = argpath(path)
            raise ValueError(
                _MSG_SHARD.format(
                    name=name, path=where, shape=tuple(x.shape), n=n, axis=axis, size=x.shape[0]
                )
            )
        return PartitionSpec(axis)

    specs = jtu.tree_map_with_path(one, dynamic, is_leaf=is_module)
    split = [
        (argpath(path), x.shape[0])
        for (path, x), spec in zip(
            jtu.tree_flatten_with_path(dynamic, is_leaf=is_module)[0],
            jtu.tree_leaves(specs, is_leaf=_is_spec),
        )
        if spec != PartitionSpec()
    ]
    for where, rows in split[1:]:
        if rows != split[0][1]:
            raise ValueError(
                _MSG_ROWS.format(
                    name=name, a=split[0][0], na=split[0][1], b=where, nb=rows, axis=axis
                )
            )
    return specs


def _check_replicated(out: Any, specs: Any, axis: Hashable, name: str) -> None:
    """Raise, naming the first output that differs between devices but whose spec
    does not split it over `axis`."""
    for (path, leaf), spec in zip(jtu.tree_leaves_with_path(out), _spread(specs, out)):
        split = any(axis in (e if isinstance(e, tuple) else (e,)) for e in spec)
        vma = _varying(leaf)
        if not split and vma is not None and axis in vma:
            raise ValueError(
                _MSG_PER_DEVICE.format(name=name, path=jtu.keystr(path), spec=spec, axis=axis)
            )


def _explicit(mesh: Mesh) -> bool:
    explicit = getattr(getattr(jax.sharding, "AxisType", None), "Explicit", None)
    return explicit is not None and explicit in getattr(mesh, "axis_types", ())


class _DataParallel:
    """The function `eqstate.data_parallel` compiles: `fun` under `shard_map`."""

    def __init__(self, fun: Callable[..., Any], mesh: Mesh, axis: Hashable, out_specs: Any):
        self.fun = fun
        self.mesh = mesh
        self.axis = axis
        self.out_specs = out_specs
        self.name = getattr(fun, "__qualname__", type(fun).__qualname__)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        dynamic, static = eqx.partition((args, kwargs), eqx.is_array)
        n = self.mesh.shape[self.axis]
        in_specs = _in_specs(dynamic, self.axis, n, self.name)
        if _explicit(self.mesh):  # shard_map takes explicit-axis inputs as they are placed
            leaves, treedef = jtu.tree_flatten(dynamic)
            specs = _spread(in_specs, dynamic)
            dynamic = treedef.unflatten(
                [
                    jax.sharding.reshard(x, NamedSharding(self.mesh, s))
                    for x, s in zip(leaves, specs)
                ]
            )
        out_static: list[Any] = []

        def body(dynamic: Any) -> Any:
            a, kw = eqx.combine(dynamic, static)
            _local.devices.append(self.axis)
            try:
                out = self.fun(*a, **kw)
            finally:
                _local.devices.pop()
            out_dynamic, out_static_ = eqx.partition(out, eqx.is_array)
            _check_replicated(out_dynamic, self.out_specs, self.axis, self.name)
            out_static.append(out_static_)
            return out_dynamic

        out_dynamic = jax.shard_map(
            body, mesh=self.mesh, in_specs=(in_specs,), out_specs=self.out_specs, check_vma=True
        )(dynamic)
        return eqx.combine(out_dynamic, out_static[0])


@overload
def data_parallel(
    fun: Callable[_P, _R],
    mesh: Mesh | None = None,
    *,
    axis_name: Hashable = "data",
    out_specs: Any = _REPLICATED,
    donate: Literal["all", "all-except-first", "none"] = "none",
    max_traces: int | None = None,
) -> Jit[_P, _R]: ...


@overload
def data_parallel(
    fun: None = None,
    mesh: Mesh | None = None,
    *,
    axis_name: Hashable = "data",
    out_specs: Any = _REPLICATED,
    donate: Literal["all", "all-except-first", "none"] = "none",
    max_traces: int | None = None,
) -> Callable[[Callable[_P, _R]], Jit[_P, _R]]: ...


def data_parallel(
    fun: Callable[_P, _R] | None = None,
    mesh: Mesh | None = None,
    *,
    axis_name: Hashable = "data",
    out_specs: Any = _REPLICATED,
    donate: Literal["all", "all-except-first", "none"] = "none",
    max_traces: int | None = None,
) -> Jit[_P, _R] | Callable[[Callable[_P, _R]], Jit[_P, _R]]:
    """Compile `fun` to run on every device of `mesh`, each on its shard of the batch,
    with the numbers of one device running it on the whole batch.

    `fun` runs under `jax.shard_map(..., check_vma=True)` inside `eqstate.jit`. Every
    array inside an `eqx.Module` among the arguments (model, optimizer, EMA, metrics) is
    replicated; every other array (the batch) is split along its leading axis over the
    mesh axis `axis_name`; non-array leaves (the `inference` flags, static settings)
    stay Python values, so nothing compiles again. Inside:

    - `eqstate.value_and_grad` / `eqstate.grad` differentiate the mean of the loss over
        the devices: the gradient of the loss over the whole batch, identical on every
        device (a plain `jax.grad` of a device's loss would give the sum over devices,
        8 times too large on 8 devices).
    - `eqstate.nn.BatchNorm` takes its statistics over the whole batch.
    - `eqstate.nn.Dropout` draws for each row the mask of that row in the whole batch
        (so the masks differ between devices); `eqstate.next_key` gives each device its
        own numbers (per example under `eqstate.vmap`: each example's own, as on one
        device).
    - `eqstate.metrics` add up the batches of every device; `Metric.all_reduce` over
        `axis_name` has nothing left to do.

    Every output is replicated (by default). A value that differs between devices and is
    returned replicated is an error naming the output, never device 0's value. Layers
    built with an `axis_name` of their own keep reducing over it.

    **Arguments:**

    - `fun`: the step, e.g. `train_step(model, opt, x, y)`. May be omitted, to use
        `data_parallel(mesh=mesh, ...)` as a decorator.
    - `mesh`: a `jax.sharding.Mesh` with an axis `axis_name`; by default a 1-D mesh over
        every device.
    - `axis_name`: the mesh axis the batch is split over (its size must divide every
        batch); other mesh axes replicate.
    - `out_specs`: as in `shard_map`, a prefix tree of `PartitionSpec`s for the output;
        default `PartitionSpec()`: everything replicated. Give `PartitionSpec(axis_name)`
        at an output to return it split by device (per-example predictions).
    - `donate`, `max_traces`: as in `eqstate.jit`.

    **Returns:**

    An `eqstate.jit` callable (with `traces`, `retrace_reasons`). Its outputs are
    replicated over `mesh`, so the next call takes them as they are.

    !!! example

        ```python
        mesh = jax.make_mesh((jax.device_count(),), ("data",))


        @eqstate.data_parallel(mesh=mesh, max_traces=1)
        def train_step(model, opt, metrics, x, y):  # x, y: the whole batch
            (loss, (model, logits)), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(
                model, x, y
            )
            model, opt = opt.update(grads, model)
            _, metrics = metrics.update(loss=loss, logits=logits, labels=y)
            return model, opt, metrics
        ```
    """
    if fun is None:
        return ft.partial(  # pyright: ignore[reportReturnType]
            data_parallel,
            mesh=mesh,
            axis_name=axis_name,
            out_specs=out_specs,
            donate=donate,
            max_traces=max_traces,
        )
    if not hasattr(jax, "shard_map"):
        raise RuntimeError(_MSG_OLD_JAX.format(version=jax.__version__))
    if mesh is None:
        mesh = Mesh(np.array(jax.devices()), (axis_name,))
    if not isinstance(mesh, Mesh):
        raise TypeError(_MSG_MESH.format(got=f"{mesh!r} ({type(mesh).__name__})"))
    if axis_name not in mesh.axis_names:
        raise ValueError(_MSG_AXIS.format(axis=axis_name, names=mesh.axis_names))
    run = _DataParallel(fun, mesh, axis_name, out_specs)

    @ft.wraps(fun)
    def step(*args: Any, **kwargs: Any) -> Any:
        return run(*args, **kwargs)

    return jit(step, donate=donate, max_traces=max_traces)  # pyright: ignore[reportReturnType]
