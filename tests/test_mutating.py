"""`mutating` never touches its input, checks every assignment, and loses no update."""

import collections
import dataclasses
import threading
import warnings
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import tree_allclose

import eqstate
from eqstate.nn import BatchNorm, Dropout


def snapshot(tree):
    """A deep, independent copy of `tree` to compare against afterwards."""
    return jax.tree_util.tree_map(lambda x: np.array(x) if eqx.is_array(x) else x, tree)


def assert_untouched(tree, before):
    assert tree_allclose(snapshot(tree), before, rtol=0, atol=0)


class Norms(eqstate.Module):
    norms: list

    @eqstate.mutating
    def __call__(self, x):
        for i in range(len(self.norms)):
            x, self.norms[i] = self.norms[i](x)
        return x


def test_list_of_children_idiom_leaves_the_caller_alone():
    net = Norms([BatchNorm(3), BatchNorm(3)])
    before = snapshot(net)
    x = jax.random.normal(jax.random.key(0), (8, 3)) + 5.0
    _, new = net(x)
    assert_untouched(net, before)
    assert float(new.norms[0].running_mean[0]) != 0.0
    assert new.norms is not net.norms


class Bag(eqstate.Module):
    items: list
    cache: dict
    w: np.ndarray
    count: jax.Array = eqstate.State.field(default=0)

    @eqstate.mutating
    def grow(self, x):
        self.items.append(x)
        self.cache["k"] = x
        self.w += 1
        self.count += 1

    @eqstate.mutating
    def grow_then_fail(self, x):
        self.items.append(x)
        self.cache["k"] = x
        self.w += 1
        raise RuntimeError("boom")

    @eqstate.mutating
    def shrink(self):
        self.items.pop()
        del self.cache["a"]

    @eqstate.mutating
    def set_item(self, i, value):
        self.items[i] = value

    @eqstate.mutating
    def set_key(self, k, value):
        self.cache[k] = value


def make_bag():
    return Bag([jnp.zeros(2)], {"a": jnp.ones(2)}, np.zeros(3, np.float32))


def test_containers_and_numpy_leaves_are_private_to_the_call():
    bag = make_bag()
    before = snapshot(bag)
    _, new = bag.grow(jnp.full(2, 7.0))
    assert_untouched(bag, before)
    assert len(new.items) == 2 and set(new.cache) == {"a", "k"}
    np.testing.assert_array_equal(new.w, np.ones(3))
    _, smaller = bag.shrink()
    assert_untouched(bag, before)
    assert smaller.items == [] and smaller.cache == {}


def test_a_raising_method_leaves_nothing_behind():
    bag = make_bag()
    before = snapshot(bag)
    with pytest.raises(RuntimeError, match="boom"):
        bag.grow_then_fail(jnp.ones(2))
    assert_untouched(bag, before)
    assert len(bag.items) == 1 and set(bag.cache) == {"a"}


def test_items_set_into_containers_are_checked_like_fields():
    bag = make_bag()
    with pytest.raises(
        ValueError,
        match=r"Bag\.items\[0\] has shape \(2,\) but was assigned a value of shape \(5,\)",
    ):
        bag.set_item(0, jnp.zeros(5))
    with pytest.raises(
        TypeError, match=r"Bag\.cache\['a'\] holds float32 values but was assigned a complex64"
    ):
        bag.set_key("a", jnp.ones(2, jnp.complex64))
    _, ok = bag.set_item(0, jnp.arange(2))  # int -> float32: same direction, cast
    assert ok.items[0].dtype == jnp.float32
    _, new_key = bag.set_key("new", jnp.zeros(9))  # a new item: nothing to compare with
    assert new_key.cache["new"].shape == (9,)


def test_two_calls_inside_one_jit_see_the_same_state():
    bag = make_bag()

    @jax.jit
    def twice(x):
        _, a = bag.grow(x)
        _, b = bag.grow(x)
        return len(a.items), len(b.items)

    assert twice(jnp.ones(2)) == (2, 2)
    assert len(bag.items) == 1


def test_threads_share_one_model_safely():
    net = Norms([BatchNorm(2)])
    before = snapshot(net)
    xs = [jnp.full((4, 2), float(i)) + jnp.arange(4.0)[:, None] for i in range(8)]
    expected = [float(net(x)[1].norms[0].running_mean[0]) for x in xs]
    results: dict[int, list[float]] = collections.defaultdict(list)

    def work(t):
        for _ in range(25):
            for i, x in enumerate(xs):
                results[i].append(float(net(x)[1].norms[0].running_mean[0]))

    threads = [threading.Thread(target=work, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, got in results.items():
        assert got == [expected[i]] * len(got)
    assert_untouched(net, before)


class Nested(eqstate.Module):
    n: jax.Array = eqstate.State.field(default=0)
    log: list = eqstate.State.field(default_factory=list, fixed_shape=False)

    @eqstate.mutating
    def risky(self):
        self.n += 100
        self.log.append(jnp.zeros(1))
        raise ValueError("risky failed")

    @eqstate.mutating
    def __call__(self):
        try:
            self.risky()
        except ValueError:  # the idiom under test: caught by the caller
            self.n += 0
        self.n += 1
        return self.n


def test_nested_call_that_raises_is_undone():
    n, new = Nested()()
    assert int(n) == 1 and int(new.n) == 1 and new.log == []


class Parent(eqstate.Module):
    bn: BatchNorm
    drop: Dropout

    def __init__(self):
        self.bn = BatchNorm(3)
        self.drop = Dropout(0.5, key=jax.random.key(0))

    @eqstate.mutating
    def forgets(self, x):
        h, _ = self.bn(x)
        return h

    @eqstate.mutating
    def bare(self, x):
        self.bn(x)
        return x

    @eqstate.mutating
    def discards(self, x):
        h, new_bn = self.bn(x)
        eqstate.discard(new_bn)
        return h

    @eqstate.mutating
    def chained(self, x):
        h, bn = self.bn(x)
        h, bn = bn(h)
        self.bn = bn
        return h

    @eqstate.mutating
    def returns_child(self, x):
        return self.bn(x)

    @eqstate.mutating
    def in_inference(self, x):
        h, _ = eqstate.eval(self.bn)(x)
        return h

    @eqstate.mutating
    def scanned(self, xs):
        def body(bn, x):
            y, bn = bn(x)
            return bn, y

        self.bn, ys = jax.lax.scan(body, self.bn, xs)
        return ys

    @eqstate.mutating
    def forgets_drop(self, x):
        y, _ = self.drop(x)
        return y


X = jax.random.normal(jax.random.key(1), (4, 3))


@pytest.mark.parametrize("name", ["forgets", "bare"])
def test_dropped_child_update_raises(name):
    with pytest.raises(
        RuntimeError,
        match=r"Parent\.\w+ dropped an update: `self\.bn\(\.\.\.\)` returned a new BatchNorm whose state changed \(running_mean, running_var\).*`y, self\.bn = self\.bn\(x\)`.*eqstate\.discard",
    ):
        getattr(Parent(), name)(X)


def test_dropped_child_update_raises_under_filter_jit_and_names_rng_fields():
    # Under plain jax.jit the `inference` flags are traced, so whether the state changes
    # is only known when the step runs: a dropped update is then only warned about.
    with pytest.raises(
        RuntimeError,
        match=r"`self\.drop\(\.\.\.\)` returned a new Dropout whose state changed \(key\)",
    ):
        eqx.filter_jit(lambda m, x: m.forgets_drop(x))(Parent(), X)


def test_kept_or_discarded_updates_do_not_raise():
    p = Parent()
    p.discards(X)
    _, new = p.chained(X)
    assert float(new.bn.running_mean[0]) != 0.0
    (_, bn), _ = p.returns_child(X)
    assert isinstance(bn, BatchNorm)
    p.in_inference(X)
    _, scanned = p.scanned(jnp.stack([X, X]))
    assert float(scanned.bn.running_mean[0]) != 0.0


class Cell(eqstate.Module):
    buf: tuple
    flag: bool = eqx.field(static=True, default=False)
    weight: jax.Array = eqx.field(default_factory=lambda: jnp.ones(2))
    count: jax.Array = eqstate.State.field(default=0)
    total: jax.Array = eqstate.State.field(default=0)
    child: BatchNorm | None = None

    @eqstate.mutating
    def set(self, name, value):
        setattr(self, name, value)

    @eqstate.mutating
    def add_mean(self, x):
        self.total += jnp.mean(x)


def make_cell():
    return Cell(buf=(jnp.zeros(2), jnp.zeros(3)), child=BatchNorm(3))


@pytest.mark.parametrize(
    ("name", "value", "error", "pattern"),
    [
        (
            "weight",
            None,
            TypeError,
            r"Cell\.weight holds an array \(float32\[2\]\) but was assigned None of type NoneType",
        ),
        ("weight", "a string", TypeError, r"Cell\.weight holds an array .* of type str"),
        ("weight", [1.0, 2.0], TypeError, r"Cell\.weight holds an array .* of type list"),
        (
            "buf",
            (jnp.zeros(2), jnp.zeros(4)),
            ValueError,
            r"Cell\.buf\[1\] has shape \(3,\) but was assigned a value of shape \(4,\)",
        ),
        (
            "flag",
            jnp.array(True),
            TypeError,
            r"Cell\.flag is a static field .* assigned a JAX array\. .*without `static=True`",
        ),
        (
            "count",
            jnp.array(0.5),
            TypeError,
            r"Cell\.count holds int32 values but was assigned a float32 value; .*floating to integer.*`default=0\.0`",
        ),
        ("count", jnp.array(True), None, None),
        ("weight", jnp.ones(2, jnp.int32), None, None),
    ],
)
def test_assignments_are_checked(name, value, error, pattern):
    cell = make_cell()
    if error is None:
        _, new = cell.set(name, value)
        assert getattr(new, name).dtype == getattr(cell, name).dtype
        return
    with pytest.raises(error, match=pattern):
        cell.set(name, value)


def test_a_child_assigned_whole_keeps_its_own_fixed_shape():
    cell = make_cell()
    grown = eqx.tree_at(lambda b: b.running_mean, cell.child, jnp.zeros(7))
    with pytest.raises(
        ValueError,
        match=r"Cell\.child\.running_mean has shape \(3,\) but was assigned a value of shape \(7,\)",
    ):
        cell.set("child", grown)


def test_a_tracer_assigned_to_a_static_field_is_named():
    with pytest.raises(TypeError, match=r"Cell\.flag is a static field .*JAX array \(a tracer\)"):
        jax.jit(lambda c, x: c.set("flag", x))(make_cell(), jnp.array(True))


@pytest.mark.usefixtures("standard_promotion")
def test_lossy_cast_of_an_accumulated_mean_raises():
    with pytest.raises(
        TypeError,
        match=r"Cell\.total holds int32 values .* Declare the field with a floating dtype",
    ):
        make_cell().add_mean(jnp.full(4, 0.1))


def test_same_category_casts_stay_silent():
    class Acc(eqstate.Module):
        total: jax.Array = eqstate.State.field(default=0.0)

        @eqstate.mutating
        def add(self, x):
            self.total += x

    _, acc = Acc().add(np.float64(0.25))  # float64 -> float32
    assert acc.total.dtype == jnp.float32 and not acc.total.weak_type
    _, acc = acc.add(1)  # int -> float32
    assert float(acc.total) == 1.25


@pytest.mark.parametrize("name", ["filter", "update", "parameters", "states"])
def test_fields_shadowing_module_methods_are_refused(name):
    with pytest.raises(
        TypeError,
        match=rf"Bad\.{name}: a field named '{name}' would hide the method `Module\.{name}`.*Rename the field",
    ):
        type("Bad", (eqstate.Module,), {"__annotations__": {name: int}})


def test_update_free_function_reaches_every_module():
    model = make_cell()
    ema = eqstate.nn.EMA(model, decay=0.5)
    zeros = jax.tree_util.tree_map(jnp.zeros_like, ema.states())
    ema2 = eqstate.update(ema, zeros)
    assert float(ema2.params.weight[0]) == 0.0 and float(ema.params.weight[0]) == 1.0
    assert tree_allclose(eqstate.update(model, model.parameters()), model)


def test_update_checks_shapes_and_dtypes():
    cell = make_cell()
    params = cell.parameters()
    wrong = eqx.tree_at(lambda c: c.weight, params, jnp.ones(5))
    with pytest.raises(
        ValueError,
        match=r"Cell\.update: tree 0 has an array float32\[5\] at \.weight, where the model has float32\[2\]",
    ):
        cell.update(wrong)
    wrong = eqx.tree_at(lambda c: c.weight, params, jnp.ones(2, jnp.int32))
    with pytest.raises(
        ValueError, match=r"eqstate\.update: tree 0 has an array int32\[2\] at \.weight"
    ):
        eqstate.update(cell, wrong)


def test_update_allows_new_shapes_where_declared():
    class Grows(eqstate.Module):
        buf: jax.Array = eqstate.State.field(
            default_factory=lambda: jnp.zeros(0), fixed_shape=False
        )

    g = Grows()
    assert eqstate.update(g, Grows(jnp.ones(3))).buf.shape == (3,)


def test_rng_fields_must_hold_keys():
    with pytest.raises(
        TypeError,
        match=r"eqstate\.Rng\.field\(default=0\): an `Rng` field holds a PRNG key.*default_factory=lambda: jax\.random\.key\(0\)",
    ):
        eqstate.Rng.field(default=0)

    class Noisy(eqstate.Module):
        key: jax.Array = eqstate.Rng.field()

    with pytest.raises(
        TypeError,
        match=r"Noisy\.key is an `Rng` field but holds an array of dtype int32, not a PRNG key.*jax\.random\.key\(0\)",
    ):
        Noisy(0)

    class Fine(eqstate.Module):
        key: jax.Array = eqstate.Rng.field(default_factory=lambda: jax.random.PRNGKey(0))

    assert Fine().key.dtype == jnp.uint32


class Noise(eqstate.Module):
    key: jax.Array = eqstate.Rng.field(default_factory=lambda: jax.random.key(0))

    @eqstate.mutating
    def __call__(self, x, axis_name=None):
        return x + jax.random.normal(eqstate.next_key(self, axis_name=axis_name), x.shape)


def test_next_key_per_example_needs_an_axis_name():
    noise = Noise()
    with pytest.raises(
        ValueError,
        match=r"next_key\(Noise\) was called per example .* every example would draw the same random numbers",
    ):
        jax.vmap(noise)(jnp.zeros((3, 2)))
    ys, _ = jax.vmap(lambda x: noise(x, axis_name="b"), axis_name="b", out_axes=(0, None))(
        jnp.zeros((3, 2))
    )
    assert not np.allclose(ys[0], ys[1])


def test_frozen_after_the_call_and_outside_it():
    bag = make_bag()
    _, new = bag.grow(jnp.ones(2))
    with pytest.raises(dataclasses.FrozenInstanceError):
        new.count = jnp.array(3)


def test_numpy_leaves_stay_numpy():
    bag = make_bag()
    _, new = bag.grow(jnp.ones(2))
    assert isinstance(new.w, np.ndarray) and new.w is not bag.w
    _, same = bag.set_key("a", jnp.zeros(2))
    assert isinstance(same.w, np.ndarray)


class Ring(eqstate.Module):
    items: list
    seen: dict

    @eqstate.mutating
    def __call__(self, x):
        self.items.append(self.items.pop(0) + x)
        self.seen["last"] = x
        return sum(jnp.sum(i) for i in self.items)


@pytest.mark.parametrize(
    "transform",
    [
        lambda r, x: jax.jit(lambda r, x: r(x))(r, x),
        lambda r, x: eqx.filter_jit(lambda r, x: r(x))(r, x),
        lambda r, x: jax.vmap(lambda x: r(x)[0])(jnp.stack([x, x])),
        lambda r, x: jax.grad(lambda x: r(x)[0])(x),
        lambda r, x: jax.lax.scan(lambda r, x: (r(x)[1], None), r, jnp.stack([x, x])),
        lambda r, x: jax.checkpoint(lambda x: r(x)[0])(x),
        lambda r, x: jax.lax.cond(True, lambda x: r(x)[0], lambda x: jnp.sum(x), x),
    ],
    ids=["jit", "filter_jit", "vmap", "grad", "scan", "checkpoint", "cond"],
)
def test_input_untouched_under_every_transformation(transform):
    ring = Ring([jnp.zeros(2), jnp.ones(2)], {"last": jnp.zeros(2)})
    before = snapshot(ring)
    transform(ring, jnp.full(2, 3.0))
    assert_untouched(ring, before)
    assert [float(i[0]) for i in ring.items] == [0.0, 1.0]


# --- what a hostile review found, each now a test -------------------------------------


class Holder(eqstate.Module):
    layer: eqx.nn.BatchNorm
    state: eqx.nn.State

    @eqstate.mutating
    def __call__(self, x):
        y, self.state = jax.vmap(
            self.layer, axis_name="batch", in_axes=(0, None), out_axes=(0, None)
        )(x, self.state)
        return y


def test_an_equinox_state_is_not_spent_by_the_call():
    layer, state = eqx.nn.make_with_state(eqx.nn.BatchNorm)(3, axis_name="batch", mode="batch")
    holder = Holder(layer, state)
    _, new = holder(X)
    _, again = holder(X)  # the caller's state is still usable: not spent by `set`
    assert tree_allclose(new, again) and new.state is not holder.state


class Odd(eqstate.Module):
    queue: collections.deque
    ns: object
    raw: bytearray
    fn: object

    @eqstate.mutating
    def __call__(self):
        self.queue.append(1)
        self.ns.count += 1
        self.raw.append(7)
        self.fn.args[0].append(2)


def test_other_mutable_objects_are_private_too():
    import types

    odd = Odd(
        collections.deque([0]),
        types.SimpleNamespace(count=0),
        bytearray(b"a"),
        jax.tree_util.Partial(len, [1]),
    )
    _, new = odd()
    assert list(odd.queue) == [0] and odd.ns.count == 0 and odd.raw == bytearray(b"a")
    assert odd.fn.args[0] == [1]
    assert list(new.queue) == [0, 1] and new.ns.count == 1 and new.fn.args[0] == [1, 2]


class Remat(eqstate.Module):
    bn: BatchNorm

    @eqstate.mutating
    def checkpointed(self, x):
        return jax.checkpoint(lambda x: self.bn(x)[0])(x)

    @eqstate.mutating
    def checkpointed_kept(self, x):
        y, self.bn = jax.checkpoint(lambda x: self.bn(x))(x)
        return y

    @eqstate.mutating
    def in_cond(self, x):
        return jax.lax.cond(True, lambda x: self.bn(x)[0], lambda x: x, x)

    @eqstate.mutating
    def in_inner_jit(self, x):
        return eqx.filter_jit(lambda x: self.bn(x)[0])(x)


@pytest.mark.parametrize("name", ["checkpointed", "in_cond", "in_inner_jit"])
def test_dropped_updates_inside_transformations_raise(name):
    with pytest.raises(RuntimeError, match=r"Remat\.\w+ dropped an update: `self\.bn\(\.\.\.\)`"):
        getattr(Remat(BatchNorm(3)), name)(X)


def test_updates_kept_through_a_transformation_do_not_raise():
    _, new = Remat(BatchNorm(3)).checkpointed_kept(X)
    assert float(new.bn.running_mean[0]) != 0.0


class Stepper(eqstate.Module):
    acc: eqstate.metrics.Mean

    @eqstate.mutating
    def __call__(self, x):
        self.acc.update(x)
        return x


def test_dropped_update_names_the_method_called():
    with pytest.raises(
        RuntimeError,
        match=r"`self\.acc\.update\(\.\.\.\)` returned a new Mean .*`y, self\.acc = self\.acc\.update\(x\)`",
    ):
        Stepper(eqstate.metrics.Mean())(jnp.ones(3))


class Refs(eqstate.Module):
    a: list
    b: list

    @eqstate.mutating
    def inner(self):
        self.a.append(1)
        self.a = [99]
        raise ValueError("inner failed")

    @eqstate.mutating
    def __call__(self):
        a = self.a
        with pytest.raises(ValueError):
            self.inner()
        a.append(2)
        return a is self.a and self.a is self.b


def test_undoing_a_nested_call_keeps_the_callers_references():
    shared = [0]
    same, new = Refs(shared, shared)()
    assert same and new.a == [0, 2] and shared == [0]


class Meta(eqstate.Module):
    meta: dict = eqx.field(static=True)

    @eqstate.mutating
    def note(self, x):
        self.meta["x"] = x


def test_a_static_container_refuses_arrays_set_into_it():
    with pytest.raises(TypeError, match=r"Meta\.meta is a static field .*JAX array"):
        Meta({}).note(jnp.ones(2))


class Masked(eqstate.Module):
    mask: np.ndarray = eqx.field(static=True)
    count: jax.Array = eqstate.State.field(default=0)

    @eqstate.mutating
    def __call__(self, x):
        self.count += 1
        return x * self.mask


class HoldsMasked(eqstate.Module):
    child: Masked

    @eqstate.mutating
    def __call__(self, x):
        y, self.child = self.child(x)
        return y


def test_a_static_numpy_array_in_a_child_is_no_error():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Equinox warns about static arrays
        holder = HoldsMasked(Masked(np.ones(2, np.float32)))
    _, new = holder(jnp.ones(2))
    assert int(new.child.count) == 1


class Wrap(eqstate.Module):
    inner: Any

    @eqstate.mutating
    def touch(self):
        return None


class Draftee(eqstate.Module):
    items: Any = None

    @eqstate.mutating
    def f(self):
        Wrap(self).touch()  # walks the draft while it is still being assigned to
        self.items = [1]


class Outer(eqstate.Module):
    m: Draftee

    @eqstate.mutating
    def h(self):
        self.m.items.append(2)


def test_a_draft_is_never_taken_for_immutable():
    _, n = Draftee().f()
    Outer(n).h()
    assert n.items == [1]


def test_integers_out_of_range_are_refused():
    with pytest.raises(
        ValueError,
        match=r"Cell\.count holds int32 values but was assigned 1099511627776, outside int32's range",
    ):
        make_cell().set("count", 2**40)


def test_containers_and_strings_into_an_array_slot_are_named():
    Pt = collections.namedtuple("Pt", "x y")
    with pytest.raises(TypeError, match=r"Cell\.weight holds an array .* a Pt of type Pt"):
        make_cell().set("weight", Pt(1, 2))
    with pytest.raises(TypeError, match=r"Cell\.weight holds an array .* an array of dtype <U1"):
        make_cell().set("weight", np.array(["a", "b"]))


def test_rng_fields_may_hold_containers_of_keys():
    class Keys(eqstate.Module):
        keys: tuple = eqstate.Rng.field()

    assert len(Keys((jax.random.key(0), jax.random.key(1))).keys) == 2
    with pytest.raises(
        TypeError, match=r"Keys\.keys is an `Rng` field but holds an array of dtype int32"
    ):
        Keys((jax.random.key(0), 3))


class Queue(eqstate.Module):
    items: list

    @eqstate.mutating
    def push(self, x):
        self.items.pop(0)
        self.items.append(x)


def test_a_list_that_keeps_its_length_is_compared_item_by_item():
    q = Queue([jnp.zeros(2), jnp.ones(2)])
    _, q2 = q.push(jnp.full(2, 5.0))
    assert [float(i[0]) for i in q2.items] == [1.0, 5.0]
    with pytest.raises(
        ValueError,
        match=r"Queue\.items\[1\] has shape \(2,\) but was assigned a value of shape \(3,\)",
    ):
        q.push(jnp.zeros(3))


class Frozen(eqstate.Module):
    backbone: Parent

    @eqstate.mutating
    def __call__(self, x):
        feats, _ = self.backbone.forgets(x)  # in inference mode nothing changes
        return feats


def call_frozen(m, x):
    return m(x)


@pytest.mark.parametrize(
    "wrap",
    [lambda f: f, jax.jit, eqx.filter_jit, eqstate.jit],
    ids=["eager", "jit", "filter_jit", "eqstate.jit"],
)
def test_an_unchanged_child_ignored_is_no_dropped_update(wrap):
    frozen = Frozen(eqstate.eval(Parent()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y, new = wrap(call_frozen)(frozen, X)
    # plain jax.jit traces the `inference` flags: it can only warn that an update may be lost
    expected = [eqstate.DroppedUpdateWarning] if wrap is jax.jit else []
    assert [type(w.message) for w in caught] == expected
    assert y.shape == X.shape
    np.testing.assert_array_equal(new.backbone.bn.running_mean, frozen.backbone.bn.running_mean)


def test_per_example_dropout_under_grad_is_refused():
    drop = Dropout(0.5, key=jax.random.key(0))
    with pytest.raises(ValueError, match=r"Dropout was called per example inside `jax\.vmap`"):
        jax.vmap(jax.grad(lambda x: jnp.sum(drop(x)[0])))(jnp.ones((4, 3)))


def test_per_example_batch_norm_on_square_maps_is_refused():
    bn = BatchNorm(8)
    with pytest.raises(
        ValueError,
        match=r"BatchNorm was called per example .* no mapped axis",
    ):
        jax.vmap(lambda x: bn(x)[0])(jnp.ones((2, 8, 8, 8)))
    # named, the square map is one example (features first), as in Equinox
    per_example = eqstate.vmap(lambda x: bn(x)[0])(jnp.ones((2, 8, 8, 8)))
    assert per_example.shape == (2, 8, 8, 8)


class Head(eqstate.Module):
    bn: BatchNorm

    @eqstate.mutating
    def __call__(self, x, inference=None):
        h, _ = self.bn(x, inference=inference)  # in inference: nothing to keep
        return h


def eval_head():
    return Head(eqstate.eval(BatchNorm(3)))


@pytest.mark.parametrize(
    "model",
    [
        lambda: jax.jit(lambda m: m)(eval_head()),  # the flag comes back as an Array(True)
        lambda: jax.device_put(eval_head()),
        lambda: eqstate.update(
            eval_head(), jax.tree_util.tree_map(np.asarray, eval_head().states())
        ),
    ],
    ids=["after-jit", "device_put", "numpy-state"],
)
def test_inference_calls_whose_state_is_rebuilt_equal_are_no_dropped_update(model):
    m = model()
    y, _ = m(X)  # eager: the flag's value is known, nothing is lost
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        y2, _ = eqx.filter_jit(lambda m, x: m(x))(m, X)
    traced = isinstance(m.bn.inference, jax.Array)  # an array flag is traced by filter_jit
    assert [type(w.message) for w in caught] == ([eqstate.DroppedUpdateWarning] if traced else [])
    np.testing.assert_allclose(y, y2, rtol=1e-6)
    jax.vmap(lambda x: m(x)[0])(X)  # per example is fine in inference


def test_a_traced_inference_argument_is_only_a_possible_drop():
    head = Head(BatchNorm(3))
    with pytest.warns(
        eqstate.DroppedUpdateWarning, match=r"Head\.__call__ may have dropped an update"
    ):
        eqx.filter_jit(lambda m, x, flag: m(x, inference=flag))(head, X, jnp.array(True))


def test_a_dropped_update_under_plain_jit_is_warned():
    with pytest.warns(
        eqstate.DroppedUpdateWarning,
        match=r"Parent\.forgets may have dropped an update: `self\.bn\(\.\.\.\)`.*plain `jax\.jit`",
    ):
        jax.jit(lambda m, x: m.forgets(x))(Parent(), X)
