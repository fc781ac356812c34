"""Exact resume of the digits demo: a run interrupted (in process, or killed with SIGKILL)
and resumed from its checkpoint ends bit for bit where an uninterrupted run ends, and
restoring does not trace the training step again."""

import importlib.util
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import numpy as np
import pytest

import eqstate


pytest.importorskip("sklearn")

DEMO = Path(__file__).parents[1] / "examples" / "train_digits.py"


def load_demo():
    spec = importlib.util.spec_from_file_location("train_digits", DEMO)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def leaves(path, like):
    """The checkpoint at `path` as {key path: (dtype, shape, bytes)}, keys by their data."""
    out = {}
    for where, x in jax.tree_util.tree_leaves_with_path(eqstate.load(path, like)):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        x = np.asarray(x)
        out[jax.tree_util.keystr(where)] = (str(x.dtype), x.shape, x.tobytes())
    return out


def assert_same_state(demo, a: Path, b: Path, epochs: int):
    """The final states at `a` and `b` agree bit for bit: parameters, BatchNorm
    statistics, Dropout keys, optimizer state, EMA, metrics, step and curves."""
    steps_per_epoch = len(demo.load_data(0)[0]) // 64
    like = demo.initial_state(epochs, steps_per_epoch, 64, 0)
    saved_a, saved_b = leaves(a, like), leaves(b, like)
    assert saved_a.keys() == saved_b.keys()
    differ = [where for where in saved_a if saved_a[where] != saved_b[where]]
    assert not differ, f"the runs differ at {differ}"
    for part in ["running_mean", "running_var", ".key", ".opt", ".ema", ".metrics", ".history"]:
        assert any(part in where for where in saved_a), part  # each kind of state is compared
    assert a.read_bytes() == b.read_bytes()


@pytest.mark.usefixtures("standard_promotion")  # optax mixes Python floats and int32 counts
@pytest.mark.parametrize(
    "save_every, stop_after",
    [(7, 30), (11, 30)],  # resumed mid-epoch (step 28), at an epoch's end (step 22)
)
def test_resume_in_process_is_exact_and_does_not_retrace(tmp_path, save_every, stop_after):
    demo = load_demo()
    full = demo.train(epochs=2, progress=False, final=tmp_path / "full.eqstate")
    ck = tmp_path / "ck"
    demo.train(
        epochs=2, progress=False, checkpoint=ck, save_every=save_every, stop_after=stop_after
    )
    # fresh objects (a new optimizer with a new schedule) take the saved values
    resumed = demo.train(
        epochs=2, progress=False, checkpoint=ck, resume=True, final=tmp_path / "resumed.eqstate"
    )
    assert resumed == full
    assert_same_state(demo, tmp_path / "full.eqstate", tmp_path / "resumed.eqstate", epochs=2)
    assert demo.TRACES["train_step"] == 1  # three runs, one trace: restoring does not retrace
    assert demo.TRACES["evaluate"] == 1


def test_a_checkpoint_of_other_settings_is_refused(tmp_path):
    demo = load_demo()
    steps_per_epoch = len(demo.load_data(0)[0]) // 64
    (tmp_path / "ck").mkdir()
    eqstate.save(tmp_path / "ck" / demo.CHECKPOINT, demo.initial_state(3, steps_per_epoch, 64, 0))
    with pytest.raises(SystemExit, match="epochs=3, seed=0, but this run has .* epochs=2"):
        demo.train(epochs=2, progress=False, checkpoint=tmp_path / "ck", resume=True)


def start_demo(tmp_path: Path, name: str, *args: str) -> subprocess.Popen:
    command = [sys.executable, str(DEMO), "--epochs", "3", "--min-accuracy", "0"]
    command += ["--plot", str(tmp_path / f"{name}.png"), "--final", str(tmp_path / name)]
    with open(tmp_path / f"{name}.log", "w") as log:  # tqdm's bar and any traceback
        return subprocess.Popen(
            command + list(args),
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            cwd=tmp_path,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )


def finish(tmp_path: Path, name: str, proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out + (tmp_path / f"{name}.log").read_text()
    return out


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs SIGKILL")
def test_demo_killed_and_resumed_ends_as_an_uninterrupted_run(tmp_path):
    start = time.perf_counter()
    plain = start_demo(tmp_path, "uninterrupted")  # alongside the killed run
    ck = ["--checkpoint", str(tmp_path / "ck"), "--save-every", "10"]
    killed = start_demo(tmp_path, "resumed", *ck, "--step-delay", "0.05")
    assert killed.stdout is not None
    printed = []
    for line in killed.stdout:
        printed.append(line)
        if line.startswith("checkpoint: step 20 "):  # mid-epoch: 22 steps per epoch
            break
    time.sleep(0.08)  # a step or two on
    killed.send_signal(signal.SIGKILL)
    rest, _ = killed.communicate(timeout=60)
    printed += rest.splitlines(keepends=True)
    assert killed.returncode == -signal.SIGKILL, "".join(printed)
    last = max(int(line.split()[2]) for line in printed if line.startswith("checkpoint: step"))
    assert 20 <= last < 66 and not (tmp_path / "resumed").exists()

    out = finish(tmp_path, "resumed", start_demo(tmp_path, "resumed", *ck, "--resume"))
    steps = int(out.split("resumed from ")[1].split(" at step ")[1].split()[0])
    assert steps in (last, last + 10)  # the save in flight may have completed
    assert "compilations: {'train_step': 1, 'evaluate': 1}" in out
    plain_out = finish(tmp_path, "uninterrupted", plain)
    assert (
        out.split("test accuracy:")[1].split("compilations")[0]
        == (plain_out.split("test accuracy:")[1].split("compilations")[0])
    )
    demo = load_demo()
    assert_same_state(demo, tmp_path / "uninterrupted", tmp_path / "resumed", epochs=3)
    print(f"killed after step {last}, resumed at {steps}: {time.perf_counter() - start:.1f} s")
