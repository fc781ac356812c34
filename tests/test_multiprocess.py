"""Data-parallel training across processes, with JAX's own machinery only.

Two JAX processes on this machine (`jax.distributed.initialize` on 127.0.0.1, CPU
collectives over gloo), each with two CPU devices, train the digits demo's model (MLP +
BatchNorm + Dropout, Adam, an EMA, metrics; small) for a few steps with the demo's own
`train_step` (`eqstate.jit`): the model replicated on a 4-device mesh that spans both
processes, each global batch sharded over all four devices, each process supplying its
own rows (`jax.make_array_from_process_local_data`). A third process trains the same
model on the same global batches on one device. Both processes must end with the same
bits, and with the one-device run's values up to rounding; each saves its replicated
state with `eqstate.save`, and the other process (and this one) loads it with
`eqstate.load`.
"""

import importlib.util
import json
import os
import socket
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
SKIP = 77  # a worker's exit status when `jax.distributed` cannot start here
TIMEOUT_S = 120  # for the three processes together

# One process of the run, written to tmp_path. Also imported here (without running
# `main`) for `build`, so that this process loads checkpoints into the same structure.
WORKER = r'''
import importlib.util
import json
import os
import sys
from pathlib import Path

STEPS, BATCH = 4, 64
SKIP = 77


def load_demo(path):
    spec = importlib.util.spec_from_file_location("train_digits", path)
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    return demo


def build(demo):
    """The run's state at step 0: the demo's MLP (small), Adam, an EMA and metrics."""
    import jax
    import optax

    import eqstate
    from eqstate.metrics import Accuracy, Collection, Mean
    from eqstate.nn import EMA

    model = demo.MLP((64, 32, 32), 10, dropout=0.2, key=jax.random.key(0))
    # eps: the biases before each BatchNorm have a zero gradient up to rounding, which
    # Adam with a tiny eps scales up to steps of +-lr whose sign is the rounding's
    opt = eqstate.Optimizer(optax.adam(1e-2, eps=1e-3), model)
    ema = EMA(model, decay=0.9)
    return model, opt, ema, Collection(loss=Mean(argname="loss"), acc=Accuracy())


def main():
    role, demo_path, out, port = sys.argv[1:5]  # role: "0" or "1" (a process), or "ref"
    out = Path(out)
    import jax

    jax.config.update("jax_numpy_dtype_promotion", "standard")  # optax needs it
    if role != "ref":
        try:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
            jax.distributed.initialize(
                coordinator_address=f"127.0.0.1:{port}",
                num_processes=2,
                process_id=int(role),
                initialization_timeout=60,
            )
            jax.devices()  # starts the CPU backend with its collectives
        except Exception as err:  # no gloo in this jaxlib, no coordination service, ...
            print(f"jax.distributed cannot start here: {type(err).__name__}: {err}")
            sys.exit(SKIP)

    import equinox as eqx
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

    import eqstate

    demo = load_demo(demo_path)
    x_train, _, y_train, _ = demo.load_data(0)
    batches = [
        (x_train[s * BATCH : (s + 1) * BATCH], y_train[s * BATCH : (s + 1) * BATCH])
        for s in range(STEPS + 1)
    ]
    report = {"devices": jax.device_count(), "local_devices": jax.local_device_count()}

    if role == "ref":  # one process, one device, no sharding
        tree = build(demo)
        for x, y in batches[:STEPS]:
            tree = demo.train_step(*tree, jnp.asarray(x), jnp.asarray(y))
        eqstate.save(out / "ref.eqstate", tree)
        report["traces"] = demo.TRACES["train_step"]
        (out / "ref.json").write_text(json.dumps(report))
        return

    pid = jax.process_index()
    mesh = jax.make_mesh((jax.device_count(),), ("batch",), axis_types=(AxisType.Auto,))
    replicated, batched = NamedSharding(mesh, P()), NamedSharding(mesh, P("batch"))

    def replicate(tree):
        """Every array on every device of the mesh, from its value on this host (the
        same in each process). jax.device_put refuses typed keys and arrays committed
        to one device for devices of other processes, so both go as NumPy arrays."""

        def put(x):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                data = jax.device_put(np.asarray(jax.random.key_data(x)), replicated)
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            return jax.device_put(np.asarray(x), replicated)

        return jax.tree.map(lambda x: put(x) if eqx.is_array(x) else x, tree)

    def shard(a):
        """A global batch from this process's rows of it."""
        index = batched.addressable_devices_indices_map(a.shape)
        rows = sorted({i for idx in index.values() for i in range(len(a))[idx[0]]})
        assert rows == list(range(rows[0], rows[-1] + 1)), rows  # contiguous
        return jax.make_array_from_process_local_data(
            batched, a[rows[0] : rows[-1] + 1], a.shape
        )

    def host(tree):
        """Array leaves as NumPy (keys as their data): the same bits in each process."""

        def one(x):
            if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                x = jax.random.key_data(x)
            return np.asarray(x)

        return [one(x) for x in jax.tree.leaves(tree) if eqx.is_array(x)]

    def same(a, b):
        return all(x.dtype == y.dtype and np.array_equal(x, y) for x, y in zip(host(a), host(b)))

    report["rows"] = len(shard(batches[0][0]).addressable_shards)
    tree = replicate(build(demo))
    for x, y in batches[:STEPS]:
        tree = demo.train_step(*tree, shard(x), shard(y))
    report["traces"] = demo.TRACES["train_step"]
    arrays = [x for x in jax.tree.leaves(tree) if eqx.is_array(x)]
    report["replicated"] = all(x.sharding.is_equivalent_to(replicated, x.ndim) for x in arrays)

    # the same steps under eqx.filter_jit
    step = eqx.filter_jit(demo.train_step.fn)
    other = replicate(build(demo))
    for x, y in batches[:STEPS]:
        other = step(*other, shard(x), shard(y))
    report["filter_jit_max_diff"] = max(
        float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)), initial=0.0))
        for a, b in zip(host(tree), host(other))
        if a.dtype.kind == "f"
    )

    # checkpoints: each process saves its replicated state and loads the other's
    eqstate.save(out / f"{pid}.eqstate", tree)
    multihost_utils.sync_global_devices("saved")
    theirs = out / f"{1 - pid}.eqstate"
    loaded = eqstate.load(theirs, build(demo))  # into a freshly built, host-local tree
    report["loaded_equal"] = same(loaded, tree)
    # going on from the loaded state is the same step, not compiled again
    x, y = batches[STEPS]
    report["next_equal"] = same(
        demo.train_step(*replicate(loaded), shard(x), shard(y)),
        demo.train_step(*tree, shard(x), shard(y)),
    )
    report["traces_after_load"] = demo.train_step.traces  # eqstate.jit's count
    try:  # straight into a replicated tree (`tree` itself was donated by the step)
        direct = eqstate.load(theirs, replicate(build(demo)))
        report["direct_load"] = "ok" if same(direct, replicate(loaded)) else "different values"
        report["direct_load_sharding"] = all(
            x.sharding.is_equivalent_to(replicated, x.ndim)
            for x in jax.tree.leaves(eqx.filter(direct, eqx.is_array))
        )
    except Exception as err:
        report["direct_load"] = f"{type(err).__name__}: {err}"
    try:  # an array split over both processes cannot be saved from one of them
        eqstate.save(out / f"sharded{pid}.eqstate", {"x": shard(batches[0][0])})
        report["save_sharded"] = "saved"
    except ValueError as err:
        report["save_sharded"] = str(err)
    try:  # eqstate's own placement, from a freshly built (host-local) tree
        fresh = build(demo)
        placed = eqstate.place(fresh, eqstate.shardings(fresh, mesh, [(..., P())]))
        report["place"] = "ok" if same(placed, replicate(fresh)) else "different values"
    except Exception as err:
        report["place"] = f"{type(err).__name__}: {err}"
    (out / f"{pid}.json").write_text(json.dumps(report))
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()


if __name__ == "__main__":
    main()
'''


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(script: Path, out: Path, role: str, port: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("XLA_", "JAX_"))}
    devices = 1 if role == "ref" else 2
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
    with open(out / f"{role}.log", "w") as log:
        return subprocess.Popen(
            [sys.executable, str(script), role, str(DEMO), str(out), str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )


def wait_all(procs: dict[str, subprocess.Popen], out: Path) -> None:
    """Wait for every process; on a failure or past the deadline, kill the others (a
    process whose peer died waits in a collective) and fail with their logs."""
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while any(p.poll() is None for p in procs.values()):
            failed = [r for r, p in procs.items() if p.poll() not in (None, 0, SKIP)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
        for p in procs.values():
            p.wait(timeout=30)
    logs = {r: (out / f"{r}.log").read_text() for r in procs}
    codes = {r: p.returncode for r, p in procs.items()}
    skipped = [r for r, code in codes.items() if code == SKIP]
    if skipped:
        pytest.skip(logs[skipped[0]].strip().splitlines()[-1])
    if any(codes.values()):
        text = "\n".join(f"--- {r} (exit {codes[r]}):\n{logs[r][-3000:]}" for r in procs)
        raise AssertionError(f"a process failed or ran past {TIMEOUT_S} s:\n{text}")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Run the two processes and the one-device reference side by side."""
    out = tmp_path_factory.mktemp("multiprocess")
    script = out / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    begin = time.perf_counter()
    procs = {role: start(script, out, role, port) for role in ["0", "1", "ref"]}
    wait_all(procs, out)
    print(f"three processes: {time.perf_counter() - begin:.1f} s")
    spec = importlib.util.spec_from_file_location("worker", script)
    assert spec is not None and spec.loader is not None
    worker = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(worker)
    reports = {r: json.loads((out / f"{r}.json").read_text()) for r in ["0", "1", "ref"]}
    return out, worker, reports


def flat(tree) -> dict[str, np.ndarray]:
    out = {}
    for path, x in jax.tree_util.tree_leaves_with_path(tree):
        if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        if isinstance(x, (jax.Array, np.ndarray)):
            out[jax.tree_util.keystr(path)] = np.asarray(x)
    return out


@pytest.mark.usefixtures("standard_promotion")  # optax's init, in `build`
def test_two_processes_train_as_one(run):
    out, worker, reports = run
    p0, p1, ref = reports["0"], reports["1"], reports["ref"]
    assert (p0["devices"], p0["local_devices"], p0["rows"]) == (4, 2, 2)
    assert ref["devices"] == 1
    for report in (p0, p1):
        assert report["traces"] == 1, report  # the demo's max_traces=1 held
        assert report["replicated"], report  # the outputs keep the inputs' shardings
        assert report["filter_jit_max_diff"] < 1e-5, report
    assert ref["traces"] == 1

    demo = worker.load_demo(DEMO)
    like = worker.build(demo)
    states = {r: flat(eqstate.load(out / f"{r}.eqstate", like)) for r in ["0", "1", "ref"]}
    assert (out / "0.eqstate").read_bytes() == (out / "1.eqstate").read_bytes()
    for where, ours in states["0"].items():
        np.testing.assert_array_equal(ours, states["1"][where], err_msg=where)
        theirs = states["ref"][where]
        assert ours.dtype == theirs.dtype, where
        if ours.dtype.kind == "f":
            np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5, err_msg=where)
        else:  # keys, counts, metrics totals
            np.testing.assert_array_equal(ours, theirs, err_msg=where)
    # the model's statistics and keys, the optimizer's state, the EMA, the metrics
    for part in ["running_mean", "running_var", ".key", "[1].opt", "[2].params", "[3]"]:
        assert any(part in where for where in states["0"]), part  # all of it is compared
    moved = states["0"]["[0].layers[0].weight"] - flat(like)["[0].layers[0].weight"]
    assert np.abs(moved).max() > 1e-3  # it trained


def test_checkpoints_cross_processes(run):
    _, _, reports = run
    for report in (reports["0"], reports["1"]):
        assert report["loaded_equal"], report  # the other process's file, bit for bit
        assert report["next_equal"], report  # and the next step from it
        assert report["traces_after_load"] == 1, report


def test_load_into_a_tree_sharded_across_processes(run):
    _, _, reports = run
    for role in ["0", "1"]:
        assert reports[role]["direct_load"] == "ok", reports[role]["direct_load"]
        assert reports[role]["direct_load_sharding"]  # the arrays keep like's shardings


def test_saving_an_array_split_over_processes_is_a_named_error(run):
    _, _, reports = run
    for role in ["0", "1"]:
        message = reports[role]["save_sharded"]
        assert "the array at ['x'] is split over devices of several processes" in message
        assert "process_allgather" in message


def test_place_across_processes(run):
    _, _, reports = run
    for role in ["0", "1"]:
        assert reports[role]["place"] == "ok", reports[role]["place"]
