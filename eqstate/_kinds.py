"""Kinds: plain classes that tag dataclass fields, and the field specifiers that set them."""

import abc
import dataclasses
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import equinox as eqx

from ._convert import is_key_like, to_strong


KIND_KEY = "eqstate.kind"
FIXED_SHAPE_KEY = "eqstate.fixed_shape"

if TYPE_CHECKING:
    # To type checkers a kind is an abstract class (its `__init__` is abstract), so that
    # `eqstate.State()` is reported (pyright: reportAbstractUsage). At run time kinds are
    # plain classes: filters call `issubclass` on them per leaf, at `type`'s speed.
    _KindMeta = abc.ABCMeta
else:
    _KindMeta = type


class Kind(metaclass=_KindMeta):
    """Base class of every field kind.

    A kind is a plain class: it is never instantiated. Subclass it (or one of the
    built-in kinds) to make your own; a filter for a kind matches its subclasses too.

    !!! example

        ```python
        class Cache(eqstate.State):
            pass

        class Model(eqstate.Module):
            cache: jax.Array = Cache.field()
        ```
    """

    @abc.abstractmethod
    def __init__(self) -> None:
        raise TypeError(
            f"{type(self).__name__} is a kind, used as a class: declare fields with "
            f"`{type(self).__name__}.field()` and filter with `{type(self).__name__}` "
            "itself; it is never instantiated."
        )

    @classmethod
    def field(
        cls,
        *,
        default: Any = dataclasses.MISSING,
        default_factory: Any = dataclasses.MISSING,
        init: bool = True,
        repr: bool = True,
        converter: Callable[[Any], Any] | None = None,
        static: bool = False,
        fixed_shape: bool = True,
        **kwargs: Any,
    ) -> Any:
        """Declare a field of this kind. Same as `eqstate.field(kind=cls, ...)`.

        **Arguments:**

        As for `eqstate.field`, less `kind`.

        **Returns:**

        A dataclass field, to assign in the class body of an `eqstate.Module`.

        !!! example

            ```python
            class Counter(eqstate.Module):
                count: jax.Array = eqstate.State.field(default=0)

            counter = Counter()  # count: a strongly typed int32 array
            ```
        """
        return field(
            kind=cls,
            default=default,
            default_factory=default_factory,
            init=init,
            repr=repr,
            converter=converter,
            static=static,
            fixed_shape=fixed_shape,
            **kwargs,
        )


class Param(Kind):
    """Trainable parameters. Every leaf not under a declared field is a `Param`.

    `model.parameters()`, `eqstate.value_and_grad` and `eqstate.Optimizer` take the
    inexact-array `Param` leaves by default.

    !!! example

        ```python
        class Linear(eqstate.Module):
            weight: jax.Array  # undeclared: Param
            bias: jax.Array = eqstate.Param.field()  # the same, said explicitly

        linear = Linear(jnp.ones((2, 3)), jnp.zeros(2))
        params = eqstate.filter(linear, eqstate.Param)  # both arrays
        ```
    """


class State(Kind):
    """Non-trainable state, updated by the model itself (counters, running values).

    Array values given to a `State` field in `__init__` are converted to strongly typed
    JAX arrays, so state is never a static Python value. A filter for `State` matches
    its subclasses `BatchStat`, `Rng` and `OptState` too.

    !!! example

        ```python
        class Average(eqstate.Module):
            count: jax.Array = eqstate.State.field(default=0)
            total: jax.Array = eqstate.State.field(default=0.0)

        avg = Average()
        state = avg.states()  # count and total; the same as eqstate.filter(avg, eqstate.State)
        ```
    """


class BatchStat(State):
    """Running statistics of a batch, such as `BatchNorm`'s mean and variance.

    A subclass of `State`: never trained, matched by a `State` filter too.

    !!! example

        ```python
        bn = eqstate.nn.BatchNorm(16)
        stats = eqstate.filter(bn, eqstate.BatchStat)  # running_mean, running_var
        ```
    """


class Rng(State):
    """A PRNG key owned by the module.

    A subclass of `State`. `eqstate.next_key(self)` draws a subkey from it inside a
    `@eqstate.mutating` method and stores the advanced key.

    !!! example

        ```python
        class Noisy(eqstate.Module):
            key: jax.Array = eqstate.Rng.field()

            @eqstate.mutating
            def __call__(self, x):
                return x + jax.random.normal(eqstate.next_key(self), x.shape)

        noisy = Noisy(jax.random.key(0))
        y, noisy = noisy(jnp.zeros(3))  # noisy.key has moved on
        ```
    """


class OptState(State):
    """Optimiser state.

    A subclass of `State`: `eqstate.Optimizer` keeps optax's state in a field of this
    kind, so it is saved, loaded and sharded by kind like any other state.

    !!! example

        ```python
        opt = eqstate.Optimizer(optax.adam(1e-3), model)
        opt_state = eqstate.filter(opt, eqstate.OptState)  # Adam's moments and the step
        ```
    """


_MSG_RNG_DEFAULT = (
    "eqstate.{kind}.field(default={default!r}): an `Rng` field holds a PRNG key, not "
    "{default!r}. Give it a key when the module is built, or declare "
    "`default_factory=lambda: jax.random.key(0)`."
)


def _check_kind(kind: Any) -> type[Kind]:
    if not (isinstance(kind, type) and issubclass(kind, Kind)):
        raise TypeError(
            f"eqstate.field(kind=...) expects a subclass of eqstate.Kind (such as "
            f"eqstate.State), got {kind!r}."
        )
    return kind


def field(
    *,
    kind: type[Kind] = Param,
    default: Any = dataclasses.MISSING,
    default_factory: Any = dataclasses.MISSING,
    init: bool = True,
    repr: bool = True,
    converter: Callable[[Any], Any] | None = None,
    static: bool = False,
    fixed_shape: bool = True,
    **kwargs: Any,
) -> Any:
    """Declare a dataclass field of an `eqstate.Module` with a kind.

    **Arguments:**

    - `kind`: a subclass of `eqstate.Kind`. It applies to every leaf of the field's
        value, down to any field inside it that declares a kind of its own.
    - `default`, `default_factory`, `init`, `repr`, `converter`, `static`, `**kwargs`:
        as for `eqx.field` / `dataclasses.field`.
    - `fixed_shape`: if `True` (the default), an array assigned to this field inside an
        `@eqstate.mutating` method must keep the field's shape. Pass `False` for state
        whose shape legitimately changes.

    The kind is stored in the field's metadata: the pytree structure of the module is
    exactly that of an `eqx.Module` with the same fields. For `State` kinds, array-like
    values (Python scalars, NumPy arrays, weakly typed JAX arrays) are converted to
    strongly typed JAX arrays when the module is built.

    **Returns:**

    A dataclass field, to assign in the class body of an `eqstate.Module`.

    !!! example

        ```python
        class Model(eqstate.Module):
            weight: jax.Array
            steps: jax.Array = eqstate.field(kind=eqstate.State, default=0)
            losses: jax.Array = eqstate.State.field(  # grows, so its shape changes
                fixed_shape=False, default_factory=lambda: jnp.zeros(0)
            )

        model = Model(jnp.ones(3))
        ```
    """
    kind = _check_kind(kind)
    given = default is not dataclasses.MISSING and default is not None
    if given and issubclass(kind, Rng) and not is_key_like(default):
        raise TypeError(_MSG_RNG_DEFAULT.format(kind=kind.__name__, default=default))
    metadata = dict(kwargs.pop("metadata", None) or {})
    metadata[KIND_KEY] = kind
    metadata[FIXED_SHAPE_KEY] = bool(fixed_shape)
    if issubclass(kind, State) and not static:
        converter = to_strong if converter is None else _compose(converter)
    if default is not dataclasses.MISSING:
        kwargs["default"] = default
    if default_factory is not dataclasses.MISSING:
        kwargs["default_factory"] = default_factory
    return eqx.field(
        converter=converter,
        static=static,
        init=init,
        repr=repr,
        metadata=metadata,
        **kwargs,
    )


def _compose(converter: Callable[[Any], Any]) -> Callable[[Any], Any]:
    def convert(value: Any) -> Any:
        return to_strong(converter(value))

    return convert


def field_kind(f: dataclasses.Field) -> type[Kind] | None:
    """The kind declared on a dataclass field, or `None`."""
    return f.metadata.get(KIND_KEY)
