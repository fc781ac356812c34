"""Soak test: 10,000 training steps through `eqstate.jit`; write benchmarks/SOAK.md.

    python benchmarks/soak.py [--steps 10000] [--every 1000]

The dispatch-bound step of `bench_step.py` (MLP + BatchNorm + Dropout + Adam), fed a new
batch of a fixed data set every step, as a training loop is. Checks that the step
compiles once and that the process's memory stays flat: resident memory (VmRSS) and the
number of live Python objects are sampled along the way. A script, not a timed test.
"""

import argparse
import datetime
import gc
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _rows  # noqa: E402

import eqstate  # noqa: E402


def rss_mb() -> float:
    status = Path("/proc/self/status").read_text()
    return int(status.split("VmRSS:")[1].split()[0]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description="Soak test of eqstate.jit.")
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--every", type=int, default=1_000)
    parser.add_argument("--out", type=Path, default=HERE / "SOAK.md")
    args = parser.parse_args()

    size = _rows.SIZES["dispatch"]
    rng = np.random.default_rng(0)
    data_x = jnp.asarray(rng.normal(size=(64 * size.batch, size.width)), jnp.float32)
    data_y = jnp.asarray(rng.integers(0, _rows.CLASSES, 64 * size.batch), jnp.int32)
    model = _rows.EqstateMLP(size, jax.random.key(0))
    opt = eqstate.Optimizer(optax.adam(_rows.LR), model)
    step = eqstate.jit(_rows._eqstate_step, donate="all-except-first", max_traces=1)

    samples = []
    start, paused = time.perf_counter(), 0.0
    loss = None
    for i in range(1, args.steps + 1):
        b = i % 64
        x = data_x[b * size.batch : (b + 1) * size.batch]
        y = data_y[b * size.batch : (b + 1) * size.batch]
        model, opt, loss = step(model, opt, x, y)
        if i == 1 or i % args.every == 0:
            jax.block_until_ready(loss)
            elapsed = time.perf_counter() - start - paused
            pause = time.perf_counter()
            gc.collect()
            samples.append((i, rss_mb(), len(gc.get_objects()), elapsed))
            paused += time.perf_counter() - pause  # sampling is not part of the steps
            print(f"step {i}: RSS {samples[-1][1]:.1f} MB, {samples[-1][2]} objects", flush=True)
    jax.block_until_ready((model, opt, loss))

    assert step.traces == 1, f"compiled {step.traces} times: {step.retrace_reasons}"
    assert len(step._cache) == 1 and len(step._parts) <= 8, "the cache grew"
    assert int(opt.step) == args.steps

    warm = next(s for s in samples if s[0] >= args.every)
    growth = samples[-1][1] - warm[1]
    objects = samples[-1][2] - warm[2]
    per_step = (samples[-1][3] - warm[3]) / max(1, samples[-1][0] - warm[0]) * 1e6
    lines = [
        "# Soak test of `eqstate.jit`",
        "",
        f"Written by `benchmarks/soak.py` on {datetime.date.today()}: {args.steps:,} training "
        f"steps of the dispatch-bound `bench_step.py` model (batch {size.batch}, width "
        f"{size.width}, {size.layers} layers, BatchNorm, Dropout, Adam), a new batch every "
        'step, `eqstate.jit(donate="all-except-first", max_traces=1)`.',
        "",
        f"- Compilations: {step.traces}",
        f"- Resident memory from step {warm[0]:,} to {samples[-1][0]:,}: {growth:+.1f} MB",
        f"- Live Python objects from step {warm[0]:,} to {samples[-1][0]:,}: {objects:+d}",
        f"- Mean time per step after step {warm[0]:,}: {per_step:.0f} µs",
        f"- Final loss: {float(loss):.4f}",  # pyright: ignore[reportArgumentType]
        "",
        "| step | RSS (MB) | live Python objects | time in steps (s) |",
        "|---:|---:|---:|---:|",
        *[f"| {i:,} | {rss:.1f} | {n:,} | {t:.1f} |" for i, rss, n, t in samples],
        "",
    ]
    args.out.write_text("\n".join(lines))
    print("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
