"""Hyperparameters of `optax.inject_hyperparams` states: set them (`with_hyperparams`),
and show them read-only in `opt.opt_state`, where a change would be lost."""

from collections.abc import Callable
from typing import Any

import jax.numpy as jnp
import jax.tree_util as jtu

from ._checks import category
from ._convert import is_array_like


_MSG_READ_ONLY = (
    "opt.opt_state is a read-only view: it is rebuilt from the optimizer's leaves on every "
    "access, so a change to it would be silently lost. To change a hyperparameter, make a "
    "new optimizer: `opt = opt.with_hyperparams({key}=...)` (the transformation must be "
    "built with `optax.inject_hyperparams`, e.g. "
    "`optax.inject_hyperparams(optax.adam)(learning_rate=1e-3)`)."
)
_MSG_NO_HYPERPARAM = (
    "Optimizer.with_hyperparams: {names} {is_} not among the hyperparameters this "
    "optimizer holds in its state; {available}. Only a transformation built with "
    "`optax.inject_hyperparams` keeps its hyperparameters in its state, e.g. "
    "`eqstate.Optimizer(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), model)`."
)
_MSG_SCHEDULED = (
    "Optimizer.with_hyperparams: {name} follows a schedule in this optimizer; optax "
    "recomputes it from the schedule at every step, so a value set here would be "
    "overwritten. Inject a constant {name} to set it by hand, or change the schedule."
)
_MSG_HYPERPARAM_VALUE = (
    "Optimizer.with_hyperparams: {name} holds {old} values (from the value given to "
    "`optax.inject_hyperparams`), but was given {new!r}; {why}. Give a number, or inject "
    "a value of the right type when building the transformation (e.g. "
    "`{name}=1.0` rather than `{name}=1`)."
)
_MSG_HYPERPARAM_SHAPE = (
    "Optimizer.with_hyperparams: {name} must be a value of shape {old}, as the optimizer "
    "holds it, got shape {new}."
)


def set_hyperparams(state: Any, values: dict[str, Any]) -> Any:
    """`state` with the `optax.inject_hyperparams` hyperparameters in `values` set, in
    every injected state that has them; an error names what cannot be set."""
    found: set[str] = set()
    available: set[str] = set()

    def set_values(node: Any) -> Any:
        if not _is_injected(node):
            return node
        hyper, schedules = node.hyperparams, getattr(node, "hyperparams_states", None) or {}
        available.update(hyper)
        new = dict(hyper)
        for name, value in values.items():
            if name in schedules:
                raise ValueError(_MSG_SCHEDULED.format(name=name))
            if name in hyper:
                new[name] = _like(value, hyper[name], name)
                found.add(name)
        return node._replace(hyperparams=new)

    state = _map_nodes(state, set_values)
    missing = sorted(set(values) - found)
    if missing:
        raise ValueError(
            _MSG_NO_HYPERPARAM.format(
                names=", ".join(missing),
                is_="is" if len(missing) == 1 else "are",
                available=(
                    f"it holds {', '.join(sorted(available))}" if available else "it holds none"
                ),
            )
        )
    return state


def _is_injected(node: Any) -> bool:
    """Whether `node` is the state of `optax.inject_hyperparams` (a NamedTuple)."""
    return isinstance(node, tuple) and isinstance(getattr(node, "hyperparams", None), dict)


def _like(value: Any, old: Any, name: str) -> Any:
    dtype = jnp.result_type(old)
    boolean = isinstance(value, bool) or getattr(value, "dtype", None) == jnp.bool_
    if not is_array_like(value) or (boolean and dtype != jnp.bool_):
        why = "it is not a number"
        raise TypeError(_MSG_HYPERPARAM_VALUE.format(name=name, old=dtype, new=value, why=why))
    if category(value) > category(old):
        why = "the cast would lose information"
        raise TypeError(_MSG_HYPERPARAM_VALUE.format(name=name, old=dtype, new=value, why=why))
    value = jnp.asarray(value)
    shape = jnp.shape(old)
    if value.shape != shape:
        raise ValueError(_MSG_HYPERPARAM_SHAPE.format(name=name, old=shape, new=value.shape))
    return value.astype(jnp.result_type(old))


def _map_nodes(x: Any, fn: Callable[[Any], Any]) -> Any:
    """Apply `fn` bottom-up to the tuples, NamedTuples, lists and dicts of `x`."""
    if type(x) is dict:
        return fn({k: _map_nodes(v, fn) for k, v in x.items()})
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return fn(type(x)(*(_map_nodes(v, fn) for v in x)))
    if type(x) in (tuple, list):
        return fn(type(x)(_map_nodes(v, fn) for v in x))
    return x


class _ReadOnlyDict(dict):
    """The hyperparameters in `opt.opt_state`: refuse changes; a pytree node like a dict."""

    def _refuse(self, key: Any = None) -> Any:
        key = key if isinstance(key, str) and key.isidentifier() else "name"
        raise TypeError(_MSG_READ_ONLY.format(key=key))

    def __setitem__(self, key: Any, value: Any) -> None:
        self._refuse(key)

    def __delitem__(self, key: Any) -> None:
        self._refuse(key)

    def setdefault(self, key: Any, default: Any = None) -> Any:
        self._refuse(key)

    def pop(self, key: Any, *default: Any) -> Any:
        self._refuse(key)

    def update(self, *args: Any, **kwargs: Any) -> None:
        given = dict(*args, **kwargs)
        self._refuse(next(iter(given), None))

    def __ior__(self, other: Any) -> Any:
        self._refuse(next(iter(dict(other)), None))

    def clear(self) -> None:
        self._refuse()

    def popitem(self) -> Any:
        self._refuse()

    def __reduce__(self) -> Any:
        return (_ReadOnlyDict, (dict(self),))


def _keys(d: dict) -> list:
    try:
        return sorted(d)
    except TypeError:
        return list(d)


jtu.register_pytree_with_keys(
    _ReadOnlyDict,
    lambda d: ([(jtu.DictKey(k), d[k]) for k in _keys(d)], tuple(_keys(d))),
    lambda keys, children: _ReadOnlyDict(zip(keys, children)),
    flatten_func=lambda d: ([d[k] for k in _keys(d)], tuple(_keys(d))),
)


def read_only(state: Any) -> Any:
    """`state` with the `hyperparams` dict of each injected state made read-only."""

    def freeze(node: Any) -> Any:
        if _is_injected(node):
            return node._replace(hyperparams=_ReadOnlyDict(node.hyperparams))
        return node

    return _map_nodes(state, freeze)
