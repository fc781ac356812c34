"""Every notebook's code cells run top to bottom, as a fresh kernel would run them."""

import json
from pathlib import Path

import pytest


NOTEBOOKS = sorted((Path(__file__).parents[1] / "notebooks").glob("*.ipynb"))


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[p.name for p in NOTEBOOKS])
@pytest.mark.usefixtures("standard_promotion")  # as a user's kernel runs them
def test_notebook_runs(path, capsys):
    cells = json.loads(path.read_text())["cells"]
    namespace: dict = {"__name__": "__main__"}
    for cell in cells:
        if cell["cell_type"] == "code":
            exec(compile("".join(cell["source"]), f"{path.name}", "exec"), namespace)
    printed = capsys.readouterr().out
    assert "compiled 1 time(s)" in printed
    before, after = printed.split("loss ")[1].split(";")[0].split(" -> ")
    assert float(after) < 0.5 * float(before)


def test_there_is_a_notebook():
    assert NOTEBOOKS
