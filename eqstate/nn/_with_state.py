from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.tree_util as jtu

from .._kinds import BatchStat, State
from .._module import Module
from .._mutating import mutating


_MSG_MODEL = (
    "WithState(model, state): `model` must be callable as `model(x, state) -> (y, "
    "state)`, got {value!r} ({type})."
)
_MSG_STATE = (
    "WithState(model, state): `state` must be the model's `eqx.nn.State`, got {got}. "
    "Make both with `eqstate.nn.WithState(*eqx.nn.make_with_state(Model)(...))`."
)
_MSG_STATELESS = (
    "WithState(model, state): {cls} holds no `eqx.nn.StateIndex`, so it keeps no state "
    "and needs no WithState: use it directly (as a field of an eqstate module, or in "
    "`eqstate.nn.Sequential`)."
)
_MSG_STALE = (
    "WithState(model, state): this `eqx.nn.State` was already used (Equinox invalidates a "
    "state once `state.set` made a new one). Pass the newest state."
)
_MSG_MISSING = (
    "WithState(model, state): {count} of the model's stateful layers ({where}) have no "
    "entry in `state`: it is not this model's state. Make both together: "
    "`eqx.nn.make_with_state(Model)(...)`."
)
_MSG_RETURN = (
    "WithState: `{model}(..., state)` returned {got}; a model wrapped by WithState must "
    "return `(y, new_state)` with the `eqx.nn.State` it was given, updated (Equinox's "
    "convention for stateful models)."
)
_MSG_LAYOUT = (
    "WithState: `{model}(..., state)` returned a state with other entries than it was "
    "given: {diff}. Return the state the layers updated (`state.set(...)`), not a new one."
)


def _index_leaves(model: Any, state: eqx.nn.State, cls: type) -> set[int]:
    """The ids of `state`'s arrays that belong to the layers of type `cls` in `model`."""
    ids: set[int] = set()
    for layer in jtu.tree_leaves(model, is_leaf=lambda x: isinstance(x, cls)):
        if not isinstance(layer, cls):
            continue
        for index in jtu.tree_leaves(layer, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex)):
            if isinstance(index, eqx.nn.StateIndex):
                ids.update(map(id, jtu.tree_leaves(state.get(index))))
    return ids


def _missing(model: Any, state: eqx.nn.State) -> list[str]:
    """The key paths of `model`'s `StateIndex`es that `state` does not hold."""
    out = []
    for path, index in jtu.tree_leaves_with_path(
        model, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex)
    ):
        if isinstance(index, eqx.nn.StateIndex):
            try:
                state.get(index)
            except (KeyError, ValueError):
                out.append(jtu.keystr(path))
    return out


def _split(leaves: list, is_stat: tuple[bool, ...]) -> tuple[tuple, tuple]:
    """A state's leaves: `(those of BatchNorm layers, the others)`."""
    stats = tuple(x for x, s in zip(leaves, is_stat) if s)
    return stats, tuple(x for x, s in zip(leaves, is_stat) if not s)


class WithState(Module):
    """An Equinox stateful model (or layer) and its `eqx.nn.State`, as one eqstate layer.

    Migrates a model written for `eqx.nn.make_with_state` without changing it: its
    state is held as `BatchStat` (the statistics of `eqx.nn.BatchNorm` layers) and
    `State` kinds (everything else, e.g. `eqx.nn.SpectralNorm`'s vectors), so
    `model.states()`, `eqstate.partition` and `eqstate.grad` see it, and a call returns
    `(y, new_model)` like any eqstate layer.

    The call `wrapper(*args, **kwargs)` runs `model(*args, state, **kwargs)` (Equinox's
    `model(x, state, key=...)`) on a fresh `eqx.nn.State` rebuilt from the held arrays,
    so no state is ever used twice. Under `jax.vmap`, give the vmap the `axis_name` the
    model's `BatchNorm` layers were built with: `eqstate.vmap(model, axis_name="batch")`.

    **Fields:**

    - `model`: the Equinox model, without the initial-state copies that
        `eqx.nn.StateIndex` keeps (`eqx.nn.delete_init_state`).
    - `stats`: the arrays of the state that belong to `eqx.nn.BatchNorm` layers
        (`BatchStat`).
    - `buffers`: the other arrays of the state (`State`).
    - `state`: (a property) the state as an `eqx.nn.State`, to go back to Equinox.

    !!! example

        ```python
        class EqxModel(eqx.Module):  # written for eqx.nn.make_with_state
            linear: eqx.nn.Linear
            bn: eqx.nn.BatchNorm

            def __init__(self, key):
                self.linear = eqx.nn.Linear(3, 16, key=key)
                self.bn = eqx.nn.BatchNorm(16, axis_name="batch", mode="batch")

            def __call__(self, x, state):
                return self.bn(self.linear(x), state)

        model = eqstate.nn.WithState(*eqx.nn.make_with_state(EqxModel)(key=key))
        ys, model = eqstate.vmap(model, axis_name="batch")(xs)
        stats = model.filter(eqstate.BatchStat)  # the BatchNorm's running statistics
        ```
    """

    model: Callable[..., Any]
    stats: tuple[jax.Array, ...] = BatchStat.field()
    buffers: tuple[jax.Array, ...] = State.field()
    layout: tuple[Any, tuple[bool, ...]] = eqx.field(static=True)

    def __init__(self, model: Callable[..., Any], state: eqx.nn.State):
        """**Arguments:**

        - `model`: an Equinox model or layer called as `model(x, state) -> (y, state)`.
        - `state`: its `eqx.nn.State`, as `eqx.nn.make_with_state` returns it.
        """
        if not isinstance(state, eqx.nn.State):
            got = f"{state!r} ({type(state).__name__})"
            if isinstance(model, eqx.nn.State):
                got = f"a {type(state).__name__}; the arguments look swapped: the order is "
                got += "`WithState(model, state)`"
            raise TypeError(_MSG_STATE.format(got=got))
        if not callable(model):
            raise TypeError(_MSG_MODEL.format(value=model, type=type(model).__name__))
        try:
            leaves, treedef = jtu.tree_flatten(state)
        except ValueError as err:
            raise ValueError(_MSG_STALE) from err
        if not any(
            isinstance(x, eqx.nn.StateIndex)
            for x in jtu.tree_leaves(model, is_leaf=lambda x: isinstance(x, eqx.nn.StateIndex))
        ):
            raise ValueError(_MSG_STATELESS.format(cls=type(model).__name__))
        missing = _missing(model, state)
        if missing:
            raise ValueError(_MSG_MISSING.format(count=len(missing), where=", ".join(missing)))
        stats = _index_leaves(model, state, eqx.nn.BatchNorm)
        is_stat = tuple(id(x) in stats for x in leaves)
        self.model = eqx.nn.delete_init_state(model)
        self.stats, self.buffers = _split(leaves, is_stat)
        self.layout = (treedef, is_stat)

    @property
    def state(self) -> eqx.nn.State:
        """A fresh `eqx.nn.State` holding this module's state.

        **Returns:**

        An `eqx.nn.State`, to call the Equinox model directly: `model.model(x,
        model.state)`.
        """
        treedef, is_stat = self.layout
        stats, buffers = iter(self.stats), iter(self.buffers)
        leaves = [next(stats) if s else next(buffers) for s in is_stat]
        return jtu.tree_unflatten(treedef, leaves)

    @mutating
    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        """Run `model(*args, state, **kwargs)`; returns `(y, new_with_state)`.

        **Arguments:**

        - `*args`: the model's arguments before its state (usually `x`).
        - `**kwargs`: its keyword arguments (`key=`, `inference=`, ...).

        **Returns:**

        `(y, new_with_state)`: what the model returned beside the state, and this
        module holding the new state.
        """
        name = type(self.model).__name__
        out = self.model(*args, self.state, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2 and isinstance(out[1], eqx.nn.State)):
            got = f"a {type(out).__name__}"
            if isinstance(out, tuple):
                got = f"a tuple of {len(out)} ({', '.join(type(o).__name__ for o in out)})"
            raise TypeError(_MSG_RETURN.format(model=name, got=got))
        y, new_state = out
        leaves, treedef = jtu.tree_flatten(new_state)
        old_treedef, is_stat = self.layout
        if treedef != old_treedef:
            old, new = set(old_treedef.node_data()[1]), set(treedef.node_data()[1])
            diff = ", ".join(
                [f"{k!r} is new" for k in sorted(map(str, new - old))]
                + [f"{k!r} is missing" for k in sorted(map(str, old - new))]
            )
            raise ValueError(_MSG_LAYOUT.format(model=name, diff=diff or "another structure"))
        self.stats, self.buffers = _split(leaves, is_stat)
        return y
