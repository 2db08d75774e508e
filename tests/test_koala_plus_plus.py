"""KoalaPlusPlus (the KOALA++ comparison baseline) against Algorithm 1 of its paper, written out in float64 here."""

from __future__ import annotations

import copy
import io
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from koala import KoalaPlusPlus, optimizers


class ReferenceKoalaPlusPlus:
    """Algorithm 1 of arXiv 2506.04432 per tensor, with R an EMA of the losses' second moment (R_0 = 1)."""

    def __init__(self, weights: list[Tensor], sigma: float, q: float, lam: float) -> None:
        self.x = [w.detach().to(torch.float64).reshape(-1).clone() for w in weights]
        self.sigma, self.q, self.lam, self.r = sigma, q, lam, 1.0
        self.prev: list[tuple[Tensor, Tensor, float] | None] = [None] * len(weights)  # v, H, S

    def step(self, losses: Tensor, grads: list[Tensor], lr: float) -> None:
        self.r = 0.9 * self.r + 0.1 * float(losses.to(torch.float64).square().mean())
        big_l = float(losses.to(torch.float64).mean())
        q = self.q
        for b, g in enumerate(grads):
            x = self.x[b]
            h = g.to(torch.float64).reshape(-1) + self.lam * x
            if self.prev[b] is None:
                v0 = self.sigma * h
                self.prev[b] = (v0, h, float(h @ v0 + q * (h @ h) + self.r))
            v_prev, h_prev, s_prev = self.prev[b]  # type: ignore[misc]
            norm_sq = float(h_prev @ h_prev)
            alpha = float(h @ h_prev) / norm_sq
            lam_k = float(h @ (v_prev + q * h_prev)) / s_prev
            w = (float(h @ v_prev) * norm_sq - float(h_prev @ v_prev) * float(h @ h_prev)) / norm_sq**2
            v = (alpha - lam_k) * v_prev + (h - lam_k * h_prev) * q + w * h_prev
            s = float(h @ v + q * (h @ h)) + self.r
            gap = lr * (big_l + 0.5 * self.lam * float(x @ x))
            self.x[b] = x - gap / s * (v + q * h)
            self.prev[b] = (v, h, s)


def make_model(dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)


def losses_at(model: nn.Module, k: int) -> Tensor:
    gen = torch.Generator().manual_seed(k)
    dtype = next(model.parameters()).dtype
    x = torch.randn(16, 5, generator=gen, dtype=dtype)
    y = torch.randint(0, 3, (16,), generator=gen)
    return nn.functional.cross_entropy(model(x), y, reduction="none")


@pytest.mark.parametrize(("sigma", "q", "lam"), [(0.1, 0.1, 0.0), (1.0, 1.0, 1e-3)])
def test_matches_algorithm_1(sigma: float, q: float, lam: float) -> None:
    model = make_model()
    params = list(model.parameters())
    opt = KoalaPlusPlus(params, sigma=sigma, q=q, weight_decay=lam)
    reference = ReferenceKoalaPlusPlus(params, sigma, q, lam)
    for k in range(25):
        losses = losses_at(model, k)
        opt.zero_grad()
        losses.mean().backward()
        grads = [p.grad.clone() for p in params]  # type: ignore[union-attr]
        opt.step(loss=losses.detach())
        reference.step(losses.detach(), grads, lr=1.0)
        for p, x in zip(params, reference.x, strict=True):
            torch.testing.assert_close(p.detach().reshape(-1), x, rtol=1e-9, atol=1e-12)


def test_state_dict_round_trip_and_copy() -> None:
    def run(model: nn.Module, opt: Any, start: int, steps: int) -> list[float]:
        values = []
        for k in range(start, start + steps):
            losses = losses_at(model, k)
            opt.zero_grad()
            losses.mean().backward()
            opt.step(loss=losses.detach())
            values.append(float(losses.detach().mean()))
        return values

    model = make_model(torch.float32)
    opt = KoalaPlusPlus(model.parameters())
    expected = run(model, opt, 0, 8)
    model = make_model(torch.float32)
    opt = KoalaPlusPlus(model.parameters())
    first = run(model, opt, 0, 4)
    twin_model, twin = copy.deepcopy((model, opt))
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    fresh = KoalaPlusPlus(model.parameters())
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert first + run(model, fresh, 4, 4) == expected
    assert first + run(twin_model, twin, 4, 4) == expected


def test_tiny_gradient_block_is_left_alone_and_registry() -> None:
    model = make_model()
    opt = optimizers.create("koalapp", model.parameters())
    assert isinstance(opt, KoalaPlusPlus)
    assert opt.sigma == 0.1
    assert opt.q == 0.1
    losses = losses_at(model, 0)
    losses.mean().backward()
    first = next(model.parameters())
    first.grad.zero_()  # type: ignore[union-attr]
    before = first.detach().clone()
    opt.step(loss=losses.detach())
    assert torch.equal(first, before)
    assert float(opt.state[first]["started"]) == 0
