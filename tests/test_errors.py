"""A catalogue of wrong inputs and misuses across the public API.

Each case asserts the exception type, that the message names the argument or field
path (`where`), and that it says what to do (`fix`). None may be an internal
`KeyError` / `IndexError`, or come from inside JAX where eqstate could have known first.
"""

import dataclasses
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import eqstate
from eqstate.metrics import Accuracy, Collection, Mean
from eqstate.nn import EMA, BatchNorm, Dropout


# --- models the cases use -------------------------------------------------------------


class Net(eqstate.Module):
    weight: jax.Array
    buf: tuple
    items: list
    cache: dict
    count: jax.Array = eqstate.State.field(default=0)
    flag: bool = eqx.field(static=True, default=False)
    key: jax.Array = eqstate.Rng.field(default_factory=lambda: jax.random.key(0))
    raw: jax.Array = eqstate.Rng.field(default_factory=lambda: jax.random.PRNGKey(0))
    mask: jax.Array = eqstate.State.field(default_factory=lambda: jnp.zeros(2, bool))
    z: jax.Array = eqstate.State.field(default_factory=lambda: jnp.zeros(2, jnp.complex64))
    bn: BatchNorm = dataclasses.field(default_factory=lambda: BatchNorm(3))

    @eqstate.mutating
    def set(self, name, value):
        setattr(self, name, value)

    @eqstate.mutating
    def set_item(self, name, key, value):
        getattr(self, name)[key] = value

    @eqstate.mutating
    def bare_child(self, x):
        self.bn(x)
        return x

    @eqstate.mutating
    def ignored_child(self, x):
        y, _ = self.bn(x)
        return y

    @eqstate.mutating
    def undeclared(self):
        self.nope = 1

    @eqstate.mutating
    def key_now(self):
        return eqstate.next_key(self, "key")


def net():
    return Net(jnp.ones(2), (jnp.zeros(2), jnp.zeros(3)), [jnp.zeros(2)], {"a": jnp.ones(2)})


class NoKey(eqstate.Module):
    x: jax.Array = eqstate.State.field(default=0)

    @eqstate.mutating
    def draw(self):
        return eqstate.next_key(self)


class TwoKeys(eqstate.Module):
    a: jax.Array = eqstate.Rng.field(default_factory=lambda: jax.random.key(0))
    b: jax.Array = eqstate.Rng.field(default_factory=lambda: jax.random.key(1))

    @eqstate.mutating
    def draw(self):
        return eqstate.next_key(self)


class Plain(eqx.Module):
    @eqstate.mutating
    def f(self):
        return 1


X3 = jnp.ones((4, 3))


def _frozen():
    n = net()
    n.count = jnp.array(1)


def _init_undeclared():
    class Bad(eqstate.Module):
        a: jax.Array

        def __init__(self):
            self.a = jnp.zeros(1)
            self.b = 1

    Bad()


def _field_named(name):
    def make():
        type("Shadow", (eqstate.Module,), {"__annotations__": {name: int}})

    return make


def _static_tracer():
    jax.jit(lambda n, x: n.set("flag", x))(net(), jnp.array(True))


def _max_traces():
    f = eqstate.jit(lambda x: x + 1, max_traces=1)
    f(jnp.ones(2))
    f(jnp.ones(3))


def _unhashable_static():
    eqstate.jit(lambda x, opts: x)(jnp.ones(2), {"opts": {1, 2}})


def _per_example_key():
    class Noise(eqstate.Module):
        key: jax.Array = eqstate.Rng.field(default_factory=lambda: jax.random.key(0))

        @eqstate.mutating
        def __call__(self, x):
            return x + jax.random.normal(eqstate.next_key(self), x.shape)

    jax.vmap(Noise())(jnp.zeros((3, 2)))


def _update_wrong_shape():
    n = net()
    n.update(eqx.tree_at(lambda m: m.weight, n.parameters(), jnp.ones(5)))


def _update_wrong_dtype():
    n = net()
    eqstate.update(n, eqx.tree_at(lambda m: m.weight, n.parameters(), jnp.ones(2, jnp.int32)))


def _update_wrong_structure():
    n = net()
    n.update({"weight": n.weight})


# Each case: (id, call, exception type, where: regex naming the place, fix: regex of advice)
CASES: list[tuple[str, Any, type[BaseException], str, str]] = [
    # kinds and fields
    (
        "field-kind-not-a-kind",
        lambda: eqstate.field(kind=int),
        TypeError,
        r"eqstate\.field\(kind=\.\.\.\)",
        r"subclass of eqstate\.Kind",
    ),
    (
        "kind-instantiated",
        lambda: eqstate.State(),
        TypeError,
        r"State is a kind",
        r"declare fields with `State\.field\(\)`",
    ),
    (
        "rng-default-not-key",
        lambda: eqstate.Rng.field(default=0),
        TypeError,
        r"eqstate\.Rng\.field\(default=0\)",
        r"default_factory=lambda: jax\.random\.key\(0\)",
    ),
    (
        "rng-value-not-key",
        lambda: TwoKeys(a=jnp.zeros(2)),
        TypeError,
        r"TwoKeys\.a is an `Rng` field",
        r"Pass a key",
    ),
    *[
        (
            f"field-shadows-{m}",
            _field_named(m),
            TypeError,
            rf"Shadow\.{m}: a field named '{m}'",
            r"Rename the field",
        )
        for m in ("filter", "update", "parameters", "states")
    ],
    # frozen modules and declared names
    (
        "assign-outside-mutating",
        _frozen,
        dataclasses.FrozenInstanceError,
        r"field 'count'",
        r"Decorate the method that assigns with `@eqstate\.mutating`",
    ),
    (
        "undeclared-in-init",
        _init_undeclared,
        AttributeError,
        r"Bad\.b is not a field",
        r"Declare it on the class",
    ),
    (
        "undeclared-in-mutating",
        lambda: net().undeclared(),
        AttributeError,
        r"Net\.nope is not a field",
        r"Declare it on the class",
    ),
    (
        "mutating-on-plain-module",
        lambda: Plain().f(),
        TypeError,
        r"Plain\.f was called on a Plain",
        r"subclasses of eqstate\.Module",
    ),
    (
        "mutating-not-callable",
        lambda: eqstate.mutating(3),
        TypeError,
        r"eqstate\.mutating decorates a method",
        r"got 3",
    ),
    # assignments inside mutating methods
    (
        "shape-changed",
        lambda: net().set("weight", jnp.ones(3)),
        ValueError,
        r"Net\.weight has shape \(2,\)",
        r"fixed_shape=False",
    ),
    (
        "typed-key-to-raw",
        lambda: net().set("key", jnp.zeros(2, jnp.uint32)),
        TypeError,
        r"Net\.key holds a PRNG key",
        r"jax\.random\.split\(self\.key\)",
    ),
    (
        "raw-key-to-typed",
        lambda: net().set("raw", jax.random.key(1)),
        TypeError,
        r"Net\.raw holds a PRNG key of dtype uint32",
        r"Assign a key of the same kind",
    ),
    (
        "float-to-int",
        lambda: net().set("count", jnp.array(0.5)),
        TypeError,
        r"Net\.count holds int32",
        r"Declare the field with a floating dtype \(e\.g\. `default=0\.0`\)",
    ),
    (
        "python-float-to-int",
        lambda: net().set("count", 0.5),
        TypeError,
        r"Net\.count holds int32",
        r"`default=0\.0`",
    ),
    (
        "complex-to-real",
        lambda: net().set("weight", jnp.ones(2, jnp.complex64)),
        TypeError,
        r"Net\.weight holds float32 values .* complex",
        r"cast on purpose with `\.astype\(float32\)`",
    ),
    (
        "int-to-bool",
        lambda: net().set("mask", jnp.ones(2, jnp.int32)),
        TypeError,
        r"Net\.mask holds bool values",
        r"integer dtype",
    ),
    (
        "none-into-array",
        lambda: net().set("weight", None),
        TypeError,
        r"Net\.weight holds an array \(float32\[2\]\)",
        r"declare the field as `Optional`",
    ),
    (
        "string-into-array",
        lambda: net().set("count", "three"),
        TypeError,
        r"Net\.count holds an array",
        r"assign one",
    ),
    (
        "list-into-array",
        lambda: net().set("weight", [1.0, 2.0]),
        TypeError,
        r"Net\.weight holds an array .* type list",
        r"assign one",
    ),
    (
        "array-into-static",
        lambda: net().set("flag", jnp.array(True)),
        TypeError,
        r"Net\.flag is a static field",
        r"without `static=True`",
    ),
    (
        "tracer-into-static",
        _static_tracer,
        TypeError,
        r"Net\.flag is a static field .*\(a tracer\)",
        r"without `static=True`",
    ),
    (
        "child-escapes-fixed-shape",
        lambda: net().set("bn", eqx.tree_at(lambda b: b.running_mean, BatchNorm(3), jnp.zeros(7))),
        ValueError,
        r"Net\.bn\.running_mean has shape \(3,\)",
        r"fixed_shape=False",
    ),
    (
        "tuple-item-shape",
        lambda: net().set("buf", (jnp.zeros(2), jnp.zeros(4))),
        ValueError,
        r"Net\.buf\[1\] has shape \(3,\)",
        r"fixed_shape=False",
    ),
    (
        "list-item-shape",
        lambda: net().set_item("items", 0, jnp.zeros(5)),
        ValueError,
        r"Net\.items\[0\] has shape \(2,\)",
        r"fixed_shape=False",
    ),
    (
        "dict-item-lossy",
        lambda: net().set_item("cache", "a", jnp.ones(2, jnp.complex64)),
        TypeError,
        r"Net\.cache\['a'\] holds float32",
        r"\.astype\(float32\)",
    ),
    (
        "dropped-child-bare",
        lambda: net().bare_child(X3),
        RuntimeError,
        r"Net\.bare_child dropped an update: `self\.bn\(\.\.\.\)`",
        r"`y, self\.bn = self\.bn\(x\)`",
    ),
    (
        "dropped-child-ignored",
        lambda: net().ignored_child(X3),
        RuntimeError,
        r"`self\.bn\(\.\.\.\)` returned a new BatchNorm .*running_mean",
        r"eqstate\.discard",
    ),
    # keys
    (
        "next-key-outside-mutating",
        lambda: eqstate.next_key(net()),
        RuntimeError,
        r"eqstate\.next_key\(self\) advances the key stored in Net",
        r"Decorate the method with `@eqstate\.mutating`",
    ),
    (
        "next-key-no-rng-field",
        lambda: NoKey().draw(),
        ValueError,
        r"could not choose a key field of NoKey: it has no Rng field",
        r"declare exactly one field with `eqstate\.Rng\.field\(\)`",
    ),
    (
        "next-key-two-rng-fields",
        lambda: TwoKeys().draw(),
        ValueError,
        r"TwoKeys: it has several: a, b",
        r"Pass the field's name",
    ),
    (
        "next-key-per-example",
        _per_example_key,
        ValueError,
        r"eqstate\.next_key\(Noise\) was called per example",
        r"`eqstate\.next_key\(self, axis_name=\.\.\.\)`",
    ),
    # putting trees back
    (
        "update-wrong-structure",
        _update_wrong_structure,
        ValueError,
        r"Net\.update: tree 0 does not have the structure of the model",
        r"Pass trees made by eqstate\.partition",
    ),
    (
        "update-wrong-shape",
        _update_wrong_shape,
        ValueError,
        r"Net\.update: tree 0 has an array float32\[5\] at \.weight",
        r"must hold leaves of the model's shapes and dtypes",
    ),
    (
        "update-wrong-dtype",
        _update_wrong_dtype,
        ValueError,
        r"eqstate\.update: tree 0 has an array int32\[2\] at \.weight",
        r"must hold leaves of the model's shapes",
    ),
    (
        "combine-mismatch",
        lambda: eqstate.combine({"a": 1}, {"b": 1}),
        ValueError,
        r"eqstate\.combine: tree 1 does not have the structure of tree 0",
        r"Pass trees made by eqstate\.partition",
    ),
    (
        "combine-nothing",
        lambda: eqstate.combine(),
        TypeError,
        r"eqstate\.combine",
        r"needs at least one tree",
    ),
    # filters
    (
        "filter-not-a-filter",
        lambda: eqstate.filter(net(), 3),
        TypeError,
        r"eqstate\.filter: 3 is not a filter",
        r"A filter is a subclass of eqstate\.Kind",
    ),
    (
        "filter-a-plain-class",
        lambda: eqstate.partition(net(), int),
        TypeError,
        r"eqstate\.partition: <class 'int'> is not a filter",
        r"A filter is a subclass of eqstate\.Kind",
    ),
    (
        "filter-none-given",
        lambda: eqstate.partition(net()),
        TypeError,
        r"eqstate\.partition needs at least one filter",
        r"eqstate\.partition\(tree, eqstate\.State\)",
    ),
    (
        "spec-bad-filter",
        lambda: eqstate.spec(net(), "State"),
        TypeError,
        r"eqstate\.spec: 'State' is not a filter",
        r"A filter is",
    ),
    # jit
    (
        "jit-not-callable",
        lambda: eqstate.jit(3),
        TypeError,
        r"eqstate\.jit expects a callable",
        r"got int",
    ),
    (
        "jit-bad-donate",
        lambda: eqstate.jit(lambda x: x, donate="some"),
        ValueError,
        r"eqstate\.jit\(donate=\.\.\.\)",
        r"must be 'all', 'all-except-first' or 'none'",
    ),
    (
        "jit-bad-max-traces",
        lambda: eqstate.jit(lambda x: x, max_traces=0),
        ValueError,
        r"eqstate\.jit\(max_traces=\.\.\.\)",
        r"must be >= 1",
    ),
    (
        "jit-max-traces",
        _max_traces,
        RuntimeError,
        r"args\[0\] changed from float32\[2\] to float32\[3\]",
        r"keep shapes, dtypes and non-array values fixed",
    ),
    (
        "jit-unhashable-static",
        _unhashable_static,
        TypeError,
        r"args\[1\]\['opts'\] is a non-array leaf of type set",
        r"Make it an array .* or a hashable value",
    ),
    # layers and metrics (constructors and calls)
    (
        "batchnorm-momentum",
        lambda: BatchNorm(3, momentum=2.0),
        ValueError,
        r"BatchNorm\(momentum=\.\.\.\)",
        r"must be in \[0, 1\]",
    ),
    (
        "batchnorm-features",
        lambda: BatchNorm(0),
        ValueError,
        r"BatchNorm\(num_features=\.\.\.\)",
        r"must be a positive",
    ),
    (
        "batchnorm-wrong-width",
        lambda: BatchNorm(3)(jnp.ones((4, 5))),
        ValueError,
        r"BatchNorm expects a batch of shape \(N, 3, \.\.\.\)",
        r"features",
    ),
    (
        "dropout-p",
        lambda: Dropout(1.5, key=jax.random.key(0)),
        ValueError,
        r"Dropout\(p=\.\.\.\)",
        r"must be in \[0, 1\]",
    ),
    (
        "ema-decay",
        lambda: EMA(net(), decay=1.5),
        ValueError,
        r"EMA\(decay=\.\.\.\)",
        r"in \[0, 1\]",
    ),
    (
        "mean-missing-arg",
        lambda: Mean(argname="loss").update(values_typo=1.0),
        TypeError,
        r"Mean\.update needs `loss=`",
        r"pass it by name",
    ),
    (
        "accuracy-missing-labels",
        lambda: Accuracy().update(logits=jnp.ones((2, 3))),
        TypeError,
        r"Accuracy\.update needs `labels=`",
        r"pass it by name",
    ),
    (
        "accuracy-label-shape",
        lambda: Accuracy().update(jnp.ones((2, 3)), jnp.ones(3, jnp.int32)),
        ValueError,
        r"Accuracy\.update: logits of shape \(2, 3\)",
        r"need labels of shape \(2,\)",
    ),
    (
        "collection-not-a-metric",
        lambda: Collection(acc=3),
        TypeError,
        r"Collection\(acc=\.\.\.\)",
        r"expects an eqstate\.metrics\.Metric",
    ),
    (
        "metric-merge-other-class",
        lambda: Mean().merge(Accuracy()),
        TypeError,
        r"Mean\.merge: other is a Accuracy",
        r"merge metrics of the same class",
    ),
    (
        "optimizer-not-a-transformation",
        lambda: eqstate.Optimizer(3, net()),
        TypeError,
        r"Optimizer\(tx=\.\.\.\)",
        r"optax GradientTransformation such as optax\.adam",
    ),
]


class W(eqstate.Module):
    w: jax.Array
    bn: BatchNorm


def w_model(n):
    return W(jnp.ones(n), BatchNorm(2))


def w_loss(m):
    return jnp.sum(m.w**2) + jnp.sum(m.bn.weight)


def grads(n):
    return eqstate.grad(w_loss)(w_model(n))


def sgd(model):
    return eqstate.Optimizer(optax.sgd(0.1), model)


def injected():
    return eqstate.Optimizer(optax.inject_hyperparams(optax.sgd)(learning_rate=0.1), w_model(3))


def _set_hyperparam():
    injected().opt_state.hyperparams["learning_rate"] = 0.01


def _scheduled_hyperparam():
    tx = optax.inject_hyperparams(optax.sgd)(learning_rate=optax.linear_schedule(0.1, 0.0, 10))
    eqstate.Optimizer(tx, w_model(3)).with_hyperparams(learning_rate=0.01)


def _per_example_dropout():
    d = Dropout(0.5, key=jax.random.key(0))
    jax.vmap(lambda x: d(x)[0])(jnp.ones((8, 16)))


def _per_example_batch_norm():
    bn = BatchNorm(3)
    jax.vmap(lambda x: bn(x)[0])(jnp.ones((4, 3)))


def _ema_other_dtype():
    model = w_model(2)
    ema = EMA(model)
    ema.update(eqx.tree_at(lambda m: m.w, model, jnp.ones(2, jnp.complex64)))


def _ema_apply_other_shape():
    EMA(w_model(2)).apply(w_model(5))


def _complex_grads():
    model = w_model(3)
    g = jax.tree_util.tree_map(lambda x: x.astype(jnp.complex64), grads(3))
    sgd(model).update(g, model)


def _merge_unlike_collections():
    Collection(a=Mean()).merge(Collection(b=Mean()))


TRAINING_CASES: list[tuple[str, Any, type[BaseException], str, str]] = [
    (
        "optimizer-complex-grads",
        _complex_grads,
        ValueError,
        r"Optimizer\.update: grads at \.w is complex64\[3\], but the model's leaf there is float32\[3\]",
        r"Pass the gradients of the model",
    ),
    (
        "metric-merge-unlike",
        _merge_unlike_collections,
        ValueError,
        r"Collection\.merge: other does not have the structure of self",
        r"Merge metrics built alike",
    ),
    # gradients and filters
    (
        "filter-wrong-arity",
        lambda: eqstate.filter(net(), lambda a, b: True),
        TypeError,
        r"eqstate\.filter: the callable filter <lambda> has the signature \(a, b\)",
        r"one argument",
    ),
    (
        "grad-wrt-matches-nothing",
        lambda: eqstate.grad(w_loss, wrt=eqstate.Rng)(w_model(3)),
        ValueError,
        r"eqstate\.grad: wrt=eqstate\.Rng matches no inexact-array",
        r"Pass a `wrt=` filter",
    ),
    (
        "value-and-grad-wrt-matches-nothing",
        lambda: eqstate.value_and_grad(w_loss, wrt=eqstate.OptState)(w_model(3)),
        ValueError,
        r"wrt=eqstate\.OptState matches no inexact-array",
        r"Pass a `wrt=` filter",
    ),
    (
        "optimizer-wrt-matches-nothing",
        lambda: eqstate.Optimizer(optax.sgd(0.1), w_model(3), wrt=eqstate.Rng),
        ValueError,
        r"wrt=eqstate\.Rng matches no inexact-array",
        r"nothing to optimise",
    ),
    # the optimizer
    (
        "optimizer-model-other-shape",
        lambda: sgd(w_model(3)).update(grads(1), w_model(1)),
        ValueError,
        r"Optimizer\.update: the model's leaf at \.w is float32\[1\].* float32\[3\]",
        r"Optimizer",
    ),
    (
        "optimizer-grads-other-shape",
        lambda: sgd(w_model(3)).update(grads(1), w_model(3)),
        ValueError,
        r"Optimizer\.update: grads at \.w is float32\[1\], but the model's leaf there is float32\[3\]",
        r"grad",
    ),
    (
        "optimizer-swapped-arguments",
        lambda: sgd(w_model(3)).update(w_model(3), grads(3)),
        ValueError,
        r"the `model` argument has None at \.bn\.running_mean",
        r"The order is `opt\.update\(grads, model\)`",
    ),
    (
        "optimizer-model-is-optimizer",
        lambda: sgd(w_model(3)).update(grads(3), sgd(w_model(3))),
        TypeError,
        r"Optimizer\.update: the `model` argument is an Optimizer",
        r"opt\.update\(grads, model\)",
    ),
    (
        "optimizer-put-tree-back",
        lambda: (lambda o: o.update(o.states()))(sgd(w_model(3))),
        TypeError,
        r"Optimizer\.update\(grads, model\) applies one optimizer step",
        r"eqstate\.update\(module, tree\)",
    ),
    (
        "optimizer-missing-model",
        lambda: sgd(w_model(3)).update(grads(3)),
        TypeError,
        r"Optimizer\.update needs the model",
        r"model, opt = opt\.update\(grads, model\)",
    ),
    (
        "optimizer-hyperparams-assigned",
        _set_hyperparam,
        TypeError,
        r"opt\.opt_state is a read-only view",
        r"opt\.with_hyperparams\(learning_rate=\.\.\.\)",
    ),
    (
        "optimizer-unknown-hyperparam",
        lambda: injected().with_hyperparams(lr=0.1),
        ValueError,
        r"Optimizer\.with_hyperparams: lr is not among the hyperparameters",
        r"learning_rate",
    ),
    (
        "optimizer-scheduled-hyperparam",
        _scheduled_hyperparam,
        ValueError,
        r"Optimizer\.with_hyperparams: learning_rate follows a schedule",
        r"schedule",
    ),
    (
        "optimizer-hyperparam-shape",
        lambda: injected().with_hyperparams(learning_rate=jnp.ones(2)),
        ValueError,
        r"learning_rate must be a value of shape \(\)",
        r"got shape \(2,\)",
    ),
    # layers
    (
        "batchnorm-float-features",
        lambda: BatchNorm(3.0),
        TypeError,
        r"BatchNorm\(num_features=\.\.\.\) must be a positive int",
        r"Pass e\.g\. `BatchNorm\(3\)`",
    ),
    (
        "batchnorm-momentum-type",
        lambda: BatchNorm(3, momentum="0.9"),
        TypeError,
        r"BatchNorm\(momentum=\.\.\.\)",
        r"must be a number in \[0, 1\]",
    ),
    (
        "batchnorm-negative-eps",
        lambda: BatchNorm(3, eps=-1.0),
        ValueError,
        r"BatchNorm\(eps=\.\.\.\)",
        r"non-negative",
    ),
    (
        "batchnorm-int-dtype",
        lambda: BatchNorm(3, dtype=jnp.int32),
        TypeError,
        r"BatchNorm\(dtype=\.\.\.\)",
        r"floating dtype",
    ),
    (
        "batchnorm-int-input",
        lambda: BatchNorm(3)(jnp.ones((4, 3), jnp.int32)),
        TypeError,
        r"BatchNorm: x has dtype int32",
        r"x\.astype\(jnp\.float32\)",
    ),
    (
        "batchnorm-one-value-per-feature",
        lambda: BatchNorm(3)(jnp.ones((1, 3))),
        ValueError,
        r"BatchNorm in training got a batch of shape \(1, 3\)",
        r"batch",
    ),
    (
        "batchnorm-per-example",
        _per_example_batch_norm,
        ValueError,
        r"BatchNorm was called per example .* no mapped axis",
        r"eqstate\.vmap\(model\)\(xs\)",
    ),
    (
        "dropout-p-array",
        lambda: Dropout(jnp.asarray(0.5), key=jax.random.key(0)),
        TypeError,
        r"Dropout\(p=\.\.\.\)",
        r"Python number in \[0, 1\]",
    ),
    (
        "dropout-key-int",
        lambda: Dropout(0.5, key=0),
        TypeError,
        r"Dropout\(key=\.\.\.\) expects a PRNG key, got 0",
        r"jax\.random\.key\(0\)",
    ),
    (
        "dropout-int-input",
        lambda: Dropout(0.5, key=jax.random.key(0))(jnp.ones(4, jnp.int32)),
        TypeError,
        r"Dropout: x has dtype int32",
        r"x\.astype\(jnp\.float32\)",
    ),
    (
        "dropout-per-example",
        _per_example_dropout,
        ValueError,
        r"Dropout was called per example inside `jax\.vmap`",
        r"eqstate\.vmap\(model\)\(xs\)",
    ),
    (
        "ema-decay-type",
        lambda: EMA(w_model(2), decay="0.99"),
        TypeError,
        r"EMA\(decay=\.\.\.\)",
        r"number in \[0, 1\]",
    ),
    (
        "ema-other-dtype",
        _ema_other_dtype,
        ValueError,
        r"EMA\.update: the model's leaf at \.w is complex64\[2\]",
        r"eqstate\.nn\.EMA\(model",
    ),
    ("ema-apply-other-shape", _ema_apply_other_shape, ValueError, r"EMA\.apply: .*\.w", r"EMA"),
    (
        "ema-wrong-structure",
        lambda: EMA(w_model(2)).update({"w": jnp.ones(2)}),
        ValueError,
        r"EMA\.update: the average does not have the structure of the model",
        r"EMA",
    ),
    (
        "ema-put-tree-back",
        lambda: (lambda e: e.update(e.states()))(EMA(w_model(2))),
        TypeError,
        r"EMA\.update\(model\) moves the average towards a model",
        r"`ema = eqstate\.update\(ema, tree\)`",
    ),
    (
        "ema-wrt-matches-nothing",
        lambda: EMA(w_model(2), wrt=eqstate.Rng),
        ValueError,
        r"wrt=eqstate\.Rng matches no inexact-array",
        r"nothing to average",
    ),
    # metrics
    (
        "metric-put-tree-back",
        lambda: Mean().update(Mean().states()),
        TypeError,
        r"Mean\.update accumulates a batch, but it was given a Mean",
        r"eqstate\.update\(module, tree\)",
    ),
    (
        "accuracy-put-tree-back",
        lambda: Accuracy().update(Accuracy().states()),
        TypeError,
        r"Accuracy\.update accumulates a batch",
        r"eqstate\.update\(module, tree\)",
    ),
    (
        "collection-positional",
        lambda: Collection(acc=Accuracy()).update(jnp.ones(3)),
        TypeError,
        r"Collection\.update takes keyword arguments only",
        r"got 1 positional",
    ),
]

CASES += TRAINING_CASES

_INTERNAL = (KeyError, IndexError)


@pytest.mark.parametrize(
    ("call", "error", "where", "fix"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_wrong_input_is_a_named_error(call, error, where, fix):
    with pytest.raises(BaseException) as info:
        call()
    exc = info.value
    if not issubclass(error, _INTERNAL):  # a KeyError is right only where it is asked for
        assert not isinstance(exc, _INTERNAL), f"internal {type(exc).__name__}: {exc}"
    assert isinstance(exc, error), f"{type(exc).__name__}: {exc}"
    message = str(exc)
    assert_matches(where, message)
    assert_matches(fix, message)


def assert_matches(pattern, message):
    import re

    assert re.search(pattern, message, re.DOTALL), f"{pattern!r} not in {message!r}"


def test_ids_are_unique():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids))


def test_the_callers_model_survives_every_failed_call():
    n = net()
    before = jax.tree_util.tree_map(
        lambda x: (
            np.array(x)
            if eqx.is_array(x) and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
            else x
        ),
        n,
    )
    for call in (
        lambda: n.set("weight", jnp.ones(3)),
        lambda: n.set_item("items", 0, jnp.zeros(5)),
        lambda: n.set_item("cache", "a", jnp.ones(2, jnp.complex64)),
        lambda: n.bare_child(X3),
    ):
        with pytest.raises((TypeError, ValueError, RuntimeError)):
            call()
    after = jax.tree_util.tree_map(
        lambda x: (
            np.array(x)
            if eqx.is_array(x) and not jnp.issubdtype(x.dtype, jax.dtypes.prng_key)
            else x
        ),
        n,
    )
    assert len(n.items) == 1 and list(n.cache) == ["a"]
    for a, b in zip(jax.tree_util.tree_leaves(before), jax.tree_util.tree_leaves(after)):
        if isinstance(a, np.ndarray):
            np.testing.assert_array_equal(a, b)


def test_repeated_retraces_warn_with_the_reason_and_the_fix():
    f = eqstate.jit(lambda x, lr: x * lr)
    with pytest.warns(eqstate.RetraceWarning) as record:
        for i in range(9):
            f(jnp.ones(2), float(i))
    message = str(record[0].message)
    assert_matches(r"The static value of args\[1\] changed from 7\.0 to 8\.0", message)
    assert_matches(r"Pass Python numbers that change between calls as arrays", message)


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 80
