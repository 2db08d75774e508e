"""The optimizer registry (`koala.optimizers`): names, hyperparameters with their declared types, construction,
and the closure protocol every registered optimizer follows."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from koala import KoalaM, optimizers
from service.jobspec import JobSpec
from tests.optimizer_cases import per_sample_loss, regression_batch, regression_model


def test_registry_names_and_create() -> None:
    assert {"koala-v", "koala-m", "sgd", "momentum", "adam", "adamw"} <= set(optimizers.names())
    model = regression_model()
    assert isinstance(optimizers.create("koala-m", model.parameters()), KoalaM)
    sgd = optimizers.create("momentum", model.parameters(), lr=0.05)
    assert isinstance(sgd, torch.optim.SGD)
    assert sgd.param_groups[0]["momentum"] == 0.9
    adam = optimizers.create("adam", model.parameters(), beta2=0.99)
    assert adam.param_groups[0]["betas"] == (0.9, 0.99)
    assert optimizers.get("koala-v").hyperparameters()["lr"] == 1.0


def test_registry_rejects_unknown_names_and_hyperparameters() -> None:
    with pytest.raises(ValueError, match=r"unknown optimizer 'lion'; valid names: adam, adamw, .*koala-m, koala-v"):
        optimizers.create("lion", regression_model().parameters())
    with pytest.raises(
        ValueError, match=r"unknown hyperparameter\(s\) betas for optimizer 'koala-m'; valid: .*momentum"
    ):
        optimizers.create("koala-m", regression_model().parameters(), betas=(0.9, 0.9))
    with pytest.raises(ValueError, match="already registered"):
        optimizers.register(optimizers.get("sgd"))


def test_every_registered_optimizer_steps_with_a_closure() -> None:
    """The closure protocol works for every registered optimizer, KOALA included (it returns per-sample losses)."""
    x, y = regression_batch(0)
    for name in optimizers.names():
        model = regression_model()
        opt = optimizers.create(name, model.parameters())

        def closure(model: nn.Module = model, opt: torch.optim.Optimizer = opt) -> torch.Tensor:
            opt.zero_grad()
            losses = per_sample_loss(model, x, y)
            losses.mean().backward()
            return losses

        before = [p.detach().clone() for p in model.parameters()]
        opt.step(closure)
        assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), before, strict=True)), name


def test_sgd_takes_torch_parameter_names() -> None:
    """A torch user's SGD settings carry over: momentum, dampening and nesterov as torch.optim.SGD names them."""
    params = {"lr": 0.05, "momentum": 0.9, "nesterov": True, "dampening": 0.0}
    spec = JobSpec.parse({"workload": "digits-mlp", "optimizers": [{"name": "sgd", "params": params}]})
    assert spec.optimizers[0].params["momentum"] == 0.9
    built = optimizers.create("sgd", [torch.nn.Parameter(torch.zeros(2))], **params)
    assert (built.defaults["momentum"], built.defaults["nesterov"]) == (0.9, True)
    assert optimizers.create("sgd", [torch.nn.Parameter(torch.zeros(2))]).defaults["momentum"] == 0.0  # plain SGD
