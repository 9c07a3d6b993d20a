"""Launchers for the token-stage kernels: shapes in, tensors out, no autograd.

Both launchers take a ``[B, T, V]`` logits view (any strides) and ``[B, T]``
integer labels, and return / fill ``[B, T]`` fp32 tensors aligned with the labels.
"""
import os

import torch
import triton

from .token_backward import token_backward_kernel
from .token_forward import token_forward_kernel

EXTRA_NAMES = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def launch_config(V: int, block_v: int | None = None) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of ``V``.

    The row loop is bandwidth-bound: 4096-wide blocks give each of 8 warps
    16 elements per thread per iteration, enough loads in flight to cover HBM
    latency without spilling the fp32 accumulators.  Under the interpreter small
    blocks keep the CPU tests fast and exercise the multi-block path.
    """
    if block_v is None:
        cap = 128 if _interpreting() else 4096
        block_v = min(cap, triton.next_power_of_2(V))
    num_warps = 4 if block_v <= 1024 else 8
    return block_v, num_warps


def row_layout(block_v, *rows):
    """Constexprs of ``kernels/row_split.py`` for ``[B, T, V]`` row tensors ``rows`` (the first
    one's offsets place the aligned body): ``LANE`` elements per 16 bytes (at most the
    block); ``ALIGN`` the elements per 16 bytes when every vocabulary axis is contiguous
    (else 1: no vector loads to align for);
    ``SAME_ROWS`` when all share strides and element size, so one body offset aligns all."""
    per16 = 16 // rows[0].element_size()
    unit = all(r.stride(-1) == 1 for r in rows)
    same = all(r.stride() == rows[0].stride() and r.element_size() == rows[0].element_size()
               for r in rows)
    return dict(LANE=min(per16, block_v), ALIGN=per16 if unit else 1, SAME_ROWS=same)


def invariant_layout(layout, *rows):
    """``row_layout``'s constexprs for ``batch_invariant=True``: every row split with an empty head.

    The kernels reduce a row block by block from where its aligned body starts
    (``kernels/row_split.py``), so a row whose element offset is not a multiple of ``ALIGN`` (odd
    ``V``, a row at another position of another batch) would group its sum differently.  When every
    row offset is a multiple of ``ALIGN`` (unit vocabulary stride, leading strides multiples of it)
    the head is empty anyway; otherwise ``ALIGN = 1`` empties it (the body is then read without the
    16-byte vector hint).  Either way a row's blocks are ``[0, BLOCK_V), [BLOCK_V, 2·BLOCK_V), …``:
    the same order at any position, in any batch."""
    align = layout["ALIGN"]
    aligned = all(s % align == 0 for r in rows for n, s in zip(r.shape[:-1], r.stride()[:-1]) if n > 1)
    return dict(layout, ALIGN=align if aligned else 1)


def flip_key(logit_scale, temperature, softcap) -> bool:
    """Whether the forward kernels' max key is −x (``z = x·scale/T`` decreasing in x)."""
    return softcap is None and float(logit_scale) / float(temperature) < 0


def _check_pairs(name, lse, B, T):
    """The kernels index LSE pairs as ``2·row + {0, 1}``: a contiguous ``[B, T, 2]`` fp32."""
    if tuple(lse.shape) != (B, T, 2) or not lse.is_contiguous() or lse.dtype != torch.float32:
        raise ValueError(f"{name} must be the forward's contiguous float32 [B, T, 2] LSE pairs "
                         f"({B}, {T}, 2), got {lse.dtype} {tuple(lse.shape)} with strides {lse.stride()}")


def _softcap_args(softcap):
    return (0.0 if softcap is None else float(softcap)), softcap is not None


def token_forward(logits, labels, *, ignore_index, shift, temperature, logit_scale, softcap,
                  extras=(), block_v=None, vocab_shard=False, batch_invariant=False):
    """Returns ``(logp, lse, {extra: tensor})``; ``lse`` is per logits row, ``[B, T, 2]``: the
    pair ``(hi, lo)`` of ``kernels/lse_pair.py`` (LSE = hi + lo; 0 for rows without a label).

    ``vocab_shard=True``: ``logits`` is one rank's vocabulary slice and labels are
    relative to it (outside ``[0, V)`` when another rank owns them); ``logp`` then holds
    the raw target logit (0 when not owned), ``is_top1`` the slice's max logit (+inf where the
    owned label loses a tie or more inside the slice), and
    ``lse`` / the other extras the slice's own statistics (see ``token_forward.py``).

    One program per row and a ``BLOCK_V`` that depends on ``V`` only: a row's reduction order does
    not depend on the batch, except through the aligned split, which ``batch_invariant=True`` fixes
    (:func:`invariant_layout`).
    """
    B, T, V = logits.shape
    dev = logits.device
    logp = torch.zeros(B, T, device=dev, dtype=torch.float32)
    lse = torch.empty(B, T, 2, device=dev, dtype=torch.float32)
    outs = {name: torch.zeros(B, T, device=dev, dtype=torch.float32) for name in extras}
    dummy = logp
    cap, has_cap = _softcap_args(softcap)
    block, warps = launch_config(V, block_v)
    if B * T == 0:
        return logp, lse, outs
    layout = row_layout(block, logits)
    if batch_invariant:
        layout = invariant_layout(layout, logits)
    token_forward_kernel[(B * T,)](
        logits, *logits.stride(),
        labels, *labels.stride(),
        logp, lse,
        outs.get("entropy", dummy), outs.get("log_sum_sq_probs", dummy),
        outs.get("mean_logit", dummy), outs.get("is_top1", dummy),
        T, V, ignore_index,
        float(logit_scale), 1.0 / float(temperature), cap,
        SHIFT=int(shift), HAS_SOFTCAP=has_cap,
        WANT_ENTROPY="entropy" in outs, WANT_LSQ="log_sum_sq_probs" in outs,
        WANT_MEAN="mean_logit" in outs, WANT_TOP1="is_top1" in outs,
        VOCAB_SHARD=bool(vocab_shard), BLOCK_V=block, num_warps=warps,
        LANE=layout["LANE"], ALIGN=layout["ALIGN"],
        FLIP=flip_key(logit_scale, temperature, softcap),
    )
    return logp, lse, outs


def token_backward(logits, labels, lse, grad_out, *, ignore_index, shift, temperature,
                   logit_scale, softcap, grad_logp=None, entropy=None, grad_entropy=None,
                   log_sum_sq_probs=None, grad_log_sum_sq_probs=None, grad_mean_logit=None,
                   block_v=None, vocab_shard=False, batch_invariant=False):
    """Writes ∂loss/∂logits into ``grad_out`` (``[B, T, V]``, may be ``logits`` itself).
    ``lse``: the forward's ``[B, T, 2]`` pairs (contiguous).

    ``vocab_shard=True`` documents that ``logits`` is a vocabulary slice whose labels may
    lie outside ``[0, V)`` (not ignore_index); ``lse``, ``entropy`` and
    ``log_sum_sq_probs`` must then be the *global* row values.  The kernel needs no
    flag for it: the one-hot term ``idx == y`` never fires for such a label, so the
    slice gets exactly its part of ``g·(onehot − p)``.
    """
    B, T, V = logits.shape
    if B * T == 0:
        return grad_out
    _check_pairs("lse", lse, B, T)
    dummy = lse
    cap, has_cap = _softcap_args(softcap)
    block, warps = launch_config(V, block_v)
    layout = row_layout(block, logits, grad_out)
    if batch_invariant:  # elementwise given the LSE; the same split as the forward's all the same
        layout = invariant_layout(layout, logits, grad_out)
    token_backward_kernel[(B * T,)](
        logits, *logits.stride(),
        grad_out, *grad_out.stride(),
        labels, *labels.stride(),
        lse,
        dummy if grad_logp is None else grad_logp,
        dummy if entropy is None else entropy,
        dummy if grad_entropy is None else grad_entropy,
        dummy if log_sum_sq_probs is None else log_sum_sq_probs,
        dummy if grad_log_sum_sq_probs is None else grad_log_sum_sq_probs,
        dummy if grad_mean_logit is None else grad_mean_logit,
        T, V, ignore_index,
        float(logit_scale), 1.0 / float(temperature), cap,
        SHIFT=int(shift), HAS_SOFTCAP=has_cap,
        HAS_G=grad_logp is not None,
        GRAD_ENTROPY=grad_entropy is not None,
        GRAD_LSQ=grad_log_sum_sq_probs is not None,
        GRAD_MEAN=grad_mean_logit is not None,
        BLOCK_V=block, num_warps=warps, **layout,
    )
    return grad_out
