"""KOALA's fused CPU kernels (Numba), as separate processes see them: the on-disk cache keeps the serial and
parallel variants apart, `warm_up` loads every kernel a step uses, and torch's thread count is left alone.
(That the fused path computes what the loop does: tests/test_optimizer.py.)"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
import torch

from koala import cpu_kernels

_CACHE_PROBE = """
import sys, numpy as np, torch
from koala import cpu_kernels
kernel = getattr(cpu_kernels, "_vanilla_update_" + sys.argv[1])
x, g = torch.zeros(10), torch.ones(10)
addresses = [np.array([t.data_ptr()], dtype=np.int64) for t in (x, g)]
kernel(*addresses, np.array([10], dtype=np.int64), np.ones(1, dtype=np.float32), np.float32(0))
assert x.eq(-1).all()
print(kernel.stats.cache_hits.total(), kernel.stats.cache_misses.total())
"""


def test_parallel_kernel_never_loads_the_serial_one_from_the_cache(tmp_path: Any) -> None:
    """Both variants of a kernel come from one function; Numba's cache must keep them apart (it keys entries by name
    and signature only), or the largest tensors run the serial loop in every later process."""
    env = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path)}

    def probe(variant: str) -> tuple[int, int]:
        run = subprocess.run([sys.executable, "-c", _CACHE_PROBE, variant], env=env, capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        hits, misses = run.stdout.split()
        return int(hits), int(misses)

    assert probe("serial") == (0, 1)  # compiled and saved
    assert probe("parallel") == (0, 1)  # its own entry: compiled, not the serial one loaded
    assert probe("parallel") == (1, 0)  # and cached from then on


_WARM_UP_PROBE = """
import sys, torch
from koala import KoalaM, KoalaV, cpu_kernels
dtype = getattr(torch, sys.argv[1])
cpu_kernels.warm_up(dtype)
kernels = [k for group in cpu_kernels._KERNELS.values() for k in group]
loaded = [len(k.signatures) for k in kernels]
for cls in (KoalaV, KoalaM):
    for weight_decay in (0.0, 1e-3):
        for size in (7, 1 << 17):  # serial and parallel kernels
            weight = torch.nn.Parameter(torch.randn(size, dtype=dtype))
            weight.grad = torch.randn(size, dtype=dtype)
            cls([weight], weight_decay=weight_decay).step(loss=torch.ones(4))
print(loaded, [len(k.signatures) for k in kernels])
"""


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_warm_up_loads_every_kernel_a_step_uses(dtype: str) -> None:
    """After `cpu_kernels.warm_up`, no KOALA step (either variant, with and without weight decay, serial and parallel
    sizes) loads or compiles another kernel: the service calls it so that a trial's clock never counts that."""
    run = subprocess.run([sys.executable, "-c", _WARM_UP_PROBE, dtype], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    loaded, after = run.stdout.split("] [")
    assert loaded == "[" + ", ".join(["1"] * 8)
    assert after == ", ".join(["1"] * 8) + "]\n"


_THREADS_PROBE = """
import sys, numba, torch
from koala import KoalaM, KoalaV, cpu_kernels
calls = []
numba.set_num_threads = calls.append
torch.set_num_threads(int(sys.argv[1]))
torch.get_num_threads()  # torch's thread state initialised, as in any process that has trained
cpu_kernels.warm_up()
for cls in (KoalaV, KoalaM):
    weight = torch.nn.Parameter(torch.randn(1 << 17))  # large enough for the parallel kernels
    weight.grad = torch.randn(1 << 17)
    cls([weight], weight_decay=1e-3).step(loss=torch.ones(4))
print(sorted(set(calls)), torch.get_num_threads())
"""


def test_kernels_keep_torchs_thread_count() -> None:
    """torch's intra-op thread count survives `warm_up` and steps (Numba's OpenMP pool, started by either, shares
    the runtime and would raise it to the pool size). With one thread (a one-CPU Ray trial) the serial kernels run
    and Numba's thread count is not set either. Both made two one-CPU trials sharing two cores train 3-15x slower.
    With more threads the parallel kernels follow torch's count."""
    run = subprocess.run([sys.executable, "-c", _THREADS_PROBE, "1"], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "[] 1"
    if cpu_kernels.numba.config.NUMBA_NUM_THREADS > 1:
        run = subprocess.run([sys.executable, "-c", _THREADS_PROBE, "2"], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        assert run.stdout.strip() == "[2] 2"


def test_warm_up_rejects_other_dtypes() -> None:
    with pytest.raises(
        ValueError, match=r"dtype: the CPU kernels take torch.float32 or torch.float64, got torch.bfloat16"
    ):
        cpu_kernels.warm_up(torch.bfloat16)
