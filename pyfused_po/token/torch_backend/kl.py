"""Chunked pure-PyTorch full-vocabulary KL(π_ref ‖ π_θ): the contract of ``kernels.token_kl_launch``.

Rows are processed in bounded chunks (see :mod:`.token`); only labelled rows are read.
Math runs in float32, or float64 when the policy logits are float64.
"""
import torch

from .token import _compute_dtype, _row_chunks, _transform_grad, backward_chunks, log_probs, lse_pair, row_stats


def _log_softmax_pair(logits, ref_logits, b, rows, cdt, tkw):
    """:func:`row_stats` of the policy's and the reference's rows."""
    return (row_stats(logits[b, rows].to(cdt), **tkw), row_stats(ref_logits[b, rows].to(cdt), **tkw))


def token_kl_forward(logits, ref_logits, labels, *, ignore_index, shift, temperature, logit_scale,
                     softcap, want_logp=False, block_v=None):
    """Returns ``(kl, logp or None, lse, lse_r)`` as the Triton launcher does (``lse``,
    ``lse_r``: ``[B, T, 2]`` LSE pairs)."""
    del block_v  # Triton-only tuning knob
    B, T, _ = logits.shape
    cdt = _compute_dtype(logits)
    dev = logits.device
    kl = torch.zeros(B, T, device=dev, dtype=cdt)
    logp = torch.zeros(B, T, device=dev, dtype=cdt) if want_logp else None
    lse = torch.zeros(B, T, 2, device=dev, dtype=cdt)  # LSE pairs, as token.lse_pair
    lse_r = torch.zeros(B, T, 2, device=dev, dtype=cdt)
    tkw = dict(logit_scale=logit_scale, temperature=temperature, softcap=softcap)
    for b, rows, pos, targets in _row_chunks(logits, labels, ignore_index, shift):
        (d, m, log_s, m_err), (d_r, m_r, log_s_r, m_err_r) = _log_softmax_pair(logits, ref_logits, b, rows, cdt,
                                                                               tkw)
        p_ref = (d_r - log_s_r.unsqueeze(-1)).exp()
        # log p_ref − log p_θ = (zr − lse_r) − (z − lse) = (d_r − d) − (log s_r − log s) with
        # d = z − m: relative to the rows' maxima, nothing of size |m| + log V is subtracted.
        d_lse = log_s_r - log_s
        # Entries with p_ref = 0 contribute 0 (not 0·(−inf − z) = NaN); only those: a NaN
        # reference row stays NaN, as on the Triton path, never a plausible KL of 0.
        terms = torch.where(p_ref == 0, 0.0, p_ref * ((d_r - d) - d_lse.unsqueeze(-1)))
        kl[b, pos] = terms.sum(-1)
        lse[b, rows] = lse_pair(m, log_s, m_err)
        lse_r[b, rows] = lse_pair(m_r, log_s_r, m_err_r)
        if want_logp:
            logp[b, pos] = d.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1) - log_s
    return kl, logp, lse, lse_r


def token_kl_backward(logits, ref_logits, labels, lse, lse_r, grad_out, *, ignore_index, shift,
                      temperature, logit_scale, softcap, grad_kl=None, grad_logp=None,
                      block_v=None):
    """Writes g·(p − p_ref) + g_y·(onehot(y) − p), times dz/dx, into ``grad_out``."""
    del block_v
    cdt = _compute_dtype(logits)
    for b, rows, pos, targets in backward_chunks(logits, labels, ignore_index, shift, grad_out):
        x = logits[b, rows].to(cdt)
        tkw = dict(logit_scale=logit_scale, temperature=temperature, softcap=softcap)
        p = log_probs(x, None, exact=True, **tkw).exp()  # the row's own exact softmax
        dz = torch.zeros_like(p)
        if grad_kl is not None:
            p_ref = log_probs(ref_logits[b, rows].to(cdt), None, exact=True, **tkw).exp()
            dz += grad_kl[b, pos].to(cdt).unsqueeze(-1) * (p - p_ref)
        if grad_logp is not None:
            g_y = grad_logp[b, pos].to(cdt).unsqueeze(-1)
            dz -= g_y * p
            dz.scatter_add_(-1, targets.long().unsqueeze(-1), g_y)
        grad_out[b, rows] = (dz * _transform_grad(x, logit_scale, temperature, softcap)).to(grad_out.dtype)
    return grad_out
