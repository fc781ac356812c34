import dataclasses
import io

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from beartype import beartype
from helpers import count_traces, is_strong, tree_allclose
from jaxtyping import Array, Float, jaxtyped

import eqstate


class Counter(eqstate.Module):
    weight: jax.Array
    count: jax.Array = eqstate.State.field(default=0)
    total: jax.Array = eqstate.State.field(default=0.0)

    @eqstate.mutating
    def __call__(self, x):
        self.count += np.prod(x.shape)
        self.total += 0.5
        return x * self.weight

    @eqstate.mutating
    def bump_twice(self):
        _, same = self.bump()
        assert same is self
        self.bump()
        return self.count

    @eqstate.mutating
    def bump(self):
        self.count = self.count + 1

    @eqstate.mutating
    def set_undeclared(self):
        self.nope = 1

    @eqstate.mutating
    def fail_halfway(self):
        self.count += 100
        raise RuntimeError("boom")


class Parent(eqstate.Module):
    child: Counter
    calls: jax.Array = eqstate.State.field(default=0)

    @eqstate.mutating
    def __call__(self, x):
        x, self.child = self.child(x)
        self.calls += 1
        return x


def make():
    return Counter(jnp.array(2.0))


def test_returns_result_and_new_model_leaving_original():
    c = make()
    y, c1 = c(jnp.ones(3))
    np.testing.assert_array_equal(y, 2 * np.ones(3))
    assert c1 is not c and int(c.count) == 0 and int(c1.count) == 3
    assert is_strong(c1.count, jnp.int32) and is_strong(c1.total, jnp.float32)
    _, c2 = c1(jnp.ones((2, 2)))
    assert int(c2.count) == 7 and float(c2.total) == 1.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        c2.count = 3  # frozen again after the call


def test_nested_children_and_calls_on_self():
    p = Parent(make())
    _, p1 = p(jnp.ones(2))
    assert int(p1.child.count) == 2 and int(p1.calls) == 1
    assert int(p.child.count) == 0
    n, c = make().bump_twice()
    assert int(n) == 2 and int(c.count) == 2


def test_error_in_body_leaves_original_valid():
    c = make()
    with pytest.raises(RuntimeError, match="boom"):
        c.fail_halfway()
    assert int(c.count) == 0
    _, c1 = c.bump()  # still usable
    assert int(c1.count) == 1


def test_assigning_undeclared_name_lists_fields():
    with pytest.raises(AttributeError) as info:
        make().set_undeclared()
    msg = str(info.value)
    assert "Counter.nope is not a field" in msg
    assert "weight, count, total" in msg


def test_assigning_undeclared_name_in_init_lists_fields():
    class Bad(eqstate.Module):
        a: jax.Array

        def __init__(self):
            self.a = jnp.zeros(1)
            self.b = 1

    with pytest.raises(
        AttributeError, match=r"Bad\.b is not a field\. You can assign only to declared fields: a\."
    ):
        Bad()


def test_assignment_outside_mutating_is_frozen():
    c = make()
    with pytest.raises(dataclasses.FrozenInstanceError, match="cannot assign to field 'count'"):
        c.count = jnp.array(1)
    with pytest.raises(dataclasses.FrozenInstanceError, match="@eqstate.mutating"):
        c.weight = 1.0


class Shapes(eqstate.Module):
    buf: jax.Array = eqstate.State.field(default_factory=lambda: jnp.zeros(2))
    grow: jax.Array = eqstate.State.field(default_factory=lambda: jnp.zeros(0), fixed_shape=False)
    key: jax.Array = eqstate.Rng.field(default_factory=lambda: jax.random.key(0))
    raw: jax.Array = eqstate.Rng.field(default_factory=lambda: jax.random.PRNGKey(0))
    weak: jax.Array = eqstate.field(default_factory=lambda: jnp.array(1.0))

    @eqstate.mutating
    def set(self, name, value):
        setattr(self, name, value)


def test_dtype_and_weak_type_kept():
    s = Shapes()
    _, s1 = s.set("buf", jnp.arange(2))  # int -> float32, strong
    assert is_strong(s1.buf, jnp.float32)
    _, s2 = s.set("weak", jnp.array(3, jnp.int32))
    assert s2.weak.dtype == jnp.float32 and s2.weak.weak_type
    _, s3 = s.set("raw", jax.random.split(s.raw)[0])
    assert s3.raw.dtype == jnp.uint32


def test_shape_change_errors_unless_opted_out():
    s = Shapes()
    with pytest.raises(
        ValueError, match=r"Shapes\.buf has shape \(2,\) but was assigned a value of shape \(3,\)"
    ):
        s.set("buf", jnp.zeros(3))
    _, s1 = s.set("grow", jnp.ones(5))
    assert s1.grow.shape == (5,)


class Grows(eqstate.Module):
    buf: jax.Array = eqstate.State.field(default_factory=lambda: jnp.zeros(0), fixed_shape=False)

    @eqstate.mutating
    def push(self, x):
        self.buf = jnp.concatenate([self.buf, x])


class HoldsGrows(eqstate.Module):
    child: Grows
    total: jax.Array = eqstate.State.field(default=0.0)

    @eqstate.mutating
    def push(self, x):
        _, self.child = self.child.push(x)
        self.total += jnp.sum(x)


def test_child_fixed_shape_opt_out_is_respected_by_parent():
    h = HoldsGrows(Grows())
    _, h = h.push(jnp.ones(2))
    _, h = h.push(jnp.ones(3))
    assert h.child.buf.shape == (5,) and float(h.total) == 5.0


def test_key_fields_are_not_cast():
    s = Shapes()
    _, s1 = s.set("key", jax.random.split(s.key)[1])
    assert s1.key.dtype == s.key.dtype
    with pytest.raises(TypeError, match=r"Shapes\.key holds a PRNG key of dtype key<fry>"):
        s.set("key", jnp.zeros(2, jnp.uint32))
    with pytest.raises(TypeError, match=r"Shapes\.raw holds a PRNG key of dtype uint32"):
        s.set("raw", jax.random.key(1))


def test_compiles_once_over_five_jitted_steps():
    step = count_traces(lambda m, x: m(x))
    jitted = jax.jit(step)
    c = make()
    for i in range(5):
        _, c = jitted(c, jnp.ones(3) * i)
    assert step.traces == 1 and int(c.count) == 15

    fstep = count_traces(lambda m, x: m(x))
    fjitted = eqx.filter_jit(fstep)
    p = Parent(make())
    for _ in range(5):
        _, p = fjitted(p, jnp.ones(3))
    assert fstep.traces == 1 and int(p.child.count) == 15 and int(p.calls) == 5


def test_under_vmap_grad_scan():
    c = make()
    # vmap over a stack of models
    stacked = jax.vmap(lambda w: Counter(w))(jnp.arange(3.0))
    ys, new = jax.vmap(lambda m, x: m(x))(stacked, jnp.ones((3, 4)))
    np.testing.assert_array_equal(new.count, [4, 4, 4])
    np.testing.assert_array_equal(ys[:, 0], [0.0, 1.0, 2.0])
    ys, new = eqx.filter_vmap(lambda m, x: m(x), in_axes=(None, 0))(c, jnp.ones((3, 4)))
    assert ys.shape == (3, 4)
    # grad through a mutating call
    g = jax.grad(lambda p: jnp.sum(c.update(p)(jnp.ones(3))[0]))(c.parameters())
    assert float(g.weight) == 3.0
    g = eqx.filter_grad(lambda m: jnp.sum(m(jnp.ones(3))[0]))(c)
    assert float(g.weight) == 3.0 and float(g.total) == 0.0
    # scan, threading the model as the carry
    final, ys = jax.lax.scan(lambda m, x: m(x)[::-1], c, jnp.ones((6, 2)))
    assert int(final.count) == 12 and ys.shape == (6, 2)


class Typed(eqstate.Module):
    seen: jax.Array = eqstate.State.field(default=0)

    @eqstate.mutating
    @jaxtyped(typechecker=beartype)
    def __call__(self, x: Float[Array, " n"]) -> Float[Array, " n"]:
        self.seen += x.shape[0]
        return 2 * x


class TypedOutside(eqstate.Module):
    seen: jax.Array = eqstate.State.field(default=0)

    @jaxtyped(typechecker=beartype)
    @eqstate.mutating
    def __call__(self, x: Float[Array, " n"]) -> Float[Array, " n"]:
        self.seen += x.shape[0]
        return 2 * x


@pytest.mark.parametrize("cls", [Typed, TypedOutside])
def test_with_jaxtyped_beartype(cls):
    y, t = cls()(jnp.ones(3))
    assert int(t.seen) == 3 and y.shape == (3,)
    y, t = jax.jit(lambda m, x: m(x))(t, jnp.ones(2))
    assert int(t.seen) == 5
    with pytest.raises(Exception, match="Type-check error"):
        cls()(jnp.ones((2, 2)))


def test_mutating_rejects_non_modules():
    class Plain(eqx.Module):
        @eqstate.mutating
        def f(self):
            return 1

    with pytest.raises(TypeError, match="works on subclasses of eqstate.Module only"):
        Plain().f()
    with pytest.raises(TypeError, match="decorates a method"):
        eqstate.mutating(3)


class Abstract(eqstate.Module):
    size: eqx.AbstractVar[int]


class Concrete(Abstract):
    size: int
    w: jax.Array = eqx.field(converter=jnp.asarray)
    count: jax.Array = eqstate.State.field(default=0)
    inference: bool = False

    def __check_init__(self):
        if self.size < 0:
            raise ValueError("size must be >= 0")

    def scale(self, x):
        return x * self.w


def test_equinox_features_keep_working():
    m = Concrete(2, [1.0, 2.0])
    assert isinstance(m.w, jax.Array) and m.w.shape == (2,)
    with pytest.raises(ValueError, match="size must be >= 0"):
        Concrete(-1, 1.0)
    with pytest.raises(TypeError, match="abstract"):
        Abstract()
    m2 = eqx.tree_at(lambda m: m.count, m, jnp.array(5))
    assert int(m2.count) == 5 and int(m.count) == 0
    # bound methods are pytrees
    out = eqx.filter_jit(lambda f, x: f(x))(m.scale, jnp.ones(2))
    np.testing.assert_array_equal(out, [1.0, 2.0])
    # serialisation round-trip
    buf = io.BytesIO()
    eqx.tree_serialise_leaves(buf, m2)
    buf.seek(0)
    loaded = eqx.tree_deserialise_leaves(buf, m)
    assert tree_allclose(loaded, m2)
    assert eqx.nn.inference_mode(m).inference is True
    assert isinstance(m, eqx.Module)
