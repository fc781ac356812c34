import collections
import json
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest


pytest.importorskip("pyright")

ROOT = Path(__file__).parent.parent
TYPECHECK = Path(__file__).parent / "typecheck"
FILES = ("declarations.py", "user_ok.py", "user_mistakes.py")
EXPECT = re.compile(r"#\s*expect:\s*(\w+)")


def _pyright(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pyright", *args],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,  # pyproject.toml's [tool.pyright]
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


@pytest.fixture(scope="module")
def reported(pyright_runs) -> dict[str, collections.Counter[tuple[int, str]]]:
    """For each file of `typecheck/`, what pyright reports: `(line, rule)` counts."""
    proc = _pyright(
        "--outputjson", "--pythonpath", sys.executable, *[str(TYPECHECK / f) for f in FILES]
    )
    try:
        out = json.loads(proc.stdout)
    except json.JSONDecodeError:
        pytest.fail(f"pyright gave no report: {proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    found: dict[str, collections.Counter[tuple[int, str]]] = {
        f: collections.Counter() for f in FILES
    }
    for d in out["generalDiagnostics"]:
        line = d["range"]["start"]["line"] + 1
        rule = d.get("rule", d["severity"])  # a syntax error has no rule
        found[Path(d["file"]).name][(line, rule)] += 1
    return found


def _expected(name: str) -> collections.Counter[tuple[int, str]]:
    lines = (TYPECHECK / name).read_text().splitlines()
    return collections.Counter(
        (i, m.group(1)) for i, text in enumerate(lines, 1) for m in EXPECT.finditer(text)
    )


def test_pyright_accepts_field_declarations(reported):
    assert reported["declarations.py"] == {}


def test_pyright_accepts_user_code(reported):
    assert reported["user_ok.py"] == {}


@pytest.mark.usefixtures("standard_promotion")  # optax's adamw needs it, as user code does
def test_user_code_runs():
    runpy.run_path(str(TYPECHECK / "user_ok.py"), run_name="user_ok")


def test_pyright_reports_user_mistakes(reported):
    expected = _expected("user_mistakes.py")
    assert len(expected) >= 10
    assert reported["user_mistakes.py"] == expected
