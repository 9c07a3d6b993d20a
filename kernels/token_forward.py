"""Token stage, forward: per-token log p(label) and the row's log-sum-exp in one read.

One program handles one logits row ``(b, t)`` of a ``[B, T, V]`` view (any strides).
With ``SHIFT`` the row's label is ``labels[b, t + 1]`` and the result is written at
position ``t + 1`` (outputs are aligned with the labels); the last row has no label.

Online log-sum-exp over vocabulary blocks of ``BLOCK_V`` (running max ``m``):

    s ← s·e^{m_old − m} + Σ e^{z − m}                 lse = m + log s
    a ← a·e^{m_old − m} + Σ e^{z − m}·z               entropy  H = lse − a / s
    q ← q·e^{2(m_old − m)} + Σ e^{2(z − m)}           log Σ p² = log q − 2 log s
    Σ z                                               mean_logit = Σ z / V

Each extra is computed only when its constexpr flag is set.  Rows whose label is
``ignore_index`` are never read and produce 0 everywhere.

``VOCAB_SHARD`` (vocabulary parallelism): the row is one rank's slice of the
vocabulary and the label, given relative to the slice, may fall outside
``[0, V)`` (the target lives on another rank).  The row is still reduced — ``lse``,
entropy, log Σ p² and the mean are the *shard's* statistics, to be combined across
ranks — and two outputs change meaning: ``logp`` holds the raw target logit z_y
(0 when the label is not in the slice) and ``top1`` holds the shard's max logit.
"""
import triton
import triton.language as tl

from .tl_utils import row_target, transform


@triton.jit
def token_forward_kernel(
    x_ptr, stride_xb, stride_xt, stride_xv,
    y_ptr, stride_yb, stride_yt,
    logp_ptr, lse_ptr, ent_ptr, lsq_ptr, mean_ptr, top1_ptr,
    T, V, ignore_index,
    scale, inv_temp, softcap,
    SHIFT: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr,
    WANT_ENTROPY: tl.constexpr,
    WANT_LSQ: tl.constexpr,
    WANT_MEAN: tl.constexpr,
    WANT_TOP1: tl.constexpr,
    VOCAB_SHARD: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row, b, t, out, has_label, y = row_target(y_ptr, stride_yb, stride_yt, T, ignore_index, SHIFT)
    if y != ignore_index:
        x_row = x_ptr + b * stride_xb + t * stride_xt
        cols = tl.arange(0, BLOCK_V)
        m = -float("inf")
        s = 0.0
        a = 0.0
        q = 0.0
        zsum = 0.0
        for start in range(0, V, BLOCK_V):
            idx = start + cols
            inside = idx < V
            x = tl.load(x_row + idx * stride_xv, mask=inside, other=0.0)
            z = transform(x, scale, inv_temp, softcap, HAS_SOFTCAP)
            z = tl.where(inside, z, -float("inf"))
            m_new = tl.maximum(m, tl.max(z, axis=0))
            # A block (or row prefix) of -inf logits keeps m = -inf; exponentiate
            # against 0 then so that e^{-inf − -inf} never produces NaN.
            m_ref = tl.where(m_new == -float("inf"), 0.0, m_new)
            alpha = tl.exp(m - m_ref)
            e = tl.exp(z - m_ref)
            s = s * alpha + tl.sum(e, axis=0)
            if WANT_ENTROPY:
                # e·z is 0·(−inf) at −inf logits: count those entries as 0.
                a = a * alpha + tl.sum(e * tl.where(z > -float("inf"), z, 0.0), axis=0)
            if WANT_LSQ:
                q = q * (alpha * alpha) + tl.sum(e * e, axis=0)
            if WANT_MEAN:
                zsum += tl.sum(tl.where(inside, z, 0.0), axis=0)
            m = m_new
        lse = tl.where(m == -float("inf"), 0.0, m) + tl.log(s)
        if VOCAB_SHARD:
            # The label may belong to another rank's slice: read it only when it is ours.
            mine = (y >= 0) & (y < V)
            x_y = tl.load(x_row + tl.where(mine, y, 0) * stride_xv, mask=mine, other=0.0)
            z_y = tl.where(mine, transform(x_y, scale, inv_temp, softcap, HAS_SOFTCAP), 0.0)
            tl.store(logp_ptr + out, z_y)
        else:
            z_y = transform(tl.load(x_row + y * stride_xv), scale, inv_temp, softcap, HAS_SOFTCAP)
            tl.store(logp_ptr + out, z_y - lse)
        tl.store(lse_ptr + row, lse)
        if WANT_ENTROPY:
            tl.store(ent_ptr + out, lse - a / s)
        if WANT_LSQ:
            tl.store(lsq_ptr + out, tl.log(q) - 2.0 * tl.log(s))
        if WANT_MEAN:
            tl.store(mean_ptr + out, zsum / V)
        if WANT_TOP1:
            if VOCAB_SHARD:
                tl.store(top1_ptr + out, m)
            else:
                tl.store(top1_ptr + out, (z_y >= m).to(tl.float32))
    else:
        tl.store(lse_ptr + row, 0.0)
        if has_label:
            tl.store(logp_ptr + out, 0.0)
            if WANT_ENTROPY:
                tl.store(ent_ptr + out, 0.0)
            if WANT_LSQ:
                tl.store(lsq_ptr + out, 0.0)
            if WANT_MEAN:
                tl.store(mean_ptr + out, 0.0)
            if WANT_TOP1:
                tl.store(top1_ptr + out, 0.0)
