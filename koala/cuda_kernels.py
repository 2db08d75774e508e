"""Fused CUDA kernels for the multi-tensor path, written in Triton.

Eager PyTorch pays one kernel launch (5-15 us of host time) per operation. A KOALA step through `torch._foreach_*`
makes about 250 of them on ResNet-18's 62 tensors: the filter's scalar arithmetic is about a hundred 0-d operations,
and the update needs two launches per tensor (foreach kernels take no per-tensor scalar that lives on the device,
and the sync-free skip is a `torch.where` per tensor). On an H100 that made a step cost 5x a fused Adam step while
moving fewer bytes. These kernels do the step in a handful of launches:

    block sums     one pass over the gradients (and weights, with weight decay): per-tile partial sums, then a
                   per-block reduction in a fixed order (deterministic, no atomics)
    filter         one single-program kernel: the measurement noise, the gains of every block, the skip rule and
                   the covariance update, written into the optimizer's state in place
    update         one pass per run of tensors sharing dtype, lr and weight decay
    predict        (KOALA-M) one single-program kernel after the weight-drift sum

Tensors are addressed through a per-step table of data pointers (the layout of torch's multi_tensor_apply), copied
from pinned memory without blocking: `step()` never synchronises. Filter arithmetic is float64; Triton passes a
Python float as float32, so every float64 constant enters as a (high, low) float32 pair whose sum is exact to ~1e-15.
The kernels run where Triton is importable (it ships with torch's CUDA builds), outside `torch.compile`; the
optimizers' `fused` argument chooses them or the `torch._foreach_*` path, the reference they are tested against
(`koala.functional.select_path`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only torch builds do not ship Triton
    triton = None

#: Whether the kernels can run at all: Triton is importable.
AVAILABLE: bool = triton is not None

#: Triton's interpreter runs the kernels on CPU tensors (TRITON_INTERPRET=1): how they are checked without a GPU.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
#: Elements per program of the passes over parameter memory.
TILE = 4096
_REDUCE = 256  # tiles summed per iteration of the per-block reduction
# Columns of the per-block table: data pointers of x, g, v, x_avg (0 where absent), element count, first tile.
_V, _AVG, _NUMEL, _FIRST_TILE = range(2, 6)
_COLUMNS = 6
# The KOALA-M filter's scratch (velocity decay, take, rho, h, finite) is addressed by position in the kernels.


def _split(value: float) -> tuple[float, float]:
    """`value` as float32 high and low parts: Triton types Python floats as float32."""
    high = float(np.float32(value))
    return high, float(np.float32(value - high))


# --------------------------------------------------------------------------------------------------------------------
# Layout: the per-block pointer table, the tile map and the step's buffers


class Workspace:
    """Device buffers, the last pointer table and the last step plan of one optimizer, reused across steps while the
    shapes hold.

    Reuse is safe in stream order: a step's kernels run after the previous step's on the same stream. The pointer
    table is uploaded only when a pointer changed (the caching allocator tends to hand gradients the same addresses
    step after step), and the plan (checks, table, runs) is rebuilt only when its key changes (see `plan`)."""

    def __init__(self, device: torch.device, numels: tuple[int, ...]) -> None:
        self.device, self.numels = device, numels
        tiles = [-(-n // TILE) for n in numels]
        self.first_tiles = [0, *np.cumsum(tiles).tolist()]
        self.most_tiles = max(1, *tiles)
        self.numel = sum(numels)
        nblocks, ntiles = len(numels), int(self.first_tiles[-1])
        self.tile_block = _upload(np.repeat(np.arange(nblocks, dtype=np.int32), tiles), device)

        def buffer(*shape: int) -> Tensor:
            return torch.empty(shape, dtype=torch.float64, device=device)

        self.tile_sums = buffer(ntiles, 3)  # per tile: |g|^2, |a|^2, lam/2 |x|^2
        self.tile_drift = buffer(ntiles)
        self.stats = buffer(nblocks, 3)
        self.coefficients = buffer(nblocks, 3)
        self.moments = buffer(3)
        self.scratch = buffer(5)
        self.rows = np.zeros((nblocks + 1, _COLUMNS), dtype=np.int64)  # a sentinel row holds the tile count
        self.rows[:, _FIRST_TILE] = self.first_tiles
        self.rows[:nblocks, _NUMEL] = numels
        self.table = _upload(self.rows, device)
        self.key: tuple[Any, ...] | None = None  # what the cached plan was built for (see `_plan_key`)
        self.runs: list[Run] = []  # the cached plan's runs
        self.builds = 0  # plans built in full; the other steps reused the cached one
        self._buffers: dict[str, Tensor] = {}

    def buffer(self, name: str, *shape: int) -> Tensor:
        """A float64 device buffer by name, allocated at its first use (for variants with kernels of their own)."""
        found = self._buffers.get(name)
        if found is None or found.shape != shape:
            found = self._buffers[name] = torch.empty(shape, dtype=torch.float64, device=self.device)
        return found


def _staged(host: np.ndarray, device: torch.device) -> Tensor:
    """A copy of `host` to send to `device` without blocking: in pinned memory, which the caching host allocator
    keeps alive until the copy is done."""
    tensor = torch.from_numpy(host.copy())
    return tensor if device.type == "cpu" else tensor.pin_memory()


def _upload(host: np.ndarray, device: torch.device) -> Tensor:
    return _staged(host, device).to(device, non_blocking=True)


@dataclass
class Layout:
    """What the kernels of one step need: the workspace (its table up to date) and the per-parameter state."""

    workspace: Workspace
    velocities: list[Tensor]
    averages: list[Tensor]

    @property
    def table(self) -> Tensor:
        return self.workspace.table

    @property
    def tile_block(self) -> Tensor:
        return self.workspace.tile_block

    @property
    def first_tiles(self) -> list[int]:
        return self.workspace.first_tiles


def plan(
    blocks: Blocks,
    filter_device: torch.device,
    workspace: Workspace | None,
    velocities: Sequence[Tensor] = (),
    averages: Sequence[Tensor] = (),
) -> Layout | None:
    """The step's layout, or None where the kernels do not apply: every tensor must be a contiguous float tensor on
    the filter's CUDA device, and each block's gradient and state of its parameter's dtype; not under compile.

    Cached: while the plan's key (`_plan_key`) is the one the workspace's plan was built for, that plan is the step's:
    its checks, pointer table and runs unchanged. Otherwise one pass over the blocks checks them, gathers the pointers
    and computes the runs (a plain loop, about 1.3-2.2 us per block on a slow host CPU; the key about 0.6-0.8)."""
    if not AVAILABLE or torch.compiler.is_compiling() or filter_device.type != ("cpu" if INTERPRET else "cuda"):
        return None
    key = _plan_key(blocks, velocities, averages)
    if workspace is not None and workspace.key == key and workspace.device == filter_device:
        blocks._runs = workspace.runs
        return Layout(workspace, list(velocities), list(averages))
    pointers = []
    keys = []
    for b, x in enumerate(blocks.params):
        dtype = x.dtype
        if dtype not in _DTYPES or x.device != filter_device or not x.is_contiguous():
            return None
        g = blocks.grads[b]
        if g is not None and (g.dtype != dtype or g.device != filter_device or not g.is_contiguous()):
            return None
        row = [x.data_ptr(), 0 if g is None else g.data_ptr(), 0, 0]
        for column, kind in ((_V, velocities), (_AVG, averages)):  # a variant may keep one kind of state, or none
            if kind:
                t = kind[b]
                if t.dtype != dtype or t.device != filter_device or not t.is_contiguous():
                    return None
                row[column] = t.data_ptr()
        pointers.append(row)
        keys.append((dtype, blocks.lrs[b], blocks.weight_decays[b], g is not None))
    numels = tuple(x.numel() for x in blocks.params)
    if workspace is None or workspace.numels != numels or workspace.device != filter_device:
        workspace = Workspace(filter_device, numels)
    table = np.array(pointers, dtype=np.int64)
    if not np.array_equal(workspace.rows[:-1, :_NUMEL], table):
        workspace.rows[:-1, :_NUMEL] = table
        workspace.table.copy_(_staged(workspace.rows, filter_device), non_blocking=True)
    blocks._runs = []
    start = 0
    for b in range(1, len(keys) + 1):
        if b == len(keys) or keys[b] != keys[start]:
            _, lr, lam, has_grad = keys[start]
            blocks._runs.append(Run(start, b, lr, lam, has_grad))
            start = b
    workspace.key, workspace.runs = key, blocks._runs
    workspace.builds += 1
    return Layout(workspace, list(velocities), list(averages))


def _plan_key(blocks: Blocks, velocities: Sequence[Tensor], averages: Sequence[Tensor]) -> tuple[Any, ...]:
    """What a step's plan depends on, cheap to gather: the address of every parameter, gradient (0: none) and state
    tensor, each block's dtype, size and lr and weight decay, and whether its parameter and gradient are contiguous.
    The plan's checks hold while it is unchanged: a tensor keeps its device with its address (CUDA's unified
    addressing gives the host and every device addresses of their own), and the state tensors are the optimizer's
    own (allocated contiguous, on the parameter's device, of its dtype)."""
    params = blocks.params
    return (
        [x.data_ptr() for x in params],
        [0 if g is None else g.data_ptr() for g in blocks.grads],
        [t.data_ptr() for t in velocities],
        [t.data_ptr() for t in averages],
        [x.dtype for x in params],
        [x.numel() for x in params],
        [x.is_contiguous() for x in params],
        [g is None or g.is_contiguous() for g in blocks.grads],
        list(blocks.lrs),
        list(blocks.weight_decays),
    )


def _launch_runs(blocks: Blocks, lay: Layout, *, with_grad: bool | None, launch: Any) -> None:
    """Call `launch(run, first_tile, tiles, dtype)` for each run of blocks (`with_grad` as in `runs`) with tiles."""
    for run in runs(blocks, with_grad=with_grad):
        first, stop = lay.first_tiles[run.start], lay.first_tiles[run.stop]
        if stop > first:
            launch(run, first, stop - first, blocks.params[run.start].dtype)


# --------------------------------------------------------------------------------------------------------------------
# Kernels

if triton is not None:
    _DTYPES: dict[torch.dtype, Any] = {
        torch.float32: tl.float32,
        torch.float64: tl.float64,
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
    }

    @triton.jit
    def _tile_of(table, tile_block, tile, COLUMNS: tl.constexpr, TILE: tl.constexpr):
        block = tl.load(tile_block + tile)
        row = table + block * COLUMNS  # columns: x, g, v, x_avg pointers, element count, first tile
        start = (tile - tl.load(row + 5)).to(tl.int64) * TILE
        offsets = start + tl.arange(0, TILE)
        return block, row, offsets, offsets < tl.load(row + 4)

    @triton.jit
    def _column(row, column, DTYPE: tl.constexpr):
        return tl.load(row + column).to(tl.pointer_type(DTYPE))

    @triton.jit
    def _loss_moments_kernel(loss, moments, numel, DTYPE: tl.constexpr, BLOCK: tl.constexpr, SPAN: tl.constexpr):
        """[sum, sum of squares, count] of the losses in float64 (`koala.functional.loss_moments`), one program.
        SPAN >= numel (a constant bound: one compilation per power of two of the batch size, not per size)."""
        total = tl.zeros((BLOCK,), dtype=tl.float64)
        squares = tl.zeros((BLOCK,), dtype=tl.float64)
        count = tl.zeros((BLOCK,), dtype=tl.float64)
        for start in range(0, SPAN, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            mask = offsets < numel
            value = tl.load(loss + offsets, mask=mask, other=0.0).to(tl.float64)
            total += value
            squares += value * value
            count += mask.to(tl.float64)
        tl.store(moments, tl.sum(total, axis=0))
        tl.store(moments + 1, tl.sum(squares, axis=0))
        tl.store(moments + 2, tl.sum(count, axis=0))

    @triton.jit
    def _block_sums_kernel(
        table,
        tile_block,
        partials,
        first_tile,
        lam_hi,
        lam_lo,
        DTYPE: tl.constexpr,
        ACC: tl.constexpr,
        WITH_DECAY: tl.constexpr,
        COLUMNS: tl.constexpr,
        TILE: tl.constexpr,
    ):
        """Per tile: |g|^2, |g + lam x|^2 and lam/2 |x|^2 (the last two are |g|^2 and 0 without weight decay)."""
        tile = first_tile + tl.program_id(0)
        _, row, offsets, mask = _tile_of(table, tile_block, tile, COLUMNS, TILE)
        g = tl.load(_column(row, 1, DTYPE) + offsets, mask=mask, other=0.0).to(ACC)
        gg = tl.sum(g * g, axis=0).to(tl.float64)
        out = partials + tile * 3
        tl.store(out, gg)
        if WITH_DECAY:
            x = tl.load(_column(row, 0, DTYPE) + offsets, mask=mask, other=0.0).to(ACC)
            a = g + (x * lam_hi + x * lam_lo)
            xx = tl.sum(x * x, axis=0).to(tl.float64)
            tl.store(out + 1, tl.sum(a * a, axis=0).to(tl.float64))
            tl.store(out + 2, xx * (lam_hi * 0.5) + xx * (lam_lo * 0.5))
        else:
            tl.store(out + 1, gg)
            tl.store(out + 2, 0.0)

    @triton.jit
    def _block_reduce_kernel(
        partials, table, stats, WIDTH: tl.constexpr, COLUMNS: tl.constexpr, REDUCE: tl.constexpr, SPAN: tl.constexpr
    ):
        """Per block: the sum of its tiles' partials (WIDTH <= 4 per tile), in tile order; zeros for a block without
        gradient. SPAN >= the most tiles any block has."""
        block = tl.program_id(0)
        row = table + block * COLUMNS
        first = tl.load(row + 5)
        stop = tl.load(row + COLUMNS + 5)  # the next row's first tile (the table ends with a sentinel row)
        has_grad = tl.load(row + 1) != 0  # tiles of blocks without gradient were never written
        columns = tl.arange(0, 4)
        acc = tl.zeros((REDUCE, 4), dtype=tl.float64)
        for start in range(0, SPAN, REDUCE):
            tiles = first + start + tl.arange(0, REDUCE)
            mask = (tiles < stop)[:, None] & (columns < WIDTH)[None, :]
            acc += tl.load(partials + tiles[:, None] * WIDTH + columns[None, :], mask=mask, other=0.0)
        sums = tl.sum(acc, axis=0)
        tl.store(stats + block * WIDTH + columns, tl.where(has_grad, sums, 0.0), mask=columns < WIDTH)

    @triton.jit
    def _gains(
        stats,
        moments,
        noise,
        prior_xx,
        blocks,
        decay_hi,
        decay_lo,
        keep_hi,
        keep_lo,
        ADAPTIVE: tl.constexpr,
        B: tl.constexpr,
        THRESHOLD: tl.constexpr,
    ):
        """update_k up to the weight change (`koala.functional.gains`); writes R_k in place."""
        index = tl.arange(0, B)
        valid = index < blocks
        gg = tl.load(stats + index * 3, mask=valid, other=0.0)
        aa = tl.load(stats + index * 3 + 1, mask=valid, other=0.0)
        l2 = tl.load(stats + index * 3 + 2, mask=valid, other=0.0)
        count = tl.load(moments + 2)
        loss = tl.load(moments) / count
        second_moment = tl.load(moments + 1) / count
        check = tl.sum(gg + aa + l2, axis=0) + loss + second_moment
        # check - check is NaN for any NaN or inf among the statistics; kept as a vector (broadcast) like `updated`.
        all_finite = (gg * 0.0 + (check - check)) == 0.0
        updated = valid & (tl.sqrt(gg) >= THRESHOLD) & all_finite
        finite = tl.max(all_finite.to(tl.int32), axis=0) > 0
        take = finite & (tl.max(updated.to(tl.int32), axis=0) > 0)
        old_noise = tl.load(noise)
        new_noise = old_noise
        if ADAPTIVE:
            blended = (old_noise * decay_hi + old_noise * decay_lo) + (
                second_moment * keep_hi + second_moment * keep_lo
            )
            new_noise = tl.where(take, blended, old_noise)
        tl.store(noise, new_noise)
        augmented = tl.where(updated, aa, 0.0)
        scaled_gaps = tl.where(updated, (loss + l2) / (prior_xx * augmented + new_noise), 0.0)
        g_star = tl.max(augmented, axis=0)
        denominator = prior_xx * g_star + new_noise
        return index, valid, finite, take, updated, scaled_gaps, new_noise / denominator, g_star / denominator

    @triton.jit
    def _vanilla_filter_kernel(
        stats,
        moments,
        covariance,
        noise,
        step,
        coefficients,
        blocks,
        decay_hi,
        decay_lo,
        keep_hi,
        keep_lo,
        q_hi,
        q_lo,
        ADAPTIVE: tl.constexpr,
        B: tl.constexpr,
        THRESHOLD: tl.constexpr,
    ):
        prior = tl.load(covariance)
        index, valid, _, take, _, scaled_gaps, rho, _ = _gains(
            stats, moments, noise, prior, blocks, decay_hi, decay_lo, keep_hi, keep_lo, ADAPTIVE, B, THRESHOLD
        )
        tl.store(coefficients + index, prior * scaled_gaps, mask=valid)
        tl.store(covariance, tl.where(take, (rho * prior + q_hi) + q_lo, prior))
        tl.store(step, tl.load(step) + take.to(tl.float64))

    @triton.jit
    def _vanilla_update_kernel(
        table,
        tile_block,
        coefficients,
        first_tile,
        lr_hi,
        lr_lo,
        DTYPE: tl.constexpr,
        ACC: tl.constexpr,
        COLUMNS: tl.constexpr,
        TILE: tl.constexpr,
    ):
        """x_b <- x_b - lr c_b g_b. A zero coefficient (block not updated, or the step skipped) touches no memory."""
        tile = first_tile + tl.program_id(0)
        block, row, offsets, mask = _tile_of(table, tile_block, tile, COLUMNS, TILE)
        c = tl.load(coefficients + block)
        if c != 0.0:
            scale = (c * lr_hi + c * lr_lo).to(ACC)
            x_ptr = _column(row, 0, DTYPE) + offsets
            g = tl.load(_column(row, 1, DTYPE) + offsets, mask=mask, other=0.0).to(ACC)
            x = tl.load(x_ptr, mask=mask, other=0.0).to(ACC)
            tl.store(x_ptr, (x - scale * g).to(DTYPE), mask=mask)

    @triton.jit
    def _momentum_filter_kernel(
        stats,
        moments,
        covariance,
        noise,
        coefficients,
        scratch,
        blocks,
        decay_hi,
        decay_lo,
        keep_hi,
        keep_lo,
        kappa_hi,
        kappa_lo,
        average_hi,
        average_lo,
        ADAPTIVE: tl.constexpr,
        B: tl.constexpr,
        THRESHOLD: tl.constexpr,
    ):
        pxx = tl.load(covariance)
        pxp = tl.load(covariance + 1)
        index, valid, finite, take, updated, scaled_gaps, rho, h = _gains(
            stats, moments, noise, pxx, blocks, decay_hi, decay_lo, keep_hi, keep_lo, ADAPTIVE, B, THRESHOLD
        )
        accepted = (updated & take).to(tl.float64)
        tl.store(coefficients + index * 3, pxx * scaled_gaps, mask=valid)
        tl.store(coefficients + index * 3 + 1, pxp * scaled_gaps, mask=valid)
        tl.store(coefficients + index * 3 + 2, accepted * average_hi + accepted * average_lo, mask=valid)
        taken = take.to(tl.float64)
        tl.store(scratch + 0, (taken * kappa_hi + taken * kappa_lo) + (1.0 - taken))
        tl.store(scratch + 1, taken)
        tl.store(scratch + 2, rho)
        tl.store(scratch + 3, h)
        tl.store(scratch + 4, finite.to(tl.float64))

    @triton.jit
    def _momentum_update_kernel(
        table,
        tile_block,
        coefficients,
        scratch,
        partials,
        first_tile,
        lr_hi,
        lr_lo,
        lam_hi,
        lam_lo,
        DTYPE: tl.constexpr,
        ACC: tl.constexpr,
        HAS_GRAD: tl.constexpr,
        WITH_DECAY: tl.constexpr,
        COLUMNS: tl.constexpr,
        TILE: tl.constexpr,
    ):
        """One KOALA-M block update per tile (`koala.functional.apply_momentum_single_tensor`); per-tile drift."""
        tile = first_tile + tl.program_id(0)
        block, row, offsets, mask = _tile_of(table, tile_block, tile, COLUMNS, TILE)
        x_ptr = _column(row, 0, DTYPE) + offsets
        v_ptr = _column(row, 2, DTYPE) + offsets
        avg_ptr = _column(row, 3, DTYPE) + offsets
        x = tl.load(x_ptr, mask=mask, other=0.0).to(ACC)
        v = tl.load(v_ptr, mask=mask, other=0.0).to(ACC) * tl.load(scratch + 0).to(ACC)
        if HAS_GRAD:
            weight_gain = tl.load(coefficients + block * 3)
            velocity_gain = tl.load(coefficients + block * 3 + 1)
            a = tl.load(_column(row, 1, DTYPE) + offsets, mask=mask, other=0.0).to(ACC)
            if WITH_DECAY:
                a = a + (x * lam_hi + x * lam_lo)
            a = tl.where(tl.load(scratch + 4) != 0.0, a, 0.0)  # 0 * inf is NaN: a skipped step sees no direction
            v = v - (velocity_gain * lr_hi + velocity_gain * lr_lo).to(ACC) * a
            x = x - (weight_gain * lr_hi + weight_gain * lr_lo).to(ACC) * a
        weight = tl.load(coefficients + block * 3 + 2)
        avg = tl.load(avg_ptr, mask=mask, other=0.0).to(ACC)
        difference = x - avg
        kept = difference * (1.0 - weight).to(ACC)
        tl.store(partials + tile, tl.sum(kept * kept, axis=0).to(tl.float64))
        tl.store(avg_ptr, (avg + weight.to(ACC) * difference).to(DTYPE), mask=mask)
        tl.store(v_ptr, v.to(DTYPE), mask=mask)
        tl.store(x_ptr, (x + tl.load(scratch + 1).to(ACC) * v).to(DTYPE), mask=mask)

    @triton.jit
    def _momentum_predict_kernel(
        drift_sq,
        scratch,
        covariance,
        process_noise,
        step,
        kappa_hi,
        kappa_lo,
        kappa2_hi,
        kappa2_lo,
        qp_hi,
        qp_lo,
        decay_hi,
        decay_lo,
        distance_hi,
        distance_lo,
    ):
        """P_k = P^ - h~ c c^T, then predict_{k+1}: the qx EMA of the drift and P^ = F P F^T + Q (KoalaM._predict)."""
        take = tl.load(scratch + 1)
        rho = tl.load(scratch + 2)
        h = tl.load(scratch + 3)
        sxx = tl.load(covariance)
        sxp = tl.load(covariance + 1)
        spp = tl.load(covariance + 3)
        post_xx = rho * sxx
        post_xp = rho * sxp
        post_pp = spp - h * sxp * sxp
        old_qx = tl.load(process_noise)
        distance = tl.sqrt(tl.load(drift_sq))
        qx = (old_qx * decay_hi + old_qx * decay_lo) + (distance * distance_hi + distance * distance_lo)
        pxx = post_xx + 2.0 * post_xp + post_pp + qx
        velocity = post_xp + post_pp
        pxp = velocity * kappa_hi + velocity * kappa_lo
        ppp = (post_pp * kappa2_hi + post_pp * kappa2_lo + qp_hi) + qp_lo
        accepted = take != 0.0
        tl.store(covariance, tl.where(accepted, pxx, sxx))
        tl.store(covariance + 1, tl.where(accepted, pxp, sxp))
        tl.store(covariance + 2, tl.where(accepted, pxp, sxp))
        tl.store(covariance + 3, tl.where(accepted, ppp, spp))
        tl.store(process_noise, tl.where(accepted, qx, old_qx))
        tl.store(step, tl.load(step) + take)

else:
    _DTYPES = {}


def _accumulator(dtype: torch.dtype) -> Any:
    return tl.float64 if dtype == torch.float64 else tl.float32


def _block_width(blocks: int) -> int:
    return max(16, int(triton.next_power_of_2(blocks)))


def _decay_constants(noise_decay: float | None) -> tuple[float, float, float, float]:
    decay = 1.0 if noise_decay is None else noise_decay
    return (*_split(decay), *_split(1 - decay))


# --------------------------------------------------------------------------------------------------------------------
# Entry points


def loss_moments(loss: Tensor, device: torch.device, out: Tensor | None = None) -> Tensor:
    """[sum, sum of squares, count] of the loss as float64 on `device` (in `out` if given), in one launch where the
    kernel applies."""
    values = loss.detach().reshape(-1)
    if values.device != device or values.dtype not in _DTYPES:
        return F.loss_moments(loss, device, torch.float64)
    moments = torch.empty(3, dtype=torch.float64, device=device) if out is None else out
    numel = values.numel()
    block = min(1024, max(16, int(triton.next_power_of_2(numel))))
    span = block * int(triton.next_power_of_2(-(-numel // block)))
    _loss_moments_kernel[(1,)](values, moments, numel, DTYPE=_DTYPES[values.dtype], BLOCK=block, SPAN=span)
    return moments


def block_stats(blocks: Blocks, lay: Layout) -> Tensor:
    """Per block [|g|^2, |g + lam x|^2, lam/2 |x|^2] in float64 on the device (zeros for blocks without gradient)."""
    ws = lay.workspace
    partials = ws.tile_sums

    def launch(run: Any, first: int, tiles: int, dtype: torch.dtype) -> None:
        _block_sums_kernel[(tiles,)](
            lay.table,
            lay.tile_block,
            partials,
            first,
            *_split(run.weight_decay),
            DTYPE=_DTYPES[dtype],
            ACC=_accumulator(dtype),
            WITH_DECAY=run.weight_decay != 0,
            COLUMNS=_COLUMNS,
            TILE=TILE,
        )

    _launch_runs(blocks, lay, with_grad=True, launch=launch)
    return reduce_blocks(lay, partials, ws.stats)


def reduce_blocks(lay: Layout, partials: Tensor, stats: Tensor) -> Tensor:
    """`stats` (blocks, width): per block the sum of its tiles' rows of `partials` (tiles, width), width <= 4."""
    ws = lay.workspace
    reduce = min(_REDUCE, int(triton.next_power_of_2(ws.most_tiles)))
    span = -(-ws.most_tiles // reduce) * reduce
    width = partials.shape[1]
    _block_reduce_kernel[(stats.shape[0],)](
        partials, lay.table, stats, WIDTH=width, COLUMNS=_COLUMNS, REDUCE=reduce, SPAN=span
    )
    return stats


def vanilla_step(
    blocks: Blocks,
    lay: Layout,
    stats: Tensor,
    moments: Tensor,
    state: dict[str, Tensor],
    noise_decay: float | None,
    process_noise: float,
) -> None:
    """KOALA-V's filter and update; `state` holds the 0-d float64 tensors covariance, noise and step (in place)."""
    coefficients = lay.workspace.coefficients.view(-1)[: len(blocks)]
    _vanilla_filter_kernel[(1,)](
        stats,
        moments,
        state["covariance"],
        state["measurement_noise"],
        state["step"],
        coefficients,
        len(blocks),
        *_decay_constants(noise_decay),
        *_split(process_noise),
        ADAPTIVE=noise_decay is not None,
        B=_block_width(len(blocks)),
        THRESHOLD=GRADIENT_THRESHOLD,
    )

    def launch(run: Any, first: int, tiles: int, dtype: torch.dtype) -> None:
        _vanilla_update_kernel[(tiles,)](
            lay.table,
            lay.tile_block,
            coefficients,
            first,
            *_split(run.lr),
            DTYPE=_DTYPES[dtype],
            ACC=_accumulator(dtype),
            COLUMNS=_COLUMNS,
            TILE=TILE,
        )

    _launch_runs(blocks, lay, with_grad=True, launch=launch)


def momentum_update(
    blocks: Blocks,
    lay: Layout,
    stats: Tensor,
    moments: Tensor,
    state: dict[str, Tensor],
    noise_decay: float | None,
    momentum: float,
) -> tuple[Tensor, Tensor]:
    """KOALA-M's update_k over every block; returns the squared weight drift (0-d) and the scratch for `predict`."""
    coefficients, scratch = lay.workspace.coefficients, lay.workspace.scratch
    _momentum_filter_kernel[(1,)](
        stats,
        moments,
        state["covariance"],
        state["measurement_noise"],
        coefficients,
        scratch,
        len(blocks),
        *_decay_constants(noise_decay),
        *_split(momentum),
        *_split(1 - AVERAGE_DECAY),
        ADAPTIVE=noise_decay is not None,
        B=_block_width(len(blocks)),
        THRESHOLD=GRADIENT_THRESHOLD,
    )
    partials = lay.workspace.tile_drift  # every tile writes its own

    def launch(run: Any, first: int, tiles: int, dtype: torch.dtype) -> None:
        _momentum_update_kernel[(tiles,)](
            lay.table,
            lay.tile_block,
            coefficients,
            scratch,
            partials,
            first,
            *_split(run.lr),
            *_split(run.weight_decay),
            DTYPE=_DTYPES[dtype],
            ACC=_accumulator(dtype),
            HAS_GRAD=run.has_grad,
            WITH_DECAY=run.weight_decay != 0,
            COLUMNS=_COLUMNS,
            TILE=TILE,
        )

    _launch_runs(blocks, lay, with_grad=None, launch=launch)
    return partials.sum(), scratch


def momentum_predict(
    drift_sq: Tensor, scratch: Tensor, state: dict[str, Tensor], numel: int, momentum: float, velocity_noise: float
) -> None:
    """KOALA-M's covariance update and predict_{k+1}, in place on covariance, process noise and step."""
    _momentum_predict_kernel[(1,)](
        drift_sq,
        scratch,
        state["covariance"],
        state["process_noise"],
        state["step"],
        *_split(momentum),
        *_split(momentum * momentum),
        *_split(velocity_noise),
        *_split(AVERAGE_DECAY),
        *_split((1 - AVERAGE_DECAY) / numel),  # qx takes (1 - 0.9) |x - x_avg|_2 / n
    )


__all__ = [
    "Layout",
    "Workspace",
    "block_stats",
    "loss_moments",
    "momentum_predict",
    "momentum_update",
    "plan",
    "reduce_blocks",
    "vanilla_step",
]

# Last: koala.functional builds its path table from this module, so whichever of the two is imported first, each finds
# the other's names defined (used only inside functions here).
from koala import functional as F  # noqa: E402
from koala.functional import AVERAGE_DECAY, GRADIENT_THRESHOLD, Blocks, Run, runs  # noqa: E402
