"""`eqstate.jit` against `eqx.filter_jit` as an oracle.

Hypothesis generates sequences of calls with changing shapes, static values (Python ints,
floats, bools, strings), keyword styles and output structures; both wrappers must return
the same structure, static values and arrays, trace as often, and return new containers
on every call, from one thread and from several at once.

Each static argument keeps one Python type: `eqx.filter_jit` reuses the trace for `1`
when called with `True` or `1.0` (equal values with one hash), where `eqstate.jit`
traces again (see `test_static_values_of_another_type_are_another_trace`).
"""

import functools
import itertools
from collections import OrderedDict, defaultdict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import eqstate


pytestmark = pytest.mark.filterwarnings("ignore::eqstate._jit.RetraceWarning")


class Box(eqx.Module):
    value: jax.Array
    n: int = eqx.field(static=True)
    label: str = "b"


ALIVE: list = []
EXAMPLES = itertools.count()
CALLS: dict[str, list] = {}  # calls of each `Scale` (by its `who`): its traces, under a jit


class Scale(eqx.Module):
    w: jax.Array
    who: str = eqx.field(static=True)

    def __call__(self, x, k):
        CALLS[self.who].append(None)
        return self.w * x.sum(), [x] * k, x.shape, "scaled"


def make_functions(who: str) -> dict[str, Any]:
    """Fresh function objects (so that neither wrapper shares a cache across examples)."""

    def tuple_out(x, n, flag):
        return x * float(n), x.shape[0] + n, flag, None, ()

    def dict_out(x, name, n):
        rows = [x[i] for i in range(min(x.shape[0], n))]
        return {name: x.sum(), "len": x.shape[0], "rows": rows, "od": OrderedDict(z=x.shape)}

    def module_out(x, scale, flag):
        boxes = [Box(x, i, "u") for i in range(x.shape[0] % 3)]
        empty = OrderedDict() if flag else defaultdict(list)
        return Box(x * scale, x.shape[0], "s" if flag else "t"), boxes, empty

    def module_in(m, x):
        return Box(m.value.sum() + x, m.n + x.shape[0], m.label * 2)

    def keywords(x, n=1, *, mode="a"):
        return {"out": x * float(n), "mode": mode, "shape": x.shape, "n": n}

    return {
        "tuple_out": tuple_out,
        "dict_out": dict_out,
        "module_out": module_out,
        "module_in": module_in,
        "keywords": keywords,
        "module": Scale(jnp.arange(1.0, 3.0), who),
    }


def counted(fn):
    """`fn` and a list whose length counts its calls (traces, under a jit)."""
    if isinstance(fn, Scale):
        return fn, CALLS.setdefault(fn.who, [])
    calls = []

    @functools.wraps(fn)  # the same signature, for binding keyword arguments
    def wrapper(*args, **kwargs):
        calls.append(None)
        return fn(*args, **kwargs)

    return wrapper, calls


call = st.fixed_dictionaries(
    {
        "fn": st.sampled_from(
            ["tuple_out", "dict_out", "module_out", "module_in", "keywords", "module"]
        ),
        "length": st.integers(1, 4),
        "offset": st.integers(0, 3),
        "int": st.integers(0, 3),
        "float": st.sampled_from([0.5, 1.0, 2.0]),
        "bool": st.booleans(),
        "str": st.sampled_from(["a", "b", "zz"]),
        "style": st.integers(0, 2),
    }
)


def arguments(c: dict) -> tuple[tuple, dict]:
    x = jnp.arange(c["length"], dtype=jnp.float32) + c["offset"]
    name, style = c["fn"], c["style"]
    if name == "tuple_out":
        args = (x, c["int"], c["bool"])
    elif name == "dict_out":
        args = (x, c["str"], c["int"])
    elif name == "module_out":
        args = (x, c["float"], c["bool"])
    elif name == "module_in":
        args = (Box(x, c["int"], c["str"]), x[: c["int"] + 1] * c["float"])
    elif name == "keywords":
        if style == 0:
            return (x,), {}
        if style == 1:
            return (x, c["int"]), {"mode": c["str"]}
        return (), {"x": x, "n": c["int"]}
    else:
        args = (x, c["int"] % 3)
    if style == 2:  # the last parameter by keyword
        params = {"tuple_out": "flag", "dict_out": "n", "module_out": "flag", "module_in": "x"}
        if name in params:
            return args[:-1], {params[name]: args[-1]}
    return args, {}


def assert_same(ours: Any, ref: Any) -> None:
    a, a_def = jtu.tree_flatten(ours)
    b, b_def = jtu.tree_flatten(ref)
    assert a_def == b_def
    for x, y in zip(a, b, strict=True):
        if isinstance(y, jax.Array):
            assert isinstance(x, jax.Array) and (x.dtype, x.shape) == (y.dtype, y.shape)
            np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-6)
        else:
            assert type(x) is type(y) and x == y


def containers(tree: Any) -> list:
    """Every list and dict (OrderedDict, defaultdict, ...) inside `tree`."""
    found = []
    for sub in jtu.tree_leaves(
        tree, is_leaf=lambda t: t is not tree and isinstance(t, list | dict)
    ):
        if isinstance(sub, list | dict):
            found += [sub, *containers(sub)]
    return found


def wrappers(names: set[str]) -> tuple[dict, dict, dict, dict]:
    key = str(next(EXAMPLES))  # Equinox shares one cache among all callable modules
    fns, ref_fns = make_functions("ours" + key), make_functions("ref" + key)
    ours, refs, our_calls, ref_calls = {}, {}, {}, {}
    for name in names:
        f, our_calls[name] = counted(fns[name])
        g, ref_calls[name] = counted(ref_fns[name])
        ours[name], refs[name] = eqstate.jit(f), eqx.filter_jit(g)
    # Kept alive: a function object at the address of a dead one can meet a stale entry
    # in Equinox's caches, which then serves its trace with no call to count.
    ALIVE.append((ours, refs))
    return ours, refs, our_calls, ref_calls


@settings(max_examples=50, deadline=None)
@given(st.lists(call, min_size=1, max_size=10))
def test_same_results_as_filter_jit(calls):
    ours, refs, our_calls, ref_calls = wrappers({c["fn"] for c in calls})
    kept = []  # every result stays alive, so that object identities are not reused
    for c in calls:
        args, kwargs = arguments(c)
        out = ours[c["fn"]](*args, **kwargs)
        assert_same(out, refs[c["fn"]](*args, **kwargs))
        kept.append(out)
    seen = [id(t) for out in kept for t in containers(out)]
    assert len(seen) == len(set(seen))  # new containers on every call
    for name, jf in ours.items():
        assert jf.traces == len(our_calls[name]) == len(ref_calls[name]), name


@settings(max_examples=20, deadline=None)
@given(st.lists(call, min_size=2, max_size=8))
def test_same_results_as_filter_jit_from_several_threads(calls):
    ours, refs, _, _ = wrappers({c["fn"] for c in calls})
    work = [(c, *arguments(c)) for c in calls * 4]
    expected = [refs[c["fn"]](*args, **kwargs) for c, args, kwargs in work]

    def run(item):
        c, args, kwargs = item
        return ours[c["fn"]](*args, **kwargs)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(run, work))
    for out, ref in zip(results, expected, strict=True):
        assert_same(out, ref)
    seen = [id(t) for out in results for t in containers(out)]
    assert len(seen) == len(set(seen))
