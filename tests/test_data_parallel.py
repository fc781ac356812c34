"""`eqstate.data_parallel` and the sharded recipes on 8 CPU devices, against one device.

The checks live in `data_parallel_checks.py` and run in one subprocess (JAX's device
count is fixed when it starts); each check is reported here as its own test.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


SCRIPT = Path(__file__).with_name("data_parallel_checks.py")
CHECKS = [
    # the digits demo's model (Linear, BatchNorm, Dropout p=0.3, AdamW, EMA, metrics)
    # trained 4 steps on one device (a), then: losses, gradients, parameters, BatchNorm
    # statistics, Dropout keys, optimizer state, EMA and metrics equal to (a), every
    # array replicated on the way out as on the way in, flags Python bools, one trace
    "single_device_trains",
    "jit_with_sharded_batch",  # (b) eqstate.jit, batch device_put over the mesh
    "filter_jit_with_sharded_batch",  # (c) eqx.filter_jit, likewise
    "data_parallel_placed",  # (d) eqstate.data_parallel (explicit mesh axes)
    "data_parallel_unplaced",  # (d) from arrays on one device (auto mesh axes)
    # the traps of a hand-written shard_map, and data_parallel without them
    "trap_gradient_scale",  # 8x gradients (check_vma=True), device 0's (False)
    "trap_metrics_of_device_zero",  # out_specs=P() without all_reduce
    "trap_identical_dropout_masks",  # the same mask on every device
    "per_example_model_and_next_key",  # eqstate.vmap inside: the numbers of one device
    "flags_stay_bools",  # device_put and shard_map turn the flags into arrays
    "errors_are_named",
]


@pytest.fixture(scope="module")
def results():
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    proc = subprocess.run(
        [sys.executable, "-W", "error", str(SCRIPT)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert sorted(out) == sorted(CHECKS), "data_parallel_checks.py and CHECKS differ"
    return out


@pytest.mark.parametrize("name", CHECKS)
def test_data_parallel(results, name):
    assert results[name] == "ok", results[name]
