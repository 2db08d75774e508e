"""The catalogue: the workloads and optimizers a JobSpec may name (answered without a token)."""

from __future__ import annotations

import dataclasses

from fastapi import APIRouter
from pydantic import TypeAdapter

from koala import optimizers, workloads
from koala_client import models
from service.jobspec import type_name

router = APIRouter(tags=["catalogue"])


@router.get("/v1/workloads", response_model=list[models.WorkloadInfo])
def list_workloads() -> list[models.WorkloadInfo]:
    """Workloads a JobSpec may name, with their metrics and configuration defaults."""
    return [_workload_info(name) for name in workloads.names()]


@router.get("/v1/optimizers", response_model=list[models.OptimizerInfo])
def list_optimizers() -> list[models.OptimizerInfo]:
    """Optimizers a JobSpec may name, with their hyperparameters and defaults."""
    return [_optimizer_info(name) for name in optimizers.names()]


def _workload_info(name: str) -> models.WorkloadInfo:
    cls = workloads.workload_class(name)
    config = {f.name: f.default for f in dataclasses.fields(cls.Config)}
    try:
        schema = TypeAdapter(cls.Config).json_schema()
    except Exception:  # a user workload's config type pydantic cannot describe: defaults still say enough
        schema = {}
    return models.WorkloadInfo(
        name=name,
        description=cls.description,
        metric=cls.metric,
        mode=cls.mode,
        metrics=cls.metric_modes(),
        config=config,
        config_schema=schema,
    )


def _optimizer_info(name: str) -> models.OptimizerInfo:
    spec = optimizers.get(name)
    return models.OptimizerInfo(
        name=name,
        description=spec.description,
        hyperparameters=[
            models.HyperparameterInfo(name=key, default=value, type=type_name(name, key))
            for key, value in spec.hyperparameters().items()
        ],
    )
