"""Workloads: `get(name, **config)` and `names()`.

Built in: the embedded workloads (`digits-mlp`, `digits-cnn`, `noisy-quadratic`, `char-lm`), which run offline on a
laptop CPU, and the real-scale ones (`cifar10-resnet18`, `cifar100-resnet18`, `wikitext2-lstm`), which read a data
directory. Others come from the entry-point group `koala.workloads` (name -> a `Workload` subclass) or from a
`"module:attribute"` string naming a `Workload` subclass.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points
from typing import Any

from koala.workloads.base import Batch, Workload, WorkloadConfig, model_device

ENTRY_POINT_GROUP = "koala.workloads"
_BUILTIN: dict[str, str] = {
    "digits-mlp": "koala.workloads.digits:DigitsMLP",
    "digits-cnn": "koala.workloads.digits:DigitsCNN",
    "noisy-quadratic": "koala.workloads.quadratic:NoisyQuadratic",
    "char-lm": "koala.workloads.language:CharLM",
    "cifar10-resnet18": "koala.workloads.cifar:Cifar10ResNet18",
    "cifar100-resnet18": "koala.workloads.cifar:Cifar100ResNet18",
    "wikitext2-lstm": "koala.workloads.language:WikiText2LSTM",
}


def _plugins() -> dict[str, Any]:
    return {ep.name: ep for ep in entry_points(group=ENTRY_POINT_GROUP)}


def names() -> list[str]:
    """Built-in and installed workload names, sorted."""
    return sorted({*_BUILTIN, *_plugins()})


def workload_class(name: str) -> type[Workload]:
    """The class behind a workload name or a "module:attribute" reference. Raises ValueError if unknown."""
    if name in _BUILTIN:
        cls = _load(_BUILTIN[name])
    elif name in (plugins := _plugins()):
        cls = plugins[name].load()
    elif ":" in name:
        try:
            cls = _load(name)
        except (ImportError, AttributeError) as error:
            raise ValueError(f"cannot load workload {name!r}: {error}") from None
    else:
        raise ValueError(f"unknown workload {name!r}; valid: {', '.join(names())}, or 'module:Class'")
    if not (isinstance(cls, type) and issubclass(cls, Workload)):
        raise ValueError(f"workload {name!r} is {cls!r}, not a koala.workloads.Workload subclass")
    return cls


def get(name: str, **config: Any) -> Workload:
    """Build workload `name` with config overrides. Raises ValueError for unknown names or config keys."""
    cls = workload_class(name)
    return cls(cls.Config.from_mapping(name, config))


def _load(reference: str) -> Any:
    module, _, attribute = reference.partition(":")
    return getattr(importlib.import_module(module), attribute)


__all__ = ["Batch", "Workload", "WorkloadConfig", "get", "model_device", "names", "workload_class"]
