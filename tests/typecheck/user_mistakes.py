"""Checked by pyright in test_typing.py: each line marked `# expect: <rule>` is a mistake
pyright must report under that rule, and nothing else may be reported. Never run."""

import jax
import jax.numpy as jnp
from jaxtyping import Array

import eqstate


class NoDecay(eqstate.Param):
    pass


class Linear(eqstate.Module):
    weight: Array
    calls: jax.Array = eqstate.State.field(default=0)

    @eqstate.mutating
    def __call__(self, x: Array) -> Array:
        self.calls += 1
        return x @ self.weight

    @eqstate.jit
    def predict(self, x: Array) -> Array:
        return x @ self.weight


class Other(eqstate.Module):
    weight: Array


@eqstate.jit
def step(model: Linear, x: Array) -> tuple[Array, Linear]:
    return model(x)


@eqstate.jit(max_traces=2)
def scaled(model: Linear, x: Array, *, scale: float = 1.0) -> Array:
    return model.predict(x) * scale


model = Linear(jnp.ones((3, 2)))
x = jnp.ones((4, 3))

# kinds are classes, never instances
eqstate.State()  # expect: reportAbstractUsage
NoDecay()  # expect: reportAbstractUsage

# a jitted function keeps the signature of the function it wraps
step(model)  # expect: reportCallIssue
step(model, x, x)  # expect: reportCallIssue
step(model, "x")  # expect: reportArgumentType
scaled(model, x, scale="big")  # expect: reportArgumentType
scaled(model, x, shift=1.0)  # expect: reportCallIssue
model.predict(x, x)  # expect: reportCallIssue
model.predict(model)  # expect: reportArgumentType

# ... and its return type
y, new = step(model, x)
count: int = step(model, x)  # expect: reportAssignmentType
wrong: Other = new  # expect: reportAssignmentType
z: str = model.predict(x)  # expect: reportAssignmentType

# trees keep the type of the model they come from
params, state, rest = eqstate.partition(model, eqstate.Param)  # expect: reportAssignmentType
other: Other = eqstate.filter(model, eqstate.State)  # expect: reportAssignmentType
back: Linear = eqstate.combine(params, Other(jnp.ones(2)))  # expect: reportAssignmentType

# fields are checked when a module is built
Linear("weights")  # expect: reportArgumentType
eqstate.jit(donate="some")  # expect: reportArgumentType
