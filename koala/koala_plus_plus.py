"""`KoalaPlusPlus`: KOALA++ (Xia, Davtyan and Favaro, NeurIPS 2025, arXiv 2506.04432), a comparison baseline.

Written from the paper's Algorithm 1 and checked against the behaviour of the authors' code (Sumxiaa/KOALA_Plus_Plus,
Task1_Image_Classification/koalap.py): per parameter tensor (block) b, with H_k = a_b = g_b + lam x_b the augmented
gradient flattened to a row vector, v the tracked product H P (a row vector), Q and R scalars:

    R_k    = beta_R R_{k-1} + (1 - beta_R) mean_j l_j^2                 (EMA of the losses' second moment, R_0 = 1)
    first step of a block:  v_0 = sigma H_1,  H_0 = H_1,  S_0 = H_0 v_0^T + Q |H_0|^2 + R_1
    alpha  = H_k H_{k-1}^T / |H_{k-1}|^2
    lambda = H_k (v_{k-1} + Q H_{k-1})^T / S_{k-1}
    w      = (H_k v_{k-1}^T) / |H_{k-1}|^2 - (H_{k-1} v_{k-1}^T)(H_k H_{k-1}^T) / |H_{k-1}|^4
    v_k    = (alpha - lambda) v_{k-1} + Q (H_k - lambda H_{k-1}) + w H_{k-1}
    S_k    = H_k (v_k + Q H_k)^T + R_k
    x_b   <- x_b - lr (L + lam/2 |x_b|^2) / S_k * (v_k + Q H_k)

A block whose raw gradient norm is below 1e-9 is left alone (weights and its v, H, S), as in the authors' code.
The published image-classification configuration (configs/koalapCNN.yaml) is sigma = q = 0.1, lr = 1; the class
defaults of the authors' code are sigma = q = 1. This implementation uses the first as its defaults.

Usage is KOALA's: `opt.step(loss=per_sample_losses)` after backward, or `opt.step(closure)`. The state (v, H, S per
tensor, R) is kept in each parameter's dtype, so `load_state_dict` restores it exactly; the arithmetic runs in
float64. The skip is a mask, so `step()` does not synchronise with the device. It is a plain loop over tensors (a
baseline to compare against, not tuned for speed).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor
from torch.optim.optimizer import ParamsT

THRESHOLD = 1e-9
NOISE = "measurement_noise"


class KoalaPlusPlus(torch.optim.Optimizer):
    """KOALA++ with per-tensor gradient-covariance products (see the module docstring for the equations).

    Args:
        params: parameters or parameter groups (per-group `lr` and `weight_decay` are honoured).
        lr: the target scale eps of KOALA's scheme (b) (default 1.0); a float or a 1-element tensor.
        sigma: the initial covariance scale, v_0 = sigma H_1 (default 0.1).
        q: the process noise Q (default 0.1).
        measurement_noise: a fixed R > 0, or None (default) for the adaptive EMA of the losses' second moment.
        noise_decay: beta_R (default 0.9).
        weight_decay: lam, coupled L2 (default 0).
    """

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        *,
        sigma: float = 0.1,
        q: float = 0.1,
        measurement_noise: float | None = None,
        noise_decay: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        lr_value: Any = lr
        if isinstance(lr, Tensor):  # a 1-element tensor, as torch's optimizers take it (an LR scheduler fills it)
            if lr.numel() != 1:
                raise ValueError("Tensor lr must be 1-element")
            lr_value = lr.item()
        for name, value in (("lr", lr_value), ("sigma", sigma), ("q", q), ("weight_decay", weight_decay)):
            if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                raise ValueError(f"Invalid {name}: {value!r} (expected a finite number >= 0)")
        if measurement_noise is not None and not measurement_noise > 0:
            raise ValueError(f"Invalid measurement_noise: {measurement_noise!r} (expected > 0 or None)")
        if not 0 <= noise_decay <= 1:
            raise ValueError(f"Invalid noise_decay: {noise_decay!r} (expected in [0, 1])")
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.sigma = sigma
        self.q = q
        self.measurement_noise = measurement_noise
        self.noise_decay = noise_decay

    def __getstate__(self) -> dict[str, Any]:
        kept = super().__getstate__()
        kept.update(sigma=self.sigma, q=self.q, measurement_noise=self.measurement_noise, noise_decay=self.noise_decay)
        return kept

    @torch.no_grad()
    def step(self, closure: Callable[[], Tensor | float] | None = None, *, loss: Tensor | float | None = None) -> Any:
        """One KOALA++ update with this minibatch's (per-sample, unscaled) losses; returns the loss as given."""
        if (closure is None) == (loss is None):
            raise TypeError("KoalaPlusPlus.step() needs exactly one of closure and loss (the per-sample losses)")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        if isinstance(loss, numbers.Real) and not isinstance(loss, bool):
            values = torch.tensor(float(loss), dtype=torch.float64)
        elif isinstance(loss, Tensor) and loss.is_floating_point() and loss.numel() > 0:
            values = loss.detach().reshape(-1)
        else:
            raise TypeError(f"KoalaPlusPlus.step() needs the losses as a float tensor or a number, got {loss!r}")
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return loss
        first = self.param_groups[0]["params"][0]
        device = first.device
        values = values.to(device, torch.float64)
        big_l, m2 = values.mean(), values.square().mean()
        head = self.state[first]
        # The state is kept in each parameter's dtype (so `load_state_dict`, which casts to it, restores it exactly);
        # the arithmetic runs in float64.
        noise = head.get(NOISE, torch.ones((), dtype=first.dtype, device=device)).to(torch.float64)
        if self.measurement_noise is None:
            noise = self.noise_decay * noise + (1 - self.noise_decay) * m2
            head[NOISE] = noise.to(first.dtype)
            r = head[NOISE].to(torch.float64)
        else:
            r = torch.tensor(self.measurement_noise, dtype=torch.float64, device=device)
        q = self.q
        for group in self.param_groups:
            lr, lam = group["lr"], group["weight_decay"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                grad = p.grad.reshape(-1).to(torch.float64)
                flat = p.detach().reshape(-1).to(torch.float64)
                h = grad + lam * flat if lam else grad
                ok = torch.linalg.vector_norm(grad) >= THRESHOLD
                hh = h.dot(h)
                # A block's first accepted step starts from v_0 = sigma H, H_0 = H, S_0 = (sigma + Q) |H|^2 + R.
                fresh_s = (self.sigma + q) * hh + r
                if "v" not in state:
                    state["v"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["h"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
                    state["s"] = torch.zeros((), dtype=p.dtype, device=p.device)
                    state["started"] = torch.zeros((), dtype=p.dtype, device=p.device)  # 0 or 1
                started = state["started"] > 0
                v_prev = torch.where(started, state["v"].reshape(-1).to(torch.float64), self.sigma * h)
                h_prev = torch.where(started, state["h"].reshape(-1).to(torch.float64), h)
                s_prev = torch.where(started, state["s"].to(torch.float64), fresh_s)
                xx = h_prev.dot(h_prev)
                xy = h_prev.dot(v_prev)
                h_hp = h.dot(h_prev)
                h_vp = h.dot(v_prev)
                safe_xx = torch.where(xx > 0, xx, 1.0)
                lam_k = (h_vp + q * h_hp) / s_prev
                alpha = h_hp / safe_xx
                w = h_vp / safe_xx - h_hp * xy / safe_xx.square()
                v = (alpha - lam_k) * v_prev + q * (h - lam_k * h_prev) + w * h_prev
                direction = v + q * h
                s = direction.dot(h) + r
                gap = lr * (big_l + (0.5 * lam * flat.dot(flat) if lam else 0.0))
                coefficient = torch.where(ok, gap / s, 0.0)
                p.sub_((coefficient * direction).reshape(p.shape).to(p.dtype))
                state["v"].copy_(torch.where(ok, v, v_prev).reshape(p.shape))
                state["h"].copy_(torch.where(ok, h, h_prev).reshape(p.shape))
                state["s"].copy_(torch.where(ok, s, s_prev))
                state["started"].copy_((started | ok).to(p.dtype))
        return loss


__all__ = ["KoalaPlusPlus"]
