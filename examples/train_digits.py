"""Train an MLP with BatchNorm, Dropout, AdamW, metrics and a parameter EMA on the digits.

The handwritten digits ship inside scikit-learn (1,797 8x8 images), so nothing is
downloaded. Every piece of state (running statistics, dropout keys, optimizer state,
metric totals, the EMA) lives in the module that owns it and comes back from the jitted
step as a new module.

    python examples/train_digits.py [--epochs 40] [--plot digits_training.png]

With `--checkpoint DIR` it saves its whole state every `--save-every N` steps (atomically,
with `eqstate.save`); killed at any moment and started again with `--resume`, it ends
bit for bit where an uninterrupted run ends, without compiling its step again:

    python examples/train_digits.py --checkpoint ckpt --resume
"""

import argparse
import collections
import time
from pathlib import Path
from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jaxtyping import Array, Float, Int
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from tqdm import tqdm

import eqstate
from eqstate.metrics import Accuracy, Collection, Mean
from eqstate.nn import EMA, BatchNorm, Dropout


TRACES: collections.Counter[str] = collections.Counter()


class MLP(eqstate.Module):
    layers: list[eqx.nn.Linear]
    norms: list[BatchNorm]
    drops: list[Dropout]
    head: eqx.nn.Linear

    def __init__(self, sizes: tuple[int, ...], n_classes: int, *, dropout: float, key: jax.Array):
        keys = jax.random.split(key, 2 * len(sizes))
        self.layers = [eqx.nn.Linear(i, o, key=k) for i, o, k in zip(sizes[:-1], sizes[1:], keys)]
        self.norms = [BatchNorm(o) for o in sizes[1:]]
        self.drops = [Dropout(dropout, key=k) for k in keys[len(sizes) : 2 * len(sizes) - 1]]
        self.head = eqx.nn.Linear(sizes[-1], n_classes, key=keys[-1])

    @eqstate.mutating
    def __call__(self, x: Float[Array, "batch features"]) -> Float[Array, "batch classes"]:
        norms, drops = list(self.norms), list(self.drops)
        for i, layer in enumerate(self.layers):
            x, norms[i] = norms[i](jax.vmap(layer)(x))
            x, drops[i] = drops[i](jax.nn.relu(x))
        self.norms, self.drops = norms, drops
        return jax.vmap(self.head)(x)


def loss_fn(model: MLP, x: Array, y: Int[Array, " batch"]) -> tuple[Array, tuple[MLP, Array]]:
    logits, model = model(x)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    return loss, (model, logits)


@eqstate.jit(donate="all-except-first", max_traces=1)
def train_step(model, opt, ema, metrics, x, y):
    TRACES["train_step"] += 1
    (loss, (model, logits)), grads = eqstate.value_and_grad(loss_fn, has_aux=True)(model, x, y)
    model, opt = opt.update(grads, model)
    _, ema = ema.update(model)
    _, metrics = metrics.update(loss=loss, logits=logits, labels=y)
    return model, opt, ema, metrics


@eqstate.jit(max_traces=1)
def evaluate(model: MLP, x: Array, y: Array) -> Array:
    TRACES["evaluate"] += 1
    logits, _ = eqstate.eval(model)(x)
    _, acc = Accuracy().update(logits, y)
    return acc.compute()


def load_data(seed: int = 0) -> tuple[np.ndarray, ...]:
    images, labels = load_digits(return_X_y=True)
    x = (np.asarray(images) / 16.0).astype(np.float32)
    y = np.asarray(labels).astype(np.int32)
    split = train_test_split(x, y, test_size=0.2, random_state=seed, stratify=y)
    return tuple(np.asarray(a) for a in split)


CURVES = ("train_loss", "train_acc", "test_acc", "ema_test_acc")
CHECKPOINT = "latest.eqstate"  # in the --checkpoint directory, replaced atomically
_MSG_OTHER_RUN = (
    "{path} was written by a run with {saved}, but this run has {ours}. Resume with the "
    "settings of the interrupted run, or use another --checkpoint directory."
)


class RunState(NamedTuple):
    """Everything a run carries from step to step: what a checkpoint holds."""

    model: MLP
    opt: eqstate.Optimizer
    ema: EMA
    metrics: Collection
    step: int
    history: dict[str, np.ndarray]  # one float32 value per epoch done, NaN for the others
    run: dict[str, int]  # the settings a resumed run must share


def initial_state(epochs: int, steps_per_epoch: int, batch_size: int, seed: int) -> RunState:
    """A run's state at step 0, freshly built: where training starts, and the `like` a
    checkpoint is loaded into."""
    model = MLP((64, 256, 256), 10, dropout=0.2, key=jax.random.key(seed))
    schedule = optax.cosine_decay_schedule(3e-3, epochs * steps_per_epoch)
    return RunState(
        model=model,
        opt=eqstate.Optimizer(optax.adamw(schedule, weight_decay=1e-4), model),
        ema=EMA(model, decay=0.99, warmup=True),
        metrics=Collection(loss=Mean(argname="loss"), acc=Accuracy()),
        step=0,
        history={name: np.full(epochs, np.nan, np.float32) for name in CURVES},
        run={"epochs": epochs, "batch_size": batch_size, "seed": seed},
    )


def epoch_order(seed: int, epoch: int, n: int) -> np.ndarray:
    """The order of the `n` training examples in `epoch`, a function of `(seed, epoch)`
    alone: a resumed run sees the batches an uninterrupted one sees."""
    rng = np.random.default_rng(seed)
    for _ in range(epoch):
        rng.permutation(n)
    return rng.permutation(n)


def restore(path: Path, fresh: RunState) -> RunState:
    """The run state saved at `path`, loaded into `fresh` (freshly built objects, equal
    to the saved ones in all static settings, so `train_step` is not traced again)."""
    nothing = dict.fromkeys(["model", "opt", "ema", "metrics", "history"])
    saved_run = eqstate.load(path, fresh._replace(**nothing)).run  # None: not loaded
    if saved_run != fresh.run:
        saved, ours = (
            ", ".join(f"{k}={v}" for k, v in sorted(r.items())) for r in (saved_run, fresh.run)
        )
        raise SystemExit(_MSG_OTHER_RUN.format(path=path, saved=saved, ours=ours))
    saved = eqstate.load(path, fresh)
    return saved._replace(history={k: np.array(v) for k, v in saved.history.items()})  # writable


def train(
    epochs: int = 40,
    batch_size: int = 64,
    seed: int = 0,
    progress: bool = True,
    *,
    checkpoint: Path | None = None,
    save_every: int = 50,
    resume: bool = False,
    final: Path | None = None,
    step_delay: float = 0.0,
    stop_after: int | None = None,
) -> dict[str, list[float]]:
    """Train on the digits; returns per-epoch curves and the final test accuracies.

    With `checkpoint` (a directory), the run's state (see `initial_state`) is saved there
    every `save_every` steps and at the end; the data order is a function of the seed and
    the epoch, so nothing else is needed to go on. With `resume`, a run starts from that
    checkpoint if there is one and ends bit for bit where an uninterrupted run ends.
    `final` saves the final state. `step_delay` (seconds after each step) and
    `stop_after` (steps in all) let tests interrupt a short run.
    """
    x_train, x_test, y_train, y_test = (jnp.asarray(a) for a in load_data(seed))
    steps_per_epoch = len(x_train) // batch_size
    total = epochs * steps_per_epoch
    start = initial_state(epochs, steps_per_epoch, batch_size, seed)
    path = None if checkpoint is None else checkpoint / CHECKPOINT
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume and path.exists():
            start = restore(path, start)
            print(f"resumed from {path} at step {start.step} of {total}", flush=True)
    model, opt, ema, metrics, step, history, run = start

    def state() -> RunState:
        return RunState(model, opt, ema, metrics, step, history, run)

    def save_if_due() -> None:
        if path is not None and (step % save_every == 0 or step == total):
            eqstate.save(path, state())
            print(f"checkpoint: step {step} saved to {path}", flush=True)

    bar = tqdm(total=epochs, initial=step // steps_per_epoch, desc="training", disable=not progress)
    for epoch in range(step // steps_per_epoch, epochs):
        order = epoch_order(seed, epoch, len(x_train))
        if step % steps_per_epoch == 0:
            metrics = metrics.reset()  # a resumed epoch keeps its totals so far
        for b in range(step % steps_per_epoch, steps_per_epoch):
            idx = order[b * batch_size : (b + 1) * batch_size]
            model, opt, ema, metrics = train_step(
                model, opt, ema, metrics, x_train[idx], y_train[idx]
            )
            step += 1
            if step_delay:
                time.sleep(step_delay)
            if b + 1 < steps_per_epoch:  # else after the epoch's curves
                save_if_due()
            if step == stop_after:
                bar.close()
                return curves(history)
        values = metrics.compute()
        history["train_loss"][epoch] = float(values["loss"])
        history["train_acc"][epoch] = float(values["acc"])
        history["test_acc"][epoch] = float(evaluate(model, x_test, y_test))
        history["ema_test_acc"][epoch] = float(evaluate(ema.apply(model), x_test, y_test))
        save_if_due()
        bar.update()
        bar.set_postfix(
            loss=f"{history['train_loss'][epoch]:.3f}", test_acc=f"{history['test_acc'][epoch]:.3f}"
        )
    bar.close()
    if final is not None:
        eqstate.save(final, state())
    return curves(history)


def curves(history: dict[str, np.ndarray]) -> dict[str, list[float]]:
    """The curves of the epochs done, as lists of Python floats."""
    return {name: [float(v) for v in values if not np.isnan(v)] for name, values in history.items()}


def plot(history: dict[str, list[float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history["train_loss"]) + 1)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, history["train_loss"], label="train loss")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy", title="Loss")
    ax_loss.legend()
    for key, label in [
        ("train_acc", "train"),
        ("test_acc", "test"),
        ("ema_test_acc", "test (EMA)"),
    ]:
        ax_acc.plot(epochs, history[key], label=label)
    ax_acc.set(xlabel="epoch", ylabel="accuracy", title="Accuracy", ylim=(0.8, 1.0))
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description="Train a stateful MLP on the digits.")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", type=Path, default=Path("digits_training.png"))
    parser.add_argument(
        "--checkpoint",
        type=Path,
        metavar="DIR",
        help=f"save everything needed to go on to DIR/{CHECKPOINT} every --save-every steps",
    )
    parser.add_argument("--save-every", type=int, default=50, metavar="N")
    parser.add_argument(
        "--resume",
        action="store_true",
        help="go on from the --checkpoint, if there is one; ends as an uninterrupted run",
    )
    parser.add_argument("--final", type=Path, metavar="PATH", help="save the final state here")
    parser.add_argument("--min-accuracy", type=float, default=0.95, help="else exit with 1")
    parser.add_argument(
        "--step-delay", type=float, default=0.0, help=argparse.SUPPRESS
    )  # seconds after each step: lets a test kill a short run mid-training
    args = parser.parse_args()
    if args.resume and args.checkpoint is None:
        parser.error("--resume needs --checkpoint DIR")

    history = train(
        epochs=args.epochs,
        seed=args.seed,
        checkpoint=args.checkpoint,
        save_every=args.save_every,
        resume=args.resume,
        final=args.final,
        step_delay=args.step_delay,
    )
    plot(history, args.plot)
    print(f"test accuracy:       {history['test_acc'][-1]:.4f}")
    print(f"test accuracy (EMA): {history['ema_test_acc'][-1]:.4f}")
    print(f"compilations: {dict(TRACES)}; curves written to {args.plot}")
    if history["ema_test_acc"][-1] < args.min_accuracy:
        raise SystemExit(f"test accuracy below {args.min_accuracy:.0%}")


if __name__ == "__main__":
    main()
