"""Property: whatever a mutating body does, the input is bit-for-bit unchanged and the
output is what the body asked for.

Models are random nests of lists, dicts, tuples and child modules over NumPy arrays,
JAX arrays and PRNG keys. Bodies are random sequences of assignments, appends, pops,
item sets, in-place NumPy updates, children's mutating calls, nested calls on `self`
and raises (some caught by the caller). Every operation is also applied to a plain
Python copy of the model, which is the oracle for the output.
"""

import copy
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import HealthCheck, given, settings, strategies as st

import eqstate


class BoomError(Exception):
    pass


class Box(eqstate.Module):
    data: Any
    n: jax.Array = eqstate.State.field(default=0)

    @eqstate.mutating
    def run(self, draw, log, depth):
        for _ in range(draw(st.integers(0, 4))):
            _step(self, draw, log, depth)
        return len(log)


def _containers(x, path=()):
    """The lists and dicts inside `x` (not inside child boxes), with their paths."""
    if isinstance(x, (list, dict)):
        yield path, x
    if isinstance(x, (list, tuple)):
        for i, v in enumerate(x):
            yield from _containers(v, (*path, i))
    elif isinstance(x, dict):
        for k, v in x.items():
            yield from _containers(v, (*path, k))


def _items(c):
    return list(enumerate(c)) if isinstance(c, list) else list(c.items())


def _is_key(x):
    return isinstance(x, jax.Array) and jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def _like(x, seed):
    """A new value of `x`'s shape and dtype."""
    if _is_key(x):
        return jax.random.key(seed)
    if isinstance(x, np.ndarray):
        return np.full(x.shape, seed, x.dtype)
    return jnp.full(x.shape, seed, x.dtype)


# Lists grown or shrunk in the running call. A list that loses an item and gains another
# keeps its length, so its items are compared position by position with the caller's
# (and an appended item of another shape or dtype is refused): bodies here do one or
# the other to a list, never both.
_GROWN: dict[int, str] = {}


def _step(box, draw, log, depth):
    found = list(_containers(box.data))
    ops = ["count", "raise"] + (["self"] if depth < 2 else [])
    if found:
        ops += ["append", "set", "pop", "child", "iadd"]
    op = draw(st.sampled_from(ops))
    if op == "count":
        box.n += 1
        log.append(("count",))
        return
    if op == "raise":
        raise BoomError
    if op == "self":
        sub = []
        try:
            box.run(draw, sub, depth + 1)
        except BoomError:
            return  # undone: nothing to log
        log.append(("self", sub))
        return
    path, c = draw(st.sampled_from(found))
    items = _items(c)
    if op == "append":
        seed = draw(st.integers(0, 9))
        if isinstance(c, list):
            if _GROWN.setdefault(id(c), "append") != "append":
                return  # popped in this call: same length, compared item by item
            c.append(np.full(2, seed, np.float32))
            log.append(("append", path, seed))
        else:
            key = f"new{len(c)}"
            c[key] = np.full(2, seed, np.float32)
            log.append(("setkey", path, key, seed))
        return
    if op == "pop":
        if isinstance(c, list) and c and _GROWN.setdefault(id(c), "pop") == "pop":
            c.pop()
            log.append(("pop", path))
        return
    arrays = [(k, v) for k, v in items if isinstance(v, (np.ndarray, jax.Array))]
    boxes = [(k, v) for k, v in items if isinstance(v, Box)]
    if op == "set" and arrays:
        k, v = draw(st.sampled_from(arrays))
        seed = draw(st.integers(0, 9))
        c[k] = _like(v, seed)
        log.append(("set", path, k, seed))
    elif op == "iadd" and arrays:
        k, v = draw(st.sampled_from(arrays))
        if not _is_key(v):
            c[k] += 1  # in place on a NumPy array: on the draft's own copy
            log.append(("iadd", path, k))
    elif op == "child" and boxes and depth < 2:
        k, child = draw(st.sampled_from(boxes))
        sub = []
        try:
            _, c[k] = child.run(draw, sub, depth + 1)
        except BoomError:
            return
        log.append(("child", path, k, sub))


def plain(x):
    """A deep, independent, comparable copy: NumPy arrays, lists, dicts, tuples."""
    if isinstance(x, Box):
        return {"__box__": plain(x.data), "n": int(x.n)}
    if isinstance(x, (list, tuple)):
        return type(x)(plain(v) for v in x)
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    if _is_key(x):
        return ("key", np.array(jax.random.key_data(x)))
    return np.array(x)


def _nav(node, path):
    for k in path:
        node = node[k]
    return node


def apply(box, log):
    """Apply a body's operations to a plain copy of a box (the oracle)."""
    for op, *args in log:
        data = box["__box__"]
        if op == "count":
            box["n"] += 1
        elif op == "self":
            apply(box, args[0])
        elif op == "append":
            path, seed = args
            _nav(data, path).append(np.full(2, seed, np.float32))
        elif op == "setkey":
            path, key, seed = args
            _nav(data, path)[key] = np.full(2, seed, np.float32)
        elif op == "pop":
            _nav(data, args[0]).pop()
        elif op == "set":
            path, k, seed = args
            c = _nav(data, path)
            old = c[k]
            if isinstance(old, tuple):
                c[k] = ("key", np.array(jax.random.key_data(jax.random.key(seed))))
            else:
                c[k] = np.full(old.shape, seed, old.dtype)
        elif op == "iadd":
            path, k = args
            c = _nav(data, path)
            c[k] = np.asarray(c[k] + 1, c[k].dtype)
        elif op == "child":
            path, k, sub = args
            apply(_nav(data, path)[k], sub)


def same(a, b):
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b)
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


leaves = st.one_of(
    st.integers(0, 5).map(lambda s: np.full(2, s, np.float32)),
    st.integers(0, 5).map(lambda s: jnp.full(3, s, jnp.float32)),
    st.integers(0, 5).map(lambda s: jnp.full((), s, jnp.int32)),
    st.integers(0, 5).map(jax.random.key),
)
trees = st.recursive(
    leaves,
    lambda children: st.one_of(
        st.lists(children, max_size=3),
        st.dictionaries(st.sampled_from("abc"), children, max_size=3),
        st.lists(children, max_size=2).map(tuple),
        children.map(lambda d: Box(data=d)),
    ),
    max_leaves=8,
)
models = st.one_of(
    st.lists(trees, max_size=3), st.dictionaries(st.sampled_from("xyz"), trees, max_size=3)
).map(lambda d: Box(data=d))


def check(model, run):
    """Run a random body through `run`; the input is unchanged and the output as asked."""
    _GROWN.clear()
    before = plain(model)
    log = []
    try:
        _, new = run(model, log)
    except BoomError:
        assert same(plain(model), before)
        return
    assert same(plain(model), before)
    expected = copy.deepcopy(before)
    apply(expected, log)
    assert same(plain(new), expected)


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=models, data=st.data())
def test_input_unchanged_and_output_as_asked(model, data):
    check(model, lambda m, log: m.run(data.draw, log, 0))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model=models, data=st.data())
def test_same_under_filter_jit(model, data):
    check(model, lambda m, log: eqx.filter_jit(lambda m: m.run(data.draw, log, 0))(m))
