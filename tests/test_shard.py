"""`eqstate.shardings` / `eqstate.place` on 8 simulated CPU devices (a subprocess: the
device count is fixed when JAX starts)."""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

import eqstate


SCRIPT = Path(__file__).parent / "scripts" / "sharded_by_kind.py"


def test_sharded_by_kind_trains_as_one_device():
    # the script asserts: parameters sharded by kind, statistics and keys replicated,
    # Adam's moments following their parameters, flags kept static, layouts kept on the
    # step's outputs, one trace, and the numbers of an unsharded run; errors name the
    # rule and the leaf
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-4000:]


def test_one_device_mesh_and_non_arrays():
    class M(eqstate.Module):
        w: jax.Array
        n: jax.Array = eqstate.State.field(default=0)
        name: str = "m"

    mesh = jax.make_mesh((1,), ("x",))
    sh = eqstate.shardings(M(jnp.ones((2, 3))), mesh, [(eqstate.Param, P("x"))])
    assert sh.w.spec == P("x") and sh.n.spec == P() and sh.name is None
    placed = eqstate.place(M(jnp.ones((2, 3))), sh)
    assert placed.w.sharding == sh.w and placed.name == "m"
    with pytest.raises(
        TypeError, match=r"takes a sequence of `\(filter, PartitionSpec\)` pairs.*got dict"
    ):
        eqstate.shardings(M(jnp.ones(2)), mesh, {eqstate.Param: P()})  # pyright: ignore[reportArgumentType]
