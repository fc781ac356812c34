import inspect
from collections.abc import Callable, Iterator, Sequence
from typing import Any, overload

import equinox as eqx
import jax.random as jr
from jaxtyping import PRNGKeyArray

from .._module import Module
from .._mutating import is_mutating, mutating


_MSG_NOT_CALLABLE = (
    "Sequential(layers=...) takes a sequence of layers (modules or functions), but "
    "layers[{i}] is {value!r} ({type}), which cannot be called."
)
_MSG_LAYERS = (
    "Sequential(layers=...) takes a sequence of layers, such as a list, got {value!r} ({type})."
)
_MSG_EQX_STATEFUL = (
    "Sequential: layers[{i}] is {cls}, an Equinox stateful layer (or one holding such "
    "layers) that keeps its state in an `eqx.nn.State`. Use eqstate's own layers (e.g. "
    "`eqstate.nn.BatchNorm`, `eqstate.nn.SpectralNorm`), or wrap the Equinox layer with "
    "its state: `eqstate.nn.WithState(*eqx.nn.make_with_state({cls})(...))`."
)
_MSG_HIDDEN_PAIR = (
    "Sequential: layers[{i}] returned `(y, new {cls})`, the pair of an eqstate layer's "
    "mutating call, but is not itself an eqstate layer (e.g. a `functools.partial` or a "
    "bound method of one), so its new state would be lost. Put the layer itself in the "
    "sequence."
)
_MSG_INDEX = "Sequential indices must be ints or slices, got {value!r} ({type})."


def _name(layer: Any) -> str:
    cls = type(layer)
    prefix = "eqx.nn." if cls.__module__.startswith("equinox") else ""
    return prefix + cls.__qualname__


def _eqx_stateful(layer: Any) -> bool:
    return isinstance(layer, eqx.nn.StatefulLayer) and layer.is_stateful()


def _takes_key(fn: Any) -> bool:
    """Whether calling `fn` may pass `key=` (a `key` parameter, or `**kwargs`)."""
    target = type(fn).__call__ if isinstance(fn, eqx.Module) else fn
    try:
        params = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):  # no signature (some builtins): Equinox's default
        return isinstance(fn, eqx.Module)
    return any(p.name == "key" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


class Sequential(Module):
    """A sequence of layers applied in order, threading the state of eqstate layers.

    `eqx.nn.Sequential` for models that mix eqstate layers (whose calls return
    `(y, new_layer)`, such as `BatchNorm` and `Dropout`), stateless Equinox layers
    (`eqx.nn.Linear`, `eqx.nn.Lambda`, ...) and plain functions (`jax.nn.relu`). As with
    any eqstate layer, a call returns `(y, new_sequential)`.

    Following `eqx.nn.Sequential`: a `key` given to the call is split into one subkey
    per layer and each is passed as `key=` to the layers that take a `key` argument;
    `seq[i]` is a layer, `seq[i:j]` a `Sequential`; `len` and iteration work.

    !!! example

        ```python
        model = eqstate.nn.Sequential([
            eqx.nn.Linear(3, 32, key=k1),
            eqstate.nn.BatchNorm(32),
            jax.nn.relu,
            eqstate.nn.Dropout(0.1, key=k2),
            eqx.nn.Linear(32, 1, key=k3),
        ])
        y, model = eqstate.vmap(model)(xs)  # per example, as eqx.nn.Linear takes one
        ```
    """

    layers: tuple[Callable[..., Any], ...]

    def __init__(self, layers: Sequence[Callable[..., Any]]):
        """**Arguments:**

        - `layers`: the layers, in order: eqstate modules, Equinox modules or callables.
        """
        if isinstance(layers, (str, bytes)) or not isinstance(layers, (Sequence, Iterator)):
            raise TypeError(_MSG_LAYERS.format(value=layers, type=type(layers).__name__))
        layers = tuple(layers)
        for i, layer in enumerate(layers):
            if not callable(layer):
                raise TypeError(
                    _MSG_NOT_CALLABLE.format(i=i, value=layer, type=type(layer).__name__)
                )
            if _eqx_stateful(layer):
                raise TypeError(_MSG_EQX_STATEFUL.format(i=i, cls=_name(layer)))
        self.layers = layers

    @mutating
    def __call__(self, x: Any, *, key: PRNGKeyArray | None = None) -> Any:
        """Run `x` through the layers; returns `(y, new_sequential)`.

        **Arguments:**

        - `x`: passed to the first layer.
        - `key`: if given, split into a subkey per layer, passed as `key=` to each layer
            that takes one.

        **Returns:**

        `(y, new_sequential)`: the last layer's output, and this sequence with the new
        state of every eqstate layer in it.
        """
        keys: Any = [None] * len(self.layers) if key is None else jr.split(key, len(self.layers))
        new = list(self.layers)
        for i, (layer, k) in enumerate(zip(self.layers, keys)):
            call: Any = layer
            if _eqx_stateful(layer):
                raise TypeError(_MSG_EQX_STATEFUL.format(i=i, cls=_name(layer)))
            kwargs = {"key": k} if k is not None and _takes_key(layer) else {}
            if isinstance(layer, Module) and is_mutating(type(layer).__call__):
                x, new[i] = call(x, **kwargs)
            else:
                x = call(x, **kwargs)
                if isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], Module):
                    raise TypeError(_MSG_HIDDEN_PAIR.format(i=i, cls=type(x[1]).__name__))
        self.layers = tuple(new)
        return x

    @overload
    def __getitem__(self, i: int) -> Callable[..., Any]: ...
    @overload
    def __getitem__(self, i: slice) -> "Sequential": ...
    def __getitem__(self, i: int | slice) -> "Callable[..., Any] | Sequential":
        if isinstance(i, slice):
            return Sequential(self.layers[i])
        if isinstance(i, int) and not isinstance(i, bool):
            return self.layers[i]
        raise TypeError(_MSG_INDEX.format(value=i, type=type(i).__name__))

    def __iter__(self) -> Iterator[Callable[..., Any]]:
        yield from self.layers

    def __len__(self) -> int:
        return len(self.layers)
