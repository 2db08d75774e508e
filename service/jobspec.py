"""JobSpec: what a user asks the service to compare (architecture.md section 4), with validation that names fields.

name: digits, KOALA vs tuned baselines
workload: digits-mlp
epochs: 10
seeds: 3                       # n (seeds 0..n-1) or an explicit list
optimizers:
  - name: koala-m              # fixed: library defaults, every seed
  - name: adam                 # tuned: TPE over `search` for `trials` trials, then the best re-run on every seed
    search: {lr: {low: 1.0e-4, high: 1.0e-1, log: true}}
    trials: 8
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from koala import optimizers, workloads


class Limits(BaseModel):
    """Caps on what one job may ask for (configurable by the operator)."""

    model_config = ConfigDict(frozen=True)

    max_epochs: int = 200
    max_seeds: int = 10
    max_trials: int = 100  # tuning trials per optimizer
    max_total_trials: int = 500  # every trial of the job
    max_cpu: float = 64
    max_gpu: float = 8


DEFAULT_LIMITS = Limits()


class FloatRange(BaseModel):
    """A numeric search range; `log` samples on a log scale; `int` draws integers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: float
    high: float
    log: bool = False
    int: bool = False

    @model_validator(mode="after")
    def _check(self) -> FloatRange:
        if self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError(f"log scale needs low > 0, got {self.low}")
        return self


class Choice(BaseModel):
    """A categorical search dimension."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    choices: list[float | int | str | bool] = Field(min_length=1)


def _dimension_kind(value: Any) -> str:
    if isinstance(value, Choice) or (isinstance(value, Mapping) and "choices" in value):
        return "Choice"
    return "FloatRange"


# Discriminated by the presence of `choices`, so a bad range gets the range's errors, not both members'.
SearchDimension = Annotated[
    Annotated[FloatRange, Tag("FloatRange")] | Annotated[Choice, Tag("Choice")], Discriminator(_dimension_kind)
]


class OptimizerEntry(BaseModel):
    """One optimizer of the comparison: fixed (params, or the library defaults) or tuned (search + trials)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str
    params: dict[str, Any] = Field(default_factory=dict)
    search: dict[str, SearchDimension] | None = None
    trials: Annotated[int, Field(ge=1)] | None = None

    @property
    def tuned(self) -> bool:
        return self.search is not None

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        if name not in optimizers.names():
            raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(optimizers.names())}")
        return name

    @model_validator(mode="after")
    def _consistent(self) -> OptimizerEntry:
        valid = optimizers.get(self.name).hyperparameters()
        for key in [*self.params, *(self.search or {})]:
            if key not in valid:
                raise ValueError(
                    f"unknown hyperparameter {key!r} for optimizer {self.name!r}; valid: {', '.join(sorted(valid))}"
                )
        if self.search is not None:
            if not self.search:
                raise ValueError("search must name at least one hyperparameter")
            if self.trials is None:
                raise ValueError("a tuned optimizer (with search) needs trials")
            overlap = sorted(set(self.search) & set(self.params))
            if overlap:
                raise ValueError(f"hyperparameter(s) {', '.join(overlap)} both fixed in params and searched")
        elif self.trials is not None:
            raise ValueError("trials is only meaningful with search")
        return self


class Resources(BaseModel):
    """Per-trial resources; gpu may be fractional (several trials share a GPU)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    cpu: Annotated[float, Field(gt=0)] = 1
    gpu: Annotated[float, Field(ge=0)] = 0


class JobSpec(BaseModel):
    """A comparison job. Build with `JobSpec.parse(mapping)` or `load_jobspec(path)` to get field-named errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    name: str = ""
    workload: str
    workload_config: dict[str, Any] = Field(default_factory=dict)
    epochs: Annotated[int, Field(ge=1)] = 10
    seeds: Annotated[int, Field(ge=1)] | list[Annotated[int, Field(ge=0)]] = 3
    metric: str | None = None
    target: float | None = None
    scheduler: Literal["none", "asha"] = "none"
    max_concurrent_trials: Annotated[int, Field(ge=1)] = 2
    resources: Resources = Field(default_factory=Resources)
    optimizers: list[OptimizerEntry] = Field(min_length=1)

    @field_validator("workload")
    @classmethod
    def _known_workload(cls, name: str) -> str:
        workloads.workload_class(name)  # raises ValueError listing the valid names
        return name

    @field_validator("seeds")
    @classmethod
    def _distinct_seeds(cls, seeds: int | list[int]) -> int | list[int]:
        if isinstance(seeds, list):
            if not seeds:
                raise ValueError("seeds must not be empty")
            if len(set(seeds)) != len(seeds):
                raise ValueError("seeds must be distinct")
        return seeds

    def cross_check(self) -> list[tuple[str, str]]:
        """Checks that involve several fields, as (field, message) pairs (empty when the spec is consistent)."""
        problems = []
        cls = workloads.workload_class(self.workload)
        try:
            cls.Config.from_mapping(self.workload, self.workload_config)  # unknown keys, types, ranges
        except ValueError as error:
            problems.append(("workload_config", str(error)))
        names = [entry.name for entry in self.optimizers]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            problems.append(("optimizers", f"duplicate entries for {', '.join(duplicates)}"))
        known = cls.metric_modes()
        if self.metric is not None and self.metric not in known:
            problems.append(
                ("metric", f"{self.metric!r} is not reported by {self.workload}; valid: {', '.join(known)}")
            )
        if self.scheduler == "asha" and not any(entry.tuned for entry in self.optimizers):
            problems.append(("scheduler", "asha early-stops tuning trials, but no optimizer is tuned"))
        return problems

    # ---- derived values --------------------------------------------------------------------------------------------

    @property
    def seed_list(self) -> list[int]:
        return list(range(self.seeds)) if isinstance(self.seeds, int) else list(self.seeds)

    @property
    def metric_name(self) -> str:
        return self.metric or workloads.workload_class(self.workload).metric

    @property
    def direction(self) -> Literal["maximize", "minimize"]:
        """The metric's direction, as the workload declares it."""
        mode = workloads.workload_class(self.workload).metric_modes()[self.metric_name]
        return "maximize" if mode == "max" else "minimize"

    def planned_trials(self) -> int:
        seeds = len(self.seed_list)
        return sum((entry.trials or 0) + seeds if entry.tuned else seeds for entry in self.optimizers)

    def check_limits(self, limits: Limits = DEFAULT_LIMITS) -> list[tuple[str, str]]:
        """The limits the job exceeds, as (field, message) pairs."""
        problems = []
        if self.epochs > limits.max_epochs:
            problems.append(("epochs", f"at most {limits.max_epochs}, got {self.epochs}"))
        if len(self.seed_list) > limits.max_seeds:
            problems.append(("seeds", f"at most {limits.max_seeds} seeds, got {len(self.seed_list)}"))
        for i, entry in enumerate(self.optimizers):
            if entry.trials is not None and entry.trials > limits.max_trials:
                problems.append((f"optimizers.{i}.trials", f"at most {limits.max_trials}, got {entry.trials}"))
        if self.planned_trials() > limits.max_total_trials:
            problems.append(
                ("optimizers", f"{self.planned_trials()} trials planned, at most {limits.max_total_trials}")
            )
        if self.resources.cpu > limits.max_cpu:
            problems.append(("resources.cpu", f"at most {limits.max_cpu}, got {self.resources.cpu}"))
        if self.resources.gpu > limits.max_gpu:
            problems.append(("resources.gpu", f"at most {limits.max_gpu}, got {self.resources.gpu}"))
        return problems

    @classmethod
    def parse(cls, data: Mapping[str, Any], limits: Limits = DEFAULT_LIMITS) -> JobSpec:
        """Validate `data`; raise SpecError whose errors name each offending field."""
        try:
            spec = cls.model_validate(data)
        except ValidationError as error:
            raise SpecError.from_validation(error) from None
        problems = spec.cross_check() + spec.check_limits(limits)
        if problems:
            raise SpecError([{"field": field, "message": message} for field, message in problems])
        return spec


class SpecError(ValueError):
    """Invalid JobSpec. `errors` is a list of {"field": dotted path, "message": what is allowed}."""

    def __init__(self, errors: list[dict[str, str]]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{e['field'] or '(spec)'}: {e['message']}" for e in errors))

    @classmethod
    def from_validation(cls, error: ValidationError) -> SpecError:
        errors = []
        for item in error.errors():
            message = item["msg"].removeprefix("Value error, ")
            errors.append({"field": cls.from_loc(item["loc"]), "message": message})
        return cls(errors)

    @staticmethod
    def from_loc(loc: Sequence[Any]) -> str:
        """The dotted field path of a pydantic error location, without pydantic's union-member tags."""
        return ".".join(str(part) for part in loc if not _is_union_tag(part))


def _is_union_tag(part: Any) -> bool:
    # pydantic inserts the tried member of a union into the location ("FloatRange", "int", "list[...]").
    return isinstance(part, str) and (part[:1].isupper() or part in {"int", "str", "float", "bool"} or "[" in part)


def load_jobspec(path: str | Path, limits: Limits = DEFAULT_LIMITS) -> JobSpec:
    """Read a JobSpec from a YAML or JSON file."""
    text = Path(path).read_text()
    try:
        data = json.loads(text) if str(path).endswith(".json") else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as error:
        raise SpecError([{"field": "", "message": f"{path} is not valid YAML/JSON: {error}"}]) from None
    if not isinstance(data, Mapping):
        raise SpecError([{"field": "", "message": f"{path} must hold a mapping, got {type(data).__name__}"}])
    return JobSpec.parse(data, limits)
