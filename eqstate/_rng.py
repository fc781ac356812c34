"""Module-owned randomness: take a fresh subkey and advance the stored key."""

from collections.abc import Hashable
from typing import Any

import jax

from ._draft import drafts, frame_of
from ._module import Module, _rng_fields
from ._vmap import UNSET, device_axes, layer_axes


_MSG_NOT_DRAFT = (
    "eqstate.next_key(self) advances the key stored in {cls}, so it must be called on "
    "`self` inside a `@eqstate.mutating` method of {cls}. Decorate the method with "
    "`@eqstate.mutating`; it then returns `(result, new_module)`."
)
_MSG_WHICH = (
    "eqstate.next_key could not choose a key field of {cls}: it has {found}. Pass the "
    "field's name, e.g. `eqstate.next_key(self, {example!r})`, or declare exactly one "
    "field with `eqstate.Rng.field()`."
)
_MSG_PER_EXAMPLE = (
    "eqstate.next_key({cls}) was called per example (under jax.vmap, with the {cls} "
    "itself not mapped) without `axis_name`: every example would draw the same random "
    "numbers, and jax.vmap would give the returned model's key a batch axis. Map the "
    "model with `eqstate.vmap(model)(xs)` (keys are then folded with the example's "
    "index), pass the vmapped axis, `eqstate.next_key(self, axis_name=...)`, or call "
    "the model on the whole batch."
)


def _rng_field(cls: type) -> str:
    names = _rng_fields(cls)
    if len(names) != 1:
        found = "no Rng field" if not names else "several: " + ", ".join(names)
        raise ValueError(_MSG_WHICH.format(cls=cls.__name__, found=found, example="key"))
    return names[0]


def next_key(
    module: Module, name: str | None = None, *, axis_name: Hashable | tuple[Hashable, ...] = None
) -> jax.Array:
    """Return a fresh subkey and advance the key stored in `module`'s `Rng` field.

    Call it on `self` inside a `@eqstate.mutating` method; the advanced key is part of
    the model that the method returns, so every call draws new numbers and the stream
    is reproducible from the seed.

    **Arguments:**

    - `module`: the module being mutated (`self`).
    - `name`: the field holding the key; may be omitted when the class has exactly one
        `Rng` field.
    - `axis_name`: a mapped axis name (or several) of `vmap`, `pmap` or `shard_map`. The
        subkey is folded with the index along each, giving a different stream per
        example or device while the stored key stays in step everywhere. Called per
        example inside `eqstate.vmap`, the mapped axes are used without it; under
        `eqstate.data_parallel`, the device axis too (per example, the index is the
        example's index in the whole batch, so the numbers are those of one device).

    Typed keys (`jax.random.key`) and raw `uint32` keys (`jax.random.PRNGKey`) both work;
    the subkey is of the same kind as the stored key.

    **Returns:**

    A fresh subkey, of the same kind as the stored key; the stored key is advanced in
    the model that the mutating method returns.

    !!! example

        ```python
        class Noisy(eqstate.Module):
            key: jax.Array = eqstate.Rng.field()

            @eqstate.mutating
            def __call__(self, x):
                return x + jax.random.normal(eqstate.next_key(self), x.shape)

        noisy = Noisy(jax.random.key(0))
        y1, noisy = noisy(jnp.zeros(3))
        y2, noisy = noisy(jnp.zeros(3))  # other numbers: the key moved on
        ```
    """
    cls = type(module)
    if module not in drafts:
        raise RuntimeError(_MSG_NOT_DRAFT.format(cls=cls.__name__))
    if name is None:
        name = _rng_field(cls)
    key: Any = getattr(module, name)
    new_key, subkey = jax.random.split(key)
    setattr(module, name, new_key)
    if axis_name is None:
        frame = frame_of(module)
        args, original = (frame.args, frame.original) if frame is not None else ((), module)
        axes = layer_axes(f"eqstate.next_key({cls.__name__})", None, UNSET, args, original)
        if axes.per_example and (axes.uncovered or not axes.names):
            raise ValueError(_MSG_PER_EXAMPLE.format(cls=cls.__name__))
        names = axes.names
    else:
        names = axis_name if isinstance(axis_name, tuple) else (axis_name,)
    return fold_axes(subkey, names)


def fold_axes(key: jax.Array, names: tuple[Hashable, ...]) -> jax.Array:
    """`key` folded with the index along each mapped axis in `names`, in order.

    The device axes of `eqstate.data_parallel` among them are not folded one by one:
    with an example axis, the first example axis is folded with the example's index in
    the whole batch (its shard's offset plus its index in the shard, as one device with
    the whole batch would fold it); without one, with the device's index.
    """
    devices = tuple(n for n in names if n in device_axes())
    rest = [n for n in names if n not in devices]
    if devices:
        index = device_index(devices)
        if rest:
            first = rest.pop(0)
            index = index * jax.lax.psum(1, first) + jax.lax.axis_index(first)
        key = jax.random.fold_in(key, index)
    for n in rest:
        key = jax.random.fold_in(key, jax.lax.axis_index(n))
    return key


def device_index(names: tuple[Hashable, ...]) -> jax.Array:
    """This device's index along the mesh axes `names` taken together (row-major), the
    index of its shard of a batch split over them."""
    index = jax.lax.axis_index(names[0])
    for n in names[1:]:
        index = index * jax.lax.psum(1, n) + jax.lax.axis_index(n)
    return index
