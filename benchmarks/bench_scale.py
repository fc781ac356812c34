"""Per-call overhead versus model size, for `eqstate.jit`, `eqx.filter_jit` and `jax.jit`.

    python benchmarks/bench_scale.py [--sizes 10 100 1000 10000]

Every row runs the same compiled computation (add one to every leaf of a module holding
N small arrays), so differences between rows are the per-call cost of the wrapper:
flattening, cache lookup, output rebuild. `jax.jit (flat list)` passes the leaves as a
list, the cheapest possible call; each cell shows the median time per call and, in
brackets, the excess over that row. Rows are interleaved; medians of repeats are
reported.
"""

import argparse
import datetime
import os
import statistics
import time
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp

import eqstate


class Bag(eqstate.Module):
    items: list[jax.Array]
    count: jax.Array = eqstate.State.field(default=0)


def step(bag: Bag) -> Bag:
    return Bag([x + 1 for x in bag.items], bag.count + 1)


def flat_step(items: list[jax.Array]) -> list[jax.Array]:
    return [x + 1 for x in items]


def rows(n: int) -> dict:
    bag = Bag([jnp.zeros(4) for _ in range(n - 1)])
    return {
        "jax.jit (flat list)": (jax.jit(flat_step), jax.tree_util.tree_leaves(bag)),
        "jax.jit (module)": (jax.jit(step), bag),
        "eqstate.jit": (eqstate.jit(step), bag),
        "eqx.filter_jit": (eqx.filter_jit(step), bag),
    }


def measure(fn, carry, calls: int) -> tuple[float, object]:
    jax.block_until_ready(carry)
    t = time.perf_counter()
    for _ in range(calls):
        carry = fn(carry)
    jax.block_until_ready(carry)
    return (time.perf_counter() - t) / calls, carry


def main() -> None:
    parser = argparse.ArgumentParser(description="Per-call overhead versus model size.")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 100, 1000, 10000])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "SCALE.md")
    args = parser.parse_args()

    lines = ["| leaves | " + " | ".join(rows(2)) + " |", "|---:|" + "---:|" * len(rows(2))]
    print("\n".join(lines))
    for n in args.sizes:
        table = rows(n)
        carries = {}
        for name, (fn, carry) in table.items():
            carries[name] = fn(carry)  # compile
        calls = max(3, 20_000 // n)
        samples: dict[str, list[float]] = {name: [] for name in table}
        for _ in range(args.repeats):
            for name, (fn, _) in table.items():
                sec, carries[name] = measure(fn, carries[name], calls)
                samples[name].append(sec)
        medians = [statistics.median(s) * 1e6 for s in samples.values()]
        base = medians[0]
        cells = [f"{m:.0f} µs (+{m - base:.0f})" for m in medians]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
        print(lines[-1], flush=True)
    header = [
        "# Per-call overhead versus number of leaves",
        "",
        f"Written by `benchmarks/bench_scale.py` on {datetime.date.today()}; "
        f"JAX {jax.__version__}, Equinox {eqx.__version__}, {os.cpu_count()} cores, "
        f"{jax.default_backend()}.",
        "",
    ]
    args.out.write_text("\n".join(header + lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
