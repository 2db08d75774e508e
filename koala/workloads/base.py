"""The workload protocol: a dataset, a model, a per-sample loss and a metric, behind four methods.

A workload is a `Workload` subclass with a `Config` dataclass. The training loop (`koala.train.run`) only ever calls:

    model = workload.build_model()                       # on the CPU; the loop moves it
    for batch in workload.train_batches(epoch, generator): # CPU tensors, a tuple; the loop moves them
        losses = workload.losses(model, batch)            # per-sample (any shape; the mean is the training loss)
    metrics = workload.evaluate(model)                    # validation metrics, plain floats

plus the class attributes `metric` (the default metric) and `mode` ("max" or "min"). `Config.tiny()` returns the
overrides that make the workload run in seconds, for tests.

Every numeric `Config` field declares its range on its type (`hidden: Annotated[int, Range(1, 4096)] = 128`), which
`Config.from_mapping` enforces and pydantic shows in the config's JSON schema; `Config.path_fields()` names the fields
that are filesystem paths (`data_dir`).
"""

from __future__ import annotations

import abc
import dataclasses
import math
import os
import typing
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Literal

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from pydantic import GetCoreSchemaHandler
    from pydantic_core import CoreSchema

Batch = tuple[Tensor, ...]
Mode = Literal["max", "min"]


@dataclasses.dataclass(frozen=True)
class Range:
    """The inclusive bounds of a numeric config field, declared on the field's type:

        hidden: Annotated[int, Range(1, 4096)] = 128

    `WorkloadConfig.from_mapping` enforces it, and pydantic (the service's `GET /v1/workloads` schema) shows it as
    `minimum` and `maximum`: `__get_pydantic_core_schema__` hands pydantic the equivalent `annotated_types`
    interval, imported only then, so the library itself needs neither package.
    """

    ge: int | float
    le: int | float

    def check(self, field: str, value: int | float) -> None:
        """Raise ValueError naming `field` and the range if `value` is outside it (NaN is outside every range)."""
        if not self.ge <= value <= self.le:
            raise ValueError(f"{field}: must be between {_number(self.ge)} and {_number(self.le)}, got {shown(value)}")

    def __get_pydantic_core_schema__(self, source_type: Any, handler: GetCoreSchemaHandler) -> CoreSchema:
        from annotated_types import Interval

        return handler(Annotated[source_type, Interval(ge=self.ge, le=self.le)])


def _number(value: int | float) -> str:
    return str(value) if isinstance(value, int) else f"{value:g}"


def shown(value: Any, limit: int = 80) -> str:
    """`repr(value)` for an error message, cut to about `limit` characters (values may come from remote clients)."""
    try:
        text = repr(value)
    except ValueError:  # an int beyond Python's integer-to-string digit limit
        return f"an integer of {value.bit_length()} bits" if isinstance(value, int) else type(value).__name__
    return text if len(text) <= limit else f"{text[: limit - 3]}..."


#: The key in a config field's `dataclasses.field(metadata=...)` that marks it as a filesystem path.
PATH_FIELD = "koala.path"
#: Batch sizes every workload accepts unless it declares a narrower range.
BatchSize = Annotated[int, Range(1, 65_536)]


@dataclasses.dataclass(frozen=True)
class WorkloadConfig:
    """Settings every workload has. Subclasses add theirs as dataclass fields with defaults.

    Every numeric field declares its range on its type (`Annotated[int, Range(lo, hi)]`), which `from_mapping`
    enforces; `validate` adds the checks that involve several fields. Fields that name filesystem paths carry
    `metadata={PATH_FIELD: True}` (see `path_fields`).
    """

    batch_size: BatchSize = 128

    @classmethod
    def tiny(cls) -> dict[str, Any]:
        """Overrides that make the workload small enough for tests (seconds on a laptop CPU)."""
        return {}

    @classmethod
    def ranges(cls) -> dict[str, Range]:
        """The declared range of each numeric field, by field name."""
        return dict(_ranges(cls))

    @classmethod
    def path_fields(cls) -> tuple[str, ...]:
        """The names of the fields that are filesystem paths (a service refuses those from remote clients)."""
        return tuple(f.name for f in dataclasses.fields(cls) if f.metadata.get(PATH_FIELD, False))

    def check_ranges(self) -> None:
        """Raise ValueError naming the first field whose value is outside its declared range."""
        for field, bounds in _ranges(type(self)).items():
            bounds.check(field, getattr(self, field))

    def validate(self) -> None:
        """Raise ValueError naming the field for values out of range (types are checked by `from_mapping`).

        This checks the declared ranges; subclasses add checks that involve several fields, after `super().validate()`.
        """
        self.check_ranges()

    @classmethod
    def from_mapping(cls, name: str, values: Mapping[str, Any]) -> WorkloadConfig:
        """Build a config from user values; unknown keys, wrong types, non-finite floats and values out of a field's
        range raise ValueError naming the field and what is valid."""
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(values) - set(fields), key=str)
        if unknown:
            valid = ", ".join(sorted(fields))
            # At most 10 keys, each cut to 40 characters: the values may come from a remote client.
            keys = ", ".join(key if len(key) <= 40 else f"{key[:37]}..." for key in map(str, unknown[:10]))
            more = f" and {len(unknown) - 10} more" if len(unknown) > 10 else ""
            raise ValueError(f"unknown config key(s) {keys}{more} for workload {name!r}; valid: {valid}")
        checked = {key: _coerce(name, key, value, fields[key].default) for key, value in values.items()}
        config = cls(**checked)
        config.check_ranges()  # also when a subclass's validate() does not call super().validate()
        config.validate()
        return config


_RANGES: dict[type[WorkloadConfig], dict[str, Range]] = {}


def _ranges(cls: type[WorkloadConfig]) -> dict[str, Range]:
    """The `Range` on each field's `Annotated` type, from the resolved annotations of `cls` and its bases (cached)."""
    if cls not in _RANGES:
        try:
            hints = typing.get_type_hints(cls, include_extras=True)
        except Exception:  # a user config whose annotations do not resolve at run time: it declares no ranges
            hints = {}
        ranges = {}
        for field in dataclasses.fields(cls):
            bounds = [item for item in getattr(hints.get(field.name), "__metadata__", ()) if isinstance(item, Range)]
            if bounds:
                ranges[field.name] = bounds[-1]
        _RANGES[cls] = ranges
    return _RANGES[cls]


def _coerce(workload: str, key: str, value: Any, default: Any) -> Any:
    """Check `value` against the type of the field's default (ints are accepted for float fields, bools only for
    bool fields; floats must be finite)."""
    expected = type(default)
    if default is None or default is dataclasses.MISSING:
        return value
    if isinstance(value, expected) and not (isinstance(value, bool) and expected is not bool):
        if expected is float and not math.isfinite(value):
            raise ValueError(f"{key}: must be a finite number for workload {workload!r}, got {value!r}")
        return value
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        try:
            return float(value)
        except OverflowError:
            raise ValueError(f"{key}: must be a finite number for workload {workload!r}, got {shown(value)}") from None
    raise ValueError(
        f"{key}: expected {expected.__name__} for workload {workload!r}, got {type(value).__name__} {shown(value)}"
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


#: The folder under $KOALA_DATA_DIR that holds the real-scale datasets when a config leaves `data_dir` empty.
DATASETS_FOLDER = "datasets"


def dataset_folders(config_value: str, folder: str, workload: str, expected: str, source: str) -> tuple[Path, ...]:
    """Where a real-scale workload looks for its dataset folder `folder`, in order.

    With a `data_dir` config value (a local user's choice), that directory is the dataset folder itself or its
    parent: (data_dir, data_dir/folder). Without one, the dataset is under the operator's data root:
    ($KOALA_DATA_DIR/datasets/folder,) only; a service that refuses `data_dir` from its clients (see
    `WorkloadConfig.path_fields`) thus reads datasets only where its operator put them.

    Raises:
        FileNotFoundError: naming the expected files and where they usually come from, if neither data_dir nor
            KOALA_DATA_DIR is set.
    """
    if config_value:
        root = Path(config_value).expanduser()
        return (root, root / folder)
    data_root = os.environ.get("KOALA_DATA_DIR", "")
    if not data_root:
        raise FileNotFoundError(
            f"workload {workload!r} reads {expected} from $KOALA_DATA_DIR/{DATASETS_FOLDER}/{folder}, or from the "
            f"folder the config key data_dir names, but neither KOALA_DATA_DIR nor data_dir is set. {source}"
        )
    return (Path(data_root).expanduser() / DATASETS_FOLDER / folder,)
