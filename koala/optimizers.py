"""The optimizer registry: `create(name, params, **hyperparams)` and `names()`.

Every comparison builds its optimizers here, so KOALA and the baselines are created the same way and unknown names
or hyperparameters fail early with the list of what is valid.
"""

from __future__ import annotations

import importlib.util
import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.optimizer import ParamsT

from koala.optim import KoalaM, KoalaV


@dataclass(frozen=True)
class OptimizerSpec:
    """A registered optimizer: how to build it, its default hyperparameters and the ones a user may set."""

    name: str
    factory: Callable[..., torch.optim.Optimizer]
    description: str
    defaults: Mapping[str, Any] = field(default_factory=dict)

    def hyperparameters(self) -> dict[str, Any]:
        """Settable hyperparameters with their defaults (the registry's defaults over the class's)."""
        signature = inspect.signature(self.factory)
        values = {
            name: param.default
            for name, param in signature.parameters.items()
            if name != "params" and param.kind is not inspect.Parameter.VAR_KEYWORD
        }
        values.update(self.defaults)
        return values

    def annotations(self) -> dict[str, Any]:
        """The declared type of each settable hyperparameter (for checking values a user sends)."""
        signature = inspect.signature(self.factory, eval_str=True)
        declared = signature.parameters
        return {name: declared[name].annotation if name in declared else Any for name in self.hyperparameters()}


_REGISTRY: dict[str, OptimizerSpec] = {}


def register(spec: OptimizerSpec) -> None:
    """Add an optimizer; a second registration under the same name is an error."""
    if spec.name in _REGISTRY:
        raise ValueError(f"optimizer {spec.name!r} is already registered")
    _REGISTRY[spec.name] = spec


def names() -> list[str]:
    """Registered optimizer names, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> OptimizerSpec:
    """The spec of a registered optimizer. Raises ValueError listing the valid names."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown optimizer {name!r}; valid names: {', '.join(names())}") from None


def create(name: str, params: ParamsT, **hyperparams: Any) -> torch.optim.Optimizer:
    """Build optimizer `name` over `params`. Raises ValueError for unknown names or hyperparameters."""
    spec = get(name)
    valid = spec.hyperparameters()
    unknown = sorted(set(hyperparams) - set(valid))
    if unknown:
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(unknown)} for optimizer {name!r}; valid: {', '.join(sorted(valid))}"
        )
    return spec.factory(params, **{**spec.defaults, **hyperparams})


def _sgd(
    params: ParamsT,
    lr: float = 0.1,
    momentum: float = 0.0,
    dampening: float = 0.0,
    nesterov: bool = False,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    # torch.optim.SGD's own parameter names and defaults, so a torch user's settings carry over unchanged.
    return torch.optim.SGD(
        params, lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay
    )


def _momentum(
    params: ParamsT, lr: float = 0.1, momentum: float = 0.9, nesterov: bool = False, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=nesterov, weight_decay=weight_decay)


def _adam(
    params: ParamsT,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    return torch.optim.Adam(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)


def _adamw(
    params: ParamsT,
    lr: float = 1e-3,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-2,
) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=lr, betas=(beta1, beta2), eps=eps, weight_decay=weight_decay)


register(OptimizerSpec("koala-v", KoalaV, "KOALA-V: Kalman filter over the weights (hyperparameter-free)"))
register(OptimizerSpec("koala-m", KoalaM, "KOALA-M: Kalman filter over weights and velocities (hyperparameter-free)"))
register(OptimizerSpec("sgd", _sgd, "SGD as torch.optim.SGD (plain by default; momentum, dampening, nesterov)"))
register(OptimizerSpec("momentum", _momentum, "SGD with (heavy-ball or Nesterov) momentum"))
register(OptimizerSpec("adam", _adam, "Adam (Kingma and Ba)"))
register(OptimizerSpec("adamw", _adamw, "AdamW, decoupled weight decay (Loshchilov and Hutter)"))


# ---- hyperparameter-free anchors, registered when the `anchors` extra is installed -----------------------------------


def _prodigy(
    params: ParamsT,
    lr: float = 1.0,
    beta1: float = 0.9,
    beta2: float = 0.999,
    weight_decay: float = 0.0,
    d_coef: float = 1.0,
    safeguard_warmup: bool = False,
) -> torch.optim.Optimizer:
    from prodigyopt import Prodigy

    return Prodigy(  # type: ignore[no-any-return]
        params,
        lr=lr,
        betas=(beta1, beta2),
        weight_decay=weight_decay,
        d_coef=d_coef,
        safeguard_warmup=safeguard_warmup,
    )


def _schedule_free_adamw(
    params: ParamsT,
    lr: float = 0.0025,
    beta1: float = 0.9,
    beta2: float = 0.999,
    weight_decay: float = 0.0,
    warmup_steps: int = 0,
) -> torch.optim.Optimizer:
    from schedulefree import AdamWScheduleFree

    optimizer = AdamWScheduleFree(
        params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay, warmup_steps=warmup_steps
    )
    optimizer.train()  # Schedule-Free starts in eval mode; the training loop switches through train()/eval()
    return optimizer  # type: ignore[no-any-return]


def _dadapt_adam(
    params: ParamsT, lr: float = 1.0, beta1: float = 0.9, beta2: float = 0.999, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    from dadaptation import DAdaptAdam

    return DAdaptAdam(params, lr=lr, betas=(beta1, beta2), weight_decay=weight_decay)  # type: ignore[no-any-return]


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


if _installed("prodigyopt"):
    register(OptimizerSpec("prodigy", _prodigy, "Prodigy: D-Adaptation with a Prodigy step-size estimate (lr=1)"))
if _installed("schedulefree"):
    register(OptimizerSpec("schedule-free-adamw", _schedule_free_adamw, "Schedule-Free AdamW (Defazio et al.)"))
if _installed("dadaptation"):
    register(OptimizerSpec("dadapt-adam", _dadapt_adam, "D-Adaptation Adam (Defazio and Mishchenko)"))


# ---- KOALA beyond the paper: the variant the ablations chose, and KOALA++ to compare with ------------------------

from koala.koala_plus_plus import KoalaPlusPlus  # noqa: E402

register(
    OptimizerSpec(
        "koalapp",
        KoalaPlusPlus,
        "KOALA++ (Xia et al., 2025): Kalman filter with gradient-covariance products (comparison baseline)",
    )
)

from koala.koala_diag import KoalaDiag  # noqa: E402

register(
    OptimizerSpec(
        "koala-diag",
        KoalaDiag,
        "KOALA-Diag: KOALA with a diagonal second-moment prior covariance and variance-based R (hyperparameter-free)",
    )
)
