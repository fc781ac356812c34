"""Train the digits demo data-parallel: the model on every device, each batch split
across them.

    python examples/train_sharded.py --devices 8 [--epochs 10]

The model, optimizer, EMA and metrics of `train_digits.py` are replicated on a mesh of
all devices, and each batch is split along its "batch" axis. The demo's own `train_step`
(an `eqstate.jit` function) then runs as one program over the mesh: XLA adds the
reductions across devices (of the gradients, the BatchNorm statistics, the metrics), so
a step computes what it computes on one device with the whole batch. `--devices N`
simulates N devices on a CPU; on GPUs, leave it out. Across hosts, call
`jax.distributed.initialize()` first and build each batch from every process's own rows
with `jax.make_array_from_process_local_data` (`tests/test_multiprocess.py` does this).
"""

import argparse
import time

import jax
import jax.numpy as jnp
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P
from train_digits import TRACES, epoch_order, evaluate, initial_state, load_data, train_step

import eqstate


def main() -> None:
    parser = argparse.ArgumentParser(description="Train the digits demo data-parallel.")
    parser.add_argument("--devices", type=int, help="simulate this many CPU devices")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=64, help="global: over all devices")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--min-accuracy", type=float, default=0.9, help="else exit with 1")
    args = parser.parse_args()
    if args.devices:
        jax.config.update("jax_num_cpu_devices", args.devices)  # before JAX starts
    n = jax.device_count()
    if args.batch_size % n:
        parser.error(f"--batch-size {args.batch_size} does not split over {n} devices")

    mesh = jax.make_mesh((n,), ("batch",), axis_types=(AxisType.Auto,))
    batched = NamedSharding(mesh, P("batch"))  # axis 0 split over the devices
    x_train, x_test, y_train, y_test = load_data(args.seed)
    x_test, y_test = jnp.asarray(x_test), jnp.asarray(y_test)
    steps_per_epoch = len(x_train) // args.batch_size
    run = initial_state(args.epochs, steps_per_epoch, args.batch_size, args.seed)
    state = (run.model, run.opt, run.ema, run.metrics)
    # every array replicated on every device; flags and settings stay static
    model, opt, ema, metrics = eqstate.place(state, eqstate.shardings(state, mesh, [(..., P())]))
    print(f"{n} {jax.devices()[0].platform} devices, {args.batch_size // n} examples each")

    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = epoch_order(args.seed, epoch, len(x_train))
        metrics = metrics.reset()
        for b in range(steps_per_epoch):
            idx = order[b * args.batch_size : (b + 1) * args.batch_size]
            x, y = jax.device_put((x_train[idx], y_train[idx]), batched)
            model, opt, ema, metrics = train_step(model, opt, ema, metrics, x, y)
        loss, acc = float(metrics.compute()["loss"]), float(evaluate(model, x_test, y_test))
        print(f"epoch {epoch + 1}: loss {loss:.3f}, test accuracy {acc:.4f}")
    seconds = time.perf_counter() - start
    test_acc = float(evaluate(model, x_test, y_test))
    ema_acc = float(evaluate(ema.apply(model), x_test, y_test))
    print(f"test accuracy:       {test_acc:.4f}")
    print(f"test accuracy (EMA): {ema_acc:.4f}")
    print(f"{args.epochs * steps_per_epoch / seconds:.0f} steps/s; compilations: {dict(TRACES)}")
    if ema_acc < args.min_accuracy:
        raise SystemExit(f"test accuracy below {args.min_accuracy:.0%}")


if __name__ == "__main__":
    main()
