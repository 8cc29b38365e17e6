"""The machine's matmul peak, measured: GFLOP/s of one large square matmul per dtype, on the
device and threads the runs get, so that a run's tokens/s x FLOPs per token reads as a share of
what this machine can multiply (on a CPU, float32 and bfloat16 differ 3-4x where AMX is present)."""

from __future__ import annotations

import time

import torch

DTYPES = ("float32", "bfloat16")


def matmul_gflops(device: torch.device, dtype: torch.dtype, *, size: int = 2048, seconds: float = 1.0) -> float:
    """The best of rounds of `size` x `size` matmuls over about `seconds`, in GFLOP/s (2 n^3 FLOPs each)."""
    generator = torch.Generator(device).manual_seed(0)
    a, b = (torch.randn(size, size, generator=generator, device=device).to(dtype) for _ in range(2))
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    torch.mm(a, b)  # warm-up: kernel choice, AMX tile set-up, caches
    sync()
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        torch.mm(a, b)
        sync()
        took = time.perf_counter() - start
        best, spent = min(best, took), spent + took
    return 2 * size ** 3 / best / 1e9


def measured_peaks(device: torch.device, *, threads: int | None = None) -> dict[str, float]:
    """{dtype name: GFLOP/s} for float32 and bfloat16, with `threads` CPU threads (None: torch's choice)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        return {name: round(matmul_gflops(device, getattr(torch, name)), 1) for name in DTYPES}
    finally:
        torch.set_num_threads(before)
