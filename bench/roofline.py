"""Roofline references measured in the same run: HBM copy bandwidth and cuBLAS bf16 rate.

* Logits path (memory-bound): forward reads the logits once, backward reads them again
  and writes the gradient: ``3·N·V·s`` bytes at least.  Floor = bytes / copy bandwidth;
  a method's score is ``floor / measured time``.
* Fused-linear path (matmul-bound): the GEMMs actually needed are the forward ``H·Wᵀ``
  and the backward ``dH = G·W`` and ``dW = Gᵀ·H``: ``3 · 2·N·D·V`` FLOPs (a recompute of
  ``H·Wᵀ`` in the backward is not counted as needed).  Score = ``(FLOPs / time) / rate``.
"""
import statistics

import torch

from .timing import time_calls_ms

COPY_BYTES = 1 << 30
GEMM_SHAPE = (16384, 4096, 32768)  # M (tokens), K (hidden), N (a vocabulary tile)


def _median_ms(fn, device, reps):
    return statistics.median(time_calls_ms(fn, device, warmup=1, reps=reps))


def copy_bandwidth(device, nbytes=COPY_BYTES, reps=20):
    """Device-to-device copy rate in bytes/s (each byte counted read and written)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).random_(0, 255)
    dst = torch.empty_like(src)
    ms = _median_ms(lambda: dst.copy_(src), device, reps)
    return 2 * nbytes / (ms / 1e3)


def matmul_rate(device, shape=GEMM_SHAPE, dtype=torch.bfloat16, reps=20):
    """cuBLAS FLOP/s of ``[M, K] @ [K, N]`` in ``dtype``."""
    m, k, n = shape
    a = torch.randn(m, k, device=device, dtype=dtype)
    b = torch.randn(n, k, device=device, dtype=dtype)
    ms = _median_ms(lambda: a @ b.t(), device, reps)
    return 2 * m * n * k / (ms / 1e3)


def measure(device):
    """``{"copy_bytes_per_s", "bf16_flops_per_s"}`` on CUDA, ``{}`` elsewhere."""
    if device.type != "cuda":
        return {}
    return {"copy_bytes_per_s": copy_bandwidth(device), "bf16_flops_per_s": matmul_rate(device)}


def logits_floor_seconds(case, copy_bytes_per_s):
    return 3 * case.tokens * case.vocab * case.element_size / copy_bytes_per_s


def linear_needed_flops(case):
    return 3 * 2 * case.tokens * case.hidden * case.vocab


def score(case, seconds, roof):
    """Percent of the floor (logits) or of the cuBLAS rate (linear); ``None`` if unmeasured."""
    if not roof or not seconds:
        return None
    if case.path == "logits":
        return 100.0 * logits_floor_seconds(case, roof["copy_bytes_per_s"]) / seconds
    if case.dtype == "fp32":
        return None  # the bf16 tensor-core rate is not the ceiling of an fp32 GEMM
    return 100.0 * linear_needed_flops(case) / seconds / roof["bf16_flops_per_s"]
