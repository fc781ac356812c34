"""`Optimizer`: an optax transformation and its state, as a module."""

import math
from collections.abc import Iterator
from typing import Any, Self, TypeVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import optax
from jax.core import Tracer

from ._convert import canonical_dtype
from ._filters import Filter, check_same_structure, describe, is_none, leaf_path
from ._grad import split_differentiable
from ._hyperparams import read_only, set_hyperparams
from ._kinds import OptState, Param
from ._module import Module
from ._mutating import mutating
from ._structural import describe_tx, structural


_MSG_MISSING_GRAD = (
    "Optimizer.update: grads has no gradient at {path}, a leaf this optimizer updates "
    "(wrt={wrt}). Compute grads with `eqstate.grad(..., wrt=...)` using the "
    "optimizer's filter, or build the optimizer with a `wrt=` that excludes this leaf."
)
_MSG_GRAD_SHAPE = (
    "Optimizer.update: grads at {path} is {grad}, but the model's leaf there is {param}. "
    "Pass the gradients of the model you pass as the second argument, as "
    "`eqstate.grad` / `eqstate.value_and_grad` compute them: "
    "`model, opt = opt.update(grads, model)`."
)
_MSG_MODEL_SHAPE = (
    "Optimizer.update: the model's leaf at {path} is {new}, but in the model this "
    "optimizer was built from it is {old}; the optax state (e.g. Adam's moments) has the "
    "shapes and dtypes of that model. Build the optimizer from the model you train: "
    "`opt = eqstate.Optimizer(tx, model)`."
)
_MSG_GRADS_ARE_MODEL = (
    "Optimizer.update: `grads` is the model itself. Pass the gradients of the model first: "
    "`(loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, ...)`, "
    "then `model, opt = opt.update(grads, model)`."
)
_MSG_MODEL_STRUCTURE = (
    "Optimizer.update: the model has {new} leaves (counting `None`), but this optimizer "
    "was built for a model with {old}. Build the optimizer from the model you train: "
    "`opt = eqstate.Optimizer(tx, model)`."
)
_MSG_SWAPPED = (
    "Optimizer.update: the `model` argument has None at {path}, where the `grads` "
    "argument has {what}; the arguments look swapped. The order is "
    "`opt.update(grads, model)` (optax's order, `tx.update(grads, state, params)`; "
    "Flax NNX's `optimizer.update(model, grads)` is the other way round)."
)
_MSG_MODEL_IS_OPTIMIZER = (
    "Optimizer.update: the `model` argument is an Optimizer. The order is "
    "`model, opt = opt.update(grads, model)`: the gradients, then the model being trained."
)
_MSG_PUT_BACK = (
    "{cls}.update{call} {does}, but it was given {given} (such as `{example}` or a "
    "loaded checkpoint). To put a tree back into a module, use "
    "`eqstate.update(module, tree)`, e.g. `{name} = eqstate.update({name}, tree)`."
)
_MSG_NO_MODEL = (
    "Optimizer.update needs the model: `model, opt = opt.update(grads, model)`. (To put "
    "a tree back into a module, use `eqstate.update(module, tree)`.)"
)


class _Shapes:
    """The shape and dtype of each leaf an optimizer updates, `None` at the model's other
    leaves (`None` counted as a leaf).

    A static field, hence part of every jit cache key: it is hashed once, and copies of
    an optimizer share it, so comparing two of them is an identity check. `treedef` (the
    model's structure, not compared) names a leaf that changed in a retrace message.
    """

    __slots__ = ("_hash", "entries", "treedef")

    def __init__(
        self, entries: tuple[tuple[tuple[int, ...], Any] | None, ...], treedef: Any = None
    ):
        self.entries = entries
        self.treedef = treedef
        self._hash = hash(entries)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (
            isinstance(other, _Shapes)
            and self._hash == other._hash
            and self.entries == other.entries
        )

    def __repr__(self) -> str:
        n = sum(e is not None for e in self.entries)
        return f"<shapes and dtypes of {n} leaves>"

    def explain_change(self, new: "_Shapes") -> str | None:
        """For a retrace message: the first optimised leaf whose shape or dtype differs
        in `new`, by its path in the model."""
        old_n, new_n = len(self.entries), len(new.entries)
        if old_n != new_n:
            return (
                f"the optimizer was built for a model of {new_n} leaves, the previous one "
                f"for a model of {old_n} (counting None)"
            )
        for i, (a, b) in enumerate(zip(self.entries, new.entries)):
            if a != b:
                where = _treedef_path(new.treedef, i)
                return (
                    f"the optimised leaf at {where} is {_entry(b)}, was {_entry(a)} (the "
                    "optimizer was built for a model of other shapes or dtypes)"
                )
        return None


def _entry(e: tuple[tuple[int, ...], Any] | None) -> str:
    return "not optimised" if e is None else f"{e[1]}{list(e[0])}"


def _treedef_path(treedef: Any, index: int) -> str:
    """The key path of leaf `index` of a tree of structure `treedef`."""
    try:
        tree = treedef.unflatten(range(treedef.num_leaves))
        return jtu.keystr(jtu.tree_flatten_with_path(tree)[0][index][0]) or "the root"
    except Exception:  # a node that cannot be rebuilt with placeholder leaves
        return f"leaf {index}"


_NO_MODEL: Any = object()
_Model = TypeVar("_Model")


class Optimizer(Module):
    """An optax transformation and its state, held in an `OptState` field.

    The optimizer updates the inexact-array leaves of a model that match `wrt`
    (default `eqstate.Param`); state, RNG keys and integer leaves are never touched,
    so weight decay never decays running statistics.

    **Fields:**

    - `tx`: the optax transformation (static). It compares by its settings: its
        functions are equal when they have the same code, defaults, closure contents and
        the same values of the globals they read (numbers by type and bits, arrays by
        kind, dtype, weak type and contents), so an optimizer rebuilt with the same
        settings (re-running `eqstate.Optimizer(optax.adam(1e-3), model)`) does not
        recompile a jitted step. A function that reaches anything else (an object of
        your own class, say) compares by identity as a whole: rebuilt, it compiles
        again. The settings are read when first needed: at the first step, or at an
        earlier comparison (a setting changed between that and the first step is an
        error that names it).
    - `wrt`: the filter selecting the updated leaves (static).
    - `opt_leaves`: the leaves of optax's state (`OptState`), stored flat so that a
        jitted step does not rebuild copies of the model's structure for it.
    - `opt_def`: the structure of optax's state (static).
    - `shapes`: the shapes and dtypes of the leaves it updates, as in the model it was
        built from (static); `update` checks the model and the gradients against them.
    - `step`: how many times `update` has been called (`OptState`, int32).

    `opt.opt_state` gives optax's state in its own structure, as a read-only view.

    **Changing hyperparameters without recompiling:** build the transformation with
    `optax.inject_hyperparams`, which keeps its hyperparameters as arrays in the
    optimizer state, and set them with `opt.with_hyperparams(learning_rate=...)`, between
    steps or inside the jitted step. The optimizer keeps its structure, so the step is
    not traced again. (A new `optax.adam(1e-4)` would compile again: the learning rate of
    a plain transformation is a static value.)

    **Per-kind settings:** `eqstate.labels` maps kinds (and other filters) to the labels
    of `optax.multi_transform` or the masks of `optax.masked` / `optax.adamw(mask=...)`.

    !!! example

        ```python
        opt = eqstate.Optimizer(optax.adamw(1e-3), model)

        @eqx.filter_jit
        def train_step(model, opt, x, y):
            (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
            model, opt = opt.update(grads, model)
            return model, opt, loss
        ```

    !!! example "A learning rate that changes every step"

        ```python
        tx = optax.inject_hyperparams(optax.adamw)(learning_rate=1e-3, weight_decay=1e-4)
        opt = eqstate.Optimizer(tx, model)
        for step, (x, y) in enumerate(batches):
            opt = opt.with_hyperparams(learning_rate=1e-3 * 0.99**step)
            model, opt, loss = train_step(model, opt, x, y)  # compiled once
        ```
    """

    tx: optax.GradientTransformation = eqx.field(static=True)
    wrt: Any = eqx.field(static=True)
    opt_leaves: tuple[Any, ...] = OptState.field()
    opt_def: Any = eqx.field(static=True)
    shapes: _Shapes = eqx.field(static=True)
    step: jax.Array = OptState.field()

    def __init__(self, tx: optax.GradientTransformation, model: Any, *, wrt: Filter = Param):
        """**Arguments:**

        - `tx`: any optax `GradientTransformation` (`optax.adamw(...)`, `optax.chain`,
            `optax.multi_transform`, `optax.MultiSteps(...)`, ...).
        - `model`: the model whose `wrt` leaves are optimised; used to initialise the
            optimizer state (not stored).
        - `wrt`: a filter, as in `eqstate.filter` (a kind, `...`, a callable
            `(path, kind, leaf) -> bool` or `leaf -> bool`, or a tuple of these);
            default `eqstate.Param`. It must match at least one inexact-array leaf.
        """
        if not isinstance(tx, optax.GradientTransformation):
            tx = getattr(tx, "gradient_transformation", lambda: tx)()  # optax.MultiSteps
        if not isinstance(tx, optax.GradientTransformation):
            raise TypeError(
                f"Optimizer(tx=...) expects an optax GradientTransformation such as "
                f"optax.adam(1e-3), got {type(tx).__name__}."
            )
        self.tx = structural(tx)
        self.wrt = wrt
        params, _ = split_differentiable(model, wrt, "eqstate.Optimizer", "optimise")
        leaves, self.opt_def = jtu.tree_flatten(_unaliased(tx.init(params), params))
        self.opt_leaves = tuple(leaves)
        p_leaves, p_def = jtu.tree_flatten(params, is_leaf=is_none)
        self.shapes = _Shapes(
            tuple(
                None if p is None else (tuple(p.shape), canonical_dtype(p.dtype)) for p in p_leaves
            ),
            p_def,
        )
        self.step = jnp.zeros((), jnp.int32)

    @property
    def opt_state(self) -> Any:
        """optax's state, in the structure optax gave it.

        It is rebuilt from `opt_leaves` on each access, so changing it changes nothing.
        The `hyperparams` dicts of `optax.inject_hyperparams` states (optax's documented
        `opt_state.hyperparams["learning_rate"] = ...`) therefore refuse assignment, and
        say to use `opt.with_hyperparams(...)`; they are pytree nodes like dicts.

        **Returns:**

        optax's state (for `optax.adam`, a tuple of `ScaleByAdamState` and
        `EmptyState`), read-only.

        !!! example

            ```python
            opt = eqstate.Optimizer(optax.adam(1e-3), model)
            adam_state = opt.opt_state[0]
            first_moments = adam_state.mu  # a tree of the model's structure
            ```
        """
        return read_only(self._state())

    def _state(self) -> Any:
        return self.opt_def.unflatten(self.opt_leaves)

    def with_hyperparams(self, **values: Any) -> Self:
        """A new optimizer with hyperparameters injected by `optax.inject_hyperparams` set.

        **Arguments:**

        - `**values`: hyperparameter names and values (scalars or arrays of the shape
            the optimizer holds; cast to its dtype). A name is set in every injected
            state that has it, e.g. in both halves of an `optax.chain`.

        **Returns:**

        A new `Optimizer` with the same structure (a jitted step does not recompile);
        `self` is unchanged. Works inside `jax.jit` too.

        !!! example

            ```python
            opt = eqstate.Optimizer(optax.inject_hyperparams(optax.adam)(learning_rate=1e-3), model)
            opt = opt.with_hyperparams(learning_rate=1e-4)
            ```
        """
        if not values:
            return self
        state = set_hyperparams(self._state(), values)
        leaves, treedef = jtu.tree_flatten(state)
        assert treedef == self.opt_def, (treedef, self.opt_def)
        return eqx.tree_at(lambda o: o.opt_leaves, self, tuple(leaves))

    def __repr__(self) -> str:
        """`Optimizer(tx=chain(scale_by_adam, scale), wrt=eqstate.Param, params=2 arrays
        (20 values), state=5 leaves, step=3)`: one line, whatever the model's size."""
        values = [getattr(self, name, None) for name in ("tx", "wrt", "shapes", "step")]
        tx, wrt, shapes, step = values
        parts = [f"tx={describe_tx(tx)}" if tx is not None else "tx=None"]
        parts.append(f"wrt={describe(wrt)}")
        if isinstance(shapes, _Shapes):
            used = [e for e in shapes.entries if e is not None]
            size = sum(math.prod(e[0]) for e in used)
            parts.append(f"params={len(used)} array{'s' * (len(used) != 1)} ({size} values)")
        leaves = getattr(self, "opt_leaves", None)
        if isinstance(leaves, tuple):
            parts.append(f"state={len(leaves)} leaves")
        parts.append(f"step={_short_step(step)}")
        return f"Optimizer({', '.join(parts)})"

    def __pdoc__(self, **kwargs: Any) -> Any:
        """The short `repr`, also inside `eqx.tree_pformat` of a larger tree."""
        import wadler_lindig  # equinox's pretty-printer, which calls this

        return wadler_lindig.TextDoc(repr(self))

    @mutating
    def update(  # pyright: ignore[reportIncompatibleMethodOverride]
        self, grads: Any, model: _Model = _NO_MODEL, **extra_args: Any
    ) -> _Model:
        """Apply one optimizer step. Returns `(new_model, new_optimizer)`.

        This `update` trains; it is not `eqstate.Module.update`, which puts trees back
        into a module. To load a saved optimizer state into `opt`, use
        `opt = eqstate.update(opt, tree)`.

        **Arguments:**

        - `grads`: gradients with the structure of `model` (`None` where absent), as
            returned by `eqstate.grad` / `eqstate.value_and_grad` or `eqx.filter_grad`.
            Gradients of leaves outside `wrt` are ignored; the others must have the
            shapes of the model's leaves.
        - `model`: the model to update. Its `wrt` leaves must have the shapes and dtypes
            of those of the model the optimizer was built from. The order is optax's:
            gradients first, then the model.
        - `**extra_args`: passed on to `tx.update`, for transformations that need them:
            `value=loss` for `optax.contrib.reduce_on_plateau`; `value=`, `grad=` and
            `value_fn=` for `optax.lbfgs` (`value_fn` takes the `wrt` leaves, as a tree
            of the model's structure, and returns the loss).

        **Returns:**

        `(new_model, new_optimizer)`: the model, of the type passed, with its `wrt` leaves
        updated, and this optimizer with its state advanced.

        !!! example

            ```python
            opt = eqstate.Optimizer(optax.adam(1e-3), model)
            (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
            model, opt = opt.update(grads, model)  # opt.step == 1
            ```
        """
        _check_arguments(grads, model)
        params, grads, m_leaves, m_def = self._params_and_grads(grads, model)
        tx = optax.with_extra_args_support(self.tx)
        updates, state = tx.update(grads, self._state(), params, **extra_args)
        leaves, treedef = jtu.tree_flatten(state)
        if treedef != self.opt_def:
            raise ValueError(
                f"Optimizer.update: the optax transformation returned a state of structure "
                f"{treedef}, which differs from the one it started with ({self.opt_def}). "
                "A jitted step would recompile every call; check the transformation."
            )
        self.opt_leaves = tuple(leaves)
        self.step += 1
        new_params = jtu.tree_leaves(optax.apply_updates(params, updates), is_leaf=is_none)
        return m_def.unflatten([m if p is None else p for m, p in zip(m_leaves, new_params)])

    def _params_and_grads(self, grads: Any, model: Any) -> tuple[Any, Any, list, Any]:
        """The model's `wrt` leaves and the matching gradients (`None` elsewhere), checked;
        and the model's leaves and treedef (`None` counted as a leaf)."""
        (m_leaves, m_def), (g_leaves, _) = check_same_structure(
            (model, grads),
            "Optimizer.update",
            lambda i: "grads" if i else "the model",
            "Pass the gradients of this model, from eqstate.grad / eqstate.value_and_grad, "
            "in the order `opt.update(grads, model)`.",
        )
        for i, (m, g) in enumerate(zip(m_leaves, g_leaves)):
            if m is None and g is not None:
                what = _describe(g) if eqx.is_array(g) else repr(g)
                raise ValueError(_MSG_SWAPPED.format(path=_path(model, i), what=what))
        params, _ = split_differentiable(model, self.wrt, "Optimizer.update", "optimise")
        p_leaves = jtu.tree_leaves(params, is_leaf=is_none)
        entries = self.shapes.entries
        if len(entries) != len(p_leaves):
            raise ValueError(_MSG_MODEL_STRUCTURE.format(new=len(p_leaves), old=len(entries)))
        for i, (p, e) in enumerate(zip(p_leaves, entries)):
            if (e is None) if p is None else (e == (p.shape, canonical_dtype(p.dtype))):
                continue
            unselected = f"not an inexact array that wrt={describe(self.wrt)} selects"
            new = _describe(p) if p is not None else f"{_describe(m_leaves[i])}, {unselected}"
            old = unselected if e is None else f"{e[1]}{list(e[0])}"
            raise ValueError(_MSG_MODEL_SHAPE.format(path=_path(model, i), new=new, old=old))
        out = []
        for i, (g, p) in enumerate(zip(g_leaves, p_leaves)):
            if p is None:
                out.append(None)
                continue
            if g is None:
                raise ValueError(
                    _MSG_MISSING_GRAD.format(path=_path(model, i), wrt=describe(self.wrt))
                )
            complex_into_real = jnp.iscomplexobj(g) and not jnp.iscomplexobj(p)
            if not (eqx.is_inexact_array(g) and g.shape == p.shape) or complex_into_real:
                raise ValueError(
                    _MSG_GRAD_SHAPE.format(
                        path=_path(model, i), grad=_describe(g), param=_describe(p)
                    )
                )
            out.append(g)
        return params, m_def.unflatten(out), m_leaves, m_def


def _check_arguments(grads: Any, model: Any) -> None:
    if isinstance(grads, Optimizer):
        raise TypeError(
            _MSG_PUT_BACK.format(
                cls="Optimizer",
                call="(grads, model)",
                does="applies one optimizer step",
                given="an Optimizer tree as `grads`",
                example="opt.states()",
                name="opt",
            )
        )
    if model is _NO_MODEL:
        raise TypeError(_MSG_NO_MODEL)
    if isinstance(model, Optimizer):
        raise TypeError(_MSG_MODEL_IS_OPTIMIZER)
    if grads is model:
        raise TypeError(_MSG_GRADS_ARE_MODEL)


def _short_step(step: Any) -> str:
    if isinstance(step, jax.Array) and not isinstance(step, Tracer):
        try:
            return str(int(step))
        except Exception:  # deleted (donated), or not a scalar
            pass
    return _describe(step) if eqx.is_array(step) else repr(step)


def _path(tree: Any, index: int) -> str:
    """The key path of leaf `index` of `tree`, `None` counted as a leaf."""
    return jtu.keystr(leaf_path(tree, index)) or "the root"


def _describe(x: Any) -> str:
    if eqx.is_array(x):
        return f"{x.dtype}{list(x.shape)}"
    return "None" if x is None else f"a {type(x).__name__}"


def _unaliased(state: Any, params: Any) -> Any:
    """`state` with copies of any leaf that is one of `params`' arrays (e.g. lookahead's
    slow weights), so that donating the optimizer never donates the model's buffers."""
    ids = {id(x) for x in jtu.tree_leaves(params)}
    return jtu.tree_map(lambda x: jnp.copy(x) if id(x) in ids else x, state)


def optimizers_in(tree: Any) -> Iterator[tuple[int, Optimizer]]:
    """Each `Optimizer` in `tree`, with the index of its first leaf (its first
    `opt_leaves` entry) among `jax.tree_util.tree_leaves(tree)`."""
    offset = 0
    for piece in jtu.tree_leaves(tree, is_leaf=lambda x: isinstance(x, Optimizer)):
        if isinstance(piece, Optimizer):
            yield offset, piece
        offset += len(jtu.tree_leaves(piece))
