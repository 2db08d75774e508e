"""`KalmanLab`: a readable, option-laden KOALA-V-structured filter for the ablations of bench/ablations.py.

Research code, not a library optimizer: one Python loop over tensors, host-side float64 scalars, no fused path. With
its defaults it is KOALA-V (docs/method.md "KOALA-V", the official departures D1-D4, D6, D7); every option switches
one hypothesis on. The shipped result of the ablations is `koala.KoalaAdam`; this class only measures.

One step (all scalars float64; block b = one parameter tensor):

    l_j      the per-sample losses, per `unit`: "flat" (every element is a sample; per token for sequence models)
             or "leading" (mean over all but the first dimension: per sequence)
    L        mean_j l_j;  T the target: (1 - lr) L for target="zero" (scheme b), or the lower-bound estimate f*
    gap      lr L (scheme b), or lr max(L - f*, 0)
    R        EMA(noise_decay) of mean_j l_j^2 (noise="m2", official D4), mean_j (l_j - T)^2 (noise="target", eq. 49)
             or the sample variance of the l_j (noise="variance")
    D_b      diagonal shape of the prior covariance P = s D: 1 (precondition="none") or 1 / (sqrt(v^_b) + eps) with
             v_b an EMA(beta2) of g_b^2 (precondition="adam"); normalised to mean 1 per tensor or over all tensors
             ("tensor", "global"), or so that mean(1 / D) = 1 ("tensor-rms", "global-rms"), or not at all
    u_b      the direction before D: g_b, or the bias-corrected EMA(beta1) of g_b when beta1 > 0
    G_b      g_b^T D_b g_b  (the measurement Jacobian's norm in the metric of P / s)
    step     x_b -= s gap / S_b * D_b u_b,  S_b = s G_b + R (innovation="block", eq. 27)
                                         or S = s sum_b G_b + R (innovation="global", eq. 12)
    s        s R / (s G* + R), G* = max_b G_b (block) or sum_b G_b (global);  then s <- s / fading + q  (predict;
             fading < 1 is a fading-memory filter: multiplicative covariance inflation)
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

THRESHOLD = 1e-9


class KalmanLab(torch.optim.Optimizer):
    def __init__(
        self,
        params: Any,
        lr: float = 1.0,
        *,
        unit: str = "flat",
        target: str = "zero",
        noise: str = "m2",
        precondition: str = "none",
        normalise: str = "tensor",
        beta1: float = 0.0,
        beta2: float = 0.999,
        eps: float = 1e-8,
        innovation: str = "block",
        initial_covariance: float = 0.1,
        process_noise: float = 1.0,
        process_noise_mode: str = "constant",
        noise_decay: float = 0.9,
        floor_decay: float = 0.9,
        floor_fraction: float = 0.5,
        weight_decay: float = 0.0,
        gain_cap: float = math.inf,
        fading: float = 1.0,
    ) -> None:
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay))
        self.o = dict(
            unit=unit,
            target=target,
            noise=noise,
            precondition=precondition,
            normalise=normalise,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            innovation=innovation,
            s0=initial_covariance,
            q=process_noise,
            q_mode=process_noise_mode,
            noise_decay=noise_decay,
            floor_decay=floor_decay,
            floor_fraction=floor_fraction,
            gain_cap=gain_cap,
            fading=fading,
        )
        self.f: dict[str, float] = {}  # filter scalars
        self.trace: list[dict[str, float]] | None = None

    def _params(self) -> list[tuple[Tensor, float, float]]:
        return [(p, g["lr"], g["weight_decay"]) for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None, *, loss: Any = None) -> Any:  # type: ignore[override]
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        o, f = self.o, self.f
        values = self._samples(loss)
        big_l = float(values.mean())
        params = self._params()
        if not params or not math.isfinite(big_l):
            return loss
        if not f:
            f.update(s=o["s0"] + o["q"], r=1.0, t=0.0, fstar=0.0, smooth=big_l, low=big_l, qx=o["q"])
        lr = params[0][1]
        f["t"] += 1
        target, gap = self._target_and_gap(lr, big_l)
        f["r"] = o["noise_decay"] * f["r"] + (1 - o["noise_decay"]) * self._measured_noise(values, target)
        r = max(f["r"], 1e-30)
        shapes, dirs, grads = self._directions(params, f["t"])
        big_gs = [float((g * d * g).sum()) for g, d in zip(grads, shapes, strict=True)]
        updated = [float(p.grad.norm()) >= THRESHOLD for p, _, _ in params]
        if not any(updated):
            return loss
        g_star, decrease, rms = self._update(params, (shapes, dirs, grads), big_gs, updated, gap, r)
        self._update_floor(big_l, decrease)
        self._predict(r, g_star)
        if self.trace is not None:
            self.trace.append(
                dict(
                    t=f["t"],
                    L=big_l,
                    gap=gap,
                    R=r,
                    s=f["s"],
                    G=g_star,
                    Gsum=sum(big_gs),
                    fstar=f["fstar"],
                    decrease=decrease,
                    var=float(values.var()) if values.numel() > 1 else 0.0,
                    rms_min=min(rms),
                    rms_max=max(rms),
                )
            )
        return loss

    def _samples(self, loss: Any) -> Tensor:
        """The per-sample losses l_j, flat, per `unit`."""
        values = torch.as_tensor(loss).detach().to(torch.float64)
        if self.o["unit"] == "leading" and values.dim() > 1:
            values = values.reshape(values.shape[0], -1).mean(1)
        return values.reshape(-1)

    def _target_and_gap(self, lr: float, big_l: float) -> tuple[float, float]:
        if self.o["target"] == "zero":
            return (1 - lr) * big_l, lr * big_l
        target = self.f["fstar"]
        return target, lr * max(big_l - target, 0.0)

    def _measured_noise(self, values: Tensor, target: float) -> float:
        noise = self.o["noise"]
        if noise == "m2":
            return float(values.square().mean())
        if noise == "target":
            return float((values - target).square().mean())
        if noise == "variance":
            return float(values.var()) if values.numel() > 1 else 0.0
        if noise == "mean-noise":  # the variance of the minibatch mean, var / B
            return float(values.var()) / values.numel() if values.numel() > 1 else 0.0
        raise ValueError(noise)

    def _directions(
        self, params: list[tuple[Tensor, float, float]], t: float
    ) -> tuple[list[Tensor], list[Tensor], list[Tensor]]:
        """Per block: the normalised diagonal shape D_b, the direction u_b and the (decayed) gradient g_b."""
        o = self.o
        beta1, beta2 = o["beta1"], o["beta2"]
        shapes, dirs, grads = [], [], []
        for p, _, lam in params:
            g = p.grad.to(torch.float64)
            if lam:
                g = g + lam * p.to(torch.float64)
            state = self.state[p]
            if o["precondition"] == "adam":
                v = state.setdefault("v", torch.zeros_like(p, dtype=torch.float64))
                v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
                d = 1 / ((v / (1 - beta2**t)).sqrt() + o["eps"])
            elif o["precondition"] == "none":
                d = torch.ones_like(g)
            else:
                raise ValueError(o["precondition"])
            if beta1 > 0:
                m = state.setdefault("m", torch.zeros_like(p, dtype=torch.float64))
                m.mul_(beta1).add_(g, alpha=1 - beta1)
                u = m / (1 - beta1**t)
            else:
                u = g
            shapes.append(d)
            dirs.append(u)
            grads.append(g)
        return self._normalised(shapes), dirs, grads

    def _normalised(self, shapes: list[Tensor]) -> list[Tensor]:
        how = self.o["normalise"]
        if how == "tensor":
            return [d / d.mean() for d in shapes]
        if how == "global":
            mean = sum(float(d.sum()) for d in shapes) / sum(d.numel() for d in shapes)
            return [d / mean for d in shapes]
        if how == "tensor-rms":  # mean(1 / D_b) = 1: robust to entries that never see a gradient
            return [d * (1 / d).mean() for d in shapes]
        if how == "global-rms":
            mean = sum(float((1 / d).sum()) for d in shapes) / sum(d.numel() for d in shapes)
            return [d * mean for d in shapes]
        if how != "none":
            raise ValueError(how)
        return shapes

    def _update(
        self,
        params: list[tuple[Tensor, float, float]],
        blocks: tuple[list[Tensor], list[Tensor], list[Tensor]],
        big_gs: list[float],
        updated: list[bool],
        gap: float,
        r: float,
    ) -> tuple[float, float, list[float]]:
        """Move every updated block by its gain; returns G*, the linear model's decrease and the steps' RMS."""
        o, s, lr = self.o, self.f["s"], params[0][1]
        if o["innovation"] == "block":
            innovations = [s * gb + r for gb in big_gs]
            g_star = max(gb for gb, u in zip(big_gs, updated, strict=True) if u)
        else:
            total = sum(gb for gb, u in zip(big_gs, updated, strict=True) if u)
            innovations = [s * total + r] * len(big_gs)
            g_star = total
        decrease = 0.0
        rms: list[float] = []
        for (p, _, lam), d, u, g, inn, up in zip(params, *blocks, innovations, updated, strict=True):
            if not up:
                continue
            l2 = 0.5 * lam * float(p.to(torch.float64).square().sum()) if lam else 0.0
            block_gap = gap + lr * l2 if o["target"] == "zero" else gap
            gain = min(s * block_gap / inn, o["gain_cap"])
            delta = gain * d * u
            decrease += float((delta * g).sum())
            if self.trace is not None:
                rms.append(float(delta.square().mean().sqrt()))
            p.sub_(delta.to(p.dtype))
        return g_star, decrease, rms

    def _update_floor(self, big_l: float, decrease: float) -> None:
        """The lower-bound estimate of the attainable loss (target != "zero")."""
        o, f = self.o, self.f
        fd = o["floor_decay"]
        f["smooth"] = fd * f["smooth"] + (1 - fd) * big_l
        f["low"] = min(f["low"], f["smooth"])
        if o["target"] == "momo":
            # Schaipp et al. 2023 (MoMo): the lower bound becomes the linear model's value halfway along the step.
            f["fstar"] = max(0.0, f["smooth"] - 0.5 * decrease)
        elif o["target"] == "fraction":
            # A fixed fraction of the lowest smoothed loss so far: a conservative lower bound.
            f["fstar"] = o["floor_fraction"] * f["low"]
        elif o["target"] != "zero":
            raise ValueError(o["target"])

    def _predict(self, r: float, g_star: float) -> None:
        """Covariance update, then predict: s <- s R / (s G* + R) / fading + q."""
        o, f = self.o, self.f
        if o["q_mode"] != "constant":
            raise ValueError(o["q_mode"])
        s = f["s"]
        s = s * r / (s * g_star + r)
        f["s"] = s / o["fading"] + o["q"]
