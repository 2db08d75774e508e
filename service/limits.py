"""What one job may ask for: the static bounds every deployment accepts, and the operator's caps on top of them."""

from __future__ import annotations

from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field

# Static bounds: what any deployment accepts. The operator's caps (`Limits`) are checked on top of them.
MAX_NAME = 200  # characters of a job name, a metric or a string choice
MAX_OPTIMIZERS = 32  # entries of one job
MAX_KEYS = 32  # hyperparameters per entry, keys of workload_config
MAX_CHOICES = 100  # values of one categorical search dimension
MAX_SEED = 2**31 - 1
MAX_SECONDS = 30 * 24 * 3600.0  # a time limit a job may ask for

Finite = Annotated[float, Field(allow_inf_nan=False)]


class Limits(BaseModel):
    """Caps on what one job may ask for, set by the operator (KOALA_LIMITS__MAX_EPOCHS=50 and so on)."""

    model_config = ConfigDict(frozen=True)

    max_epochs: int = Field(default=200, ge=1, description="Epochs of a trial")
    max_seeds: int = Field(default=10, ge=1, description="Seeds of a job")
    max_trials: int = Field(default=100, ge=1, description="Tuning trials per optimizer")
    max_total_trials: int = Field(default=500, ge=1, description="Every trial of a job")
    max_concurrent_trials: int = Field(default=16, ge=1, description="Trials of one job running at once")
    min_cpu: float = Field(default=0.25, gt=0, description="CPUs a trial must ask for at least")
    max_cpu: float = Field(default=64, gt=0, description="CPUs per trial")
    max_gpu: float = Field(default=8, ge=0, description="GPUs per trial")


DEFAULT_LIMITS = Limits()
