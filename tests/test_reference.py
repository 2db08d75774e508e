"""Both library paths against an independent float64 implementation of docs/method.md, step by step.

The reference below is written from the specification in the two-call form of the official code (predict; forward
and backward at the predicted weights; update), with the official covariance update P - P H P^T. The library runs the
one-call form `step()`. Contract item 12: losses, posterior weights, covariance, R and qx agree to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from koala import KoalaM, KoalaV

STEPS = 60
LR_CHANGE_AT = 30
THRESHOLD = 1e-9


class ReferenceKoalaV:
    """KOALA-V as in docs/method.md "KOALA-V" (layer-wise form, official departures D1-D4, D6, D7)."""

    def __init__(self, weights: list[Tensor], weight_decay: float) -> None:
        self.x = [w.detach().clone() for w in weights]
        self.lam = weight_decay
        self.s = 0.1
        self.q = 1.0
        self.r = 1.0

    def predict(self) -> None:
        self.s += self.q

    def update(self, loss: float, second_moment: float, grads: list[Tensor | None], lr: float) -> None:
        self.r = 0.9 * self.r + 0.1 * second_moment
        ratios = []
        for b, g in enumerate(grads):
            if g is None or g.norm() < THRESHOLD:
                continue
            x = self.x[b]
            a = g + self.lam * x
            big_g = float(a.norm() ** 2)
            innovation = self.s * big_g + self.r
            gap = lr * (loss + 0.5 * self.lam * float(x.norm() ** 2))
            self.x[b] = x - self.s * gap / innovation * g
            ratios.append(big_g / innovation)
        self.s -= self.s**2 * max(ratios)

    def posterior(self) -> list[Tensor]:
        return self.x

    def visible(self) -> list[Tensor]:
        return self.x


class ReferenceKoalaM:
    """KOALA-M as the normative form of docs/method.md "KOALA-M" (Algorithm 2 with the official lines)."""

    def __init__(self, weights: list[Tensor], weight_decay: float) -> None:
        self.x = [w.detach().clone() for w in weights]
        self.v = [torch.zeros_like(w) for w in self.x]
        self.avg = [torch.zeros_like(w) for w in self.x]
        self.lam = weight_decay
        self.kappa = 0.9
        self.P = torch.tensor([[0.1, 0.0], [0.0, 0.1]], dtype=torch.float64)
        self.F = torch.tensor([[1.0, 1.0], [0.0, self.kappa]], dtype=torch.float64)
        self.qx = 1e-2
        self.qv = 1e-2
        self.r = 1.0
        self.n = sum(w.numel() for w in self.x)

    def predict(self) -> None:
        distance = math.sqrt(sum(float((x - a).norm() ** 2) for x, a in zip(self.x, self.avg, strict=True)))
        self.qx = 0.9 * self.qx + 0.1 * distance / self.n
        q = torch.diag(torch.tensor([self.qx, self.qv], dtype=torch.float64))
        for b in range(len(self.x)):
            self.x[b] = self.x[b] + self.v[b]
            self.v[b] = self.kappa * self.v[b]
        self.P = self.F @ self.P @ self.F.T + q

    def update(self, loss: float, second_moment: float, grads: list[Tensor | None], lr: float) -> None:
        self.r = 0.9 * self.r + 0.1 * second_moment
        ratios = []
        for b, g in enumerate(grads):
            if g is None or g.norm() < THRESHOLD:
                continue
            x = self.x[b]
            a = g + self.lam * x
            big_g = float(a.norm() ** 2)
            innovation = float(self.P[0, 0]) * big_g + self.r
            gap = lr * (loss + 0.5 * self.lam * float(x.norm() ** 2))
            self.x[b] = x - float(self.P[0, 0]) * gap / innovation * a
            self.v[b] = self.v[b] - float(self.P[1, 0]) * gap / innovation * a
            self.avg[b] = 0.9 * self.avg[b] + 0.1 * self.x[b]
            ratios.append(big_g / innovation)
        h = torch.tensor([[max(ratios), 0.0], [0.0, 0.0]], dtype=torch.float64)
        self.P = self.P - self.P @ h @ self.P.T

    def posterior(self) -> list[Tensor]:
        return self.x

    def visible(self) -> list[Tensor]:
        # After step() the library shows x^_{k+1} = x_k + p_k, the reference's next predict without its covariance.
        return [x + v for x, v in zip(self.x, self.v, strict=True)]


# ---- problems: per-sample losses as a function of a weight list ---------------------------------------------------

LossFn = Callable[[list[Tensor], int], Tensor]


def linear_regression() -> tuple[list[Tensor], LossFn]:
    gen = torch.Generator().manual_seed(0)
    features = torch.randn(512, 8, generator=gen, dtype=torch.float64)
    truth = torch.randn(8, generator=gen, dtype=torch.float64)
    targets = features @ truth + 0.3 * torch.randn(512, generator=gen, dtype=torch.float64)
    weights = [torch.zeros(8, dtype=torch.float64), torch.zeros((), dtype=torch.float64)]

    def losses(w: list[Tensor], k: int) -> Tensor:
        idx = torch.arange(32 * k, 32 * k + 32) % 512
        return 0.5 * (features[idx] @ w[0] + w[1] - targets[idx]) ** 2  # (B,)

    return weights, losses


def mlp_with_intermittent_head() -> tuple[list[Tensor], LossFn]:
    """A 2-layer MLP plus an auxiliary head used on even steps only: it has no gradient on odd steps."""
    gen = torch.Generator().manual_seed(1)
    inputs = torch.randn(256, 6, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 3, (256,), generator=gen)

    def init(*shape: int) -> Tensor:
        return torch.randn(*shape, generator=gen, dtype=torch.float64) / math.sqrt(shape[-1])

    weights = [init(16, 6), torch.zeros(16, dtype=torch.float64), init(3, 16), torch.zeros(3, dtype=torch.float64)]
    weights.append(init(3, 16))  # auxiliary head

    def losses(w: list[Tensor], k: int) -> Tensor:
        idx = torch.arange(16 * k, 16 * k + 16) % 256
        hidden = torch.tanh(inputs[idx] @ w[0].T + w[1])  # (B, 16)
        logits = hidden @ w[2].T + w[3]  # (B, 3)
        if k % 2 == 0:
            logits = logits + 0.5 * hidden @ w[4].T
        return torch.nn.functional.cross_entropy(logits, labels[idx], reduction="none")

    return weights, losses


def _losses_and_grads(fn: LossFn, weights: list[Tensor], k: int) -> tuple[Tensor, list[Tensor | None]]:
    leaves = [w.detach().clone().requires_grad_(True) for w in weights]
    losses = fn(leaves, k)
    grads = torch.autograd.grad(losses.mean(), leaves, allow_unused=True)
    return losses.detach(), list(grads)


# The constructor arguments that choose each path on the CPU.
PATHS = {"single": {"foreach": False}, "foreach": {"foreach": True, "fused": False}, "fused": {"fused": True}}


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("variant", ["V", "M"])
@pytest.mark.parametrize(
    ("problem", "weight_decay"), [(linear_regression, 0.0), (mlp_with_intermittent_head, 5e-3)], ids=["linreg", "mlp"]
)
def test_matches_reference_step_by_step(
    problem: Callable[[], tuple[list[Tensor], LossFn]],
    weight_decay: float,
    variant: str,
    path: str,
) -> None:
    """All three implementations: the loop, foreach kernels, and the fused CPU kernels of the multi-tensor path."""
    initial, loss_fn = problem()
    reference = (ReferenceKoalaV if variant == "V" else ReferenceKoalaM)(initial, weight_decay)
    params = [torch.nn.Parameter(w.clone()) for w in initial]
    opt = (KoalaV if variant == "V" else KoalaM)(params, weight_decay=weight_decay, **PATHS[path])
    saw_missing_grad = False
    for k in range(STEPS):
        lr = 1.0 if k < LR_CHANGE_AT else 0.4
        for group in opt.param_groups:
            group["lr"] = lr
        # Reference: predict, then forward/backward at its predicted weights, then update.
        reference.predict()
        ref_losses, ref_grads = _losses_and_grads(loss_fn, reference.x, k)
        reference.update(float(ref_losses.mean()), float((ref_losses**2).mean()), ref_grads, lr)
        # Library: forward/backward at the visible weights, then one step.
        losses = loss_fn(list(params), k)
        opt.zero_grad(set_to_none=True)
        losses.mean().backward()
        saw_missing_grad |= any(p.grad is None for p in params)
        opt.step(loss=losses)

        torch.testing.assert_close(losses.detach(), ref_losses, rtol=1e-9, atol=1e-12)
        for p, expected in zip(params, reference.visible(), strict=True):
            torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-12)
        opt.eval()
        for p, expected in zip(params, reference.posterior(), strict=True):
            torch.testing.assert_close(p.detach(), expected, rtol=1e-9, atol=1e-12)
        opt.train()
        state = opt.state[params[0]]
        torch.testing.assert_close(float(state["measurement_noise"]), reference.r, rtol=1e-11, atol=0)
        if variant == "M":
            assert isinstance(reference, ReferenceKoalaM)
            # The library's state is already predicted for the next step: compare with the reference's next prior.
            distance = math.sqrt(
                sum(float((x - a).norm() ** 2) for x, a in zip(reference.x, reference.avg, strict=True))
            )
            next_qx = 0.9 * reference.qx + 0.1 * distance / reference.n
            next_prior = reference.F @ reference.P @ reference.F.T + torch.diag(
                torch.tensor([next_qx, reference.qv], dtype=torch.float64)
            )
            torch.testing.assert_close(state["covariance"], next_prior, rtol=1e-9, atol=1e-15)
            torch.testing.assert_close(float(state["process_noise"]), next_qx, rtol=1e-9, atol=0)
        else:
            assert isinstance(reference, ReferenceKoalaV)
            torch.testing.assert_close(float(state["covariance"]), reference.s + reference.q, rtol=1e-11, atol=0)
    assert float(opt.state[params[0]]["step"]) == STEPS
    assert opt._path(opt._blocks()).name == path  # each path ran as named
    if problem is mlp_with_intermittent_head:
        assert saw_missing_grad
