"""The workload protocol: a dataset, a model, a per-sample loss and a metric, behind four methods.

A workload is a `Workload` subclass with a `Config` dataclass. The training loop (`koala.train.run`) only ever calls:

    model = workload.build_model()                       # on the CPU; the loop moves it
    for batch in workload.train_batches(epoch, generator): # CPU tensors, a tuple; the loop moves them
        losses = workload.losses(model, batch)            # per-sample (any shape; the mean is the training loss)
    metrics = workload.evaluate(model)                    # validation metrics, plain floats

plus the class attributes `metric` (the default metric) and `mode` ("max" or "min"). `Config.tiny()` returns the
overrides that make the workload run in seconds, for tests.
"""

from __future__ import annotations

import abc
import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from torch import Tensor, nn

Batch = tuple[Tensor, ...]
Mode = Literal["max", "min"]


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """Settings every workload has. Subclasses add theirs as dataclass fields with defaults."""

    batch_size: int = 128

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        """Overrides that make the workload small enough for tests (seconds on a laptop CPU)."""
        return {}

    def validate(self) -> None:
        """Raise ValueError naming the field for values out of range (types are checked by `from_mapping`)."""
        if self.batch_size < 1:
            raise ValueError(f"batch_size: must be >= 1, got {self.batch_size}")

    @classmethod
    def from_mapping(cls, name: str, values: Mapping[str, Any]) -> WorkloadConfig:
        """Build a config from user values; unknown keys and wrong types raise ValueError listing what is valid."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields))
        if unknown:
            valid = ", ".join(sorted(fields))
            raise ValueError(f"unknown config key(s) {', '.join(unknown)} for workload {name!r}; valid: {valid}")
        checked = {key: _coerce(name, key, value, fields[key].default) for key, value in values.items()}
        config = cls(**checked)
        config.validate()
        return config


def _coerce(workload: str, key: str, value: Any, default: Any) -> Any:
    """Check `value` against the type of the field's default (ints are accepted for float fields)."""
    expected = type(default)
    if default is None or default is dataclasses.MISSING:
        return value
    if isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool):
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    raise ValueError(
        f"{key}: expected {expected.__name__} for workload {workload!r}, got {type(value).__name__} {value!r}"
    )


class Workload(abc.ABC):
    """A dataset + model + per-sample loss + metrics. Subclasses set the class attributes and the four methods."""

    name: ClassVar[str]
    description: ClassVar[str]
    metric: ClassVar[str]
    mode: ClassVar[Mode]
    #: Further metrics `evaluate` reports, with their directions (every workload also reports val_loss).
    extra_metrics: ClassVar[dict[str, Mode]] = {}
    Config: ClassVar[type[WorkloadConfig]] = WorkloadConfig

    @classmethod
    def metric_modes(cls) -> dict[str, Mode]:
        """Every metric `evaluate` reports, with whether higher ("max") or lower ("min") is better."""
        return {cls.metric: cls.mode, "val_loss": "min", **cls.extra_metrics}

    def __init__(self, config: WorkloadConfig) -> None:
        self.config = config

    def prepare(self) -> None:
        """Load (or generate) the data now. The loop calls it before the first epoch, so that reading a dataset is
        not timed as training and a missing one fails before any training starts. Workloads that draw their data
        on the fly keep this default, which does nothing."""
        return

    @abc.abstractmethod
    def build_model(self) -> nn.Module:
        """A freshly initialised model (uses the global torch RNG, which the loop seeds)."""

    @abc.abstractmethod
    def train_batches(self, epoch: int, generator: torch.Generator) -> Iterator[Batch]:
        """The training batches of one epoch. Shuffling and augmentation draw only from `generator`, which the loop
        seeds from (seed, epoch), so an epoch's data does not depend on what ran before it (exact resume)."""

    @abc.abstractmethod
    def losses(self, model: nn.Module, batch: Batch) -> Tensor:
        """Per-sample losses of `batch` (already on the model's device); their mean is the training loss."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module) -> dict[str, float]:
        """Validation metrics, plain floats, containing `metric`. The loop calls it with the model in eval mode and
        gradients off; batches go to `model_device(model)`."""


def model_device(model: nn.Module) -> torch.device:
    """The device of a model's parameters (where evaluation batches must go)."""
    return next(model.parameters()).device


def data_directory(config_value: str, workload: str, expected: str, source: str) -> Path:
    """The data directory of a real-scale workload: `data_dir` config, else $KOALA_DATA_DIR.

    Raises FileNotFoundError naming the expected files and where they usually come from.
    """
    root = config_value or os.environ.get("KOALA_DATA_DIR", "")
    if not root:
        raise FileNotFoundError(
            f"workload {workload!r} reads {expected} from a data directory: set the config key data_dir or "
            f"KOALA_DATA_DIR. {source}"
        )
    return Path(root).expanduser()
