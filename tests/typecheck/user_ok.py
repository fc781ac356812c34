"""Checked by pyright in test_typing.py (0 errors) and run by it: user code whose types
eqstate must keep, from the model's declaration to a jitted training step."""

from typing import assert_type, cast

import equinox as eqx
import jax
import jax.numpy as jnp
import optax
from jaxtyping import Array, Float

import eqstate


class NoDecay(eqstate.Param):
    """A user kind: parameters that weight decay skips."""


class Linear(eqstate.Module):
    weight: Float[Array, "out in"]
    bias: Float[Array, " out"] = NoDecay.field()
    calls: jax.Array = eqstate.State.field(default=0)
    mean: jax.Array = eqstate.BatchStat.field(default_factory=lambda: jnp.zeros(2))
    key: jax.Array = eqstate.field(kind=eqstate.Rng, default_factory=lambda: jax.random.key(0))
    name: str = eqx.field(static=True, default="linear")

    @eqstate.mutating
    def __call__(self, x: Float[Array, "batch in"]) -> Float[Array, "batch out"]:
        y = x @ self.weight.T + self.bias
        self.calls += 1
        self.mean = 0.9 * self.mean + 0.1 * jnp.mean(y, axis=0)
        return y

    @eqstate.jit
    def predict(self, x: Float[Array, "batch in"]) -> Float[Array, "batch out"]:
        return x @ self.weight.T + self.bias


def loss_fn(model: Linear, x: Array, y: Array) -> tuple[Array, Linear]:
    pred, model = model(x)
    return jnp.mean((pred - y) ** 2), model


@eqstate.jit(donate="all-except-first", max_traces=1)
def train_step(
    model: Linear, opt: eqstate.Optimizer, x: Array, y: Array
) -> tuple[Linear, eqstate.Optimizer, Array]:
    (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
    # whatever `Optimizer.update` is annotated to return, it returns these
    model, opt = cast(tuple[Linear, eqstate.Optimizer], opt.update(grads, model))
    return model, opt, loss


@eqstate.jit
def evaluate(model: Linear, x: Array, *, scale: float = 1.0) -> Array:
    return model.predict(x) * scale


model = Linear(jnp.ones((2, 3)), jnp.zeros(2))
assert_type(model, Linear)


def decays(path: tuple, kind: type[eqstate.Kind], leaf: Array) -> bool:
    return not issubclass(kind, NoDecay)


opt = eqstate.Optimizer(optax.adamw(1e-2, mask=lambda p: eqstate.spec(p, decays)), model)
x, y = jnp.ones((4, 3)), jnp.zeros((4, 2))

for _ in range(2):
    model, opt, loss = train_step(model, opt, x, y)
    assert_type(model, Linear)
    assert_type(opt, eqstate.Optimizer)
    assert_type(loss, Array)

pred: Array = evaluate(model, x, scale=2.0)
assert_type(model.predict(x), Float[Array, "batch out"])
assert_type(train_step.traces, int)

out, model = model(x)
assert_type(out, Float[Array, "batch out"])

params, rest = eqstate.partition(model, eqstate.Param)
assert_type(params, Linear)
assert_type(eqstate.combine(params, rest), Linear)
trainable, state, other = eqstate.partition(model, eqstate.Param, eqstate.State)
model = eqstate.combine(trainable, state, other)
assert_type(eqstate.filter(model, eqstate.State), Linear)
assert_type(model.parameters(), Linear)
assert_type(model.states(), Linear)
assert_type(model.filter(NoDecay), Linear)
assert_type(model.update(model.states()), Linear)
assert_type(eqstate.update(model, eqstate.filter(model, eqstate.BatchStat)), Linear)
dynamic, static = eqx.partition(model, eqstate.spec(model, eqstate.Param))

assert issubclass(NoDecay, eqstate.Param) and not isinstance(model, eqstate.Kind)
assert int(model.calls) == 3 and train_step.traces == 1
