"""`KoalaV` and `KoalaM`: KOALA as standard `torch.optim.Optimizer`s.

The classes are thin glue in the style of `torch.optim.Adam`: validate, gather tensors, call the functional math in
`koala.functional`. The filter's global quantities live, as float64 tensors, in the state of the first parameter
(the layout of `torch.optim.LBFGS`), so `state_dict()` carries them and `load_state_dict()` moves them.
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor
from torch.optim.optimizer import ParamsT

from koala import cuda_kernels
from koala import functional as F
from koala.functional import (
    COVARIANCE,
    FILTER_KEYS,
    MEASUREMENT_NOISE,
    PROCESS_NOISE,
    STEP,
    VELOCITY,
    WEIGHT_AVERAGE,
)

Loss = Tensor | float  # a real number is a 0-d loss
Closure = Callable[[], Tensor | float]

_CALL_HINT = (
    "pass the minibatch loss, e.g. `losses = F.cross_entropy(out, y, reduction='none'); "
    "losses.mean().backward(); opt.step(loss=losses)`, or a closure that recomputes it: `opt.step(closure)`"
)


def _filter_dtype(device: torch.device) -> torch.dtype:
    # MPS has no float64; everything else keeps the filter's scalars in double precision (departure D9).
    return torch.float32 if device.type == "mps" else torch.float64


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_lr(value: Any) -> None:
    """A finite number >= 0, or (as torch's optimizers take it) a 1-element tensor holding one. A tensor lr must be
    on the CPU: `step()` reads lr on the host, which on a device would cost a synchronisation every step."""
    if isinstance(value, Tensor):
        _check(value.numel() == 1, "Tensor lr must be 1-element")
        _check(
            value.device.type == "cpu",
            f"lr as a Tensor is not supported on {value.device}: KOALA reads lr on the host at every step, keep the "
            "tensor on the CPU or pass a float",
        )
        value = value.item()
    _check_number("lr", value, low=0.0)


def _loss_tensor(value: object) -> Tensor | None:
    """The measured loss: a non-empty floating-point tensor as it is, a real number (not a bool) as a 0-d float64
    tensor; None for anything else."""
    if isinstance(value, Tensor):
        return value if value.is_floating_point() and value.numel() > 0 else None
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    return None


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    return "None" if value is None else f"a {type(value).__name__}"


def _check_number(name: str, value: Any, *, low: float, low_open: bool = False, high: float = math.inf) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    bound = "> " if low_open else ">= "
    rng = f"{bound}{low}" + ("" if high == math.inf else f" and <= {high}")
    _check(ok, f"Invalid {name}: {value!r} (expected a finite number {rng})")
    _check(value > low if low_open else value >= low, f"Invalid {name}: {value!r} (expected {rng})")
    _check(value <= high, f"Invalid {name}: {value!r} (expected {rng})")


class _KalmanOptimizer(torch.optim.Optimizer):
    """What KOALA-V and KOALA-M share: the step protocol, the measurement, checkpoints and the train/eval switch.

    The filter's hyperparameters (all but lr and weight_decay) are attributes, not param-group options: one filter
    runs over all groups, so they have no per-group value, and LR schedulers that cycle a group's "momentum" must not
    find KOALA-M's. `__getstate__` adds them to what torch keeps, so deepcopy and pickle carry them; they are set
    after `Optimizer.__init__` (torch.compile, tracing the construction, drops attributes set before it). The state
    dict stays torch's: state and param groups.
    """

    _variant = "KOALA"
    _HYPERPARAMETERS: ClassVar[tuple[str, ...]] = ("measurement_noise", "noise_decay")
    _DEVICE_KERNELS: ClassVar[bool] = True  # the variant has a kernel path on CUDA (`koala.functional.TRITON`)

    def __init__(
        self,
        params: ParamsT,
        defaults: dict[str, Any],
        *,
        measurement_noise: float | None,
        noise_decay: float,
        foreach: bool | None,
        fused: bool | None,
    ) -> None:
        _check_lr(defaults["lr"])
        _check_number("weight_decay", defaults["weight_decay"], low=0.0)
        if measurement_noise is not None:
            _check_number("measurement_noise", measurement_noise, low=0.0, low_open=True)
        _check_number("noise_decay", noise_decay, low=0.0, high=1.0)
        _check(foreach is None or isinstance(foreach, bool), f"Invalid foreach: {foreach!r} (expected None or bool)")
        _check(fused is None or isinstance(fused, bool), f"Invalid fused: {fused!r} (expected None or bool)")
        if fused and foreach:
            raise RuntimeError("`fused` and `foreach` cannot be `True` together.")  # torch's rule and message
        defaults = dict(defaults, foreach=foreach, fused=fused, train_mode=True)
        super().__init__(params, defaults)
        self.measurement_noise = measurement_noise
        self.noise_decay = noise_decay
        self._stashed_weights: list[Tensor] | None = None
        self._workspace: cuda_kernels.Workspace | None = None  # device buffers of the CUDA kernels

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "lr" in param_group:
            _check_lr(param_group["lr"])
        if "weight_decay" in param_group:
            _check_number("weight_decay", param_group["weight_decay"], low=0.0)
        if self._has_state():
            name = type(self).__name__
            raise RuntimeError(f"{name} keeps one filter over all parameters: add groups before the first step")
        super().add_param_group(param_group)  # normalises the group (its params may be an iterator) and appends it
        added = self.param_groups[-1]["params"]
        bad = [p.dtype for p in added if not p.is_floating_point()]
        try:
            if bad:
                raise ValueError(f"Invalid parameter dtype {bad[0]}: KOALA needs floating-point tensors")
            if self.param_groups[0]["fused"]:  # the first group's options choose the path
                F.check_fused(added, self._DEVICE_KERNELS)
        except (ValueError, RuntimeError):
            self.param_groups.pop()
            raise

    def __getstate__(self) -> dict[str, Any]:
        """What pickle and deepcopy keep: torch's defaults, state and param groups, the filter's hyperparameters and
        KOALA-M's stashed predicted weights (so that `train()` after a copy made in eval mode is exact too)."""
        kept = super().__getstate__()
        kept.update({name: getattr(self, name) for name in self._HYPERPARAMETERS})
        kept["_stashed_weights"] = self._stashed_weights
        return kept

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Also called by `load_state_dict` with the state and param groups only: attributes it lacks are kept.
        super().__setstate__(state)
        self.__dict__.setdefault("_stashed_weights", None)
        self.__dict__.setdefault("_workspace", None)
        self.defaults.setdefault("fused", None)  # (pickled by versions without `fused`)
        for group in self.param_groups:  # param groups saved without these options (torch's backward compatibility)
            group.setdefault("foreach", self.defaults.get("foreach"))
            group.setdefault("fused", self.defaults["fused"])
            group.setdefault("train_mode", True)

    # ---- the public protocol --------------------------------------------------------------------------------------

    @torch.no_grad()
    def step(self, closure: Closure | None = None, *, loss: Loss | None = None) -> Loss:  # type: ignore[override]
        """Run update_k and predict_{k+1} with this minibatch's loss (docs/method.md "Step contract").

        Args:
            closure: recomputes the loss and its gradient and returns the loss.
            loss: the loss already backpropagated, per sample (any shape, averaged over all elements) or 0-d.

        Exactly one of `closure` and `loss` is required. The loss must be the unscaled one (under `GradScaler`, pass
        the losses before `scaler.scale`). A real number (a closure returning `loss.item()`) is a 0-d loss. Returns
        the loss as given (or as the closure returned it).

        Raises:
            TypeError: neither or both of `closure` and `loss`, or a loss that is neither a non-empty floating-point
                tensor nor a real number (a closure returning None, for instance).
            RuntimeError: called in evaluation mode (call `train()` first).
        """
        loss, measured = self._take_loss(closure, loss)
        blocks = self._blocks()
        if all(g is None for g in blocks.grads):
            return loss  # nothing was backpropagated: a no-op, like every torch optimizer
        state = self.state[blocks.params[0]]
        if STEP not in state:
            self._init_state(blocks)
        path = self._path(blocks)
        device = state[COVARIANCE].device
        moments = path.loss_moments(measured, device, state[COVARIANCE].dtype)
        if _distributed():
            dist.all_reduce(moments)  # global L and m2 so every replica takes the identical step
        if isinstance(path, F.KernelPlan):
            # Fused CUDA kernels: the filter runs on the device, its state is updated in place, nothing is read back.
            self._kernel_step(blocks, path, moments, state)
            return loss
        # The filter's scalars in the path's namespace: NumPy on the fused CPU path, where a 0-d torch op would cost
        # ~10 us and NumPy's ~1 us; torch on the filter's device elsewhere.
        measurement = path.measure(blocks, moments, device)
        with path.errstate():
            self._filter_step(blocks, measurement, state, path)
        self._warn_if_skipped(measurement, path)
        return loss

    def train(self) -> None:
        """Switch the parameters back to the predicted weights used for training (undoes `eval()` exactly)."""
        self._switch(train=True)

    def eval(self) -> None:
        """Switch the parameters to the posterior weights, for evaluation and checkpoint export."""
        self._switch(train=False)

    # ---- checkpoints ----------------------------------------------------------------------------------------------

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a state dict; the filter's float64 scalars keep their dtype and move to the first parameter's device.

        (`torch.optim.Optimizer` would cast every floating tensor to the parameter's dtype, e.g. bfloat16.) A plain
        number where a filter scalar belongs (`step`, as older torch optimizers saved it) is loaded as that tensor.
        Load-state-dict pre-hooks see the state dict as given and post-hooks the loaded optimizer, as in torch.
        """
        filter_state: dict[str, Any] = {}

        def take_filter_state(optimizer: torch.optim.Optimizer, loaded: dict[str, Any]) -> dict[str, Any]:
            # Runs after the user's pre-hooks, before torch casts anything.
            _check_state_shapes(self.param_groups, loaded)
            # Empty per-parameter entries (a never-stepped optimizer saved by earlier versions) are not state.
            states = {k: v for k, v in loaded["state"].items() if not (isinstance(v, dict) and not v)}
            first_state = dict(states.get(0, {}))
            filter_state.update({k: first_state.pop(k) for k in FILTER_KEYS if k in first_state})
            if first_state:
                states[0] = first_state
            else:
                states.pop(0, None)
            return {**loaded, "state": states}

        def put_filter_state(optimizer: torch.optim.Optimizer) -> None:
            # Runs before the user's post-hooks.
            first = self.param_groups[0]["params"][0]
            if filter_state:
                device, dtype = first.device, _filter_dtype(first.device)
                self.state[first].update(
                    {k: torch.as_tensor(v, dtype=dtype, device=device) for k, v in filter_state.items()}
                )
            self._stashed_weights = None

        pre_hook = self.register_load_state_dict_pre_hook(take_filter_state)
        post_hook = self.register_load_state_dict_post_hook(put_filter_state, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre_hook.remove()
            post_hook.remove()

    # ---- internals ------------------------------------------------------------------------------------------------

    def _has_state(self) -> bool:
        """Whether the filter has started (stepped, or loaded a state that had): empty entries do not count."""
        return any(self.state.get(p) for group in self.param_groups for p in group["params"])

    def _take_loss(self, closure: Closure | None, loss: Loss | None) -> tuple[Loss, Tensor]:
        """The loss of this step (from `loss` or by running `closure`) and its tensor form; the argument and mode
        checks every KOALA `step()` starts with."""
        if (closure is None) == (loss is None):
            which = "neither" if closure is None else "both"
            raise TypeError(f"{type(self).__name__}.step() got {which} of closure and loss: {_CALL_HINT}")
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        measured = _loss_tensor(loss)
        if loss is None or measured is None:
            raise TypeError(
                f"{type(self).__name__}.step() needs the loss as a non-empty float tensor or a real number, got "
                f"{_describe(loss)}: {_CALL_HINT}"
            )
        if not self.param_groups[0]["train_mode"]:
            raise RuntimeError(f"{type(self).__name__}.step() called in evaluation mode: call optimizer.train() first")
        return loss, measured

    def _blocks(self) -> F.Blocks:
        # Runs every step: list operations per group, not per parameter, where possible.
        params: list[Tensor] = []
        lrs: list[float] = []
        decays: list[float] = []
        for group in self.param_groups:
            members = group["params"]
            params += members
            lrs += [float(group["lr"])] * len(members)
            decays += [float(group["weight_decay"])] * len(members)
        grads = [p.grad for p in params]
        if any(g is not None and g.is_sparse for g in grads):
            raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
        return F.Blocks(params, grads, lrs, decays)

    def _path(self, blocks: F.Blocks) -> F.HostPath | F.KernelPlan:
        """This step's path (`koala.functional.select_path`), from the first group's `foreach` and `fused`. With the
        defaults: the fused kernels where they apply, measured 2.0-5.8x faster than the loop on the CPU
        (bench/optimizer_step.py); `torch._foreach_*` elsewhere on CPU, CUDA and XPU; the loop on other devices."""
        group = self.param_groups[0]
        path = F.select_path(
            blocks,
            self.state[blocks.params[0]][COVARIANCE].device,
            foreach=group["foreach"],
            fused=group["fused"],
            kernel_state=lambda: self._kernel_state(blocks),
            workspace=self._workspace,
            device_kernels=self._DEVICE_KERNELS,
        )
        if isinstance(path, F.KernelPlan):
            self._workspace = path.layout.workspace
        return path

    def _kernel_state(self, blocks: F.Blocks) -> tuple[list[Tensor], ...]:
        """Per-parameter state tensors the fused kernels read and write, one list per kind."""
        return ()

    def _filter_tensor(self, value: float, like: Tensor) -> Tensor:
        return torch.tensor(value, dtype=_filter_dtype(like.device), device=like.device)

    def _init_state(self, blocks: F.Blocks) -> None:
        raise NotImplementedError

    def _filter_step(
        self, blocks: F.Blocks, measurement: F.Measurement, state: dict[str, Any], path: F.HostPath
    ) -> None:
        raise NotImplementedError

    def _kernel_step(self, blocks: F.Blocks, plan: F.KernelPlan, moments: Tensor, state: dict[str, Any]) -> None:
        raise NotImplementedError

    def _noise_decay(self) -> float | None:
        """beta_R, or None for a fixed measurement noise."""
        return None if self.measurement_noise is not None else self.noise_decay

    def _switch(self, *, train: bool) -> None:
        for group in self.param_groups:
            group["train_mode"] = train

    def _warn_if_skipped(self, measurement: F.Measurement, path: F.HostPath) -> None:
        # Only where reading the flag is free: on the CPU outside compilation. Elsewhere the skip is silent, so that
        # step() never waits for the device; `state[step]` counts the accepted steps either way.
        if path.xp is np:
            finite = bool(measurement.finite(np))
        elif measurement.loss.device.type == "cpu" and not torch.compiler.is_compiling():
            finite = bool(measurement.finite(torch))
        else:
            return
        if not finite:
            warnings.warn(
                f"{type(self).__name__} skipped a step: non-finite loss or gradient (filter state unchanged)",
                RuntimeWarning,
                stacklevel=3,
            )


def _check_state_shapes(param_groups: list[dict[str, Any]], state_dict: dict[str, Any]) -> None:
    """Reject a state dict whose per-parameter tensors do not have their parameter's shape (a checkpoint of another
    model), before anything is loaded: the optimizer would otherwise fail later, or the fused kernels misaddress."""
    saved_groups = state_dict.get("param_groups")
    if not isinstance(saved_groups, list) or len(saved_groups) != len(param_groups):
        return  # torch's own check reports the group mismatch
    for saved, group in zip(saved_groups, param_groups, strict=True):
        for index, param in zip(saved.get("params", []), group["params"], strict=False):
            for key, value in state_dict.get("state", {}).get(index, {}).items():
                if key in FILTER_KEYS or not isinstance(value, Tensor) or value.shape == param.shape:
                    continue
                raise ValueError(
                    f"state_dict: state[{index}][{key!r}] has shape {tuple(value.shape)}, but parameter {index} has "
                    f"shape {tuple(param.shape)}; was it saved from another model?"
                )


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _replica_mean(value: F.Array, xp: F.Namespace) -> F.Array:
    """`value` (0-d, a tensor or a NumPy value) averaged over the DDP replicas, in the namespace `xp`."""
    reduced = torch.as_tensor(value).clone()
    dist.all_reduce(reduced)
    reduced = reduced / dist.get_world_size()
    return reduced.numpy() if xp is np else reduced


class KoalaV(_KalmanOptimizer):
    r"""KOALA-V: the Kalman filter over the weights with the static model x_k = x_{k-1} + w (Davtyan et al., 2022).

    The covariance is one scalar s for the whole network; each parameter tensor is a block (layer-wise form, eq. 27).
    One `step()` is update_k followed by predict_{k+1}:

        R_k   = beta_R R_{k-1} + (1 - beta_R) m2_k,  m2_k = mean_j l_{k,j}^2         (adaptive R; fixed if given)
        S_b   = s^_k G_b + R_k,   G_b = |g_b + lam x_b|^2                            (augmented gradient)
        x_b  <- x_b - s^_k lr (L_k + lam/2 |x_b|^2) / S_b * g_b                       (eq. 12, raw direction g_b)
        s_k   = s^_k R_k / (s^_k G* + R_k),   G* = max_b G_b                          (eq. 13 with h~ = max_b G_b/S_b)
        s^_{k+1} = s_k + q                                                            (predict)

    `lr` is eps of target scheme (b): the filter drives the loss towards (1 - lr) L, so lr=1 targets zero and values
    near 1 are normal; schedulers scale it per group. Do not port SGD or Adam learning rates.

    Usage contract:
        * Pass the per-sample losses (or a 0-d loss or a real number, which make R too small: documented as degraded)
          after backward: `opt.step(loss=losses)`, or `opt.step(closure)`. The loss must be positive (scheme b) and
          unscaled.
        * One `step()` per backward. Blocks whose raw gradient norm is below 1e-9 are not updated; if none passes,
          or the loss or any norm is non-finite, the whole step is skipped and nothing changes (a RuntimeWarning is
          issued where that is free to detect: on the CPU).
        * Under DDP (an initialised process group), the loss moments are all-reduced so every replica takes the
          identical step. Weights are visible as the posterior; `eval()`/`train()` are no-ops for KOALA-V.

    Departures from the paper, all following the official code (docs/method.md "Departures"):
        D1 only target scheme (b), gap = lr * L, per-group lr honoured from the start;
        D2 the gap carries the block's own L2 term lam/2 |x_b|^2;
        D3 S_b uses the augmented gradient, the step the raw gradient (so weight decay does not shrink weights here);
        D4 R is an EMA of the second moment of the per-sample losses, not of their squared distance to the target;
        D6 the skip rule is per tensor on the raw gradient norm, plus a whole-step skip when no tensor passes;
        D7 constant process noise q = 1 and s_0 = 0.1; D9 the filter scalars are float64.

    Args:
        params: parameters or parameter groups (per-group `lr` and `weight_decay` are honoured).
        lr: target scale eps (default 1.0, the paper's setting).
        initial_covariance: s_0 = sigma_0^2 (default 0.1).
        process_noise: q (default 1.0).
        measurement_noise: a fixed R > 0, or None (default) for the adaptive estimate.
        noise_decay: EMA coefficient beta_R of the adaptive R (default 0.9).
        weight_decay: lam, coupled L2 (default 0).
        foreach: the multi-tensor path (True), the single-tensor loop (False), or None to choose by device.
        fused: how the multi-tensor path runs: its fused kernels, Numba on the CPU and Triton on CUDA (True, also
            with foreach=False; a RuntimeError where they do not apply to the tensors), `torch._foreach_*` (False),
            or None (default) for the kernels where they apply, unless KOALA_CPU_KERNELS=0 / KOALA_CUDA_KERNELS=0,
            and `torch._foreach_*` elsewhere.
    """

    _variant = "KOALA-V"
    _HYPERPARAMETERS = (*_KalmanOptimizer._HYPERPARAMETERS, "initial_covariance", "process_noise")

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        *,
        initial_covariance: float = 0.1,
        process_noise: float = 1.0,
        measurement_noise: float | None = None,
        noise_decay: float = 0.9,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        _check_number("initial_covariance", initial_covariance, low=0.0, low_open=True)
        _check_number("process_noise", process_noise, low=0.0)
        super().__init__(
            params,
            dict(lr=lr, weight_decay=weight_decay),
            measurement_noise=measurement_noise,
            noise_decay=noise_decay,
            foreach=foreach,
            fused=fused,
        )
        self.initial_covariance = initial_covariance
        self.process_noise = process_noise

    def _init_state(self, blocks: F.Blocks) -> None:
        first = blocks.params[0]
        state = self.state[first]
        state[STEP] = self._filter_tensor(0.0, first)
        # The covariance half of predict_1 (s^_1 = s_0 + q) runs here, at the first step (contract item 4).
        state[COVARIANCE] = self._filter_tensor(self.initial_covariance + self.process_noise, first)
        state[MEASUREMENT_NOISE] = self._filter_tensor(self.measurement_noise or 1.0, first)

    def _filter_step(
        self, blocks: F.Blocks, measurement: F.Measurement, state: dict[str, Any], path: F.HostPath
    ) -> None:
        xp = path.xp
        prior = path.read(state, COVARIANCE)
        g = F.gains(measurement, prior, path.read(state, MEASUREMENT_NOISE), self._noise_decay(), xp)
        path.apply_vanilla(blocks, prior * g.scaled_gaps, g.finite)
        next_prior = g.rho * prior + self.process_noise
        F.write_state(state, COVARIANCE, xp.where(g.take, next_prior, prior))
        F.write_state(state, MEASUREMENT_NOISE, g.noise)
        F.write_state(state, STEP, path.read(state, STEP) + g.take)

    def _kernel_step(self, blocks: F.Blocks, plan: F.KernelPlan, moments: Tensor, state: dict[str, Any]) -> None:
        kernels, layout = plan.path, plan.layout
        stats = kernels.block_stats(blocks, layout)
        kernels.vanilla_step(blocks, layout, stats, moments, state, self._noise_decay(), self.process_noise)

    def __repr__(self) -> str:
        extra = (
            f"initial_covariance={self.initial_covariance}, process_noise={self.process_noise}, "
            f"measurement_noise={self.measurement_noise}, noise_decay={self.noise_decay}"
        )
        return super().__repr__().replace("(\n", f"({extra},\n", 1)


class KoalaM(_KalmanOptimizer):
    r"""KOALA-M: the Kalman filter over weights and velocities, x_k = x_{k-1} + p_{k-1}, p_k = kappa p_{k-1}.

    The covariance is a 2x2 matrix P (times the identity) shared by all blocks; each parameter tensor is a block.
    One `step()` is update_k followed by predict_{k+1} (official code, docs/method.md "KOALA-M", "Step contract"):

        R_k   = beta_R R_{k-1} + (1 - beta_R) m2_k                                   (49')
        S_b   = P^[1,1] G_b + R_k,   a_b = g_b + lam x_b,   G_b = |a_b|^2             (56)
        x_b  <- x^_b - lr P^[1,1] (L + lam/2 |x^_b|^2) / S_b * a_b                    (57, 59; direction a_b)
        p_b  <- p^_b - lr P^[2,1] (L + lam/2 |x^_b|^2) / S_b * a_b                    (58, 60)
        x_avg_b <- 0.9 x_avg_b + 0.1 x_b   for updated blocks                         (50')
        P_k   = P^ - P^ H~ P^,   H~ = diag(max_b G_b / S_b, 0)                        (61-63)
      predict_{k+1}:
        qx    = 0.9 qx + 0.1 |x_k - x_avg|_2 / n,   Q = diag(qx, q_p)                  (51', 52')
        x^    = x_k + p_k,   p^ = kappa p_k,   P^ = F P F^T + Q,   F = [[1, 1], [0, kappa]]

    After `step()` the parameters hold the predicted weights x^_{k+1} = x_k + p_k, where the next forward pass must
    run. Evaluate and export the posterior x_k: call `opt.eval()` (parameters become x_k) and `opt.train()` before
    training resumes (restores x^_{k+1} exactly). `step()` in evaluation mode raises. The state stores the posterior
    velocity p_k (the decay kappa is applied at the start of the next update), which makes the switch exact.

    `lr` is eps of target scheme (b): lr=1 targets zero loss; schedulers scale it per group. The usage contract of
    `KoalaV` applies (per-sample unscaled positive losses, one step per backward, the skip rule, DDP all-reduce;
    under DDP the weight-drift statistic is all-reduced too).

    Departures from the paper, all following the official code (docs/method.md "Departures"): D1-D4 as in `KoalaV`
    except that the step direction is the augmented gradient a_b (coupled L2, D3); D5 the process noise uses the
    unsquared distance |x - x_avg|_2 / n under an extra EMA (0.9, from qw), with x_avg starting at 0 and refreshed
    only for updated blocks, while the distance covers every parameter given (do not pass frozen parameters);
    D6 per-tensor skip; D8 q_p = 1e-2 and P_0[1,2] = 0; D9 float64 filter scalars.

    Args:
        params: parameters or parameter groups (per-group `lr` and `weight_decay` are honoured).
        lr: target scale eps (default 1.0).
        momentum: kappa, the velocity decay (default 0.9).
        initial_covariance: (P_0[1,1], P_0[1,2], P_0[2,2]) (default (0.1, 0.0, 0.1)).
        weight_process_noise: qw, the initial value of the adaptive qx (default 1e-2).
        velocity_process_noise: q_p (default 1e-2).
        measurement_noise: a fixed R > 0, or None (default) for the adaptive estimate.
        noise_decay: EMA coefficient beta_R of the adaptive R (default 0.9).
        weight_decay: lam, coupled L2 (default 0).
        foreach: the multi-tensor path (True), the single-tensor loop (False), or None to choose by device.
        fused: how the multi-tensor path runs: its fused kernels, Numba on the CPU and Triton on CUDA (True, also
            with foreach=False; a RuntimeError where they do not apply to the tensors), `torch._foreach_*` (False),
            or None (default) for the kernels where they apply, unless KOALA_CPU_KERNELS=0 / KOALA_CUDA_KERNELS=0,
            and `torch._foreach_*` elsewhere.
    """

    _variant = "KOALA-M"
    _HYPERPARAMETERS = (
        *_KalmanOptimizer._HYPERPARAMETERS,
        "momentum",
        "initial_covariance",
        "weight_process_noise",
        "velocity_process_noise",
    )

    def __init__(
        self,
        params: ParamsT,
        lr: float = 1.0,
        *,
        momentum: float = 0.9,
        initial_covariance: tuple[float, float, float] = (0.1, 0.0, 0.1),
        weight_process_noise: float = 1e-2,
        velocity_process_noise: float = 1e-2,
        measurement_noise: float | None = None,
        noise_decay: float = 0.9,
        weight_decay: float = 0.0,
        foreach: bool | None = None,
        fused: bool | None = None,
    ) -> None:
        _check_number("momentum", momentum, low=0.0, high=1.0)
        _check(
            isinstance(initial_covariance, tuple | list) and len(initial_covariance) == 3,
            f"Invalid initial_covariance: {initial_covariance!r} (expected (P_xx, P_xp, P_pp))",
        )
        sxx, sxp, spp = initial_covariance
        for name, value in (("initial_covariance[0]", sxx), ("initial_covariance[2]", spp)):
            _check_number(name, value, low=0.0, low_open=True)
        _check_number("initial_covariance[1]", sxp, low=-math.inf)
        _check(
            sxp * sxp <= sxx * spp, f"Invalid initial_covariance: {initial_covariance!r} (not positive semidefinite)"
        )
        _check_number("weight_process_noise", weight_process_noise, low=0.0)
        _check_number("velocity_process_noise", velocity_process_noise, low=0.0)
        super().__init__(
            params,
            dict(lr=lr, weight_decay=weight_decay),
            measurement_noise=measurement_noise,
            noise_decay=noise_decay,
            foreach=foreach,
            fused=fused,
        )
        self.momentum = momentum
        self.initial_covariance = (float(sxx), float(sxp), float(spp))
        self.weight_process_noise = weight_process_noise
        self.velocity_process_noise = velocity_process_noise

    def _all_state(self, blocks: F.Blocks) -> tuple[list[Tensor], list[Tensor]]:
        states = [self.state[p] for p in blocks.params]
        return [s[VELOCITY] for s in states], [s[WEIGHT_AVERAGE] for s in states]

    def _init_state(self, blocks: F.Blocks) -> None:
        first = blocks.params[0]
        for p in blocks.params:
            self.state[p][VELOCITY] = torch.zeros_like(p, memory_format=torch.preserve_format)
            self.state[p][WEIGHT_AVERAGE] = torch.zeros_like(p, memory_format=torch.preserve_format)
        state = self.state[first]
        state[STEP] = self._filter_tensor(0.0, first)
        state[MEASUREMENT_NOISE] = self._filter_tensor(self.measurement_noise or 1.0, first)
        state[PROCESS_NOISE] = self._filter_tensor(self.weight_process_noise, first)
        sxx, sxp, spp = self.initial_covariance
        posterior = torch.tensor([[sxx, sxp], [sxp, spp]], dtype=state[STEP].dtype, device=first.device)
        # The covariance half of predict_1 runs here, at the first step (contract item 4): d_1 = |x_0 - 0| / n.
        drift = torch.stack(
            [
                torch.linalg.vector_norm(p, dtype=F.norm_dtype(p.dtype)).to(first.device, posterior.dtype)
                for p in blocks.params
            ]
        )
        state[COVARIANCE], state[PROCESS_NOISE] = self._predict(
            posterior, state[PROCESS_NOISE], drift.square().sum(), blocks, torch
        )

    def _predict(
        self, posterior: F.Array, process_noise: F.Array, drift_sq: F.Array, blocks: F.Blocks, xp: F.Namespace
    ) -> tuple[F.Array, F.Array]:
        """predict_{k+1} of the covariance (`koala.functional.momentum_prior`), the drift averaged over replicas."""
        numel = sum(p.numel() for p in blocks.params)
        if _distributed():
            drift_sq = _replica_mean(drift_sq, xp)
        return F.momentum_prior(
            posterior, process_noise, drift_sq, numel, self.momentum, self.velocity_process_noise, xp
        )

    def _filter_step(
        self, blocks: F.Blocks, measurement: F.Measurement, state: dict[str, Any], path: F.HostPath
    ) -> None:
        xp = path.xp
        prior = path.read(state, COVARIANCE)
        g = F.gains(measurement, prior[0, 0], path.read(state, MEASUREMENT_NOISE), self._noise_decay(), xp)
        take = F.to_float(g.take, prior)
        coefficients = F.MomentumCoefficients(
            weight_gains=prior[0, 0] * g.scaled_gaps,
            velocity_gains=prior[0, 1] * g.scaled_gaps,
            average_weights=(1 - F.AVERAGE_DECAY) * F.to_float(g.updated & g.take, prior),
            velocity_decay=take * self.momentum + (1 - take),  # kappa, or exactly 1 on a skipped step
            take=take,
            finite=g.finite,
        )
        velocities, averages = self._all_state(blocks)
        drift_sq = path.apply_momentum(blocks, velocities, averages, coefficients)
        posterior = F.momentum_posterior(prior, g, xp)
        process_noise = path.read(state, PROCESS_NOISE)
        next_prior, next_qx = self._predict(posterior, process_noise, drift_sq, blocks, xp)
        F.write_state(state, COVARIANCE, xp.where(g.take, next_prior, prior))
        F.write_state(state, PROCESS_NOISE, xp.where(g.take, next_qx, process_noise))
        F.write_state(state, MEASUREMENT_NOISE, g.noise)
        F.write_state(state, STEP, path.read(state, STEP) + take)

    def _kernel_state(self, blocks: F.Blocks) -> tuple[list[Tensor], ...]:
        return self._all_state(blocks)

    def _kernel_step(self, blocks: F.Blocks, plan: F.KernelPlan, moments: Tensor, state: dict[str, Any]) -> None:
        kernels, layout = plan.path, plan.layout
        stats = kernels.block_stats(blocks, layout)
        drift_sq, scratch = kernels.momentum_update(
            blocks, layout, stats, moments, state, self._noise_decay(), self.momentum
        )
        if _distributed():
            dist.all_reduce(drift_sq)
            drift_sq = drift_sq / dist.get_world_size()
        numel = layout.workspace.numel
        kernels.momentum_predict(drift_sq, scratch, state, numel, self.momentum, self.velocity_process_noise)

    @torch.no_grad()
    def _switch(self, *, train: bool) -> None:
        group_mode = self.param_groups[0]["train_mode"]
        super()._switch(train=train)
        if group_mode == train:
            return
        params = [p for group in self.param_groups for p in group["params"] if VELOCITY in self.state.get(p, ())]
        if not train:
            # x_k = x^_{k+1} - p_k. The predicted weights are kept so that train() restores them bit for bit.
            self._stashed_weights = [p.detach().clone() for p in params]
            for p in params:
                p.sub_(self.state[p][VELOCITY])
        elif self._stashed_weights is not None and len(self._stashed_weights) == len(params):
            for p, saved in zip(params, self._stashed_weights, strict=True):
                p.copy_(saved)
            self._stashed_weights = None
        else:
            # Posterior weights and a state saved in eval mode, loaded elsewhere: recompute x^ = x + p.
            for p in params:
                p.add_(self.state[p][VELOCITY])

    def __repr__(self) -> str:
        extra = (
            f"momentum={self.momentum}, initial_covariance={self.initial_covariance}, "
            f"weight_process_noise={self.weight_process_noise}, "
            f"velocity_process_noise={self.velocity_process_noise}, "
            f"measurement_noise={self.measurement_noise}, noise_decay={self.noise_decay}"
        )
        return super().__repr__().replace("(\n", f"({extra},\n", 1)


__all__ = ["KoalaM", "KoalaV"]
