"""Optimizer step time: KOALA against fused Adam, fused SGD-momentum and a per-tensor reference loop.

    python bench/optimizer_step.py [--device cpu|cuda] [--repeats N] [--json PATH]

KOALA's multi-tensor path runs fused kernels (Numba on the CPU, Triton on CUDA); the "torch ops" rows run the same
path through `torch._foreach_*` alone (`fused=False`).

Parameters come from shapes alone (random weights with random `.grad`), so only `step()` is timed. All optimizers of
a parameter set run in one process and are timed round-robin, one step each per round, so that machine noise hits
them equally; the median over rounds is reported. A plain `dst.copy_(src)` (and an in-place `add_`) of the same total
size run in the same rotation and give the bandwidth this machine reaches at that size.

Also checked: KOALA's multi-tensor path on the device against the single-tensor loop on the CPU in float64 (on the
CPU this is the foreach-vs-loop parity), and on CUDA one step of each under `torch.cuda.set_sync_debug_mode("error")`.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

try:
    from koala import KoalaM, KoalaV
except ImportError:  # a checkout run without installing: the package sits next to bench/
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from koala import KoalaM, KoalaV

Shape = tuple[int, ...]
Step = Callable[[], None]
Builder = Callable[[list[Tensor], Tensor, float], tuple[torch.optim.Optimizer, Step]]

SEED = 0
BATCH = 128  # per-sample losses given to KOALA each step
CHECK_STEPS = 5
CHECK_WEIGHT_DECAY = 5e-4  # the correctness check exercises the weight-decay terms too


# --------------------------------------------------------------------------------------------------------------------
# Parameter sets


@dataclass(frozen=True)
class ParamSet:
    name: str
    description: str
    shapes: list[Shape]

    @property
    def numel(self) -> int:
        return sum(_numel(s) for s in self.shapes)


def _numel(shape: Shape) -> int:
    return math.prod(shape)


def resnet18_cifar() -> ParamSet:
    """CIFAR ResNet-18: 3x3 stem, no max-pool, 4 stages of 2 BasicBlocks, 1x1 conv+BN shortcut on a change."""
    shapes: list[Shape] = [(64, 3, 3, 3), (64,), (64,)]
    in_ch = 64
    for out_ch, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
        for block in range(2):
            s = stride if block == 0 else 1
            # conv1, bn1 (weight, bias), conv2, bn2; convolutions have no bias before BN.
            shapes += [(out_ch, in_ch, 3, 3), (out_ch,), (out_ch,), (out_ch, out_ch, 3, 3), (out_ch,), (out_ch,)]
            if s != 1 or in_ch != out_ch:
                shapes += [(out_ch, in_ch, 1, 1), (out_ch,), (out_ch,)]
            in_ch = out_ch
    shapes += [(10, 512), (10,)]
    return ParamSet("resnet18-cifar", "CIFAR ResNet-18 (10 classes)", shapes)


def small_transformer(
    layers: int = 4, d_model: int = 256, heads: int = 4, ff: int = 1024, vocab: int = 4096, context: int = 256
) -> ParamSet:
    """Pre-LN decoder: learned positions, fused QKV, biases everywhere except the untied output head.

    The head count does not change any shape (the heads split the d_model projections); it is only described.
    """
    shapes: list[Shape] = [(vocab, d_model), (context, d_model)]
    for _ in range(layers):
        shapes += [(d_model,), (d_model,)]  # ln1
        shapes += [(3 * d_model, d_model), (3 * d_model,)]  # attention in-projection (Q, K, V)
        shapes += [(d_model, d_model), (d_model,)]  # attention out-projection
        shapes += [(d_model,), (d_model,)]  # ln2
        shapes += [(ff, d_model), (ff,), (d_model, ff), (d_model,)]  # MLP
    shapes += [(d_model,), (d_model,), (vocab, d_model)]  # final LN, untied LM head without bias
    description = (
        f"{layers}-layer transformer, d_model {d_model}, {heads} heads, ff {ff}, vocab {vocab}, context {context}, "
        "untied embeddings"
    )
    return ParamSet("transformer-4l", description, shapes)


def make_tensors(
    shapes: list[Shape], device: torch.device, dtype: torch.dtype, seed: int
) -> tuple[list[Tensor], list[Tensor]]:
    """Weights and gradients drawn on the CPU (identical on every device), then moved."""
    gen = torch.Generator().manual_seed(seed)
    weights = [(0.02 * torch.randn(s, generator=gen, dtype=torch.float64)).to(device, dtype) for s in shapes]
    grads = [(1e-2 * torch.randn(s, generator=gen, dtype=torch.float64)).to(device, dtype) for s in shapes]
    return weights, grads


def leaf_params(weights: list[Tensor], grads: list[Tensor]) -> list[Tensor]:
    """Fresh leaf parameters with their own `.grad`, so each optimizer owns its copy."""
    params = []
    for w, g in zip(weights, grads, strict=True):
        p = w.clone().requires_grad_(True)
        p.grad = g.clone()
        params.append(p)
    return params


# --------------------------------------------------------------------------------------------------------------------
# Reference baseline: the structure of the research code (two calls per iteration, a Python loop over tensors)


class OfficialStyleKoalaV(torch.optim.Optimizer):
    """KOALA-V as a per-tensor loop with `predict()` and `update(loss, loss_var)`, the research code's protocol.

    Kept deliberately in that shape, as the baseline the library's paths are measured against: a Python test on
    every gradient norm (one host read per tensor), the augmented gradient and the L2 term computed per tensor with
    separate kernels, and the filter scalars held as Python numbers or 0-d tensors.
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float = 1.0,
        sigma: float = 0.1,
        q: float = 1.0,
        alpha_r: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr))
        self.eps = 1e-9
        self.weight_decay = weight_decay
        self.alpha_r = alpha_r
        self.s: float | Tensor = sigma
        self.q = q
        self.r: float | Tensor = 1.0

    def predict(self) -> None:
        self.s = self.s + self.q

    @torch.no_grad()
    def update(self, loss: Tensor, loss_var: Tensor) -> None:
        self.r = self.alpha_r * self.r + (1 - self.alpha_r) * loss_var
        s, r = self.s, self.r
        ratios = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.norm() < self.eps:  # host read, once per tensor
                    continue
                layer_grad = p.grad + self.weight_decay * p
                layer_grad_norm = layer_grad.norm() ** 2
                layer_loss = loss + 0.5 * self.weight_decay * (p**2).sum()
                innovation = s * layer_grad_norm + r
                scale = s * group["lr"] * layer_loss / innovation
                p.data.add_(-scale * p.grad)
                ratios.append(layer_grad_norm / innovation)
        if not ratios:
            raise RuntimeError("no parameter passed the gradient threshold")
        self.s = s - s * s * torch.stack(ratios).max()


class OfficialStyleKoalaM(torch.optim.Optimizer):
    """KOALA-M in the same shape: per-tensor velocity `vt` and running average `gt`, and the 2x2 filter matrices
    F, P, Q as float64 tensors combined with `torch.matmul`; Q and H are rebuilt from host numbers every call.
    """

    def __init__(
        self,
        params: list[Tensor],
        lr: float = 1.0,
        sw: float = 0.1,
        sc: float = 0.0,
        sv: float = 0.1,
        a: float = 0.9,
        qw: float = 1e-2,
        qv: float = 1e-2,
        alpha_r: float = 0.9,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__(params, dict(lr=lr))
        device = self.param_groups[0]["params"][0].device
        self.eps = 1e-9
        self.weight_decay = weight_decay
        self.alpha_r = alpha_r
        self.a = a
        self.qv = qv
        self.F = torch.tensor([[1.0, 1.0], [0.0, a]], dtype=torch.float64, device=device)
        self.P = torch.tensor([[sw, sc], [sc, sv]], dtype=torch.float64, device=device)
        self.qx: float | Tensor = qw
        self.r: float | Tensor = 1.0
        for group in self.param_groups:
            for p in group["params"]:
                self.state[p]["vt"] = torch.zeros_like(p)
                self.state[p]["gt"] = torch.zeros_like(p)

    @torch.no_grad()
    def predict(self) -> None:
        params = [p for group in self.param_groups for p in group["params"]]
        distance = torch.stack([(p - self.state[p]["gt"]).norm() ** 2 for p in params]).sum().sqrt()
        n = sum(p.numel() for p in params)
        self.qx = 0.9 * self.qx + 0.1 * distance / n
        q = torch.diag(torch.Tensor([float(self.qx), self.qv])).double().to(self.P.device)  # host read
        self.P = torch.matmul(torch.matmul(self.F, self.P), self.F.t()) + q
        for p in params:
            p.data.add_(self.state[p]["vt"])
            self.state[p]["vt"].mul_(self.a)

    @torch.no_grad()
    def update(self, loss: Tensor, loss_var: Tensor) -> None:
        self.r = self.alpha_r * self.r + (1 - self.alpha_r) * loss_var
        cov, r = self.P, self.r
        ratios = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.norm() < self.eps:  # host read, once per tensor
                    continue
                layer_grad = p.grad + self.weight_decay * p
                layer_grad_norm = layer_grad.norm() ** 2
                layer_loss = loss + 0.5 * self.weight_decay * (p**2).sum()
                innovation = cov[0, 0] * layer_grad_norm + r
                kx = cov[0, 0] * group["lr"] * layer_loss / innovation
                kp = cov[1, 0] * group["lr"] * layer_loss / innovation
                p.data.add_(-kx * layer_grad)
                self.state[p]["vt"].add_(-kp * layer_grad)
                self.state[p]["gt"].mul_(0.9).add_(0.1 * p)
                ratios.append(layer_grad_norm / innovation)
        if not ratios:
            raise RuntimeError("no parameter passed the gradient threshold")
        h = torch.diag(torch.Tensor([float(torch.stack(ratios).max()), 0.0])).double().to(cov.device)  # host read
        self.P = cov - torch.matmul(torch.matmul(cov, h), cov.t())


# --------------------------------------------------------------------------------------------------------------------
# The optimizers under test


@dataclass(frozen=True)
class Case:
    """One timed row: how to build it and what a minimal implementation must move per parameter."""

    name: str
    build: Builder
    passes: int  # tensors of parameter size read or written per step by a minimal implementation
    traffic: str  # how `passes` is counted
    variant: str = ""  # "V" or "M" for KOALA rows: pairs them with their reference loop


def _torch_step(opt: torch.optim.Optimizer) -> Step:
    def step() -> None:
        opt.step()

    return step


def _koala_step(opt: KoalaV | KoalaM, losses: Tensor) -> Step:
    def step() -> None:
        opt.step(loss=losses)

    return step


def _reference_step(opt: OfficialStyleKoalaV | OfficialStyleKoalaM, losses: Tensor) -> Step:
    def step() -> None:
        opt.predict()
        opt.update(losses.mean(), (losses**2).mean())

    return step


def _adam(params: list[Tensor], losses: Tensor, wd: float) -> tuple[torch.optim.Optimizer, Step]:
    opt = torch.optim.Adam(params, lr=1e-3, weight_decay=wd, fused=True)
    return opt, _torch_step(opt)


def _sgd(params: list[Tensor], losses: Tensor, wd: float) -> tuple[torch.optim.Optimizer, Step]:
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=wd, fused=True)
    return opt, _torch_step(opt)


def _koala(cls: type[KoalaV] | type[KoalaM], foreach: bool, fused_kernels: bool = True) -> Builder:
    """`fused_kernels=False`: the multi-tensor path through `torch._foreach_*` only (`fused=False`)."""

    def build(params: list[Tensor], losses: Tensor, wd: float) -> tuple[torch.optim.Optimizer, Step]:
        opt = cls(params, weight_decay=wd, foreach=foreach, fused=None if fused_kernels else False)
        return opt, _koala_step(opt, losses)

    return build


def _reference(cls: type[OfficialStyleKoalaV] | type[OfficialStyleKoalaM]) -> Builder:
    def build(params: list[Tensor], losses: Tensor, wd: float) -> tuple[torch.optim.Optimizer, Step]:
        opt = cls(params, weight_decay=wd)
        return opt, _reference_step(opt, losses)

    return build


def cases(weight_decay: float) -> list[Case]:
    # With weight decay the KOALA norm pass needs the weights as well as the gradient (|g + lam x|, |x|).
    norm_pass = 2 if weight_decay else 1
    norm_text = "read g, x (norms)" if weight_decay else "read g (norm)"
    v_traffic = f"{norm_text}; read x, g, write x"
    m_traffic = f"{norm_text}; read x, g, p, x_avg, write x, p, x_avg"
    return [
        Case("Adam(fused=True)", _adam, 7, "read x, g, m, v; write x, m, v"),
        Case("SGD(momentum=0.9, fused=True)", _sgd, 5, "read x, g, buf; write x, buf"),
        Case("KoalaV(foreach=True)", _koala(KoalaV, True), norm_pass + 3, v_traffic, "V"),
        Case("KoalaM(foreach=True)", _koala(KoalaM, True), norm_pass + 7, m_traffic, "M"),
        Case("KoalaV(foreach=True, torch ops)", _koala(KoalaV, True, False), norm_pass + 3, v_traffic, "V"),
        Case("KoalaM(foreach=True, torch ops)", _koala(KoalaM, True, False), norm_pass + 7, m_traffic, "M"),
        Case("KoalaV(foreach=False)", _koala(KoalaV, False), norm_pass + 3, v_traffic, "V"),
        Case("KoalaM(foreach=False)", _koala(KoalaM, False), norm_pass + 7, m_traffic, "M"),
        Case("OfficialStyleKoalaV (reference loop)", _reference(OfficialStyleKoalaV), norm_pass + 3, v_traffic, "V"),
        Case("OfficialStyleKoalaM (reference loop)", _reference(OfficialStyleKoalaM), norm_pass + 7, m_traffic, "M"),
    ]


COPY = "copy_ (bandwidth reference)"
ADD = "add_ (in-place bandwidth reference)"


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of every non-scalar tensor reachable from `opt.state` (each storage counted once)."""

    def walk(obj: Any) -> Iterator[Tensor]:
        if isinstance(obj, Tensor):
            yield obj
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from walk(value)
        elif isinstance(obj, list | tuple):
            for value in obj:
                yield from walk(value)

    seen: set[int] = set()
    total = 0
    for t in walk(dict(opt.state)):
        if t.dim() > 0 and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.nbytes
    return total


# --------------------------------------------------------------------------------------------------------------------
# Timing


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(steps: dict[str, Step], device: torch.device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per call of each step, one call each per round; the starting row rotates every round."""
    names = list(steps)
    for _ in range(warmup):
        for name in names:
            steps[name]()
    _synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    gc.collect()
    gc.disable()  # a collection inside a timed call would land on whichever row happens to run
    try:
        for r in range(repeats):
            shift = r % len(names)
            for name in names[shift:] + names[:shift]:
                _synchronize(device)
                start = time.perf_counter()
                steps[name]()
                _synchronize(device)
                times[name].append(time.perf_counter() - start)
    finally:
        gc.enable()
    return times


@dataclass
class Row:
    name: str
    median_ms: float | None = None
    p25_ms: float | None = None
    p75_ms: float | None = None
    vs_adam: float | None = None  # this median / fused Adam's median
    passes: int | None = None
    traffic: str = ""
    bytes_per_step: int | None = None
    gb_per_s: float | None = None
    of_copy: float | None = None  # effective bandwidth / copy_'s
    state_bytes_per_param: float | None = None
    reference_over_this: float | None = None  # reference-loop median / this median, same KOALA variant
    error: str = ""


@dataclass
class SetResult:
    name: str
    description: str
    tensors: int
    numel: int
    dtype: str
    weight_decay: float
    repeats: int
    rows: list[Row] = field(default_factory=list)
    foreach_speedup: dict[str, float] = field(default_factory=dict)  # foreach=False median / foreach=True median
    sync_debug: dict[str, str] = field(default_factory=dict)


def bandwidth_steps(numel: int, device: torch.device, dtype: torch.dtype) -> dict[str, tuple[Step, int, str]]:
    """Plain large-tensor passes of the same total size: (step, tensor passes, what they move)."""
    src = torch.randn(numel, device=device, dtype=dtype)
    dst = torch.empty_like(src)
    acc = torch.randn(numel, device=device, dtype=dtype)

    def copy() -> None:
        dst.copy_(src)

    def add() -> None:
        acc.add_(src)

    # copy_ writes to lines it never read, which costs the CPU an extra read per line (write-allocate); in-place
    # optimizers do not pay that, so the in-place add_ is shown beside it.
    return {
        COPY: (copy, 2, "read src, write dst"),
        ADD: (add, 3, "read acc, src; write acc (in place)"),
    }


def _quartiles(t: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(t, n=4)
    return 1e3 * q[0], 1e3 * statistics.median(t), 1e3 * q[2]


def bench_set(
    pset: ParamSet, device: torch.device, weight_decay: float, warmup: int, repeats: int
) -> tuple[SetResult, dict[str, Step]]:
    dtype = torch.float32
    element = torch.finfo(dtype).bits // 8
    weights, grads = make_tensors(pset.shapes, device, dtype, SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    losses = (2.3 + 0.5 * torch.rand(BATCH, generator=gen)).to(device, dtype)  # positive, like cross-entropy
    result = SetResult(pset.name, pset.description, len(pset.shapes), pset.numel, str(dtype), weight_decay, repeats)
    steps: dict[str, Step] = {}
    optimizers: dict[str, torch.optim.Optimizer] = {}
    table = cases(weight_decay)
    for case in table:
        try:
            opt, step = case.build(leaf_params(weights, grads), losses, weight_decay)
            step()  # some kernels are only checked at the first step
        except (RuntimeError, ValueError, TypeError) as exc:  # e.g. a fused kernel missing on this torch/device
            result.rows.append(Row(case.name, error=f"{type(exc).__name__}: {exc}"))
            continue
        optimizers[case.name], steps[case.name] = opt, step
    del weights, grads
    references = bandwidth_steps(pset.numel, device, dtype)
    steps.update({name: step for name, (step, _, _) in references.items()})
    times = time_round_robin(steps, device, warmup, repeats)

    medians = {name: statistics.median(t) for name, t in times.items()}
    copy_rate = references[COPY][1] * pset.numel * element / medians[COPY]
    adam = medians.get("Adam(fused=True)")
    loop = {c.variant: medians.get(c.name) for c in table if c.name.startswith("OfficialStyle")}

    def row(name: str, passes: int, traffic: str, variant: str = "") -> Row:
        moved = passes * pset.numel * element
        p25, median, p75 = _quartiles(times[name])
        ref = loop.get(variant) if variant else None
        opt = optimizers.get(name)
        return Row(
            name,
            median,
            p25,
            p75,
            vs_adam=medians[name] / adam if adam else None,
            passes=passes,
            traffic=traffic,
            bytes_per_step=moved,
            gb_per_s=moved / medians[name] / 1e9,
            of_copy=moved / medians[name] / copy_rate,
            state_bytes_per_param=None if opt is None else state_bytes(opt) / pset.numel,
            reference_over_this=ref / medians[name] if ref else None,
        )

    failed = {r.name: r for r in result.rows}
    result.rows = [failed.get(c.name) or row(c.name, c.passes, c.traffic, c.variant) for c in table]
    result.rows += [row(name, passes, traffic) for name, (_, passes, traffic) in references.items()]
    for variant in ("V", "M"):
        multi, single = medians.get(f"Koala{variant}(foreach=True)"), medians.get(f"Koala{variant}(foreach=False)")
        if multi and single:
            result.foreach_speedup[f"Koala{variant}"] = single / multi
    return result, steps


# --------------------------------------------------------------------------------------------------------------------
# CUDA checks


def sync_debug_check(steps: dict[str, Step], device: torch.device) -> dict[str, str]:
    """One step of each KOALA multi-tensor path (and, as a control, each reference loop) under sync debug "error"."""
    outcome: dict[str, str] = {}
    for name in (
        "KoalaV(foreach=True)",
        "KoalaM(foreach=True)",
        "KoalaV(foreach=True, torch ops)",
        "KoalaM(foreach=True, torch ops)",
        "KoalaDiag(foreach=True)",
        "KoalaDiag(foreach=True, torch ops)",
        "OfficialStyleKoalaV (reference loop)",
        "OfficialStyleKoalaM (reference loop)",
    ):
        if name not in steps:
            continue
        _synchronize(device)
        torch.cuda.set_sync_debug_mode("error")
        try:
            steps[name]()
            outcome[name] = "no synchronizing call"
        except RuntimeError as exc:
            outcome[name] = "raised: " + str(exc).strip().splitlines()[0][:160]
        finally:
            torch.cuda.set_sync_debug_mode(0)
        _synchronize(device)
    return outcome


@dataclass
class Parity:
    optimizer: str
    steps: int
    max_rel_diff: float
    allclose: bool


def parity_check(pset: ParamSet, device: torch.device) -> list[Parity]:
    """float64: the multi-tensor path on `device` against the single-tensor loop on the CPU, after a few steps.

    Compares the weights, the per-parameter state and the filter state. The relative difference of a tensor is
    max|a - b| / max|b|; the largest over all tensors is reported.
    """
    out = []
    weights, grads = make_tensors(pset.shapes, torch.device("cpu"), torch.float64, SEED)
    gen = torch.Generator().manual_seed(SEED + 1)
    losses = 2.3 + 0.5 * torch.rand(BATCH, generator=gen, dtype=torch.float64)
    for cls in (KoalaV, KoalaM):
        cpu_params = leaf_params(weights, grads)
        # Copies even when `device` is the CPU: the two optimizers must not share weights.
        dev_params = [p.detach().to(device, copy=True).requires_grad_(True) for p in cpu_params]
        for p, g in zip(dev_params, grads, strict=True):
            p.grad = g.to(device, copy=True)
        cpu_opt = cls(cpu_params, weight_decay=CHECK_WEIGHT_DECAY, foreach=False)
        dev_opt = cls(dev_params, weight_decay=CHECK_WEIGHT_DECAY, foreach=True)
        dev_losses = losses.to(device)
        for _ in range(CHECK_STEPS):
            cpu_opt.step(loss=losses)
            dev_opt.step(loss=dev_losses)
        pairs = list(zip(dev_params, cpu_params, strict=True))
        for dp, cp in zip(dev_params, cpu_params, strict=True):
            for key, value in cpu_opt.state[cp].items():
                pairs.append((dev_opt.state[dp][key], value))
        worst, close = 0.0, True
        for a, b in pairs:
            a = a.detach().cpu().to(torch.float64)
            b = b.detach().to(torch.float64)
            scale = b.abs().max().item()
            diff = (a - b).abs().max().item()
            worst = max(worst, diff / scale if scale > 0 else diff)
            close = close and torch.allclose(a, b, rtol=1e-9, atol=1e-12 * max(scale, 1.0))
        out.append(Parity(cls.__name__, CHECK_STEPS, worst, close))
    return out


# --------------------------------------------------------------------------------------------------------------------
# Report


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def markdown(result: SetResult) -> str:
    head = (
        f"**{result.name}**: {result.description}; {result.tensors} tensors, {result.numel / 1e6:.2f}M parameters "
        f"({result.dtype}), weight decay {result.weight_decay:g}, median of {result.repeats} rounds\n\n"
    )
    lines = [
        "| optimizer | median ms | IQR ms | x fused Adam | bytes/param moved | GB/s | % of copy BW "
        "| state bytes/param | reference loop / this |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in result.rows:
        if row.error:
            lines.append(f"| {row.name} | failed: {row.error} | | | | | | | |")
            continue
        per_param = None if row.passes is None else 4 * row.passes
        of_copy = None if row.of_copy is None else 100 * row.of_copy
        lines.append(
            f"| {row.name} | {_fmt(row.median_ms, '.2f')} | {_fmt(row.p25_ms, '.2f')}-{_fmt(row.p75_ms, '.2f')} "
            f"| {_fmt(row.vs_adam, '.2f')} | {_fmt(per_param, 'd')} | {_fmt(row.gb_per_s, '.1f')} "
            f"| {_fmt(of_copy, '.0f')} | {_fmt(row.state_bytes_per_param, '.2f')} "
            f"| {_fmt(row.reference_over_this, '.1f')} |"
        )
    tail = [
        "",
        "KOALA multi-tensor speedup over its own single-tensor loop (foreach=False time / foreach=True time): "
        + ", ".join(f"{k} {v:.2f}x" for k, v in result.foreach_speedup.items()),
    ]
    for name, outcome in result.sync_debug.items():
        tail.append(f"- sync debug mode 'error', {name}: {outcome}")
    return head + "\n".join(lines + tail) + "\n"


def traffic_notes(weight_decay: float) -> str:
    lines = ["Bytes moved per parameter per step by a minimal implementation (float32, 4 bytes per tensor pass):"]
    seen = set()
    for case in cases(weight_decay):
        key = (case.passes, case.traffic)
        if case.name.startswith("OfficialStyle") or key in seen:
            continue
        seen.add(key)
        label = case.name.split("(")[0]
        lines.append(f"- {label}: {case.passes} passes = {4 * case.passes} bytes ({case.traffic})")
    lines.append("- reference loops: counted as their KOALA variant (the minimal work, not what the loop moves)")
    lines.append("- copy_: 2 passes = 8 bytes (read src, write dst); add_: 3 passes = 12 bytes (in place)")
    lines.append("\nGB/s = those bytes / median step time; % of copy BW compares it with copy_'s GB/s.")
    return "\n".join(lines) + "\n"


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            info["cpu"] = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=100, help="timed rounds per parameter set (default 100)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default 3)")
    parser.add_argument("--weight-decay", type=float, default=0.0, help="lam for every optimizer (default 0)")
    parser.add_argument("--sets", default="resnet18-cifar,transformer-4l", help="comma-separated parameter sets")
    parser.add_argument("--no-check", action="store_true", help="skip the float64 parity check")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.repeats < 2:
        parser.error("--repeats must be at least 2")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available in this torch build or on this machine")
    device = torch.device(args.device)
    torch.manual_seed(SEED)

    available = {p.name: p for p in (resnet18_cifar(), small_transformer())}
    names = [n.strip() for n in args.sets.split(",") if n.strip()]
    unknown = [n for n in names if n not in available]
    if unknown:
        parser.error(f"unknown parameter set(s) {unknown}; valid: {sorted(available)}")

    info = machine(device)
    print(f"# Optimizer step time on {args.device}: {info}\n")
    print(traffic_notes(args.weight_decay))
    results = []
    for name in names:
        result, steps = bench_set(available[name], device, args.weight_decay, args.warmup, args.repeats)
        if device.type == "cuda":
            result.sync_debug = sync_debug_check(steps, device)
        del steps
        gc.collect()
        results.append(result)
        print(markdown(result))

    parity: list[Parity] = []
    if not args.no_check:
        parity = parity_check(available[names[0]], device)
        where = "CUDA" if device.type == "cuda" else "CPU"
        print(
            f"Parity, float64, {names[0]}, weight decay {CHECK_WEIGHT_DECAY:g}: multi-tensor path on {where} against "
            f"the single-tensor loop on the CPU after {CHECK_STEPS} steps (weights, per-parameter and filter state)"
        )
        for p in parity:
            print(f"- {p.optimizer}: max relative difference {p.max_rel_diff:.2e}, allclose {p.allclose}")

    if args.json:
        payload = {
            "device": args.device,
            "machine": info,
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "results": [asdict(r) for r in results],
            "parity": [asdict(p) for p in parity],
        }
        args.json.write_text(json.dumps(payload, indent=2, allow_nan=True) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
