"""The row log-sum-exp as an unevaluated pair ``(hi, lo)``: LSE = hi + lo.

One fp32 value ``m + log s`` rounds ``log s`` to the ulp of ``|m|`` (2e-3 at |m| = 3e4), so
every ``z − lse`` built from it is off by that much, and gradient rows no longer sum to 0.
The kernels keep ``hi = fl(m + log s)`` and ``lo = (m + log s) − hi`` exactly (TwoSum, six
adds, once per row) and form

    log p_v = (z_v − hi) − lo

where ``z_v − hi`` is exact for every entry near the max (Sterbenz) and ``lo`` is below half
an ulp of ``hi``.  ``hi`` alone is the LSE rounded once, for any reader that needs only a value.
Pairs are stored as ``[..., 2]`` fp32 (``[..., 0] = hi``, ``[..., 1] = lo``).
"""
import torch
import triton
import triton.language as tl


@triton.jit
def lse_pair(m, log_s, m_err):
    """``(hi, lo)`` with ``hi + lo = m + log_s`` exactly (Knuth's TwoSum: no magnitude
    order needed, ``m`` may be 0 while ``log_s`` is not), plus ``m_err`` (the max logit's own
    rounding error, ``fast_math.max_logit``; far below ulp(hi)) in ``lo``.  ``lo = 0`` where
    ``hi`` is ±inf (an all −inf row), so no NaN is made here."""
    hi = m + log_s
    t = hi - m
    lo = ((m - (hi - t)) + (log_s - t)) + m_err
    return hi, tl.where(tl.abs(hi) < float("inf"), lo, 0.0)


def lse_pair_torch(m, log_s, m_err=None):
    """:func:`lse_pair` on tensors, stacked as ``[..., 2]`` (the kernels' launchers' combine)."""
    hi = m + log_s
    t = hi - m
    lo = (m - (hi - t)) + (log_s - t)
    if m_err is not None:
        lo = lo + m_err
    lo = torch.where(torch.isfinite(hi), lo, torch.zeros_like(lo))
    return torch.stack([hi, lo], dim=-1)
