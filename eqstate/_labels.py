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
        gets the label of the first filter it matches, in the dict's order.
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
