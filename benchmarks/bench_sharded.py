"""Time the stateful training step data-parallel on 8 simulated CPU devices; write
benchmarks/SHARDED.md.

    python benchmarks/bench_sharded.py [--repeats 15]

The step of `bench_step.py` (MLP + BatchNorm + Dropout + Adam, as an `eqstate.Module`
and an `eqstate.Optimizer`) with each batch split over the mesh's "data" axis, in two
layouts: a 1-D mesh of 8 devices with the model replicated, and (where
`eqstate.shardings` exists) a 4 x 2 mesh with the parameters and Adam's moments split
along "model". The floor of each layout is the same step written by hand: `jax.jit`
over the flattened arrays of `(model, opt)`, with `in_shardings` and `out_shardings`.
The other rows call the step through `eqstate.jit` or `eqx.filter_jit` without
shardings (the inputs carry theirs and XLA chooses the outputs'), or through
`eqstate.jit` with the step ending in `eqstate.place` (the outputs pinned to the
inputs' shardings). The tables say whether the outputs came back with the inputs'
shardings and count compilations in the first five steps and in the timed ones. Rows
are measured interleaved after warmup; the tables report the median over repeats.
"""

import os


# before JAX starts: 8 CPU devices, other flags kept
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
    + ["--xla_force_host_platform_device_count=8"]
)

import argparse
import datetime
import statistics
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import optax
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import eqstate


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _rows  # noqa: E402
from bench_step import machine, measure, steps_for, versions  # noqa: E402


COMPILES = [0]  # XLA compilations so far


def _count_compiles(event: str, duration_secs: float, **kwargs: Any) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compiles)


class Layout:
    """A mesh, and the shardings of `(model, opt)` and of a batch on it."""

    def __init__(self, name: str, shape: tuple[int, ...], axes: tuple[str, ...], rules: list):
        self.name = name
        self.mesh = jax.make_mesh(shape, axes, axis_types=(AxisType.Auto,) * len(axes))
        self.rules = rules
        self.batch = NamedSharding(self.mesh, P("data"))
        self.replicated = NamedSharding(self.mesh, P())

    def shardings(self, tree: Any) -> Any:
        """A `NamedSharding` at each array of `tree` (`None` elsewhere)."""
        if self.rules:
            return eqstate.shardings(tree, self.mesh, self.rules)
        return jax.tree.map(lambda x: self.replicated if eqx.is_array(x) else None, tree)


def build(size: _rows.Size, layout: Layout):
    """`(model, opt)` on their shardings, those shardings, and a batch split over "data"."""
    model = _rows.EqstateMLP(size, jax.random.key(0))
    tree = (model, eqstate.Optimizer(optax.adam(_rows.LR), model))
    shardings = layout.shardings(tree)
    dynamic, static = eqx.partition(tree, eqx.is_array)
    tree = eqx.combine(jax.device_put(dynamic, shardings), static)
    x, y = (jax.device_put(a, layout.batch) for a in _rows.data(size))
    return tree, shardings, x, y


def make_hand(size: _rows.Size, layout: Layout) -> _rows.Row:
    """The floor: `jax.jit` over the flat list of arrays, shardings given in and out."""
    tree, shardings, x, y = build(size, layout)
    dynamic, static = eqx.partition(tree, eqx.is_array)
    leaves, treedef = jax.tree.flatten(dynamic)
    specs = jax.tree.leaves(shardings)  # in the order of `leaves`

    def step(leaves, x, y):
        model, opt = eqx.combine(jax.tree.unflatten(treedef, leaves), static)
        model, opt, loss = _rows._eqstate_step(model, opt, x, y)
        return jax.tree.leaves(eqx.filter((model, opt), eqx.is_array)), loss

    jitted = jax.jit(
        step,
        in_shardings=(specs, layout.batch, layout.batch),
        out_shardings=(specs, layout.replicated),
    )

    def run(leaves, loss):
        return jitted(leaves, x, y)

    return _rows.Row(run, (leaves, None), lambda c: c[-1])


def _make_wrapped(jit: Callable[[Callable[..., Any]], Callable[..., Any]], place: bool = False):
    def make(size: _rows.Size, layout: Layout) -> _rows.Row:
        (model, opt), shardings, x, y = build(size, layout)

        def placed(model, opt, x, y):  # outputs pinned to the inputs' shardings
            model, opt, loss = _rows._eqstate_step(model, opt, x, y)
            model, opt = eqstate.place((model, opt), shardings)
            return model, opt, loss

        step = jit(placed if place else _rows._eqstate_step)

        def run(model, opt, loss):
            return step(model, opt, x, y)

        return _rows.Row(run, (model, opt, None), lambda c: c[-1])

    return make


ROWS: dict[str, Callable[[_rows.Size, Layout], _rows.Row]] = {
    "jax.jit, flat arrays, in/out shardings (floor)": make_hand,
    "eqstate.jit": _make_wrapped(eqstate.jit),
    "eqx.filter_jit": _make_wrapped(eqx.filter_jit),
}
if hasattr(eqstate, "place"):
    ROWS["eqstate.jit, step ends with eqstate.place"] = _make_wrapped(eqstate.jit, place=True)


def layouts() -> list[Layout]:
    out = [Layout("batch over 8 devices, model replicated", (8,), ("data",), [])]
    if hasattr(eqstate, "shardings"):
        rules = [(eqstate.State, P()), (eqstate.Param, P("model"))]  # statistics replicated
        out.append(Layout("batch over 4, parameters over 2", (4, 2), ("data", "model"), rules))
    return out


def first_steps(row: _rows.Row, n: int = 5) -> tuple[list[str], int]:
    """Run a fresh row's first `n` steps: which arrays the first step returned with
    other shardings than they went in with, and how many compilations the steps took."""
    before = jax.tree_util.tree_leaves_with_path(row.carry[:-1])
    compiles = COMPILES[0]
    row.step()
    after = jax.tree.leaves(row.carry[:-1])
    changes: dict[str, list[str]] = {}  # "P() -> P('model',)": paths
    for (path, x), y in zip(before, after, strict=True):
        if eqx.is_array(x) and not x.sharding.is_equivalent_to(y.sharding, y.ndim):
            change = f"{_spec(x)} -> {_spec(y)}"
            changes.setdefault(change, []).append(f"`{jax.tree_util.keystr(path)}`")
    moved = []
    for change, paths in changes.items():
        shown = ", ".join(paths[:2]) + (", ..." if len(paths) > 2 else "")
        moved.append(f"{len(paths)} array{'s' if len(paths) > 1 else ''} ({shown}) {change}")
    for _ in range(n - 1):
        row.step()
    row.block()
    return moved, COMPILES[0] - compiles


def _spec(x: jax.Array) -> str:
    return str(getattr(x.sharding, "spec", x.sharding))


def bench(size: _rows.Size, layout: Layout, repeats: int) -> list[dict]:
    rows = {name: make(size, layout) for name, make in ROWS.items()}
    first = {name: first_steps(row) for name, row in rows.items()}
    for row in rows.values():  # warmup
        for _ in range(10):
            row.step()
        row.block()
    counts = {name: steps_for(row) for name, row in rows.items()}
    names = list(rows)
    samples: dict[str, list[float]] = {name: [] for name in names}
    compiles = dict.fromkeys(names, 0)
    for r in range(repeats):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            before = COMPILES[0]
            samples[name].append(measure(rows[name], counts[name]))
            compiles[name] += COMPILES[0] - before
    floor = statistics.median(samples[names[0]])
    return [
        {
            "row": name,
            "us": statistics.median(samples[name]) * 1e6,
            "ratio": statistics.median(samples[name]) / floor,
            "moved": first[name][0],
            "compiles": f"{first[name][1]} / {compiles[name]}",
        }
        for name in names
    ]


def table(size: _rows.Size, layout: Layout, results: list[dict]) -> str:
    lines = [
        f"### {size.name} (batch {size.batch}, width {size.width}, {size.layers} layers): "
        f"{layout.name}",
        "",
        "| row | µs/step | x floor | outputs keep their shardings | compilations: first 5 steps "
        "/ timed |",
        "|---|---:|---:|:---:|---:|",
    ]
    lines += [
        f"| {r['row']} | {r['us']:.1f} | {r['ratio']:.2f} | {'no' if r['moved'] else 'yes'} "
        f"| {r['compiles']} |"
        for r in results
    ]
    for r in results:
        if r["moved"]:
            lines.append(f"\n{r['row']}: the first step returned " + ", ".join(r["moved"]) + ".")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description="The training step on 8 simulated devices.")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--sizes", nargs="+", default=list(_rows.SIZES))
    parser.add_argument("--out", type=Path, default=HERE / "SHARDED.md")
    args = parser.parse_args()
    assert jax.device_count() == 8, jax.devices()
    load = os.getloadavg()

    sections, headline = [], []
    for key in args.sizes:
        size = _rows.SIZES[key]
        for layout in layouts():
            results = bench(size, layout, args.repeats)
            text = table(size, layout, results)
            print(text + "\n", flush=True)
            sections.append(text)
            ratio = next(r["ratio"] for r in results if r["row"] == "eqstate.jit")
            headline.append(f"{size.name}, {layout.name}: {ratio:.2f}x")
    missing = (
        []
        if hasattr(eqstate, "shardings")
        else [
            "- `eqstate.shardings` does not exist in this version: no row with the parameters "
            "sharded.",
        ]
    )
    report = [
        "# The training step on 8 simulated CPU devices",
        "",
        f"Written by `benchmarks/bench_sharded.py` on {datetime.date.today()}.",
        "",
        f"- Machine: {machine()}; {jax.device_count()} devices from "
        "`--xla_force_host_platform_device_count=8`, so every device shares the same cores "
        "and the times measure dispatch and XLA's partitioned program, not a speed-up.",
        f"- Versions: {versions()}",
        f"- Median of {args.repeats} interleaved repeats after warmup; 'x floor' is the ratio "
        "to the first row of each table. Load average (1 min) at the start and the end: "
        f"{load[0]:.1f}, {os.getloadavg()[0]:.1f}.",
        "- eqstate.jit / hand-written jax.jit: " + "; ".join(headline) + ".",
        *missing,
        "",
        "A step over simulated devices costs milliseconds (the devices' threads share two "
        "cores), so `eqstate.jit`'s per-call work (microseconds, see RESULTS.md) is lost in "
        "it; ratios within a few percent of 1 are noise. Where a row's outputs do not keep "
        "their shardings (XLA chose another layout for them), its second step compiles "
        "again for the new layout; `eqstate.jit`'s `traces` does not count that (JAX lowers "
        "the same trace again), and ending the step with `eqstate.place` pins the layouts.",
        "",
        *[s + "\n" for s in sections],
    ]
    args.out.write_text("\n".join(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
