"""Real programs ported to eqstate, each checked against its original.

1. Equinox's `train_rnn.ipynb`: a GRU scanned over time classifies clockwise and
   anticlockwise spirals; the port gives the original's losses and accuracy.
2. A conv net with BatchNorm and Dropout on NCHW maps, written per example and mapped
   with `eqstate.vmap`, against the same net written batch-level; then trained on digits.
3. Flax NNX's MNIST tutorial CNN as an `eqstate.nn.Sequential`, trained with AdamW (no
   decay on a `NoDecay` kind) and `eqstate.metrics`; the same weights give NNX's losses.
"""

import math
from functools import partial

import equinox as eqx
import jax
import jax.lax as lax
import jax.numpy as jnp
import jax.random as jrandom
import numpy as np
import optax
import pytest
from flax import nnx
from helpers import tree_allclose
from sklearn.datasets import load_digits

import eqstate
from eqstate.metrics import Accuracy, Collection, Mean
from eqstate.nn import BatchNorm, Dropout, Sequential


# optax itself mixes Python floats with int32 step counts, which strict promotion rejects.
pytestmark = pytest.mark.usefixtures("standard_promotion")


def _digits():
    """scikit-learn's 8x8 digits as NCHW float32 in [0, 1]: 1,400 to train, 397 to test."""
    d = load_digits()
    perm = np.random.default_rng(0).permutation(len(d.target))
    x = (d.images[perm, None] / 16.0).astype(np.float32)
    y = d.target[perm].astype(np.int32)
    return x[:1400], y[:1400], x[1400:], y[1400:]


X_TRAIN, Y_TRAIN, X_TEST, Y_TEST = _digits()


def _epochs(n, batch_size=64, seed=1):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        perm = rng.permutation(len(Y_TRAIN))
        for i in range(len(perm) // batch_size):
            idx = perm[i * batch_size : (i + 1) * batch_size]
            yield X_TRAIN[idx], Y_TRAIN[idx]


# ---------------------------------------------------------------------------------------
# 1. Equinox's train_rnn.ipynb
# ---------------------------------------------------------------------------------------


def dataloader(arrays, batch_size, *, key):
    dataset_size = arrays[0].shape[0]
    assert all(array.shape[0] == dataset_size for array in arrays)
    indices = jnp.arange(dataset_size)
    while True:
        perm = jrandom.permutation(key, indices)
        (key,) = jrandom.split(key, 1)
        start = 0
        end = batch_size
        while end < dataset_size:
            batch_perm = perm[start:end]
            yield tuple(array[batch_perm] for array in arrays)
            start = end
            end = start + batch_size


def get_data(dataset_size, *, key):
    t = jnp.linspace(0, 2 * math.pi, 16)
    offset = jrandom.uniform(key, (dataset_size, 1), minval=0, maxval=2 * math.pi)
    x1 = jnp.sin(t + offset) / (1 + t)
    x2 = jnp.cos(t + offset) / (1 + t)
    y = jnp.ones((dataset_size, 1))
    half_dataset_size = dataset_size // 2
    x1 = x1.at[:half_dataset_size].multiply(-1)
    y = y.at[:half_dataset_size].set(0)
    x = jnp.stack([x1, x2], axis=-1)
    return x, y


def _rnn_init(self, in_size, out_size, hidden_size, *, key):
    ckey, lkey = jrandom.split(key)
    self.hidden_size = hidden_size
    self.cell = eqx.nn.GRUCell(in_size, hidden_size, key=ckey)
    self.linear = eqx.nn.Linear(hidden_size, out_size, use_bias=False, key=lkey)
    self.bias = jnp.zeros(out_size)


def _rnn_call(self, input):
    hidden = jnp.zeros((self.hidden_size,))

    def f(carry, inp):
        return self.cell(inp, carry), None

    out, _ = lax.scan(f, hidden, input)
    # sigmoid because we're performing binary classification
    return jax.nn.sigmoid(self.linear(out) + self.bias)


class EqxRNN(eqx.Module):
    """The notebook's model, verbatim."""

    hidden_size: int
    cell: eqx.Module
    linear: eqx.nn.Linear
    bias: jax.Array

    __init__ = _rnn_init
    __call__ = _rnn_call


class RNN(eqstate.Module):
    """The port: the same fields and code, as an `eqstate.Module` (no state to declare)."""

    hidden_size: int
    cell: eqx.nn.GRUCell
    linear: eqx.nn.Linear
    bias: jax.Array

    __init__ = _rnn_init
    __call__ = _rnn_call


def _bce(pred_y, y):
    return -jnp.mean(y * jnp.log(pred_y) + (1 - y) * jnp.log(1 - pred_y))


def _train_rnn_equinox(xs, ys, steps, *, model_key, loader_key):
    model = EqxRNN(in_size=2, out_size=1, hidden_size=16, key=model_key)

    @eqx.filter_value_and_grad
    def compute_loss(model, x, y):
        return _bce(jax.vmap(model)(x), y)

    @eqx.filter_jit
    def make_step(model, x, y, opt_state):
        loss, grads = compute_loss(model, x, y)
        updates, opt_state = optim.update(grads, opt_state)
        model = eqx.apply_updates(model, updates)
        return loss, model, opt_state

    optim = optax.adam(3e-3)
    opt_state = optim.init(eqx.filter(model, eqx.is_inexact_array))
    losses = []
    for _, (x, y) in zip(range(steps), dataloader((xs, ys), 32, key=loader_key)):
        loss, model, opt_state = make_step(model, x, y, opt_state)
        losses.append(loss.item())
    accuracy = (jnp.sum((jax.vmap(model)(xs) > 0.5) == ys) / xs.shape[0]).item()
    return losses, accuracy, model


def _train_rnn_eqstate(xs, ys, steps, *, model_key, loader_key):
    model = RNN(in_size=2, out_size=1, hidden_size=16, key=model_key)

    def compute_loss(model, x, y):
        return _bce(eqstate.vmap(model)(x), y)

    @eqstate.jit(max_traces=1)
    def make_step(model, opt, x, y):
        loss, grads = eqstate.value_and_grad(compute_loss)(model, x, y)
        model, opt = opt.update(grads, model)
        return loss, model, opt

    opt = eqstate.Optimizer(optax.adam(3e-3), model)
    losses = []
    for _, (x, y) in zip(range(steps), dataloader((xs, ys), 32, key=loader_key)):
        loss, model, opt = make_step(model, opt, x, y)
        losses.append(loss.item())
    accuracy = (jnp.sum((eqstate.vmap(model)(xs) > 0.5) == ys) / xs.shape[0]).item()
    return losses, accuracy, model


def test_train_rnn_port_matches_equinox():
    # the notebook's settings: 10,000 spirals, batches of 32, Adam(3e-3), 200 steps
    data_key, loader_key, model_key = jrandom.split(jrandom.PRNGKey(5678), 3)
    xs, ys = get_data(10000, key=data_key)
    keys = dict(model_key=model_key, loader_key=loader_key)
    eqx_losses, eqx_acc, eqx_model = _train_rnn_equinox(xs, ys, 200, **keys)
    losses, acc, model = _train_rnn_eqstate(xs, ys, 200, **keys)
    np.testing.assert_allclose(losses[:5], eqx_losses[:5], rtol=1e-5)
    np.testing.assert_allclose(losses, eqx_losses, rtol=1e-3, atol=1e-5)
    assert losses[-1] < 0.05 * losses[0]
    assert eqx_acc > 0.99 and acc >= eqx_acc
    eqx_leaves = jax.tree_util.tree_leaves(eqx_model)
    assert tree_allclose(jax.tree_util.tree_leaves(model), eqx_leaves, rtol=1e-3, atol=1e-5)


# ---------------------------------------------------------------------------------------
# 2. A conv net with BatchNorm and Dropout: per example against batch-level
# ---------------------------------------------------------------------------------------


class ConvNet(eqstate.Module):
    conv1: eqx.nn.Conv2d
    bn1: BatchNorm
    conv2: eqx.nn.Conv2d
    bn2: BatchNorm
    drop: Dropout
    head: eqx.nn.Linear

    def __init__(self, key):
        k1, k2, k3, k4 = jax.random.split(key, 4)
        # no conv biases before BatchNorm: their gradient is rounding noise, which Adam
        # scales up to full steps, so two equal nets would drift apart there
        self.conv1 = eqx.nn.Conv2d(1, 8, 3, padding=1, use_bias=False, key=k1)
        self.bn1 = BatchNorm(8, momentum=0.9)
        self.conv2 = eqx.nn.Conv2d(8, 16, 3, stride=2, padding=1, use_bias=False, key=k2)
        self.bn2 = BatchNorm(16, momentum=0.9)
        self.drop = Dropout(0.2, key=k3)
        self.head = eqx.nn.Linear(16 * 4 * 4, 10, key=k4)

    @eqstate.mutating
    def __call__(self, x):  # one example, (C, H, W)
        x, self.bn1 = self.bn1(self.conv1(x))
        x, self.bn2 = self.bn2(self.conv2(jax.nn.relu(x)))
        x, self.drop = self.drop(jax.nn.relu(x).reshape(-1))
        return self.head(x)

    @eqstate.mutating
    def batched(self, x):  # a batch, (N, C, H, W)
        x, self.bn1 = self.bn1(jax.vmap(self.conv1)(x))
        x, self.bn2 = self.bn2(jax.vmap(self.conv2)(jax.nn.relu(x)))
        x, self.drop = self.drop(jax.nn.relu(x).reshape(x.shape[0], -1))
        return jax.vmap(self.head)(x)


def _conv_step(per_example):
    def loss_fn(model, x, y):
        logits, model = eqstate.vmap(model)(x) if per_example else model.batched(x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean(), model

    @eqstate.jit(max_traces=1)
    def step(model, opt, x, y):
        (loss, model), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
        model, opt = opt.update(grads, model)
        return model, opt, loss

    return step


@eqstate.jit
def _conv_accuracy(model, x, y):
    logits, _ = eqstate.vmap(eqstate.eval(model))(x)
    return jnp.mean(jnp.argmax(logits, axis=-1) == y)


def test_conv_net_per_example_matches_batch_level():
    out = {}
    for per_example in (True, False):
        model = ConvNet(jax.random.key(0))
        opt = eqstate.Optimizer(optax.adam(1e-2), model)
        step, losses = _conv_step(per_example), []
        for x, y in zip(np.split(X_TRAIN[:128], 4), np.split(Y_TRAIN[:128], 4)):
            model, opt, loss = step(model, opt, x, y)
            losses.append(float(loss))
        out[per_example] = losses, model, opt
    (losses, model, opt), (b_losses, b_model, b_opt) = out[True], out[False]
    np.testing.assert_allclose(losses, b_losses, rtol=1e-5)
    assert losses[-1] < losses[0]
    assert tree_allclose(model, b_model, rtol=1e-5, atol=1e-6)
    assert tree_allclose(opt, b_opt, rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(
        jax.random.key_data(model.drop.key), jax.random.key_data(b_model.drop.key)
    )
    assert not np.allclose(model.bn2.running_var, 1.0)  # the statistics did move


def test_conv_net_trains_on_digits():
    model = ConvNet(jax.random.key(0))
    opt = eqstate.Optimizer(optax.adam(1e-2), model)
    step = _conv_step(per_example=True)
    for x, y in _epochs(8):
        model, opt, _ = step(model, opt, x, y)
    assert step.traces == 1
    assert float(_conv_accuracy(model, X_TEST, Y_TEST)) > 0.85  # chance is 0.1


# ---------------------------------------------------------------------------------------
# 3. Flax NNX's MNIST tutorial CNN
# ---------------------------------------------------------------------------------------


class FlaxCNN(nnx.Module):
    """The tutorial's CNN (channels last), sized for 8x8 digits: 2x2x64 = 256 features
    reach `linear1` where MNIST's 28x28 gives 3136."""

    def __init__(self, *, dropout=0.025, rngs):
        self.conv1 = nnx.Conv(1, 32, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm1 = nnx.BatchNorm(32, rngs=rngs)
        self.dropout1 = nnx.Dropout(rate=dropout, rngs=rngs)
        self.conv2 = nnx.Conv(32, 64, kernel_size=(3, 3), rngs=rngs)
        self.batch_norm2 = nnx.BatchNorm(64, rngs=rngs)
        self.avg_pool = partial(nnx.avg_pool, window_shape=(2, 2), strides=(2, 2))
        self.linear1 = nnx.Linear(256, 256, rngs=rngs)
        self.dropout2 = nnx.Dropout(rate=dropout, rngs=rngs)
        self.linear2 = nnx.Linear(256, 10, rngs=rngs)

    def __call__(self, x):
        x = self.avg_pool(nnx.relu(self.batch_norm1(self.dropout1(self.conv1(x)))))
        x = self.avg_pool(nnx.relu(self.batch_norm2(self.conv2(x))))
        x = x.reshape(x.shape[0], -1)  # flatten
        x = nnx.relu(self.dropout2(self.linear1(x)))
        return self.linear2(x)


class NoDecay(eqstate.Param):
    """Parameters that AdamW does not decay."""


# Equinox's layers declare no kinds; a subclass re-declares `bias` with one.
class Conv2d(eqx.nn.Conv2d):
    bias: jax.Array | None = NoDecay.field()


class Linear(eqx.nn.Linear):
    bias: jax.Array | None = NoDecay.field()


def cnn(key, dropout=0.025):
    """The port, per example (C, H, W)."""
    k = jax.random.split(key, 6)
    return Sequential(
        [
            Conv2d(1, 32, 3, padding="SAME", key=k[0]),
            Dropout(dropout, key=k[1]),
            BatchNorm(32),
            jax.nn.relu,
            eqx.nn.AvgPool2d(2, 2),
            Conv2d(32, 64, 3, padding="SAME", key=k[2]),
            BatchNorm(64),
            jax.nn.relu,
            eqx.nn.AvgPool2d(2, 2),
            jnp.ravel,
            Linear(256, 256, key=k[3]),
            Dropout(dropout, key=k[4]),
            jax.nn.relu,
            Linear(256, 10, key=k[5]),
        ]
    )


def _from_flax(flax_model, model):
    """`model` with the weights of `flax_model` (HWIO kernels, channels-last flatten)."""
    f = flax_model

    def conv(c):
        return c.kernel[...].transpose(3, 2, 0, 1), c.bias[...][:, None, None]

    # linear1 reads the (H, W, C) flatten in NNX and the (C, H, W) one here
    w1 = f.linear1.kernel[...].reshape(2, 2, 64, 256).transpose(2, 0, 1, 3).reshape(256, 256)
    values = (
        *conv(f.conv1),
        f.batch_norm1.scale[...],
        f.batch_norm1.bias[...],
        *conv(f.conv2),
        f.batch_norm2.scale[...],
        f.batch_norm2.bias[...],
        w1.T,
        f.linear1.bias[...],
        f.linear2.kernel[...].T,
        f.linear2.bias[...],
    )

    def where(s):
        return tuple(x for i in (0, 2, 5, 6, 10, 13) for x in (s[i].weight, s[i].bias))

    return eqx.tree_at(where, model, values)


TX = optax.adamw(0.005, 0.9, mask=eqstate.labels({NoDecay: False}, default=True))


def _nnx_step():
    def loss_fn(model, x, y):
        logits, model = eqstate.vmap(model)(x)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
        return loss, (model, logits)

    @eqstate.jit(max_traces=1)
    def train_step(model, opt, metrics, x, y):
        (loss, (model, logits)), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
        model, opt = opt.update(grads, model)
        _, metrics = metrics.update(loss=loss, logits=logits, labels=y)
        return model, opt, metrics

    @eqstate.jit(max_traces=1)
    def eval_step(model, metrics, x, y):
        loss, (_, logits) = loss_fn(eqstate.eval(model), x, y)
        _, metrics = metrics.update(loss=loss, logits=logits, labels=y)
        return metrics

    return train_step, eval_step


def test_nnx_cnn_port_matches_flax():
    # dropout off: the two libraries draw different masks
    flax_model = FlaxCNN(dropout=0.0, rngs=nnx.Rngs(0))
    model = _from_flax(flax_model, cnn(jax.random.key(0), dropout=0.0))

    def flax_mask(params):  # what the NoDecay kind says, by path
        layers = ("conv1", "conv2", "linear1", "linear2")
        return jax.tree_util.tree_map_with_path(
            lambda p, _: not (p[0].key in layers and p[1].key == "bias"), params
        )

    flax_tx = optax.adamw(0.005, 0.9, mask=flax_mask)
    flax_opt = nnx.Optimizer(flax_model, flax_tx, wrt=nnx.Param)

    @nnx.jit
    def flax_step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    opt = eqstate.Optimizer(TX, model)
    train_step, _ = _nnx_step()
    metrics = Collection(loss=Mean(argname="loss"), accuracy=Accuracy())
    flax_losses, losses = [], []
    for x, y in zip(np.split(X_TRAIN[:256], 4), np.split(Y_TRAIN[:256], 4)):
        flax_losses.append(float(flax_step(flax_model, flax_opt, x.transpose(0, 2, 3, 1), y)))
        model, opt, m = train_step(model, opt, metrics.reset(), x, y)
        losses.append(float(m["loss"].compute()))
    np.testing.assert_allclose(losses, flax_losses, rtol=1e-5)
    np.testing.assert_allclose(
        model[13].weight, flax_model.linear2.kernel[...].T, rtol=1e-4, atol=1e-4
    )
    np.testing.assert_allclose(model[6].running_var, flax_model.batch_norm2.var[...], rtol=1e-4)
    mask = eqstate.labels({NoDecay: False}, default=True)(model.parameters())
    assert [x for x in jax.tree_util.tree_leaves(mask) if x is False] == [False] * 4


def test_nnx_cnn_port_trains_on_digits():
    model = cnn(jax.random.key(0))
    opt = eqstate.Optimizer(TX, model)
    train_step, eval_step = _nnx_step()
    metrics = Collection(loss=Mean(argname="loss"), accuracy=Accuracy())
    history = []
    for epoch in range(10):
        train = metrics.reset()
        for x, y in _epochs(1, seed=epoch):
            model, opt, train = train_step(model, opt, train, x, y)
        test = eval_step(model, metrics.reset(), X_TEST, Y_TEST)
        history.append((train.compute(), test.compute()))
    first_train, _ = history[0]
    last_train, last_test = history[-1]
    assert float(last_train["loss"]) < 0.5 * float(first_train["loss"])
    assert float(last_train["accuracy"]) > 0.95
    assert float(last_test["accuracy"]) > 0.9  # chance is 0.1
    assert train_step.traces == 1 and eval_step.traces == 1
