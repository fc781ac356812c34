"""The same stateful training step (MLP + BatchNorm + Dropout + optax Adam) in each library.

Every row builds its model from scratch with `make(size)` and returns a `Row`: `step()`
advances one training step (returning without waiting where the library allows) and
`block()` waits for the last result. Nothing here is timed; `bench_step.py` times it.
"""

import dataclasses
from collections.abc import Callable
from functools import partial
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

import eqstate


MOMENTUM = 0.99
EPS = 1e-5
RATE = 0.1
LR = 1e-3
CLASSES = 10


@dataclasses.dataclass(frozen=True)
class Size:
    name: str
    batch: int
    width: int
    layers: int


SIZES = {
    "dispatch": Size("dispatch-bound", batch=32, width=32, layers=2),
    "compute": Size("compute-bound", batch=256, width=512, layers=4),
}


def data(size: Size) -> tuple[jax.Array, jax.Array]:
    kx, ky = jax.random.split(jax.random.key(1234))
    x = jax.random.normal(kx, (size.batch, size.width))
    y = jax.random.randint(ky, (size.batch,), 0, CLASSES)
    return x, y


def xent(logits: jax.Array, y: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


class Row:
    """A training loop's carry and its step function."""

    def __init__(self, step: Callable[..., Any], carry: tuple, last: Callable[[tuple], Any]):
        self._step = step
        self.carry = carry
        self._last = last  # which part of the carry to wait for

    def step(self) -> None:
        self.carry = self._step(*self.carry)

    def block(self) -> None:
        jax.block_until_ready(self._last(self.carry))


# --- the floor: hand-written jax.jit over raw pytrees --------------------------------


def make_floor(size: Size) -> Row:
    keys = jax.random.split(jax.random.key(0), size.layers + 1)
    dims = [size.width] * (size.layers + 1)
    params = {
        "layers": [
            {
                "w": jax.random.normal(k, (i, o)) / jnp.sqrt(i),
                "b": jnp.zeros(o),
                "scale": jnp.ones(o),
                "offset": jnp.zeros(o),
            }
            for k, i, o in zip(keys[:-1], dims[:-1], dims[1:])
        ],
        "head": {
            "w": jax.random.normal(keys[-1], (size.width, CLASSES)) / jnp.sqrt(size.width),
            "b": jnp.zeros(CLASSES),
        },
    }
    bn = [{"mean": jnp.zeros(size.width), "var": jnp.ones(size.width)} for _ in range(size.layers)]

    def loss_fn(params, bn, key, x, y):
        h, new_bn = x, []
        for i, (layer, stats) in enumerate(zip(params["layers"], bn)):
            h = h @ layer["w"] + layer["b"]
            mean = h.mean(0)
            var = jnp.maximum((h * h).mean(0) - mean * mean, 0.0)
            new_bn.append(
                {
                    "mean": MOMENTUM * stats["mean"] + (1 - MOMENTUM) * mean,
                    "var": MOMENTUM * stats["var"] + (1 - MOMENTUM) * var,
                }
            )
            h = (h - mean) * jax.lax.rsqrt(var + EPS) * layer["scale"] + layer["offset"]
            h = jax.nn.relu(h)
            keep = jax.random.bernoulli(jax.random.fold_in(key, i), 1 - RATE, h.shape)
            h = jnp.where(keep, h / (1 - RATE), 0.0)
        logits = h @ params["head"]["w"] + params["head"]["b"]
        return xent(logits, y), new_bn

    return _functional_row(size, loss_fn, params, bn)


def _functional_row(size: Size, loss_fn: Callable[..., Any], params: Any, state: Any) -> Row:
    """A hand-written `jax.jit` step over raw pytrees `(params, state, opt_state, key)`.

    `loss_fn(params, state, key, x, y) -> (loss, new_state)`.
    """
    x, y = data(size)
    tx = optax.adam(LR)

    @jax.jit
    def step(params, state, opt_state, key, x, y):
        key, sub = jax.random.split(key)
        (loss, state), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, state, sub, x, y)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), state, opt_state, key, loss

    def run(params, state, opt_state, key, loss):
        return step(params, state, opt_state, key, x, y)

    carry = (params, state, tx.init(params), jax.random.key(1), None)
    return Row(run, carry, lambda c: c[-1])


# --- eqstate -------------------------------------------------------------------------


class EqstateMLP(eqstate.Module):
    layers: list[eqx.nn.Linear]
    norms: list[eqstate.nn.BatchNorm]
    drops: list[eqstate.nn.Dropout]
    head: eqx.nn.Linear

    def __init__(self, size: Size, key: jax.Array):
        keys = jax.random.split(key, 2 * size.layers + 1)
        w = size.width
        self.layers = [eqx.nn.Linear(w, w, key=k) for k in keys[: size.layers]]
        self.norms = [eqstate.nn.BatchNorm(w, momentum=MOMENTUM) for _ in range(size.layers)]
        self.drops = [eqstate.nn.Dropout(RATE, key=k) for k in keys[size.layers : -1]]
        self.head = eqx.nn.Linear(w, CLASSES, key=keys[-1])

    @eqstate.mutating
    def __call__(self, x: jax.Array) -> jax.Array:
        norms, drops = list(self.norms), list(self.drops)
        for i, layer in enumerate(self.layers):
            x, norms[i] = norms[i](jax.vmap(layer)(x))
            x, drops[i] = drops[i](jax.nn.relu(x))
        self.norms, self.drops = norms, drops
        return jax.vmap(self.head)(x)


def _eqstate_step(model, opt, x, y):
    def loss_fn(model):
        logits, model = model(x)
        return xent(logits, y), model

    (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model)
    model, opt = opt.update(grads, model)
    return model, opt, loss


def _make_eqstate(size: Size, jit: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Row:
    x, y = data(size)
    model = EqstateMLP(size, jax.random.key(0))
    opt = eqstate.Optimizer(optax.adam(LR), model)
    step = jit(_eqstate_step)

    def run(model, opt, loss):
        return step(model, opt, x, y)

    return Row(run, (model, opt, None), lambda c: c[-1])


make_eqstate_jit = partial(_make_eqstate, jit=eqstate.jit)
make_eqstate_filter_jit = partial(_make_eqstate, jit=eqx.filter_jit)


# --- Equinox: eqx.nn.State ------------------------------------------------------------


class EqxMLP(eqx.Module):
    layers: list[eqx.nn.Linear]
    norms: list[eqx.nn.BatchNorm]
    drops: list[eqx.nn.Dropout]
    head: eqx.nn.Linear

    def __init__(self, size: Size, key: jax.Array):
        keys = jax.random.split(key, size.layers + 1)
        w = size.width
        self.layers = [eqx.nn.Linear(w, w, key=k) for k in keys[:-1]]
        self.norms = [
            eqx.nn.BatchNorm(w, axis_name="batch", momentum=MOMENTUM, mode="batch")
            for _ in range(size.layers)
        ]
        self.drops = [eqx.nn.Dropout(RATE) for _ in range(size.layers)]
        self.head = eqx.nn.Linear(w, CLASSES, key=keys[-1])

    def __call__(self, x, state, key):
        keys = jax.random.split(key, len(self.layers))
        for layer, norm, drop, k in zip(self.layers, self.norms, self.drops, keys):
            x, state = norm(layer(x), state)
            x = drop(jax.nn.relu(x), key=k)
        return self.head(x), state


def _eqx_loss(model, state, key, x, y):
    keys = jax.random.split(key, x.shape[0])
    batched = jax.vmap(model, axis_name="batch", in_axes=(0, None, 0), out_axes=(0, None))
    logits, state = batched(x, state, keys)
    return xent(logits, y), state


def make_equinox_state(size: Size) -> Row:
    x, y = data(size)
    model, state = eqx.nn.make_with_state(EqxMLP)(size, jax.random.key(0))
    tx = optax.adam(LR)

    @eqx.filter_jit
    def step(model, state, opt_state, key, x, y):
        key, sub = jax.random.split(key)
        (loss, state), grads = eqx.filter_value_and_grad(_eqx_loss, has_aux=True)(
            model, state, sub, x, y
        )
        updates, opt_state = tx.update(grads, opt_state, eqx.filter(model, eqx.is_inexact_array))
        return eqx.apply_updates(model, updates), state, opt_state, key, loss

    def run(model, state, opt_state, key, loss):
        return step(model, state, opt_state, key, x, y)

    opt_state = tx.init(eqx.filter(model, eqx.is_inexact_array))
    return Row(run, (model, state, opt_state, jax.random.key(1), None), lambda c: c[-1])


def make_equinox_partition(size: Size) -> Row:
    model, state = eqx.nn.make_with_state(EqxMLP)(size, jax.random.key(0))
    params, static = eqx.partition(model, eqx.is_inexact_array)

    def loss_fn(params, state, key, x, y):
        return _eqx_loss(eqx.combine(params, static), state, key, x, y)

    return _functional_row(size, loss_fn, params, state)


# --- Flax NNX ---------------------------------------------------------------------------


def _nnx_model(size: Size):
    from flax import nnx

    class NnxMLP(nnx.Module):
        def __init__(self, size: Size, rngs: nnx.Rngs):
            w = size.width
            self.layers = nnx.List([nnx.Linear(w, w, rngs=rngs) for _ in range(size.layers)])
            self.norms = nnx.List(
                [nnx.BatchNorm(w, momentum=MOMENTUM, rngs=rngs) for _ in range(size.layers)]
            )
            self.drops = nnx.List([nnx.Dropout(RATE, rngs=rngs) for _ in range(size.layers)])
            self.head = nnx.Linear(w, CLASSES, rngs=rngs)

        def __call__(self, x):
            for layer, norm, drop in zip(self.layers, self.norms, self.drops):
                x = drop(jax.nn.relu(norm(layer(x))))
            return self.head(x)

    model = NnxMLP(size, nnx.Rngs(params=0, dropout=1))
    return model, nnx.Optimizer(model, optax.adam(LR), wrt=nnx.Param)


def _nnx_train(model, optimizer, x, y):
    from flax import nnx

    def loss_fn(model):
        return xent(model(x), y)

    loss, grads = nnx.value_and_grad(loss_fn)(model)
    optimizer.update(model, grads)
    return loss


def make_nnx_jit(size: Size) -> Row:
    from flax import nnx

    x, y = data(size)
    model, optimizer = _nnx_model(size)
    step = nnx.jit(_nnx_train)

    def run(model, optimizer, loss):
        return model, optimizer, step(model, optimizer, x, y)

    return Row(run, (model, optimizer, None), lambda c: c[-1])


def make_nnx_split_merge(size: Size) -> Row:
    from flax import nnx

    x, y = data(size)
    graphdef, state = nnx.split(_nnx_model(size))

    @jax.jit
    def step(state, x, y):
        model, optimizer = nnx.merge(graphdef, state)
        loss = _nnx_train(model, optimizer, x, y)
        return nnx.state((model, optimizer)), loss

    def run(state, loss):
        return step(state, x, y)

    return Row(run, (state, None), lambda c: c[-1])


# --- Haiku ----------------------------------------------------------------------------


def make_haiku(size: Size) -> Row:
    import haiku as hk

    def forward(x, is_training):
        for _ in range(size.layers):
            x = hk.Linear(size.width)(x)
            x = hk.BatchNorm(True, True, MOMENTUM, eps=EPS)(x, is_training)
            x = hk.dropout(hk.next_rng_key(), RATE, jax.nn.relu(x))
        return hk.Linear(CLASSES)(x)

    f = hk.transform_with_state(forward)
    params, state = f.init(jax.random.key(0), data(size)[0], True)

    def loss_fn(params, state, key, x, y):
        logits, new_state = f.apply(params, state, key, x, True)
        return xent(logits, y), new_state

    return _functional_row(size, loss_fn, params, state)


ROWS: dict[str, Callable[[Size], Row]] = {
    "jax.jit, raw pytrees (floor)": make_floor,
    "eqstate + eqstate.jit": make_eqstate_jit,
    "eqstate + eqx.filter_jit": make_eqstate_filter_jit,
    "equinox filter_jit + eqx.nn.State": make_equinox_state,
    "equinox partition + jax.jit": make_equinox_partition,
    "flax.nnx.jit": make_nnx_jit,
    "flax.nnx split/merge + jax.jit": make_nnx_split_merge,
    "haiku transform_with_state": make_haiku,
}
