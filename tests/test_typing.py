import subprocess
import sys
from pathlib import Path

import pytest


pytest.importorskip("pyright")


def _pyright(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyright", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def pyright_runs():
    # pyright's Python package runs Node.js and fetches pyright from the npm registry on
    # first use; where neither can be had, there is nothing to check with.
    try:
        probe = _pyright("--version")
    except (OSError, subprocess.TimeoutExpired) as err:
        pytest.skip(f"pyright cannot start here: {err}")
    if probe.returncode != 0:
        pytest.skip(f"pyright cannot start here: {probe.stderr.strip()[-300:]}")


@pytest.mark.usefixtures("pyright_runs")
def test_pyright_accepts_field_declarations():
    target = Path(__file__).parent / "typecheck" / "declarations.py"
    proc = _pyright("--pythonpath", sys.executable, str(target))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 errors" in proc.stdout
