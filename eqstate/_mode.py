"""Train / eval switches, using Equinox's `inference` field convention."""

from typing import Any, TypeVar

import equinox as eqx
import jax


_T = TypeVar("_T")


def train(model: _T) -> _T:
    """`model` with every `inference` field set to `False` (eqstate's and Equinox's layers).

    Shorthand for `eqx.nn.inference_mode(model, value=False)`.

    **Arguments:**

    - `model`: any pytree of modules.

    **Returns:**

    A new model: in training mode, `BatchNorm` uses and updates batch statistics and
    `Dropout` drops.

    !!! example

        ```python
        model = eqstate.train(model)
        logits, model = model(x)  # running statistics move, Dropout's key advances
        ```
    """
    return _inference_mode(model, False, "train")


def eval(model: _T) -> _T:
    """`model` with every `inference` field set to `True`: dropout off, running statistics used.

    Shorthand for `eqx.nn.inference_mode(model, value=True)`.

    **Arguments:**

    - `model`: any pytree of modules.

    **Returns:**

    A new model in inference mode; its layers' state no longer changes.

    !!! example

        ```python
        eval_model = eqstate.eval(model)
        logits, _ = eval_model(x)  # deterministic; the returned model is unchanged
        ```
    """
    return _inference_mode(model, True, "eval")


_MSG_UNSET = (
    "eqstate.{fn}: {where} has an `inference` field that its `__init__` never sets, so "
    "it is the class's default and not part of the module's pytree, and Equinox cannot "
    "replace it. Set it in `__init__` (`self.inference = inference`, with an "
    "`inference: bool = False` argument)."
)


def _unset(tree: Any, path: tuple = ()) -> str | None:
    """`Class at path` of the first module in `tree` whose `inference` is only its
    class's default, or `None`."""
    unset = "inference" not in vars(tree) if isinstance(tree, eqx.Module) else False
    if unset and hasattr(type(tree), "inference"):
        return f"{type(tree).__name__} at {jax.tree_util.keystr(path) or 'the root'}"
    children = jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: isinstance(x, eqx.Module) and x is not tree
    )[0]
    for p, child in children:
        if isinstance(child, eqx.Module) and child is not tree:
            found = _unset(child, path + p)
            if found is not None:
                return found
    return None


def _inference_mode(model: _T, value: bool, fn: str) -> _T:
    try:
        return eqx.nn.inference_mode(model, value=value)
    except TypeError as err:
        where = _unset(model) if "is not a leaf of the pytree" in str(err) else None
        if where is None:
            raise
        raise TypeError(_MSG_UNSET.format(fn=fn, where=where)) from err
