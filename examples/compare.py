"""Compare KOALA at its defaults with SGD-momentum and a learning-rate-tuned Adam, on one workload.

Every run goes through `koala.train.run`, the loop the comparison service uses. KOALA gets no tuning; Adam gets a
small learning-rate grid, whose total compute is reported as the price of tuning.

    python examples/compare.py [--workload digits-mlp] [--epochs 10] [--seeds 3]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from koala import train, workloads

ADAM_GRID = [3e-4, 1e-3, 3e-3, 1e-2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="digits-mlp", choices=workloads.names())
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)  # small models: one thread is fastest
    cls = workloads.workload_class(args.workload)
    better = max if cls.mode == "max" else min

    def trials(optimizer: str, hyperparams: dict[str, float]) -> tuple[list[float], float]:
        finals, seconds = [], 0.0
        for seed in range(args.seeds):
            started = time.perf_counter()
            result = train.run(args.workload, optimizer, hyperparams, seed=seed, epochs=args.epochs, device="cpu")
            seconds += time.perf_counter() - started
            final = result.final(cls.metric)
            finals.append(final if final is not None and not result.diverged else float("nan"))
        return finals, seconds

    # Untimed warm-up: the first KOALA step of a fresh install compiles its CPU kernels (cached on disk afterwards).
    train.run(args.workload, "koala-m", epochs=1, workload_config=cls.Config.tiny(), device="cpu")
    train.run(args.workload, "koala-v", epochs=1, workload_config=cls.Config.tiny(), device="cpu")

    rows = []
    for optimizer, hyperparams in [("koala-m", {}), ("koala-v", {}), ("momentum", {"lr": 0.1})]:
        finals, seconds = trials(optimizer, hyperparams)
        rows.append((f"{optimizer} {hyperparams or '(defaults)'}", finals, seconds, seconds))
    grid = {lr: trials("adam", {"lr": lr}) for lr in ADAM_GRID}
    best_lr = better(grid, key=lambda lr: statistics.mean(grid[lr][0]))
    tuning = sum(seconds for _, seconds in grid.values())
    rows.append((f"adam, best of lr {ADAM_GRID} (lr={best_lr:g})", grid[best_lr][0], grid[best_lr][1], tuning))

    print(f"\n{args.workload}: {cls.metric} after {args.epochs} epochs, {args.seeds} seeds ({cls.mode} is better)\n")
    print(f"{'optimizer':<55} {'mean':>8} {'std':>8} {'compute s':>10} {'incl. tuning':>13}")
    for label, finals, seconds, total in rows:
        spread = statistics.stdev(finals) if len(finals) > 1 else 0.0
        print(f"{label:<55} {statistics.mean(finals):>8.4f} {spread:>8.4f} {seconds:>10.1f} {total:>13.1f}")


if __name__ == "__main__":
    main()
