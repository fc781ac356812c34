import subprocess
import sys
from pathlib import Path

import pytest


pyright = pytest.importorskip("pyright")


def test_pyright_accepts_field_declarations():
    target = Path(__file__).parent / "typecheck" / "declarations.py"
    proc = subprocess.run(
        [sys.executable, "-m", "pyright", "--pythonpath", sys.executable, str(target)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 errors" in proc.stdout
