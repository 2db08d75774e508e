"""The noisy quadratic model (NQM), the classic testbed for optimizer behaviour under minibatch noise.

    per-sample loss  l(w; c) = 1/2 (w - c)^T H (w - c),   c ~ N(0, H^-1),   H = diag(h_1 .. h_d),  h_i = i^-kappa
    risk             E l(w) = 1/2 w^T H w + d/2

so the gradient noise has covariance H (as in Zhang et al., "Which algorithmic choices matter at which batch
sizes?", NeurIPS 2019), the curvature spans `condition` orders of magnitude, and the minimum risk is d/2 at w = 0.
The metric is the excess risk 1/2 w^T H w (lower is better); losses stay positive, as KOALA's target scheme needs.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Annotated, Any

import torch
from torch import Tensor, nn

from koala.workloads.base import Batch, BatchSize, Range, Workload, WorkloadConfig

#: The most float32 values one batch of centres may hold (batch_size * dimension): 1 GiB.
MAX_BATCH_VALUES = 2**28
#: The most values one epoch may draw (samples_per_epoch * dimension): about two minutes of sampling on one CPU core.
MAX_EPOCH_VALUES = 2**34


@dataclasses.dataclass(frozen=True)
class QuadraticConfig(WorkloadConfig):
    batch_size: BatchSize = 32
    dimension: Annotated[int, Range(1, 1_000_000)] = 1000
    condition: Annotated[float, Range(1.0, 1e12)] = 1e4  # h_max / h_min
    samples_per_epoch: Annotated[int, Range(1, 100_000_000)] = 8192
    # w_0 = initial_scale * h^-1/2 (equal initial risk in every direction)
    initial_scale: Annotated[float, Range(1e-6, 1e6)] = 1.0

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"dimension": 50, "samples_per_epoch": 512, "batch_size": 16}

    def validate(self) -> None:
        super().validate()
        if self.samples_per_epoch < self.batch_size:
            raise ValueError(
                f"samples_per_epoch: must be >= batch_size ({self.batch_size}), got {self.samples_per_epoch}"
            )
        if self.batch_size * self.dimension > MAX_BATCH_VALUES:
            raise ValueError(
                f"batch_size: batch_size * dimension must be at most {MAX_BATCH_VALUES} (a batch of float32 centres, "
                f"1 GiB), got {self.batch_size} * {self.dimension} = {self.batch_size * self.dimension}"
            )
        if self.samples_per_epoch * self.dimension > MAX_EPOCH_VALUES:
            raise ValueError(
                f"samples_per_epoch: samples_per_epoch * dimension must be at most {MAX_EPOCH_VALUES}, got "
                f"{self.samples_per_epoch} * {self.dimension} = {self.samples_per_epoch * self.dimension}"
            )


class QuadraticWeights(nn.Module):
    """The NQM's model: just the weight vector w."""

    def __init__(self, initial: Tensor) -> None:
        super().__init__()
        self.w = nn.Parameter(initial.clone())  # (d,)


class NoisyQuadratic(Workload):
    name = "noisy-quadratic"
    description = "noisy quadratic model: ill-conditioned diagonal quadratic with minibatch noise, excess risk"
    metric = "val_excess_risk"
    mode = "min"
    Config = QuadraticConfig
    config: QuadraticConfig

    @property
    def curvature(self) -> Tensor:
        d = self.config.dimension
        exponent = math.log(self.config.condition) / math.log(d) if d > 1 else 0.0
        return torch.arange(1, d + 1, dtype=torch.float32).pow(-exponent)  # (d,), from 1 down to 1/condition

    def build_model(self) -> nn.Module:
        return QuadraticWeights(self.config.initial_scale * self.curvature.rsqrt())

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        h = self.curvature
        for _ in range(self.config.samples_per_epoch // self.config.batch_size):
            noise = torch.randn(self.config.batch_size, len(h), generator=generator)
            yield (noise * h.rsqrt(),)  # c ~ N(0, H^-1): (B, d)

    def losses(self, model: nn.Module, batch: Batch) -> Tensor:
        (centres,) = batch
        h = self.curvature.to(centres.device)
        assert isinstance(model, QuadraticWeights)
        return 0.5 * ((model.w - centres).square() * h).sum(1)  # (B,)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        assert isinstance(model, QuadraticWeights)
        w = model.w.detach()
        excess = 0.5 * float((w.square() * self.curvature.to(w.device)).sum())
        return {"val_excess_risk": excess, "val_loss": excess + self.config.dimension / 2}
