"""A tiny regression workload: a two-layer MLP learns a noisy nonlinear function of generated inputs.

Everything a workload needs is here: a `Config` dataclass (every numeric field with its range), the data (generated
from `data_seed` in `prepare`, so every trial sees the same split), a model, per-sample losses and the metrics.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from typing import Annotated

import torch
from torch import Tensor, nn

from koala.workloads import Batch, Range, Workload, WorkloadConfig, model_device


@dataclasses.dataclass(frozen=True)
class RegressionConfig(WorkloadConfig):
    batch_size: Annotated[int, Range(1, 4096)] = 64
    samples: Annotated[int, Range(32, 1_000_000)] = 2048  # 80% train, 20% validation
    features: Annotated[int, Range(1, 256)] = 8
    hidden: Annotated[int, Range(1, 1024)] = 32
    noise: Annotated[float, Range(0.0, 10.0)] = 0.1  # standard deviation of the label noise
    data_seed: Annotated[int, Range(0, 2**31 - 1)] = 0


class TinyRegression(Workload):
    name = "tiny-regression"
    description = "two-layer MLP regressing y = sin(2 x.w) + x_0^2 / 2 + noise on generated data, validation RMSE"
    metric = "val_rmse"
    mode = "min"
    Config = RegressionConfig
    config: RegressionConfig

    def prepare(self) -> None:
        c = self.config
        generator = torch.Generator().manual_seed(c.data_seed)
        x = torch.randn(c.samples, c.features, generator=generator)
        w = torch.randn(c.features, generator=generator) / math.sqrt(c.features)
        y = torch.sin(2 * x @ w) + 0.5 * x[:, 0] ** 2 + c.noise * torch.randn(c.samples, generator=generator)
        split = int(0.8 * c.samples)
        self.train_x, self.train_y = x[:split], y[:split]
        self.val_x, self.val_y = x[split:], y[split:]

    def build_model(self) -> nn.Module:
        c = self.config
        return nn.Sequential(nn.Linear(c.features, c.hidden), nn.Tanh(), nn.Linear(c.hidden, 1))

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        order = torch.randperm(len(self.train_x), generator=generator)
        for start in range(0, len(order), self.config.batch_size):
            index = order[start : start + self.config.batch_size]
            yield self.train_x[index], self.train_y[index]

    def losses(self, model: nn.Module, batch: Batch) -> Tensor:
        x, y = batch
        return (model(x).squeeze(-1) - y).square()  # per-sample squared errors

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        device = model_device(model)
        errors = model(self.val_x.to(device)).squeeze(-1) - self.val_y.to(device)
        mse = float(errors.square().mean())
        return {"val_rmse": math.sqrt(mse), "val_loss": mse}
