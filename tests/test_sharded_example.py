"""examples/train_sharded.py: the digits demo data-parallel on simulated CPU devices
trains as it does on one device, compiling its step once."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest


pytest.importorskip("sklearn")

EXAMPLE = Path(__file__).parents[1] / "examples" / "train_sharded.py"


def start(*args: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    return subprocess.Popen(
        [sys.executable, str(EXAMPLE), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(env, JAX_PLATFORMS="cpu"),
    )


def finish(proc: subprocess.Popen) -> tuple[int, str]:
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return proc.returncode, out + err


def test_data_parallel_example_trains_as_on_one_device():
    common = ["--epochs", "2", "--min-accuracy", "0.5"]
    runs = {n: start("--devices", str(n), *common) for n in (4, 1)}
    outputs = {}
    for n, proc in runs.items():
        code, outputs[n] = finish(proc)
        assert code == 0, outputs[n]
    assert "4 cpu devices, 16 examples each" in outputs[4]
    assert "1 cpu devices, 64 examples each" in outputs[1]
    for out in outputs.values():
        assert "compilations: {'train_step': 1, 'evaluate': 1}" in out

    def accuracies(out: str) -> list[float]:
        return [float(a) for a in re.findall(r"test accuracy[^0-9]*([0-9.]+)", out)]

    split, whole = accuracies(outputs[4]), accuracies(outputs[1])
    assert len(split) == len(whole) == 4  # two epochs, then final and EMA
    # the same numbers up to rounding, which Adam makes visible (the biases before each
    # BatchNorm have a zero gradient up to rounding, and Adam turns its sign into steps)
    assert all(abs(a - b) <= 0.02 for a, b in zip(split, whole)), (split, whole)


def test_a_batch_that_does_not_split_is_refused():
    code, out = finish(start("--devices", "3", "--batch-size", "64"))
    assert code == 2 and "--batch-size 64 does not split over 3 devices" in out, out
