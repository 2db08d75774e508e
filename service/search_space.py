"""A tuned optimizer's search space: one dimension per hyperparameter, a numeric range or a set of choices, and
the Optuna distributions TPE samples them from."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any

from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, model_validator

from service.limits import MAX_CHOICES, MAX_NAME, Finite


class FloatRange(BaseModel):
    """A numeric search range; `log` samples on a log scale; `int` draws integers."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    low: Finite
    high: Finite
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

    choices: list[Finite | int | Annotated[str, Field(max_length=MAX_NAME)] | bool] = Field(
        min_length=1, max_length=MAX_CHOICES
    )


def _dimension_kind(value: Any) -> str:
    if isinstance(value, Choice) or (isinstance(value, Mapping) and "choices" in value):
        return "Choice"
    return "FloatRange"


# Discriminated by the presence of `choices`, so a bad range gets the range's errors, not both members'.
SearchDimension = Annotated[
    Annotated[FloatRange, Tag("FloatRange")] | Annotated[Choice, Tag("Choice")], Discriminator(_dimension_kind)
]


def distributions(search: Mapping[str, FloatRange | Choice]) -> dict[str, BaseDistribution]:
    """Optuna distributions for a JobSpec search space."""
    out: dict[str, BaseDistribution] = {}
    for name, dim in search.items():
        if isinstance(dim, Choice):
            out[name] = CategoricalDistribution(dim.choices)
        elif dim.int:
            out[name] = IntDistribution(int(dim.low), int(dim.high), log=dim.log)
        else:
            out[name] = FloatDistribution(dim.low, dim.high, log=dim.log)
    return out
