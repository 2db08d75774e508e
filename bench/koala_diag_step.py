"""KoalaDiag's step time against KoalaM's (and fused Adam's), in the same process, on the shapes of
bench/optimizer_step.py.

    python bench/koala_diag_step.py [--device cpu|cuda] [--sets resnet18-cifar,transformer-4l] [--repeats 100]
                                    [--weight-decay 0]

Every optimizer steps its own copy of the parameters with a fixed random gradient and 128 fixed positive per-sample
losses; rows are timed round-robin, one step each per round (bench/optimizer_step.py's `time_round_robin`), and the
median over rounds is reported with the ratio to KoalaM's multi-tensor path (its fused kernels: Numba on the CPU,
Triton on CUDA). The goal is at most 1.5x. On CUDA each multi-tensor path also takes one step under
`torch.cuda.set_sync_debug_mode("error")`, which raises on any host-device synchronisation.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from optimizer_step import (
    BATCH,
    SEED,
    leaf_params,
    make_tensors,
    resnet18_cifar,
    small_transformer,
    sync_debug_check,
    time_round_robin,
)

from koala import KoalaDiag, KoalaM, diag_cpu_kernels

SETS = {"resnet18-cifar": resnet18_cifar, "transformer-4l": small_transformer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sets", default="resnet18-cifar")
    parser.add_argument("--repeats", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--loop", action="store_true", help="also time the single-tensor loops (slow)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cpu":
        diag_cpu_kernels.warm_up(torch.float32)
    losses = (0.5 + torch.rand(BATCH, generator=torch.Generator().manual_seed(SEED))).to(device)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or platform.machine()
    print(
        f"Machine: {where}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} intra-op threads; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
        f"weight decay {args.weight_decay:g}, median of {args.repeats} rounds\n"
    )
    for name in args.sets.split(","):
        pset = SETS[name]()
        weights, grads = make_tensors(pset.shapes, device, torch.float32, SEED)
        builders = {
            "Adam(fused=True)": lambda p: torch.optim.Adam(p, lr=1e-3, weight_decay=args.weight_decay, fused=True),
            "KoalaM(foreach=True)": lambda p: KoalaM(p, weight_decay=args.weight_decay, foreach=True),
            "KoalaDiag(foreach=True)": lambda p: KoalaDiag(p, weight_decay=args.weight_decay, foreach=True),
            # The multi-tensor path through `torch._foreach_*` alone (what runs where the kernels do not).
            "KoalaDiag(foreach=True, torch ops)": lambda p: KoalaDiag(
                p, weight_decay=args.weight_decay, foreach=True, fused=False
            ),
        }
        if args.loop:
            builders["KoalaM(foreach=False)"] = lambda p: KoalaM(p, weight_decay=args.weight_decay, foreach=False)
            builders["KoalaDiag(foreach=False)"] = lambda p: KoalaDiag(p, weight_decay=args.weight_decay, foreach=False)
        steps = {}
        for label, build in builders.items():
            opt = build(leaf_params(weights, grads))
            steps[label] = _stepper(opt, losses)
        times = time_round_robin(steps, device, args.warmup, args.repeats)
        syncs = sync_debug_check(steps, device) if device.type == "cuda" else {}
        medians = {label: statistics.median(t) for label, t in times.items()}
        base = medians["KoalaM(foreach=True)"]
        print(f"**{pset.name}**: {pset.description}; {len(pset.shapes)} tensors, {pset.numel / 1e6:.2f}M parameters\n")
        print("| optimizer | median ms | IQR ms | x KoalaM(foreach=True) |")
        print("| --- | ---: | ---: | ---: |")
        for label, t in times.items():
            q = statistics.quantiles(t, n=4)
            median = medians[label]
            print(f"| {label} | {median * 1e3:.2f} | {q[0] * 1e3:.2f}-{q[2] * 1e3:.2f} | {median / base:.2f} |")
        print()
        for label, outcome in syncs.items():
            print(f"- sync debug mode 'error', {label}: {outcome}")
        if syncs:
            print()
    return 0


def _stepper(opt: torch.optim.Optimizer, losses: Tensor):  # type: ignore[no-untyped-def]
    if isinstance(opt, KoalaM | KoalaDiag):

        def step() -> None:
            opt.step(loss=losses)

    else:

        def step() -> None:
            opt.step()

    return step


if __name__ == "__main__":
    sys.exit(main())
