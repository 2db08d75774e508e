"""Fused multi-tensor CPU kernels, compiled with Numba.

Eager PyTorch runs each elementwise operation as its own pass over memory: the KOALA-M update (velocity decay and
gain, weight gain, weight-average EMA, drift norm, predict shift) costs about 19 tensor passes that way, against the
8 a fused loop needs (the same count as fused Adam). These kernels are those fused loops. Each call covers a whole
run of tensors (one parallel region for all of them, addressed through a table of data pointers), so a step pays
one kernel launch per pass, not one per tensor: on a CIFAR ResNet-18 the per-tensor calls cost more than 1 ms of
a ~10 ms step. They run on contiguous float32/float64 CPU tensors outside `torch.compile`, where the optimizers'
`fused` argument asks for them (`koala.functional.select_path`); everything else takes the `torch._foreach_*` path,
which is also the reference they are tested against. Sums accumulate in float64 across
chunks of `_CHUNK` elements. Compiled kernels are cached on disk (`cache=True`), so only the first process on a
machine pays the compilation (several seconds).
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence
from typing import Any

import numba
import numpy as np
import torch
from numba import prange
from numba.extending import intrinsic
from torch import Tensor

# Reassociation lets LLVM vectorise the reductions; NaN and inf keep their IEEE meaning (no `nnan`/`ninf`).
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}
# Elements per work item. A call over fewer than PARALLEL_NUMEL elements in all runs serially (a parallel region
# costs ~10-20 us to start).
_CHUNK = 1 << 14
PARALLEL_NUMEL = 1 << 16
#: The dtypes the kernels take.
DTYPES = (torch.float32, torch.float64)


def eligible(tensors: Sequence[Tensor]) -> bool:
    """Whether the fused kernels apply: contiguous float32/float64 CPU tensors, outside `torch.compile`."""
    if torch.compiler.is_compiling():
        return False
    for t in tensors:  # noqa: SIM110 (a loop, not `all` over a generator: it runs every step, over every tensor)
        if not (t.is_cpu and t.dtype in DTYPES and t.is_contiguous()):
            return False
    return True


def by_default() -> bool:
    """Whether `fused=None` runs these kernels: unless KOALA_CPU_KERNELS=0 (`koala.functional.FUSED_BY_DEFAULT`)."""
    from koala.functional import FUSED_BY_DEFAULT  # (that module builds on this one)

    return FUSED_BY_DEFAULT["cpu"]


# --------------------------------------------------------------------------------------------------------------------
# Kernels. A kernel gets, per tensor kind, an int64 array of data pointers, plus the element counts; `zero` is a 0
# of the tensors' dtype and fixes their element type. Work items are (tensor, chunk) pairs, so large and small
# tensors share one parallel loop. Each item works on slices indexed from 0: LLVM then vectorises the loop (indexing
# the whole array with offsets measured 1.7x slower).


@intrinsic
def _pointer(typingctx, address, zero):
    """The integer `address` as a typed pointer to elements of `zero`'s type."""
    signature = numba.types.CPointer(zero)(address, zero)

    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], context.get_value_type(sig.return_type))

    return signature, codegen


@numba.njit(cache=True, nogil=True)
def _work_items(sizes):
    """(tensor, first element) of every chunk of every tensor, in tensor order."""
    counts = (sizes + _CHUNK - 1) // _CHUNK
    total = counts.sum()
    tensor = np.empty(total, np.int64)
    start = np.empty(total, np.int64)
    w = 0
    for t in range(sizes.size):
        for c in range(counts[t]):
            tensor[w] = t
            start[w] = c * _CHUNK
            w += 1
    return tensor, start


@numba.njit(cache=True, nogil=True, inline="always")
def _chunk(addresses, sizes, t, start, zero):
    """Elements [start, start + _CHUNK) of tensor t (fewer at its end)."""
    whole = numba.carray(_pointer(addresses[t], zero), sizes[t])  # type: ignore[attr-defined]
    return whole[start : min(sizes[t], start + _CHUNK)]


# Each work item walks its chunk as four interleaved quarter streams (element j of every quarter, then j + 1): more
# memory streams in flight per core, measured 10-20% faster than one sequential walk on a 2-core VM. `_LANES` is
# that count; the last `size % _LANES` elements follow in a plain loop.
_LANES = 4


@numba.njit(cache=True, nogil=True, inline="always")
def _block_element(gc, xc, i, lam):
    gi = gc[i]
    xi = xc[i]
    ai = gi + lam * xi
    return gi * gi, ai * ai, xi * xi


@numba.njit(cache=True, nogil=True, inline="always")
def _momentum_element(xc, gc, vc, ac, i, lam, kappa, weight_gain, velocity_gain, average_weight, kept, shift):
    """One element of the KOALA-M block update; returns its term of |x_k - x_avg_new|^2."""
    xi = xc[i]
    ai = gc[i] + lam * xi  # augmented gradient (direction of KOALA-M, departure D3)
    vi = kappa * vc[i] - velocity_gain * ai  # p_k = kappa p_{k-1} - Kp a
    xi = xi - weight_gain * ai  # x_k = x^_k - Kx a
    di = xi - ac[i]
    ac[i] += average_weight * di  # x_avg EMA (weight 0 for blocks not updated)
    dk = di * kept  # x_k - x_avg_new
    vc[i] = vi
    xc[i] = xi + shift * vi  # predict_{k+1}: x^_{k+1} = x_k + p_k
    return dk * dk


def _sums_of_squares(g_addr, sizes, zero):
    """Per tensor |g|^2."""
    tensor, start = _work_items(sizes)
    parts = np.zeros(tensor.size)
    for w in prange(tensor.size):
        gc = _chunk(g_addr, sizes, tensor[w], start[w], zero)
        q = gc.size // _LANES
        gg = zero
        for j in range(q):
            for lane in range(_LANES):
                gi = gc[lane * q + j]
                gg += gi * gi
        for i in range(_LANES * q, gc.size):
            gg += gc[i] * gc[i]
        parts[w] = gg
    out = np.zeros(sizes.size)
    for w in range(tensor.size):  # in order: the sums do not depend on the thread count
        out[tensor[w]] += parts[w]
    return out


def _block_sums(g_addr, x_addr, sizes, lam, zero):
    """Per tensor (|g|^2, |g + lam x|^2, |x|^2) in one pass."""
    tensor, start = _work_items(sizes)
    parts = np.zeros((tensor.size, 3))
    for w in prange(tensor.size):
        gc = _chunk(g_addr, sizes, tensor[w], start[w], zero)
        xc = _chunk(x_addr, sizes, tensor[w], start[w], zero)
        q = gc.size // _LANES
        gg = zero
        aa = zero
        xx = zero
        for j in range(q):
            for lane in range(_LANES):
                g2, a2, x2 = _block_element(gc, xc, lane * q + j, lam)
                gg += g2
                aa += a2
                xx += x2
        for i in range(_LANES * q, gc.size):
            g2, a2, x2 = _block_element(gc, xc, i, lam)
            gg += g2
            aa += a2
            xx += x2
        parts[w, 0] = gg
        parts[w, 1] = aa
        parts[w, 2] = xx
    out = np.zeros((sizes.size, 3))
    for w in range(tensor.size):
        for k in range(3):
            out[tensor[w], k] += parts[w, k]
    return out


def _vanilla_update(x_addr, g_addr, sizes, scales, zero):
    """x_t -= scales[t] * g_t for every tensor t (scales in the tensors' dtype)."""
    tensor, start = _work_items(sizes)
    for w in prange(tensor.size):
        t = tensor[w]
        xc = _chunk(x_addr, sizes, t, start[w], zero)
        gc = _chunk(g_addr, sizes, t, start[w], zero)
        s = scales[t]
        q = xc.size // _LANES
        for j in range(q):
            for lane in range(_LANES):
                xc[lane * q + j] -= s * gc[lane * q + j]
        for i in range(_LANES * q, xc.size):
            xc[i] -= s * gc[i]


def _momentum_update(
    x_addr,
    g_addr,
    v_addr,
    avg_addr,
    sizes,
    lam,
    kappa,
    weight_gains,
    velocity_gains,
    average_weights,
    kept_weights,
    shift,
    zero,
):
    """The KOALA-M block update of every tensor, fused; returns sum_t |x_t - x_avg_t (new)|^2.

    Per-tensor coefficients come in the tensors' dtype; `kept_weights` is 1 - average_weights. See
    `koala.functional.apply_momentum_single_tensor` for the unfused form.
    """
    tensor, start = _work_items(sizes)
    parts = np.zeros(tensor.size)
    for w in prange(tensor.size):
        t = tensor[w]
        xc = _chunk(x_addr, sizes, t, start[w], zero)
        gc = _chunk(g_addr, sizes, t, start[w], zero)
        vc = _chunk(v_addr, sizes, t, start[w], zero)
        ac = _chunk(avg_addr, sizes, t, start[w], zero)
        kx, kp, mix, kept = weight_gains[t], velocity_gains[t], average_weights[t], kept_weights[t]
        q = xc.size // _LANES
        total = zero
        for j in range(q):
            for lane in range(_LANES):
                total += _momentum_element(xc, gc, vc, ac, lane * q + j, lam, kappa, kx, kp, mix, kept, shift)
        for i in range(_LANES * q, xc.size):
            total += _momentum_element(xc, gc, vc, ac, i, lam, kappa, kx, kp, mix, kept, shift)
        parts[w] = total
    return parts.sum()


def _renamed(function: Callable[..., Any], suffix: str) -> Callable[..., Any]:
    """The same function under another qualified name, so that it gets its own on-disk cache entry."""
    copy = types.FunctionType(
        function.__code__, function.__globals__, function.__name__ + suffix, function.__defaults__, function.__closure__
    )
    copy.__qualname__ = function.__qualname__ + suffix
    copy.__doc__ = function.__doc__
    return copy


def _compile(function: Callable[..., Any]) -> tuple[Any, Any]:
    """A parallel and a serial compilation of one kernel.

    Numba's cache keys an entry by the function's name and signature, not by its options: compiled from one function,
    whichever variant a process compiled first would be loaded for both (the serial loop for the largest calls), so
    each variant gets a name of its own, which also names the error model.

    Division follows IEEE arithmetic (`error_model="numpy"`: inf or NaN, as in torch), not Python's: the zero-division
    checks Python's model adds kept the serial compilations' loops from vectorising, and KoalaDiag's divisions ran
    5-7x slower on one thread than its parallel compilations (bench/RESULTS.md, "KoalaDiag step time").
    """
    parallel = numba.njit(parallel=True, fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)(
        _renamed(function, "_parallel_ieee")
    )
    serial = numba.njit(fastmath=_FASTMATH, error_model="numpy", cache=True, nogil=True)(
        _renamed(function, "_serial_ieee")
    )
    return parallel, serial


_sums_of_squares_parallel, _sums_of_squares_serial = _compile(_sums_of_squares)
_block_sums_parallel, _block_sums_serial = _compile(_block_sums)
_vanilla_update_parallel, _vanilla_update_serial = _compile(_vanilla_update)
_momentum_update_parallel, _momentum_update_serial = _compile(_momentum_update)
_KERNELS = {
    True: (_sums_of_squares_parallel, _block_sums_parallel, _vanilla_update_parallel, _momentum_update_parallel),
    False: (_sums_of_squares_serial, _block_sums_serial, _vanilla_update_serial, _momentum_update_serial),
}


# --------------------------------------------------------------------------------------------------------------------
# Entry points over lists of tensors


class _Table:
    """Element counts of one call's tensors, and their data pointers.

    The kernels trust these blindly. Callers guarantee what `eligible` checks (contiguous CPU tensors, one float32 or
    float64 dtype per call) and that every list matches the parameters' shapes (torch enforces it for gradients,
    `load_state_dict` for the optimizer state).
    """

    def __init__(self, params: Sequence[Tensor]) -> None:
        self.dtype = params[0].dtype
        self.scalar = np.float32 if self.dtype == torch.float32 else np.float64
        self.zero = self.scalar(0)
        self.sizes = np.fromiter((t.numel() for t in params), np.int64, len(params))
        self.parallel = int(self.sizes.sum()) >= PARALLEL_NUMEL and _parallel_threads()

    @staticmethod
    def addresses(tensors: Sequence[Tensor]) -> np.ndarray:
        return np.fromiter((t.data_ptr() for t in tensors), np.int64, len(tensors))


def warm_up(dtype: torch.dtype = torch.float32) -> None:
    """Load every kernel for `dtype` tensors now, serial and parallel: from Numba's on-disk cache (about a second per
    process, most of it Numba's own start-up) or by compiling it (several seconds, once per machine). Otherwise the
    first step pays it. Idempotent and cheap once done; nothing with KOALA_CPU_KERNELS=0, where only `fused=True`
    runs them (and loads them at its first step)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype: the CPU kernels take {' or '.join(map(str, DTYPES))}, got {dtype}")
    if not by_default():
        return
    _start_pool()  # compiling a parallel kernel would start it, without the care `_start_pool` takes
    scalar = np.float32 if dtype == torch.float32 else np.float64
    address, sizes = numba.typeof(np.zeros(1, np.int64)), numba.typeof(np.zeros(1, np.int64))
    value, coefficients = numba.typeof(scalar(0)), numba.typeof(np.zeros(1, scalar))
    signatures = (
        (address, sizes, value),  # sums of squares: g, sizes, zero
        (address, address, sizes, value, value),  # block sums: g, x, sizes, lam, zero
        (address, address, sizes, coefficients, value),  # vanilla update: x, g, sizes, scales, zero
        (address,) * 4 + (sizes, value, value) + (coefficients,) * 4 + (value, value),  # momentum update
    )
    for kernels in _KERNELS.values():
        for kernel, signature in zip(kernels, signatures, strict=True):
            kernel.compile(signature)


_pool_started = False


def _start_pool() -> None:
    """Start Numba's thread pool once, keeping torch's intra-op thread count.

    Numba and torch share one OpenMP runtime, and starting Numba's pool sets the calling thread's OpenMP thread count
    to the pool's size, which torch then follows: a one-CPU Ray trial trained on two threads, spinning against the
    trial next to it (the first KOALA trials of a job ran 5-15x slower)."""
    global _pool_started
    if _pool_started:
        return
    threads = torch.get_num_threads()
    numba.get_num_threads()  # starts the pool
    torch.set_num_threads(threads)
    _pool_started = True


def _parallel_threads() -> bool:
    """Whether the parallel kernels should run: only with more than one intra-op thread, which they then follow
    (Ray trials and DDP workers limit torch's count) within Numba's pool size.

    With one thread the serial kernels run and Numba's thread count is left alone: setting it at every step made two
    single-thread processes sharing two cores (one-CPU Ray trials) train a small model 3-7x slower."""
    threads = min(torch.get_num_threads(), int(getattr(numba.config, "NUMBA_NUM_THREADS", 1)))
    if threads < 2:
        return False
    _start_pool()
    numba.set_num_threads(threads)
    return True


def block_sums(grads: Sequence[Tensor], params: Sequence[Tensor], weight_decay: float) -> np.ndarray:
    """Per block [|g|^2, |g + lam x|^2, |x|^2] as float64, shape (blocks, 3); the weights are read only if lam != 0."""
    table = _Table(params)
    g_addr = table.addresses(grads)
    if weight_decay == 0:
        kernel = _sums_of_squares_parallel if table.parallel else _sums_of_squares_serial
        g_sq = kernel(g_addr, table.sizes, table.zero)
        return np.stack((g_sq, g_sq, np.zeros_like(g_sq)), axis=1)
    kernel = _block_sums_parallel if table.parallel else _block_sums_serial
    x_addr = table.addresses(params)
    result: np.ndarray = kernel(g_addr, x_addr, table.sizes, table.zero + weight_decay, table.zero)
    return result


def vanilla_update(params: Sequence[Tensor], grads: Sequence[Tensor], scales: np.ndarray) -> None:
    """x_b -= scales[b] * g_b for every block (the KOALA-V step)."""
    table = _Table(params)
    kernel = _vanilla_update_parallel if table.parallel else _vanilla_update_serial
    x_addr, g_addr = table.addresses(params), table.addresses(grads)
    kernel(x_addr, g_addr, table.sizes, np.asarray(scales, table.scalar), table.zero)


def momentum_update(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    velocities: Sequence[Tensor],
    averages: Sequence[Tensor],
    weight_decay: float,
    kappa: float,
    weight_gains: np.ndarray,
    velocity_gains: np.ndarray,
    average_weights: np.ndarray,
    shift: float,
) -> float:
    """Apply the fused KOALA-M block update to every block; returns sum_b |x_b - x_avg_b|^2."""
    table = _Table(params)
    kernel = _momentum_update_parallel if table.parallel else _momentum_update_serial
    # A block without gradient has zero gains, so its direction only has to be finite: the weights serve.
    directions = [x if g is None else g for x, g in zip(params, grads, strict=True)]
    zero = table.zero
    return float(
        kernel(
            table.addresses(params),
            table.addresses(directions),
            table.addresses(velocities),
            table.addresses(averages),
            table.sizes,
            zero + weight_decay,
            zero + kappa,
            np.asarray(weight_gains, table.scalar),
            np.asarray(velocity_gains, table.scalar),
            np.asarray(average_weights, table.scalar),
            (1 - np.asarray(average_weights, np.float64)).astype(table.scalar),
            zero + shift,
            zero,
        )
    )
