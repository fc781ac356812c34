"""Train / eval switches, using Equinox's `inference` field convention."""

from typing import TypeVar

import equinox as eqx


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
    return eqx.nn.inference_mode(model, value=False)


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
    return eqx.nn.inference_mode(model, value=True)
