"""Crash safety of `eqstate.save`: a writer killed with SIGKILL at random moments.

A subprocess saves a ~4.7 MB model over and over, each save with different contents, and
prints `saved N` after each. The test kills it at a random moment, then checks that the
file at the target path is a whole checkpoint (save N, or N + 1 whose rename beat the
print; or, before the run's first save, the previous run's), that at most one temporary
file was left behind, and that the next run's first save removes it. Half of the
kills wait for a temporary file to appear, so that they land in the write. Two lanes of
trials run side by side, each in its own directory.
"""

import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import eqstate


TRIALS_PER_LANE = 12  # two lanes: 24 runs, each killed once
TARGET = "model.eqstate"

# The writer's script, also exec'd here: both sides build bit-identical trees.
WRITER = '''
import sys

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

import eqstate
from eqstate.nn import BatchNorm, Dropout


class Dense(eqstate.Module):
    weight: jax.Array
    bias: jax.Array


class Big(eqstate.Module):
    layers: list
    bn: BatchNorm
    drop: Dropout
    counter: jax.Array = eqstate.State.field(default=0)


def checkpoint(trial, n):
    """Save `n` of run `trial`: NumPy-initialised weights (no compiling, so the writer
    starts fast) with `n` in a weight row, the BatchNorm statistics, the counter and
    the Dropout key (whose data is `[trial, n]`)."""
    rng = np.random.default_rng(trial)
    weights = [rng.standard_normal((768, 768), np.float32) for _ in range(2)]
    weights[0][0] = n
    layers = [Dense(jnp.asarray(w), jnp.asarray(rng.standard_normal(768, np.float32))) for w in weights]
    bn = eqx.tree_at(lambda b: b.running_mean, BatchNorm(768), jnp.full(768, n, jnp.float32))
    key = jax.random.wrap_key_data(np.asarray([trial, n], np.uint32))
    return Big(layers, bn, Dropout(0.1, key=key), counter=jnp.asarray(n, jnp.int32))


if __name__ == "__main__":
    import time

    path, trial = sys.argv[1], int(sys.argv[2])
    trees = [checkpoint(trial, 0)]
    print("ready", flush=True)
    n, end = 0, time.monotonic() + 120  # killed long before; the bound guards a lost writer
    while time.monotonic() < end:
        eqstate.save(path, trees[-1])
        print("saved", n, flush=True)
        n += 1
        trees = [checkpoint(trial, n)]
'''

_NAMESPACE: dict = {"__name__": "writer"}
exec(compile(WRITER, "writer", "exec"), _NAMESPACE)
checkpoint = _NAMESPACE["checkpoint"]


def bits(tree):
    """Every leaf as (dtype, shape, bytes); PRNG keys by their raw data."""

    def one(x):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            return ("key", str(jax.random.key_impl(x)), bits(jax.random.key_data(x)))
        if isinstance(x, (jax.Array, np.ndarray)):
            x = np.asarray(x)
            return (str(x.dtype), x.shape, x.tobytes())
        return x

    return jax.tree_util.tree_structure(tree), [one(x) for x in jax.tree_util.tree_leaves(tree)]


class Writer:
    """The writer subprocess, its output lines read by a thread."""

    def __init__(self, script: Path, path: Path, trial: int, log: Path):
        self.log = log
        with open(log, "w") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(script), str(path), str(trial)],
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=dict(os.environ, JAX_PLATFORMS="cpu"),
            )
        self.lines: queue.Queue[str] = queue.Queue()
        self.times: dict[int, float] = {}  # when each `saved n` line was read
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.last = -1  # the last save the writer printed

    def _read(self):
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if line.startswith("saved "):
                self.times[int(line.split()[1])] = time.perf_counter()
            self.lines.put(line.strip())
        self.lines.put("EOF")

    def wait_for(self, wanted: str):
        while True:
            line = self.lines.get(timeout=120)
            if line == "EOF":
                raise AssertionError(
                    f"the writer exited ({self.proc.wait()}) before {wanted!r}: "
                    + self.log.read_text()
                )
            if line.startswith("saved "):
                self.last = int(line.split()[1])
            if line == wanted:
                return

    def kill(self):
        self.proc.send_signal(signal.SIGKILL)
        code = self.proc.wait(timeout=60)
        assert code == -signal.SIGKILL, f"the writer exited ({code}): {self.log.read_text()}"
        self.thread.join(timeout=60)
        assert self.proc.stdout is not None
        self.proc.stdout.close()
        while True:
            line = self.lines.get_nowait()
            if line == "EOF":
                return
            if line.startswith("saved "):
                self.last = int(line.split()[1])


CHECKING = threading.Lock()  # the lanes' JAX work (loading, comparing), one at a time


def check(directory: Path, like, trial: int, last: int, on_disk, stale: set[str]):
    """After a kill: the files in `directory`, and which save is at the target.

    `last` is the last save the writer printed, `on_disk` the `(trial, n)` at the target
    before this run, `stale` the temporary files left before it. Returns the `(trial, n)`
    at the target now (`None` if absent) and the temporary files left."""
    names = set(os.listdir(directory)) - {TARGET}
    temps = {n for n in names if n.startswith(f".{TARGET}.") and n.endswith(".eqstate-tmp")}
    assert names == temps, f"trial {trial}: unexpected files {names - temps}"
    assert len(temps) <= 1, f"trial {trial}: {len(temps)} temporary files: {temps}"
    if last >= 0:  # this run completed a save, which removes the temporary files before it
        assert not stale & temps, f"trial {trial}: {stale & temps} not removed"
    allowed = {(trial, last), (trial, last + 1)} if last >= 0 else {on_disk, (trial, 0)}
    target = directory / TARGET
    found = None
    if target.exists():
        loaded = eqstate.load(target, like)
        found = tuple(int(v) for v in jax.random.key_data(loaded.drop.key))
        assert int(loaded.counter) == found[1]
        assert bits(loaded) == bits(checkpoint(*found)), f"trial {trial}: not save {found}"
    assert found in allowed, f"trial {trial}: found save {found}, expected one of {allowed}"
    return found, temps


def wait_for_temporary_file(directory: Path, stale: set[str], timeout: float = 5.0):
    """Poll `directory` until a new temporary file appears (a save is writing)."""
    end = time.perf_counter() + timeout
    while time.perf_counter() < end:
        if any(n.endswith(".eqstate-tmp") and n not in stale for n in os.listdir(directory)):
            return


def run_lane(lane: int, tmp: Path, stats: dict, errors: list):
    """Kill `TRIALS_PER_LANE` writers, one after the other, all saving to one directory."""
    rnd = random.Random(lane)
    directory = tmp / f"lane{lane}"
    directory.mkdir()
    on_disk, stale = None, set()
    writer = None
    try:
        with CHECKING:
            like = eqstate.abstract(checkpoint(0, 0))
        for i in range(TRIALS_PER_LANE):
            trial = 100 * lane + i
            writer = Writer(tmp / "writer.py", directory / TARGET, trial, tmp / f"{trial}.log")
            writer.wait_for("ready")
            if i % 4 == 0:  # often before the first save completes
                time.sleep(rnd.uniform(0.0, 0.05))
            elif i % 4 == 1:  # anywhere in the cycle of save k + 1
                k = rnd.randrange(1, 4)
                writer.wait_for(f"saved {k}")
                time.sleep((writer.times[k] - writer.times[k - 1]) * rnd.uniform(0.0, 1.0))
            else:  # aimed at the write: soon after a temporary file appears
                writer.wait_for(f"saved {rnd.randrange(3)}")
                wait_for_temporary_file(directory, stale)
                time.sleep(rnd.uniform(0.0, 0.002))
            writer.kill()
            with CHECKING:
                on_disk, temps = check(directory, like, trial, writer.last, on_disk, stale)
            stats["trials"] += 1
            stats["saves"] += writer.last + 1
            new = [directory / n for n in temps - stale]  # a temporary file of this run's
            stats["mid_write"] += bool(new)
            if new and on_disk is not None:  # all saves have the same size
                stats["mid_write_partial"] += (
                    new[0].stat().st_size < (directory / TARGET).stat().st_size
                )
            stats["before_first_save"] += writer.last < 0
            stats["renamed_not_printed"] += writer.last >= 0 and on_disk == (trial, writer.last + 1)
            stale = temps
        with CHECKING:
            eqstate.save(directory / TARGET, checkpoint(100 * lane + 99, 0))
        assert os.listdir(directory) == [TARGET], f"the last save left {os.listdir(directory)}"
    except BaseException as e:  # re-raised by the test
        errors.append(e)
    finally:
        if writer is not None and writer.proc.poll() is None:  # after a failure
            writer.proc.kill()
            writer.proc.wait()


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_save_survives_sigkill_at_random_moments(tmp_path):
    (tmp_path / "writer.py").write_text(WRITER)
    names = ["trials", "saves", "before_first_save", "mid_write", "mid_write_partial"]
    names += ["renamed_not_printed"]
    stats = [dict.fromkeys(names, 0) for _ in range(2)]
    errors: list[BaseException] = []
    lanes = [
        threading.Thread(target=run_lane, args=(lane, tmp_path, stats[lane], errors))
        for lane in range(2)
    ]
    start = time.perf_counter()
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    if errors:
        raise errors[0]
    total = {k: stats[0][k] + stats[1][k] for k in names}
    print(f"SIGKILL trials: {total} in {time.perf_counter() - start:.1f} s")
    assert total["trials"] == 2 * TRIALS_PER_LANE
