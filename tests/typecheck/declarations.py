"""Checked by pyright in test_typing.py: field declarations a user writes."""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp

import eqstate


class Cache(eqstate.State):
    pass


class Layer(eqstate.Module):
    weight: jax.Array
    count: jax.Array = eqstate.State.field(default=0)
    total: jax.Array = eqstate.field(kind=eqstate.State, default_factory=lambda: jnp.zeros(()))
    mean: jax.Array = eqstate.BatchStat.field(default_factory=lambda: jnp.zeros(3))
    cache: jax.Array = Cache.field(default_factory=lambda: jnp.zeros(3), fixed_shape=False)
    key: jax.Array = eqstate.Rng.field(init=False)
    name: str = eqx.field(static=True, default="layer")
    extra: int = dataclasses.field(default=0)

    def __post_init__(self) -> None:
        self.key = jax.random.key(0)

    @eqstate.mutating
    def __call__(self, x: jax.Array) -> jax.Array:
        self.count += x.size
        return x * self.weight


layer = Layer(jnp.ones(3))
layer = Layer(jnp.ones(3), jnp.array(1), jnp.zeros(()), jnp.zeros(3), jnp.zeros(3), "x", 1)
y, new_layer = layer(jnp.ones(3))
out: jax.Array = y
again: Layer = new_layer
params: eqstate.Module = layer.parameters()
updated: Layer = layer.update(params)
