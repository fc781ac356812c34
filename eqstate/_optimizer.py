"""`Optimizer`: an optax transformation and its state, as a module."""

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax

from ._filters import Filter, check_same_structure, combine
from ._grad import split_differentiable
from ._kinds import OptState, Param
from ._module import Module, mutating


_MSG_MISSING_GRAD = (
    "Optimizer.update: grads has no gradient at {path}, a leaf this optimizer updates "
    "(wrt={wrt}). Compute grads with `eqstate.grad(..., wrt=...)` using the "
    "optimizer's filter, or build the optimizer with a `wrt=` that excludes this leaf."
)


class Optimizer(Module):
    """An optax transformation and its state, held in an `OptState` field.

    The optimizer updates the inexact-array leaves of a model that match `wrt`
    (default `eqstate.Param`); state, RNG keys and integer leaves are never touched,
    so weight decay never decays running statistics.

    **Fields:**

    - `tx`: the optax transformation (static).
    - `wrt`: the filter selecting the updated leaves (static).
    - `opt_leaves`: the leaves of optax's state (`OptState`), stored flat so that a
        jitted step does not rebuild copies of the model's structure for it.
    - `opt_def`: the structure of optax's state (static).
    - `step`: how many times `update` has been called (`OptState`, int32).

    `opt.opt_state` gives optax's state in its own structure.

    !!! example

        ```python
        opt = eqstate.Optimizer(optax.adamw(1e-3), model)

        @eqx.filter_jit
        def train_step(model, opt, x, y):
            (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
            model, opt = opt.update(grads, model)
            return model, opt, loss
        ```
    """

    tx: optax.GradientTransformation = eqx.field(static=True)
    wrt: Any = eqx.field(static=True)
    opt_leaves: tuple[Any, ...] = OptState.field()
    opt_def: Any = eqx.field(static=True)
    step: jax.Array = OptState.field()

    def __init__(self, tx: optax.GradientTransformation, model: Any, *, wrt: Filter = Param):
        """**Arguments:**

        - `tx`: any optax `GradientTransformation` (`optax.adamw(...)`, `optax.chain`,
            `optax.multi_transform`, `optax.MultiSteps(...)`, ...).
        - `model`: the model whose `wrt` leaves are optimised; used to initialise the
            optimizer state (not stored).
        - `wrt`: a filter, as in `eqstate.filter`; default `eqstate.Param`.
        """
        if not isinstance(tx, optax.GradientTransformation):
            tx = getattr(tx, "gradient_transformation", lambda: tx)()  # optax.MultiSteps
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                f"Optimizer(tx=...) expects an optax GradientTransformation such as "
                f"optax.adam(1e-3), got {type(tx).__name__}."
            )
        self.tx = tx
        self.wrt = wrt
        params, _ = split_differentiable(model, wrt)
        leaves, self.opt_def = jtu.tree_flatten(_unaliased(tx.init(params), params))
        self.opt_leaves = tuple(leaves)
        self.step = jnp.zeros((), jnp.int32)

    @property
    def opt_state(self) -> Any:
        """optax's state, in the structure optax gave it."""
        return self.opt_def.unflatten(self.opt_leaves)

    @mutating
    def update(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, grads: Any, model: Any, **extra_args: Any
    ) -> Any:
        """Apply one optimizer step. Returns `(new_model, new_optimizer)`.

        **Arguments:**

        - `grads`: gradients with the structure of `model` (`None` where absent), as
            returned by `eqstate.grad` / `eqstate.value_and_grad` or `eqx.filter_grad`.
            Gradients of leaves outside `wrt` are ignored.
        - `model`: the model to update.
        - `**extra_args`: passed on to `tx.update`, for transformations that need them:
            `value=loss` for `optax.contrib.reduce_on_plateau`; `value=`, `grad=` and
            `value_fn=` for `optax.lbfgs` (`value_fn` takes the `wrt` leaves, as a tree
            of the model's structure, and returns the loss).
        """
        params, _ = split_differentiable(model, self.wrt)
        grads = _matching_grads(grads, params, self.wrt)
        tx = optax.with_extra_args_support(self.tx)
        updates, state = tx.update(grads, self.opt_state, params, **extra_args)
        leaves, treedef = jtu.tree_flatten(state)
        if treedef != self.opt_def:
            raise ValueError(
                f"Optimizer.update: the optax transformation returned a state of structure "
                f"{treedef}, which differs from the one it started with ({self.opt_def}). "
                "A jitted step would recompile every call; check the transformation."
            )
        self.opt_leaves = tuple(leaves)
        self.step += 1
        return combine(optax.apply_updates(params, updates), model)


def _matching_grads(grads: Any, params: Any, wrt: Filter) -> Any:
    """`grads` at the leaves of `params` (`None` elsewhere); an error where one is missing."""
    (p_leaves, p_def), (g_leaves, _) = check_same_structure(
        (params, grads),
        "Optimizer.update",
        lambda i: "grads" if i else "the model",
        "Pass the gradients of this model, from eqstate.grad / eqstate.value_and_grad.",
    )
    for i, (g, p) in enumerate(zip(g_leaves, p_leaves)):
        if p is not None and g is None:
            path = jtu.tree_flatten_with_path(params, is_leaf=lambda x: x is None)[0][i][0]
            raise ValueError(_MSG_MISSING_GRAD.format(path=jtu.keystr(path), wrt=_name(wrt)))
    return p_def.unflatten([None if p is None else g for g, p in zip(g_leaves, p_leaves)])


def _unaliased(state: Any, params: Any) -> Any:
    """`state` with copies of any leaf that is one of `params`' arrays (e.g. lookahead's
    slow weights), so that donating the optimizer never donates the model's buffers."""
    ids = {id(x) for x in jtu.tree_leaves(params)}
    return jtu.tree_map(lambda x: jnp.copy(x) if id(x) in ids else x, state)


def _name(f: Any) -> str:
    return getattr(f, "__name__", repr(f))
