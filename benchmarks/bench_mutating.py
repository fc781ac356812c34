"""What `@eqstate.mutating`'s guarantees cost per call, eager and traced.

    python benchmarks/bench_mutating.py [--baseline REV]

A mutating call copies every container reachable from `self` (so the caller's model is
never changed), checks items set into containers when the method returns, and tracks
children's updates (so a dropped one raises). This script times, for a few models:

- `no-op call`: a mutating method whose body does nothing: the machinery alone, eager.
- `forward`: the model's own mutating `__call__` on a batch, eager (JAX's eager ops
  included).
- `trace`: `jax.make_jaxpr` of a forward call, i.e. what tracing a jitted step pays once.

A jitted step runs none of this per call: `mutating` runs only while JAX traces.

With `--baseline REV`, the same measurements are taken with eqstate from git revision
REV (checked out into a temporary worktree) and shown beside the current ones. The table
goes to stdout and to `benchmarks/MUTATING.md`.
"""

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import equinox as eqx
import jax


def _load_eqstate(root: str) -> None:
    """Import eqstate from `root` (another revision) instead of the installed one."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "eqstate",
        Path(root) / "eqstate" / "__init__.py",
        submodule_search_locations=[str(Path(root) / "eqstate")],
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["eqstate"] = module
    spec.loader.exec_module(module)


if "--from" in sys.argv:
    _load_eqstate(sys.argv[sys.argv.index("--from") + 1])

import eqstate  # noqa: E402


HERE = Path(__file__).resolve().parent


class MLP(eqstate.Module):
    """The demo's shape: Linear -> BatchNorm -> Dropout, in lists (Equinox's habit)."""

    layers: list
    norms: list
    drops: list

    def __init__(self, width: int, depth: int, key: jax.Array):
        keys = jax.random.split(key, 2 * depth)
        self.layers = [eqx.nn.Linear(width, width, key=k) for k in keys[:depth]]
        self.norms = [eqstate.nn.BatchNorm(width) for _ in range(depth)]
        self.drops = [eqstate.nn.Dropout(0.1, key=k) for k in keys[depth:]]

    @eqstate.mutating
    def __call__(self, x: jax.Array) -> jax.Array:
        for i, layer in enumerate(self.layers):
            x, self.norms[i] = self.norms[i](jax.vmap(layer)(x))
            x, self.drops[i] = self.drops[i](jax.nn.relu(x))
        return x

    @eqstate.mutating
    def noop(self) -> None:
        return None


def models() -> dict[str, tuple[MLP, jax.Array]]:
    out = {}
    for width, depth in ((32, 2), (32, 8), (32, 32)):
        model = MLP(width, depth, jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (16, width))
        out[f"MLP depth {depth}"] = (model, x)
    return out


def median_time(fn, repeats: int, number: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(number):
            fn()
        times.append((time.perf_counter() - t) / number)
    return statistics.median(times)


def measure() -> dict[str, dict[str, float]]:
    results = {}
    for name, (model, x) in models().items():
        jax.block_until_ready(model(x))
        results[name] = {
            "no-op call": median_time(model.noop, 7, 200),
            "forward": median_time(lambda m=model, x=x: jax.block_until_ready(m(x)), 5, 5),
            "trace": median_time(
                lambda m=model, x=x: jax.make_jaxpr(lambda m, x: m(x))(m, x), 5, 2
            ),
        }
    return results


def baseline(rev: str) -> dict[str, dict[str, float]]:
    root = HERE.parent
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "old"
        subprocess.run(
            ["git", "-C", str(root), "worktree", "add", "--detach", str(tree), rev],
            check=True,
            capture_output=True,
        )
        try:
            out = subprocess.run(
                [sys.executable, __file__, "--json", "--from", str(tree)],
                check=True,
                capture_output=True,
                text=True,
            )
        finally:
            subprocess.run(
                ["git", "-C", str(root), "worktree", "remove", "--force", str(tree)], check=True
            )
    return json.loads(out.stdout)


def fmt(seconds: float) -> str:
    return f"{seconds * 1e6:,.0f} µs" if seconds < 1e-2 else f"{seconds * 1e3:,.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description="What mutating's guarantees cost per call.")
    parser.add_argument("--baseline", help="a git revision to compare with")
    parser.add_argument("--json", action="store_true", help="print raw results as JSON")
    parser.add_argument("--from", help="import eqstate from this checkout (internal)")
    args = parser.parse_args()
    now = measure()
    if args.json:
        print(json.dumps({**now, "eqstate": {"file": eqstate.__file__}}))
        return
    before = baseline(args.baseline) if args.baseline else None
    if before is not None:
        print("baseline eqstate from", before.pop("eqstate")["file"])
    command = f" --baseline {args.baseline}" if args.baseline else ""
    lines = [
        "# What `mutating`'s guarantees cost",
        "",
        f"`python benchmarks/bench_mutating.py{command}` on {os.cpu_count()} CPU cores, "
        f"jax {jax.__version__}, {datetime.date.today().isoformat()}. Medians; eager calls "
        "include JAX's own eager dispatch. A jitted step pays none of this per call: "
        "`mutating` runs while JAX traces. The no-op row is the guarantee's own cost (the "
        "private copy of every container, the checks when the method returns, the tracking "
        "of children's updates); the other rows also include whatever else changed between "
        "the two revisions (the layers themselves).",
        "",
    ]
    header = "| model | measure | now |" + (f" {args.baseline} | cost |" if before else "")
    lines += [header, "|" + "---|" * (header.count("|") - 1)]
    for name, row in now.items():
        for what, t in row.items():
            cells = f"| {name} | {what} | {fmt(t)} |"
            if before:
                b = before[name][what]
                cells += f" {fmt(b)} | {(t - b) * 1e6:+,.0f} µs ({t / b:.2f}x) |"
            lines.append(cells)
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "MUTATING.md").write_text(text)


if __name__ == "__main__":
    main()
