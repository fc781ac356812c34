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


BIG = 2**24  # where float32 stops counting


def test_counts_are_exact_integers_past_float32_precision():
    acc = eqx.tree_at(lambda a: (a.correct, a.count), Accuracy(), (jnp.int32(BIG), jnp.int32(BIG)))
    assert acc.correct.dtype == jnp.int32 and acc.count.dtype == jnp.int32
    step = jax.jit(lambda a, p, y: a.update(preds=p, labels=y)[1])
    for _ in range(3):  # one wrong prediction at a time
        acc = step(acc, jnp.array([0]), jnp.array([1]))
    assert int(acc.count) == BIG + 3 and int(acc.correct) == BIG
    assert float(acc.compute()) < 1.0 and acc.compute().dtype == jnp.float32
    many_wrong = step(acc, jnp.zeros(BIG // 4, jnp.int32), jnp.ones(BIG // 4, jnp.int32))
    np.testing.assert_allclose(many_wrong.compute(), BIG / (BIG + 3 + BIG // 4), rtol=1e-6)

    mean = eqx.tree_at(lambda m: (m.total, m.count), Mean(), (jnp.float32(BIG), jnp.int32(BIG)))
    for _ in range(3):
        _, mean = mean.update(jnp.array([1.0]))
    assert mean.count.dtype == jnp.int32 and int(mean.count) == BIG + 3


def test_weighted_and_unweighted_batches_mix():
    m = Mean()
    _, m = m.update(jnp.array([1.0, 3.0]))  # weight 1 each
    _, m = m.update(jnp.array([10.0]), weights=jnp.array([2.0]))
    assert int(m.count) == 2 and float(m.weight) == 2.0
    np.testing.assert_allclose(m.compute(), (1.0 + 3.0 + 20.0) / 4.0, rtol=1e-6)
    assert m.compute().dtype == jnp.float32


def test_merge_reset_all_reduce_keep_integer_counts():
    _, a = Accuracy().update(preds=jnp.array([1, 2]), labels=jnp.array([1, 0]))
    _, b = Accuracy().update(preds=jnp.array([3]), labels=jnp.array([3]))
    merged = a.merge(b)
    assert merged.count.dtype == jnp.int32 and int(merged.count) == 3 and int(merged.correct) == 2
    np.testing.assert_allclose(merged.compute(), 2 / 3, rtol=1e-6)
    reset = merged.reset()
    assert reset.count.dtype == jnp.int32 and int(reset.count) == 0
    assert np.isnan(reset.compute())
    _, wm = Mean().update(jnp.array([1.0, 2.0]), weights=jnp.array([1.0, 3.0]))
    _, um = Mean().update(jnp.array([4.0]))
    np.testing.assert_allclose(wm.merge(um).compute(), (1.0 + 6.0 + 4.0) / 5.0, rtol=1e-6)

    def per_device(p, y):
        _, acc = Accuracy().update(preds=p, labels=y)
        return acc.all_reduce("dev")

    preds = jnp.array([[1, 2], [3, 3]])
    acc = jax.vmap(per_device, axis_name="dev")(preds, jnp.array([[1, 0], [3, 3]]))
    assert acc.count.dtype == jnp.int32
    np.testing.assert_array_equal(acc.count, [4, 4])
    np.testing.assert_allclose(acc.compute(), [0.75, 0.75])


def test_putting_a_tree_back_is_not_a_batch():
    put_back = r"To put a tree back into a module, use `eqstate\.update\(module, tree\)`"
    mean = Mean()
    with pytest.raises(
        TypeError,
        match=r"Mean\.update accumulates a batch, but it was given a Mean as positional argument "
        r"0 \(such as `metric\.states\(\)` or a loaded checkpoint\)\. " + put_back,
    ):
        mean.update(mean.states())
    with pytest.raises(TypeError, match=r"Accuracy\.update accumulates a batch, .* an Accuracy as"):
        Accuracy().update(Accuracy().states())
    metrics = Collection(loss=Mean(argname="loss"), acc=Accuracy())
    with pytest.raises(
        TypeError, match=r"Collection\.update accumulates a batch, but it was given a Collection"
    ):
        metrics.update(metrics.states())
    with pytest.raises(TypeError, match=r"given a Mean as `loss=`"):
        metrics.update(loss=Mean())
    with pytest.raises(
        TypeError,
        match=r"Collection\.update takes keyword arguments only, .* got 1 positional argument",
    ):
        metrics.update(jnp.ones(3))


def test_accuracy_refuses_one_class_and_non_integer_labels():
    with pytest.raises(
        ValueError,
        match=r"logits of shape \(2, 1\) have one score per example.*preds=\(logits\[\.\.\., 0\] > 0\)",
    ):
        Accuracy().update(jnp.ones((2, 1)), jnp.array([0, 1]))
    with pytest.raises(
        TypeError,
        match=r"Accuracy\.update: labels must be integer class indices, got dtype float32",
    ):
        Accuracy().update(preds=jnp.array([0, 1]), labels=jnp.array([0.6, 1.4]))
    # labels and predictions compare as integers, without wrapping into a narrow dtype
    _, acc = Accuracy().update(preds=jnp.array([-56, 1], jnp.int8), labels=jnp.array([200, 1]))
    assert float(acc.compute()) == 0.5
    _, acc = Accuracy().update(preds=jnp.array([True, False]), labels=jnp.array([2, 0]))
    assert float(acc.compute()) == 0.5


def test_accuracy_weights_count():
    logits = jnp.eye(2)
    _, acc = Accuracy().update(
        logits=logits, labels=jnp.array([0, 0]), weights=jnp.array([1.0, 0.0])
    )
    assert float(acc.compute()) == 1.0
    _, acc = acc.update(logits=logits, labels=jnp.array([0, 0]))  # unweighted: weight 1 each
    assert float(acc.compute()) == pytest.approx(2 / 3)


def test_mean_reads_its_own_argname_first_and_weighs_examples():
    metrics = Collection(loss=Mean(argname="loss"), vals=Mean())
    _, metrics = metrics.update(loss=jnp.array([10.0]), values=jnp.array([1.0]))
    assert float(metrics["loss"].compute()) == 10.0 and float(metrics["vals"].compute()) == 1.0
    _, mean = Mean().update(jnp.array([[1.0, 2.0], [3.0, 4.0]]), weights=jnp.array([1.0, 0.0]))
    assert float(mean.compute()) == 1.5  # one weight per example (row)
    with pytest.raises(
        ValueError,
        match=r"Mean\.update: weights of shape \(3,\) do not fit values of shape \(2, 2\).*one weight per example, shape \(2,\)",
    ):
        Mean().update(jnp.ones((2, 2)), weights=jnp.ones(3))
