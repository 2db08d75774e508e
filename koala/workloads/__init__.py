"""Workloads: `registry()`, `workload_class(name)`, `get(name, **config)` and `names()`.

Built in: the embedded workloads (`digits-mlp`, `digits-cnn`, `noisy-quadratic`, `char-lm`), which run offline on a
laptop CPU, and the real-scale ones (`cifar10-resnet18`, `cifar100-resnet18`, `wikitext2-lstm`), which read a data
directory. Installed ones come from the entry-point group `koala.workloads` (name -> a `Workload` subclass); the
registry is the built-ins plus those, each loaded once per process.

A `"module:attribute"` string naming a `Workload` subclass imports that module, so it is for trusted callers only
(`koala run`, `koala.train.run`, a local user): `workload_class(name, allow_import=False)`, what a service uses for
names that come from its clients, accepts registered names only and imports nothing.
"""

from __future__ import annotations

import importlib
import inspect
import logging
import threading
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from koala.workloads.base import Batch, Range, Workload, WorkloadConfig, model_device, shown

ENTRY_POINT_GROUP = "koala.workloads"
_log = logging.getLogger(__name__)
_lock = threading.RLock()
_registered: dict[str, type[Workload]] | None = None
_building = False  # an entry point's import calling registry() must fail, not recurse


def registry() -> dict[str, type[Workload]]:
    """Every registered workload class by name: the built-ins, then the entry points of group `koala.workloads`.

    Built once per process (later calls return a copy of the same classes). An entry point that fails to load, that
    is not a concrete `Workload` subclass, or whose name is taken is skipped with a logged warning.
    """
    global _registered, _building
    with _lock:
        if _registered is None:
            if _building:
                raise RuntimeError("koala.workloads.registry() called while it loads the workload entry points")
            _building = True
            try:
                _registered = _build_registry()
            finally:
                _building = False
        return dict(_registered)


def _reset_registry() -> None:
    """Forget the registry, so that the next call reads the entry points again (for tests that install one)."""
    global _registered
    with _lock:
        _registered = None


def _build_registry() -> dict[str, type[Workload]]:
    from koala.workloads.cifar import Cifar10ResNet18, Cifar100ResNet18
    from koala.workloads.digits import DigitsCNN, DigitsMLP
    from koala.workloads.language import CharLM, WikiText2LSTM
    from koala.workloads.quadratic import NoisyQuadratic

    builtin: list[type[Workload]] = [
        DigitsMLP,
        DigitsCNN,
        NoisyQuadratic,
        CharLM,
        Cifar10ResNet18,
        Cifar100ResNet18,
        WikiText2LSTM,
    ]
    classes = {cls.name: cls for cls in builtin}
    try:
        plugins = list(entry_points(group=ENTRY_POINT_GROUP))
    except Exception as error:  # unreadable distribution metadata must not take the built-ins down with it
        _log.warning("cannot read the %r entry points: %s: %s", ENTRY_POINT_GROUP, type(error).__name__, error)
        return classes
    for entry in plugins:
        if entry.name in classes:
            _log.warning("workload entry point %r (%s) skipped: the name is taken", entry.name, entry.value)
            continue
        try:
            classes[entry.name] = _checked(entry.name, _load_entry_point(entry))
        except ValueError as error:
            _log.warning("workload entry point %r (%s) skipped: %s", entry.name, entry.value, error)
    return classes


def _load_entry_point(entry: EntryPoint) -> Any:
    try:
        return entry.load()
    except (Exception, SystemExit) as error:  # a plugin's import may raise anything
        raise ValueError(f"cannot load it: {type(error).__name__}: {error}") from None


def names() -> list[str]:
    """The registered workload names (built-in and installed), sorted."""
    return sorted(registry())


def workload_class(name: str, *, allow_import: bool = True) -> type[Workload]:
    """The class behind a registered workload name or, if `allow_import`, a "module:attribute" reference.

    With `allow_import=False` a name that is not registered is refused without importing anything, whatever it looks
    like: use that for names from untrusted clients.

    Raises:
        ValueError: the only exception, whatever goes wrong: an unknown name (listing the valid ones), a module that
            cannot be imported or raises while importing, or an attribute that is not a concrete `Workload` subclass.
    """
    classes = registry()
    if name in classes:
        return classes[name]
    valid = ", ".join(sorted(classes))
    if not allow_import:
        raise ValueError(f"unknown workload {shown(name)}; valid: {valid}")
    if ":" not in name:
        raise ValueError(f"unknown workload {shown(name)}; valid: {valid}, or 'module:Class'")
    module, _, attribute = name.partition(":")
    try:
        found = getattr(importlib.import_module(module), attribute)
    except (Exception, SystemExit) as error:  # ImportError, AttributeError, or whatever the module's code raises
        raise ValueError(f"cannot load workload {shown(name)}: {type(error).__name__}: {error}") from None
    return _checked(name, found)


def _checked(name: str, found: Any) -> type[Workload]:
    """`found` if it is a concrete `Workload` subclass that sets the class attributes and has a `WorkloadConfig`."""
    if not (isinstance(found, type) and issubclass(found, Workload)):
        raise ValueError(f"workload {shown(name)} is {shown(found)}, not a koala.workloads.Workload subclass")
    if inspect.isabstract(found):
        methods = ", ".join(sorted(getattr(found, "__abstractmethods__", ())))
        raise ValueError(
            f"workload {shown(name)} is the abstract class {found.__qualname__} (does not implement {methods})"
        )
    unset = [
        attribute
        for attribute in ("name", "description", "metric")
        if not isinstance(getattr(found, attribute, None), str)
    ]
    if unset:
        raise ValueError(f"workload {shown(name)}: the class {found.__qualname__} does not set {', '.join(unset)}")
    if getattr(found, "mode", None) not in ("max", "min"):
        mode = shown(getattr(found, "mode", None))
        raise ValueError(f"workload {shown(name)}: {found.__qualname__}: mode must be 'max' or 'min', got {mode}")
    config = getattr(found, "Config", None)
    if not (isinstance(config, type) and issubclass(config, WorkloadConfig)):
        raise ValueError(f"workload {shown(name)}: its Config is {shown(config)}, not a WorkloadConfig subclass")
    return found


def get(name: str, **config: Any) -> Workload:
    """Build workload `name` with config overrides. Raises ValueError for unknown names or config keys."""
    cls = workload_class(name)
    return cls(cls.Config.from_mapping(name, config))


__all__ = [
    "Batch",
    "Range",
    "Workload",
    "WorkloadConfig",
    "get",
    "model_device",
    "names",
    "registry",
    "workload_class",
]
