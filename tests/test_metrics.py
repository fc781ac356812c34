import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eqstate.metrics import Accuracy, Collection, Mean, Metric


RNG = np.random.default_rng(0)
BATCHES = [RNG.normal(size=(n,)).astype(np.float32) for n in (5, 7, 3)]
WEIGHTS = [RNG.uniform(size=(n,)).astype(np.float32) for n in (5, 7, 3)]
LOGITS = [RNG.normal(size=(n, 4)).astype(np.float32) for n in (6, 9)]
LABELS = [RNG.integers(0, 4, size=(n,)).astype(np.int32) for n in (6, 9)]


def test_mean_matches_numpy_and_is_jit_compatible():
    m = Mean()
    step = eqx.filter_jit(lambda m, v, w: m.update(v, weights=w)[1])
    for v, w in zip(BATCHES, WEIGHTS):
        m = step(m, v, w)
    all_v, all_w = np.concatenate(BATCHES), np.concatenate(WEIGHTS)
    np.testing.assert_allclose(m.compute(), np.average(all_v, weights=all_w), rtol=1e-5)
    _, plain = Mean().update(jnp.asarray(BATCHES[0]))
    np.testing.assert_allclose(plain.compute(), BATCHES[0].mean(), rtol=1e-6)
    assert np.isnan(Mean().compute())


def test_accuracy_matches_numpy():
    acc = Accuracy()
    for lg, lb in zip(LOGITS, LABELS):
        _, acc = jax.jit(lambda a, x, y: a.update(x, y))(acc, lg, lb)
    expected = np.mean(np.concatenate([lg.argmax(-1) == lb for lg, lb in zip(LOGITS, LABELS)]))
    np.testing.assert_allclose(acc.compute(), expected, rtol=1e-6)
    _, by_preds = Accuracy().update(preds=jnp.array([1, 2, 3]), labels=jnp.array([1, 0, 3]))
    np.testing.assert_allclose(by_preds.compute(), 2 / 3, rtol=1e-6)


def test_collection_reset_merge():
    metrics = Collection(loss=Mean(argname="loss"), acc=Accuracy())
    halves = []
    for lg, lb in zip(LOGITS, LABELS):
        loss = jnp.mean(jnp.asarray(lg) ** 2)
        _, one = Collection(loss=Mean(argname="loss"), acc=Accuracy()).update(
            loss=loss, logits=lg, labels=lb
        )
        halves.append(one)
        _, metrics = metrics.update(loss=loss, logits=lg, labels=lb)
    values = metrics.compute()
    assert set(values) == {"loss", "acc"}
    merged = halves[0].merge(halves[1])
    for k in values:
        np.testing.assert_allclose(merged.compute()[k], values[k], rtol=1e-6)
    reset = metrics.reset()
    assert float(reset["acc"].count) == 0.0 and float(reset["loss"].total) == 0.0
    assert isinstance(metrics["acc"], Accuracy)


def test_all_reduce_across_a_mapped_axis():
    vals = jnp.arange(8.0).reshape(2, 4)

    def per_device(v):
        _, m = Mean().update(v)
        return m.all_reduce("dev")

    m = jax.vmap(per_device, axis_name="dev")(vals)
    np.testing.assert_allclose(m.compute(), np.full(2, 3.5))


def test_errors():
    with pytest.raises(TypeError, match=r"Mean.update needs `loss=`"):
        Mean(argname="loss").update(values_typo=1.0)
    with pytest.raises(TypeError, match=r"Accuracy.update needs `labels=`"):
        Accuracy().update(logits=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match=r"logits of shape \(2, 3\) need labels of shape \(2,\)"):
        Accuracy().update(jnp.ones((2, 3)), jnp.ones(3, jnp.int32))
    with pytest.raises(
        TypeError, match=r"Collection\(acc=\.\.\.\) expects an eqstate.metrics.Metric"
    ):
        Collection(acc=3)
    with pytest.raises(TypeError, match="merge metrics of the same class"):
        Mean().merge(Accuracy())
    with pytest.raises(TypeError, match="abstract"):
        Metric()
