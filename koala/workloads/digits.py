"""Handwritten digits: scikit-learn's bundled 8x8 digits (1,797 images, 10 classes), an MLP and a small CNN."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from functools import cached_property
from typing import Annotated, Any

import torch
from torch import Tensor, nn

from koala.workloads.base import Batch, BatchSize, Range, Workload, WorkloadConfig, model_device


@dataclasses.dataclass(frozen=True)
class DigitsConfig(WorkloadConfig):
    batch_size: BatchSize = 32
    # MLP hidden units, or channels of the CNN's second convolution (evaluation runs the whole validation split as
    # one batch: at 4096 channels and validation_fraction 0.5 the CNN's activations take about 1 GB).
    hidden: Annotated[int, Range(1, 4096)] = 128
    validation_fraction: Annotated[float, Range(0.05, 0.5)] = 0.2
    limit_train: Annotated[int, Range(0, 1_000_000)] = 0  # 0 = all training images; fewer for quick runs

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        return {"batch_size": 16, "hidden": 16, "limit_train": 128}


class _Digits(Workload):
    """The shared data pipeline: a fixed stratified split, features standardised with training statistics."""

    metric = "val_accuracy"
    mode = "max"
    Config = DigitsConfig
    config: DigitsConfig

    def prepare(self) -> None:
        self._data  # noqa: B018 (the cached property loads the data)

    @cached_property
    def _data(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        features, labels = load_digits(return_X_y=True)
        # random_state fixes the split for every run: results are comparable across jobs and machines.
        x_train, x_val, y_train, y_val = train_test_split(
            features, labels, test_size=self.config.validation_fraction, random_state=0, stratify=labels
        )
        if self.config.limit_train:
            x_train, y_train = x_train[: self.config.limit_train], y_train[: self.config.limit_train]
        train = torch.tensor(x_train, dtype=torch.float32)  # (N, 64), pixel values 0..16
        mean, std = train.mean(0), train.std(0) + 1e-3  # some border pixels are constant
        val = torch.tensor(x_val, dtype=torch.float32)
        return (train - mean) / std, torch.tensor(y_train), (val - mean) / std, torch.tensor(y_val)

    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        x, y, _, _ = self._data
        order = torch.randperm(len(x), generator=generator)
        for idx in torch.split(order, self.config.batch_size):
            yield self._shape(x[idx]), y[idx]

    def losses(self, model: nn.Module, batch: Batch) -> Tensor:
        inputs, labels = batch
        return nn.functional.cross_entropy(model(inputs), labels, reduction="none")  # (B,)

    def evaluate(self, model: nn.Module) -> dict[str, float]:
        _, _, x, y = self._data
        device = model_device(model)
        logits = model(self._shape(x).to(device))  # the whole validation split fits in one batch
        labels = y.to(device)
        return {
            "val_accuracy": float((logits.argmax(1) == labels).float().mean()),
            "val_loss": float(nn.functional.cross_entropy(logits, labels)),
        }

    def _shape(self, x: Tensor) -> Tensor:
        return x


class DigitsMLP(_Digits):
    name = "digits-mlp"
    description = "8x8 digits (scikit-learn), MLP 64-hidden-10, validation accuracy"

    def build_model(self) -> nn.Module:
        return nn.Sequential(nn.Linear(64, self.config.hidden), nn.ReLU(), nn.Linear(self.config.hidden, 10))


class DigitsCNN(_Digits):
    name = "digits-cnn"
    description = "8x8 digits (scikit-learn), two-layer CNN, validation accuracy"

    def build_model(self) -> nn.Module:
        width = self.config.hidden
        return nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1),  # (B, 16, 8, 8)
            nn.ReLU(),
            nn.Conv2d(16, width, 3, padding=1),  # (B, width, 8, 8)
            nn.ReLU(),
            nn.MaxPool2d(2),  # (B, width, 4, 4)
            nn.Flatten(),
            nn.Linear(width * 16, 10),
        )

    def _shape(self, x: Tensor) -> Tensor:
        return x.view(-1, 1, 8, 8)  # (B, 1, 8, 8)
