"""End to end: the digits demo trains, improves, and compiles its step once."""

import importlib.util
from pathlib import Path

import pytest


pytest.importorskip("sklearn")


def load_demo():
    path = Path(__file__).parents[1] / "examples" / "train_digits.py"
    spec = importlib.util.spec_from_file_location("train_digits", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.usefixtures("standard_promotion")  # optax mixes Python floats and int32 counts
def test_short_training_run_improves_and_compiles_once(tmp_path):
    demo = load_demo()
    history = demo.train(epochs=4, progress=False)
    assert history["train_loss"][-1] < 0.5 * history["train_loss"][0]
    assert history["test_acc"][-1] > 0.9
    assert demo.TRACES["train_step"] == 1
    assert demo.TRACES["evaluate"] == 1  # the EMA model has the structure of the model
    demo.plot(history, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 10_000
