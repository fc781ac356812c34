"""The notebooks: each runs top to bottom in a fresh Jupyter kernel, without an error or a
warning, and ends by printing its success line; the committed copies hold their outputs
(so they read well on a repository browser) and stay small."""

import base64
import json
import re
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient


NOTEBOOK_DIR = Path(__file__).parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("*.ipynb"))


def _quickstart(m):
    assert float(m["ratio"]) < 2.0  # test loss within 2x the noise floor


def _training_loop(m):
    assert float(m["acc"]) >= 0.95 and float(m["ema"]) >= 0.95


def _from_equinox(m):
    assert float(m["diff"]) < 1e-5
    assert float(m["after"]) < 0.1 * float(m["before"])


def _from_treex_and_nnx(m):
    assert float(m["nnx"]) >= 0.95 and float(m["ours"]) >= 0.95


# The line each notebook's last cell prints (a regex), and what its numbers must satisfy.
SUCCESS = {
    "quickstart.ipynb": (
        r"Success: test loss [\d.]+, (?P<ratio>[\d.]+)x the noise floor",
        _quickstart,
    ),
    "training_loop.ipynb": (
        r"Success: test accuracy (?P<acc>[\d.]+) \(EMA (?P<ema>[\d.]+)\) after \d+ epochs, "
        r"resumed from a checkpoint",
        _training_loop,
    ),
    "from_equinox.ipynb": (
        r"Success: Equinox, WithState and the eqstate port agree over \d+ steps "
        r"\(loss (?P<before>[\d.]+) -> (?P<after>[\d.]+), largest difference (?P<diff>\S+)\)",
        _from_equinox,
    ),
    "from_treex_and_nnx.ipynb": (
        r"Success: Treex's examples run ported; on the digits NNX reaches (?P<nnx>[\d.]+) "
        r"and eqstate (?P<ours>[\d.]+) test accuracy",
        _from_treex_and_nnx,
    ),
}
IDS = [p.name for p in NOTEBOOKS]
WARNING = re.compile(r"\b\w*Warning\b")  # DeprecationWarning, TqdmWarning, eqstate's, ...


def _stream(cell, name="stdout"):
    return "".join(
        "".join(out["text"])
        for out in cell.get("outputs", [])
        if out["output_type"] == "stream" and out["name"] == name
    )


def _check_success(path, notebook):
    pattern, check = SUCCESS[path.name]
    last = [c for c in notebook.cells if c.cell_type == "code"][-1]
    printed = _stream(last)
    match = re.search(pattern, printed)
    assert match, f"{path.name}'s last cell printed {printed!r}, not its success line"
    check(match.groupdict())


def test_every_notebook_says_what_success_it_prints():
    assert NOTEBOOKS
    assert sorted(SUCCESS) == IDS


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # jupyter_client's, in this process
def test_notebook_runs_in_a_fresh_kernel(path):
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        kernel_name="python3",  # this interpreter's ipykernel
        timeout=300,  # per cell
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError, with the cell and its traceback
    for i, cell in enumerate(notebook.cells):
        warned = WARNING.findall(_stream(cell, "stderr"))
        assert not warned, f"{path.name}, cell {i} warned: {_stream(cell, 'stderr')}"
    _check_success(path, notebook)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=IDS)
def test_committed_notebook_holds_its_outputs_and_is_small(path):
    assert path.stat().st_size < 200_000, f"{path.name} is {path.stat().st_size:,} bytes"
    notebook = nbformat.read(path, as_version=4)
    code = [c for c in notebook.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code), f"{path.name} was not run before committing"
    assert not [o for c in code for o in c.outputs if o.output_type == "error"]
    for cell in code:
        for out in cell.outputs:
            png = out.get("data", {}).get("image/png")
            if png:
                assert len(base64.b64decode(png)) < 60_000, f"a {path.name} plot is large"
            assert len(json.dumps(out)) < 100_000, f"a {path.name} output is large"
    _check_success(path, notebook)
