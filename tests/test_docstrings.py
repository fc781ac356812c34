"""The examples in the docstrings of the public API run.

Every ```python block inside an `!!! example` section of a public object's docstring
(the names exported by `eqstate`, `eqstate.nn` and `eqstate.metrics`, and the public
methods and properties of the exported classes) is executed. The examples of one
docstring run in order in one namespace, which starts as a copy of `_context()`: the
names that examples use without defining them (`model`, `x`, `y`, `loss_fn`, `opt`, ...).

A block whose first line is `# doctest: +SKIP` (followed by the reason) is not run.
Keep those rare: a block that needs a multi-device mesh, a file that is not there,
or any other setup that the reader supplies.
"""

import functools
import importlib
import inspect
import re
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqstate


MODULES = ("eqstate", "eqstate.nn", "eqstate.metrics")
SKIP = "# doctest: +SKIP"

_ADMONITION = re.compile(r"^(\s*)!!! example\b")
_FENCE_OPEN = re.compile(r"^(\s*)```python\s*$")


def _public_objects() -> Iterator[tuple[str, Any]]:
    """(qualified name, object) for every exported name and its classes' public members."""
    seen: set[int] = set()
    for modname in MODULES:
        module = importlib.import_module(modname)
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if name.startswith("_") or inspect.ismodule(obj) or not callable(obj):
                continue
            if id(obj) in seen:  # an alias (`metrics.Average` is `metrics.Mean`)
                continue
            seen.add(id(obj))
            yield f"{modname}.{name}", obj
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_") and attr not in ("__init__", "__call__"):
                        continue
                    if isinstance(member, (staticmethod, classmethod)):
                        member = member.__func__
                    if isinstance(member, property):
                        member = member.fget
                    if inspect.isfunction(member) and id(member) not in seen:
                        seen.add(id(member))
                        yield f"{modname}.{name}.{attr}", member


def examples(doc: str) -> list[str]:
    """The ```python blocks inside the `!!! example` sections of a docstring."""
    lines = doc.splitlines()
    blocks: list[str] = []
    i = 0
    while i < len(lines):
        match = _ADMONITION.match(lines[i])
        i += 1
        if match is None:
            continue
        indent = len(match.group(1))
        while i < len(lines) and (not lines[i].strip() or _indent(lines[i]) > indent):
            fence = _FENCE_OPEN.match(lines[i])
            i += 1
            if fence is None:
                continue
            body: list[str] = []
            while i < len(lines) and lines[i].strip() != "```":
                body.append(lines[i])
                i += 1
            i += 1  # the closing fence
            blocks.append(textwrap.dedent("\n".join(body)))
    return blocks


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


CASES = [
    (qualname, index, block)
    for qualname, obj in _public_objects()
    for index, block in enumerate(examples(inspect.getdoc(obj) or ""))
]


# The context that snippets take as given. A small classifier of 3 features and 4
# classes, with BatchNorm statistics and a Dropout key, called on a batch (`model(x)`,
# `x` of shape (8, 3), integer labels `y`) or per example (`eqstate.vmap(model)(xs)`).
# The snippets' `model` is this one, `Model` its class.


class Model(eqstate.Module):
    linear1: eqx.nn.Linear
    bn: eqstate.nn.BatchNorm
    drop: eqstate.nn.Dropout
    linear2: eqx.nn.Linear
    weight: jax.Array
    bias: jax.Array

    def __init__(self, key: jax.Array):
        k1, k2, k3 = jax.random.split(key, 3)
        self.linear1 = eqx.nn.Linear(3, 16, key=k1)
        self.bn = eqstate.nn.BatchNorm(16)
        self.drop = eqstate.nn.Dropout(0.1, key=k2)
        self.linear2 = eqx.nn.Linear(16, 4, key=k3)
        self.weight = jnp.ones(4)
        self.bias = jnp.zeros(4)

    @eqstate.mutating
    def __call__(self, x: jax.Array) -> jax.Array:
        """A batch (batch, 3) -> logits (batch, 4), or one example (3,) -> (4,) per
        example inside `eqstate.vmap(model)(xs)`, with the same numbers."""
        per_example = x.ndim == 1
        x = self.linear1(x) if per_example else jax.vmap(self.linear1)(x)
        x, self.bn = self.bn(x)
        x, self.drop = self.drop(jax.nn.relu(x))
        x = self.linear2(x) if per_example else jax.vmap(self.linear2)(x)
        return x * self.weight + self.bias


class Net(eqstate.Module):
    """The per-example model of `eqstate.vmap`'s example: x of shape (3,)."""

    linear: eqx.nn.Linear
    bn: eqstate.nn.BatchNorm

    @eqstate.mutating
    def __call__(self, x: jax.Array) -> jax.Array:
        x, self.bn = self.bn(self.linear(x))
        return x


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()


def loss_fn(model: Model, x: jax.Array, y: jax.Array) -> tuple[jax.Array, Model]:
    logits, model = model(x)
    return cross_entropy(logits, y), model


def _context() -> dict[str, Any]:
    key = jax.random.key(0)
    k1, k2, k3, kx, ky = jax.random.split(key, 5)
    model = Model(k1)
    x = jax.random.normal(kx, (8, 3))
    y = jax.random.randint(ky, (8,), 0, 4)
    opt = eqstate.Optimizer(optax.adamw(1e-3), model)

    @eqx.filter_jit
    def train_step(model, opt, x, y):
        (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
        model, opt = opt.update(grads, model)
        return model, opt, loss

    return {
        "__name__": "docstring_example",
        "functools": functools,
        "np": np,
        "jax": jax,
        "jnp": jnp,
        "eqx": eqx,
        "optax": optax,
        "eqstate": eqstate,
        "P": jax.sharding.PartitionSpec,
        "key": key,
        "k1": k1,
        "k2": k2,
        "k3": k3,
        "Model": Model,
        "model": model,
        "x": x,
        "y": y,
        "xs": x,
        "batches": [(x, y)] * 3,
        "loss_fn": loss_fn,
        "cross_entropy": cross_entropy,
        "opt": opt,
        "train_step": train_step,
        "net": Net(eqx.nn.Linear(3, 32, key=k2), eqstate.nn.BatchNorm(32)),
    }


@functools.cache
def _base_context() -> dict[str, Any]:
    return _context()


@pytest.mark.parametrize(
    ("qualname", "index", "block"), CASES, ids=[f"{q}[{i}]" for q, i, _ in CASES]
)
@pytest.mark.usefixtures("standard_promotion")  # snippets are user code (optax, NumPy)
def test_docstring_example(qualname, index, block, tmp_path, monkeypatch):
    if block.lstrip().startswith(SKIP):
        pytest.skip(block.lstrip().splitlines()[0])
    monkeypatch.chdir(tmp_path)  # examples that write checkpoints write them here
    namespace = dict(_base_context())
    # The earlier examples of the same docstring run first, in the same namespace.
    for earlier in examples(_docstring(qualname))[:index]:
        if not earlier.lstrip().startswith(SKIP):
            exec(compile(earlier, f"<{qualname} example>", "exec"), namespace)
    exec(compile(block, f"<{qualname} example {index}>", "exec"), namespace)


def _docstring(qualname: str) -> str:
    return next(inspect.getdoc(obj) or "" for q, obj in _public_objects() if q == qualname)


def test_examples_are_found():
    assert len(CASES) >= 20
    assert examples(
        """Text.

        !!! example "Title"

            ```python
            a = 1
            ```

            More text.

            ```python
            b = a
            ```

        Not in the example:

        ```python
        c = 1
        ```
        """
    ) == ["a = 1", "b = a"]


def _public_names() -> list[tuple[str, Any]]:
    """(qualified name, object) for every exported name, aliases included."""
    names = []
    for modname in MODULES:
        module = importlib.import_module(modname)
        for name in sorted(vars(module)):
            obj = getattr(module, name)
            if not (name.startswith("_") or inspect.ismodule(obj) or not callable(obj)):
                names.append((f"{modname}.{name}", obj))
    return names


def test_every_public_object_has_an_example():
    """Every exported name has an example in its docstring (for a class, or in one of
    its public members' docstrings)."""
    members = {q.rsplit(".", 1)[0] for q, _, _ in CASES} | {q for q, _, _ in CASES}
    missing = [
        qualname
        for qualname, obj in _public_names()
        if qualname not in members and not examples(inspect.getdoc(obj) or "")
    ]
    assert not missing, f"no `!!! example` in the docstrings of {missing}"


def test_every_public_object_is_in_the_api_reference():
    """docs/api/*.md has a `::: name` entry for every exported name (mkdocs builds the
    reference from them; `mkdocs build --strict` in .ci/run checks that each resolves)."""
    docs = Path(__file__).parents[1] / "docs" / "api"
    documented = {
        line.removeprefix("::: ").strip()
        for page in docs.glob("*.md")
        for line in page.read_text().splitlines()
        if line.startswith("::: ")
    }
    missing = [q for q, _ in _public_names() if q not in documented]
    assert not missing, f"add `::: name` entries to a page of docs/api/ for {missing}"
