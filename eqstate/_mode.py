"""Train / eval switches, using Equinox's `inference` field convention."""

from typing import TypeVar

import equinox as eqx


_T = TypeVar("_T")


def train(model: _T) -> _T:
    """`model` with every `inference` field set to `False` (eqstate's and Equinox's layers).

    Shorthand for `eqx.nn.inference_mode(model, value=False)`.
    """
    return eqx.nn.inference_mode(model, value=False)


def eval(model: _T) -> _T:
    """`model` with every `inference` field set to `True`: dropout off, running statistics used.

    Shorthand for `eqx.nn.inference_mode(model, value=True)`.
    """
    return eqx.nn.inference_mode(model, value=True)
