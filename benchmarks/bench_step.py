"""Time one stateful training step across libraries; write benchmarks/RESULTS.md.

    python benchmarks/bench_step.py [--repeats 15] [--no-memory] [--profile]

Rows are measured interleaved in one process (each repeat runs every row once, in a
rotated order, so drift in the machine hits all rows alike); the table reports the
median over repeats. Time to first step (trace + compile + run) is the median over
three fresh builds. Peak memory is the peak resident set (VmHWM) of a fresh process that
builds the row and runs 50 steps.
"""

import argparse
import cProfile
import datetime
import io
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import jax


HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import _rows  # noqa: E402


TARGET_STEPS_S = 0.05  # run about this long per measurement


def steps_for(row: _rows.Row) -> int:
    row.step()
    row.block()
    t = time.perf_counter()
    row.step()
    row.block()
    one = time.perf_counter() - t
    return max(5, min(2000, int(TARGET_STEPS_S / max(one, 1e-6))))


def measure(row: _rows.Row, n: int) -> float:
    row.block()
    t = time.perf_counter()
    for _ in range(n):
        row.step()
    row.block()
    return (time.perf_counter() - t) / n


def first_step(make, size) -> float:
    times = []
    for _ in range(3):
        t = time.perf_counter()
        row = make(size)
        row.step()
        row.block()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def peak_memory_mb(name: str, size_key: str) -> float:
    """Peak resident memory of a fresh process that builds the row and runs 50 steps.

    Read from `VmHWM`, the high-water mark of the process's own address space:
    `ru_maxrss` would also count the parent's memory, inherited across fork and exec.
    """
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import _rows\n"
        f"row = _rows.ROWS[{name!r}](_rows.SIZES[{size_key!r}])\n"
        "for _ in range(50): row.step()\n"
        "row.block()\n"
        "status = open('/proc/self/status').read().split('VmHWM:')[1]\n"
        "print(int(status.split()[0]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    return int(out.split()[-1]) / 1024


def bench(size_key: str, repeats: int, memory: bool) -> list[dict]:
    size = _rows.SIZES[size_key]
    names = list(_rows.ROWS)
    rows = {name: _rows.ROWS[name](size) for name in names}
    counts = {name: steps_for(rows[name]) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(repeats):
        order = names[r % len(names) :] + names[: r % len(names)]
        for name in order:
            samples[name].append(measure(rows[name], counts[name]))
    results = [
        {
            "row": name,
            "us": statistics.median(samples[name]) * 1e6,
            "first_s": first_step(_rows.ROWS[name], size),
            "mem_mb": peak_memory_mb(name, size_key) if memory else float("nan"),
        }
        for name in names
    ]
    floor = results[0]
    for res in results:
        res["ratio"] = res["us"] / floor["us"]
        res["first_ratio"] = res["first_s"] / floor["first_s"]
    return results


def table(size_key: str, results: list[dict]) -> str:
    s = _rows.SIZES[size_key]
    lines = [
        f"### {s.name}: batch {s.batch}, width {s.width}, {s.layers} layers",
        "",
        "| row | µs/step | x floor | first step (s) | x floor | peak RSS (MB) |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {r['row']} | {r['us']:.1f} | {r['ratio']:.2f} | {r['first_s']:.2f} | "
        f"{r['first_ratio']:.2f} | {r['mem_mb']:.0f} |"
        for r in results
    ]
    return "\n".join(lines)


def profile_eqstate_call(n: int = 2000) -> str:
    """cProfile of `eqstate.jit`'s per-call path on the dispatch-bound step."""
    row = _rows.make_eqstate_jit(_rows.SIZES["dispatch"])
    for _ in range(20):
        row.step()
    row.block()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(n):
        row.step()
    row.block()
    prof.disable()
    buf = io.StringIO()
    pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(12)
    return buf.getvalue()


def targets(all_results: dict[str, list[dict]]) -> str:
    """The issue's targets, each with the measured figure and whether it is met."""
    lines = ["## Targets", "", "| target | measured | met |", "|---|---:|:---:|"]

    def row(target: str, value: float, limit: float, unit: str = "x") -> None:
        lines.append(f"| {target} | {value:.2f}{unit} | {'yes' if value <= limit else 'NO'} |")

    for key, results in all_results.items():
        by = {r["row"]: r for r in results}
        name = _rows.SIZES[key].name
        limit = 1.15 if key == "dispatch" else 1.03
        row(f"eqstate.jit <= {limit}x floor ({name})", by["eqstate + eqstate.jit"]["ratio"], limit)
        ours = by["eqstate + eqx.filter_jit"]["us"] / by["equinox filter_jit + eqx.nn.State"]["us"]
        row(f"eqstate + filter_jit <= Equinox's stateful pattern ({name})", ours, 1.0)
        first = by["eqstate + eqstate.jit"]["first_ratio"]
        row(f"eqstate trace + compile <= 1.2x floor's ({name})", first, 1.2)
    return "\n".join(lines)


def versions() -> str:
    pkgs = ["jax", "jaxlib", "equinox", "optax", "flax", "dm-haiku", "eqstate"]
    found = []
    for p in pkgs:
        try:
            found.append(f"{p} {metadata.version(p)}")
        except metadata.PackageNotFoundError:
            found.append(f"{p} (not installed)")
    return ", ".join(found)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    python = platform.python_version()
    return f"{cpu}, {os.cpu_count()} cores, Python {python}, JAX on {jax.default_backend()}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description="Time one stateful training step across libraries."
    )
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--no-memory", action="store_true")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--sizes", nargs="+", default=list(_rows.SIZES))
    parser.add_argument("--out", type=Path, default=HERE / "RESULTS.md")
    args = parser.parse_args()

    sections = []
    all_results = {}
    for key in args.sizes:
        results = all_results[key] = bench(key, args.repeats, not args.no_memory)
        text = table(key, results)
        print(text + "\n", flush=True)
        sections.append(text)
    sections.append(targets(all_results))
    print(sections[-1] + "\n")
    report = [
        "# Benchmark results",
        "",
        f"Written by `benchmarks/bench_step.py` on {datetime.date.today()}.",
        "",
        f"- Machine: {machine()}",
        f"- Versions: {versions()}",
        f"- Median of {args.repeats} interleaved repeats; 'x floor' is the ratio to the first row.",
        "",
        *[s + "\n" for s in sections],
    ]
    if args.profile:
        prof = profile_eqstate_call()
        print(prof)
        report += [
            "## Profile of `eqstate.jit`'s per-call path (cProfile, tottime)",
            "",
            "```",
            prof,
            "```",
        ]
    args.out.write_text("\n".join(report))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
