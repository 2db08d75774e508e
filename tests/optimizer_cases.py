"""What the optimizer tests share: KoalaV and KoalaM by registry name (and, for torch's generic contract, every
optimizer on their shared base), the constructor arguments that choose each CPU path, a small regression problem
with per-sample losses, and training with the step compiled or not."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

from koala import KoalaDiag, KoalaM, KoalaV

OPTIMIZERS = {"koala-v": KoalaV, "koala-m": KoalaM}
#: Every registered optimizer on KOALA's shared base (`koala.optim._KalmanOptimizer`: the step protocol, checkpoints,
#: copies, the CPU paths): torch's generic contract (tests/test_torch_contract.py and the contract section of
#: tests/test_optimizer.py) runs over these.
SHARED_BASE = {**OPTIMIZERS, "koala-diag": KoalaDiag}
Factory = Callable[..., torch.optim.Optimizer]
parametrize_opt = pytest.mark.parametrize("factory", OPTIMIZERS.values(), ids=OPTIMIZERS.keys())
parametrize_shared = pytest.mark.parametrize("factory", SHARED_BASE.values(), ids=SHARED_BASE.keys())

#: The constructor arguments that choose each CPU path: the loop, `torch._foreach_*`, the fused Numba kernels.
PATHS: dict[str, dict[str, Any]] = {
    "single": {"foreach": False},
    "foreach": {"foreach": True, "fused": False},
    "fused": {"fused": True},
}


def path_name(opt: Any) -> str:
    """The path the optimizer's next step takes (its parameters must have gradients)."""
    return str(opt._path(opt._blocks()).name)


# ---- a small regression problem: 4 inputs, 1 output -------------------------------------------------------------


def regression_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.ReLU(), nn.Linear(16, 1))


def regression_batch(seed: int, n: int = 32) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, generator=gen)
    return x, x.sum(1, keepdim=True).sin() + 0.1 * torch.randn(n, 1, generator=gen)


def per_sample_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (model(x) - y).pow(2).squeeze(1)  # (B,)


# ---- training, the step compiled or eager ------------------------------------------------------------------------


def trained_weights(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    losses_of: Callable[[int], torch.Tensor],
    steps: int,
    compile_options: dict[str, Any] | None = None,
) -> list[torch.Tensor]:
    """The weights after `steps` steps on the per-sample losses `losses_of(k)`; the step runs under
    `torch.compile(**compile_options)` when they are given, eagerly otherwise."""

    def step(losses: torch.Tensor) -> None:
        opt.step(loss=losses)

    run_step = torch.compile(step, **compile_options) if compile_options is not None else step
    for k in range(steps):
        losses = losses_of(k)
        opt.zero_grad()
        losses.mean().backward()
        run_step(losses.detach())
    return [p.detach().clone() for p in model.parameters()]
