"""`labels`: kinds (and other filters) to the labels of `optax.multi_transform` and the
masks of `optax.masked`, as a function of the parameters' tree."""

import enum
from collections.abc import Callable, Hashable, Mapping
from typing import Any

import equinox as eqx
import jax.tree_util as jtu

from ._filters import Filter, _assign, _compile, describe
from ._resolve import plan


_MSG_NOT_A_MAPPING = (
    "eqstate.labels(mapping): expects a dict from filters to labels, such as "
    "`{{NoDecay: 'no_decay', eqstate.Param: 'decay'}}`, got {type}."
)
_MSG_EMPTY = (
    "eqstate.labels(mapping): the mapping is empty and no `default=` is given, so no "
    "leaf would get a label. Map at least one filter to a label, or give a default."
)
_MSG_UNMATCHED = (
    "eqstate.labels: the leaf at {path} ({kind}, {leaf}) matches none of the filters "
    "{filters}, and no `default=` was given. Add a filter that matches it, or pass "
    "`default=` the label of every other leaf."
)
_MSG_SHADOWED = (
    "eqstate.labels(mapping): no leaf can get the label {label!r} of {later}: {why}. Each "
    "leaf gets the label of the first filter it matches, in the dict's order; put the "
    "more specific filter first: `{{{order}}}`."
)


class _Missing(enum.Enum):
    """No `default=` given. An Enum member, not a bare `object()`: the label function
    reads it, and optimizer settings compare by value only over such values."""

    NO_DEFAULT = enum.auto()


_NO_DEFAULT: Any = _Missing.NO_DEFAULT


def labels(
    mapping: Mapping[Filter, Hashable], *, default: Hashable = _NO_DEFAULT
) -> Callable[[Any], Any]:
    """Label the leaves of a tree by kind (or any filter), for optax.

    `optax.multi_transform(transforms, param_labels)` takes a function from the
    parameters to a tree of labels, and `optax.masked(tx, mask)` (and the `mask=` of
    `optax.adamw`, `optax.add_decayed_weights`, ...) a function from the parameters to a
    tree of booleans. `eqstate.labels` builds such a function from filters, so that a
    leaf's label follows its kind: `eqstate.Optimizer` gives optax the model (with
    `None` at the leaves it does not update), whose fields declare the kinds.

    **Arguments:**

    - `mapping`: a dict from filters to labels. A filter is as for `eqstate.filter`: a
        kind (matching array leaves of that kind or a subclass), `...`, a callable
        `(path, kind, leaf) -> bool` or `leaf -> bool`, or a tuple of these. Each leaf
        gets the label of the first filter it matches, in the dict's order, so a kind
        goes before its base class: `{NoDecay: False, eqstate.Param: True}` (the other
        order, where `NoDecay` could never decide a label, is an error).
    - `default`: the label of leaves that match no filter. Without it, such a leaf is
        an error that names it.

    **Returns:**

    A function from a tree to a tree of the same structure holding the labels. Two
    calls with equal arguments give equal functions (as optimizer settings, see
    `eqstate.Optimizer`), so rebuilding an optimizer with them does not recompile.

    !!! example

        ```python
        class NoDecay(eqstate.Param):
            pass

        class Model(eqstate.Module):
            weight: jax.Array
            bias: jax.Array = NoDecay.field()

        # no weight decay on NoDecay leaves
        no_decay = eqstate.labels({NoDecay: False}, default=True)
        tx = optax.adamw(1e-3, weight_decay=1e-4, mask=no_decay)
        # or a transformation per label
        tx = optax.multi_transform(
            {"decay": optax.adamw(1e-3), "plain": optax.adam(1e-3)},
            eqstate.labels({NoDecay: "plain"}, default="decay"),
        )
        opt = eqstate.Optimizer(tx, model)
        ```
    """
    if not isinstance(mapping, Mapping):
        raise TypeError(_MSG_NOT_A_MAPPING.format(type=type(mapping).__name__))
    if not mapping and default is _NO_DEFAULT:
        raise ValueError(_MSG_EMPTY)
    filters = tuple(mapping)
    values = tuple(mapping.values())
    for f in filters:
        _compile(f, "eqstate.labels(mapping)")  # a clear error now, not inside optax
    _check_reachable(mapping)

    def label_fn(tree: Any) -> Any:
        leaves, p = plan(tree)
        which = _assign(leaves, p, filters, "eqstate.labels") if filters else [0] * len(leaves)
        out = []
        for i, (leaf, index) in enumerate(zip(leaves, which)):
            if index < len(values):
                out.append(values[index])
            elif default is not _NO_DEFAULT:
                out.append(default)
            else:
                raise ValueError(
                    _MSG_UNMATCHED.format(
                        path=jtu.keystr(p.paths[i]) or "the root",
                        kind=p.kinds[i].__name__,
                        leaf=_describe(leaf),
                        filters=", ".join(describe(f) for f in filters),
                    )
                )
        return p.treedef.unflatten(out)

    return label_fn


def _describe(x: Any) -> str:
    if eqx.is_array(x):
        return f"{x.dtype}{list(x.shape)}"
    return f"a {type(x).__name__}"


def _kinds(f: Any) -> list[Any] | None:
    """The kinds (and `...`) a filter is made of, tuples opened; `None` if it holds a
    callable (which may match anything)."""
    if isinstance(f, tuple):
        parts = [_kinds(g) for g in f]
        return None if any(p is None for p in parts) else [k for p in parts for k in p or ()]
    return [f] if f is ... or isinstance(f, type) else None


def _shadows(earlier: Any, kind: Any) -> bool:
    return earlier is ... or (kind is not ... and issubclass(kind, earlier))


def _check_reachable(mapping: Mapping[Any, Any]) -> None:
    """Refuse a filter of kinds that earlier kinds (or `...`) all match first: a
    subclass listed after its base class never gets its label (`{Param: True,
    NoDecay: False}`)."""
    items = list(mapping.items())
    for j, (later, label) in enumerate(items):
        kinds = _kinds(later)
        if not kinds:
            continue
        reasons, first = [], j
        for kind in kinds:
            i, base = next(
                (
                    (i, e)
                    for i, (f, _) in enumerate(items[:j])
                    for e in _kinds(f) or ()
                    if _shadows(e, kind)
                ),
                (None, None),
            )
            if i is None:
                break  # this kind can still decide a label
            first = min(first, i)
            f = items[i][0]
            where = "which comes before it" if f is base else f"in {describe(f)}, before it"
            if base is ...:
                reasons.append("... matches every leaf, and comes before it")
            elif base is kind:
                reasons.append(f"{describe(kind)} is also in {describe(f)}, before it")
            else:
                reasons.append(f"{describe(kind)} is a subclass of {describe(base)}, {where}")
        else:
            order = [*items[:first], items[j], *items[first:j], *items[j + 1 :]]
            raise ValueError(
                _MSG_SHADOWED.format(
                    label=label,
                    later=describe(later),
                    why="; ".join(dict.fromkeys(reasons)),
                    order=", ".join(f"{describe(f)}: {v!r}" for f, v in order),
                )
            )
