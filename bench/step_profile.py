"""Where a step's host time goes: cProfile over many steps of one optimizer on a parameter set's shapes.

    python bench/step_profile.py [--device cpu|cuda] [--set resnet18-cifar] [--steps 300] [--top 25]

On a GPU a small step is bound by the host (Python and kernel launches), not by the device, so this is the profile
that explains `bench/optimizer_step.py`'s CUDA timings. Prints, for KoalaV, KoalaM and fused Adam, the mean wall
time per step and the functions with the most time of their own.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch

# optimizer_step sits beside this file and finds `koala` in a checkout that is not installed.
from optimizer_step import BATCH, SEED, KoalaM, KoalaV, leaf_params, make_tensors, resnet18_cifar, small_transformer


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--set", default="resnet18-cifar", choices=("resnet18-cifar", "transformer-4l"))
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    device = torch.device(args.device)
    pset = resnet18_cifar() if args.set == "resnet18-cifar" else small_transformer()
    weights, grads = make_tensors(pset.shapes, device, torch.float32, SEED)
    losses = (2.3 + torch.rand(BATCH)).to(device)
    builders = {
        "KoalaV": lambda p: KoalaV(p),
        "KoalaM": lambda p: KoalaM(p),
        "Adam(fused=True)": lambda p: torch.optim.Adam(p, lr=1e-3, fused=True),
    }
    for name, build in builders.items():
        opt = build(leaf_params(weights, grads))
        kwargs = {"loss": losses} if name.startswith("Koala") else {}
        for _ in range(10):
            opt.step(**kwargs)
        if device.type == "cuda":
            torch.cuda.synchronize()
        profile = cProfile.Profile()
        start = time.perf_counter()
        profile.enable()
        for _ in range(args.steps):
            opt.step(**kwargs)
        profile.disable()
        if device.type == "cuda":
            torch.cuda.synchronize()
        per_step = (time.perf_counter() - start) / args.steps * 1e3
        out = io.StringIO()
        pstats.Stats(profile, stream=out).sort_stats("tottime").print_stats(args.top)
        print(f"## {name} on {args.device}, {pset.name}: {per_step:.3f} ms per step under cProfile\n")
        print("\n".join(line for line in out.getvalue().splitlines() if line.strip())[:6000], "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
