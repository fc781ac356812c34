"""A running average that keeps its count and total as state, updated under `jax.jit`."""

import jax
import jax.numpy as jnp

import eqstate


class Average(eqstate.Module):
    count: jax.Array = eqstate.State.field(default=0)
    total: jax.Array = eqstate.State.field(default=0.0)

    @eqstate.mutating
    def __call__(self, x: jax.Array) -> jax.Array:
        self.count += x.size
        self.total += jnp.sum(x)
        return self.total / self.count


@jax.jit
def step(avg: Average, x: jax.Array) -> tuple[jax.Array, Average]:
    return avg(x)


def main() -> None:
    avg = Average()
    key = jax.random.key(0)
    for i in range(5):
        key, sub = jax.random.split(key)
        mean, avg = step(avg, jax.random.normal(sub, (100,)) + i)
        print(f"batch {i}: running mean {float(mean):+.3f} over {int(avg.count)} values")


if __name__ == "__main__":
    main()
