"""Chunked pure-PyTorch token stage: the same contract as ``pyfused_po.kernels``.

Used on CPU tensors (and as the float64 reference in tests).  Rows are processed
in chunks of at most ``CHUNK_ELEMENTS`` logits, so the fp32 working set is bounded
whatever the sequence length; only the rows that carry a label are ever read.
Math runs in float32, or float64 for float64 inputs.
"""
import torch

CHUNK_ELEMENTS = 1 << 22  # 4M logits: 16 MB per fp32 temporary


def _transform(x, logit_scale, temperature, softcap):
    if logit_scale == 1.0 and temperature == 1.0 and softcap is None:
        return x  # identity: no copy of the chunk
    z = x * logit_scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return z / temperature


def _transform_grad(x, logit_scale, temperature, softcap):
    if softcap is None:
        return logit_scale / temperature
    t = torch.tanh(x * logit_scale / softcap)
    return (logit_scale / temperature) * (1.0 - t * t)


def _compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _row_chunks(logits, labels, ignore_index, shift):
    """Yields ``(b, rows, label_pos, targets)`` for labelled logits rows, in chunks.

    ``rows`` / ``label_pos`` are slices when every row of the chunk is labelled (the
    chunk is then read as a view, without a gather copy), index tensors otherwise."""
    B, T, V = logits.shape
    step = max(1, CHUNK_ELEMENTS // max(V, 1))
    for b in range(B):
        for t0 in range(0, T, step):
            t1 = min(T, t0 + step)
            pos = torch.arange(t0, t1, device=labels.device) + int(shift)
            pos = pos[pos < T]
            if pos.numel() == 0:
                continue
            targets = labels[b, pos]
            keep = targets != ignore_index
            if not bool(keep.any()):
                continue
            if bool(keep.all()):
                start, stop = int(pos[0]), int(pos[-1]) + 1
                yield b, slice(start - int(shift), stop - int(shift)), slice(start, stop), targets
                continue
            pos, targets = pos[keep], targets[keep]
            yield b, pos - int(shift), pos, targets


def backward_chunks(logits, labels, ignore_index, shift, grad_out):
    """The labelled row chunks of :func:`_row_chunks`; once they are consumed, the rows
    without a label (ignored, or the last row under shift) are zeroed in ``grad_out``.
    Those rows are disjoint from the labelled ones, so zeroing them last is safe also
    when ``grad_out`` aliases the logits."""
    B, T, _ = logits.shape
    labelled = torch.zeros(B, T, dtype=torch.bool, device=logits.device)
    chunks = list(_row_chunks(logits, labels, ignore_index, shift))
    for b, rows, _, _ in chunks:
        labelled[b, rows] = True
    yield from chunks
    grad_out[(~labelled).nonzero(as_tuple=True)] = 0


def row_stats(z):
    """``(m, log s)`` per row of ``z``: its finite max (0 for a row without one) and
    log Σ_v e^{z_v − m}.  ``log p = (z − m) − log s`` is exact in fp32 at any offset, where
    ``z − (m + log s)`` is not: the one-value LSE ``m + log s`` rounds log s away at large
    |m| (its ulp is ~2e-3 at |m| = 3e4)."""
    m = z.max(dim=-1).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m, torch.logsumexp(z - m.unsqueeze(-1), dim=-1)


def lse_pair(m, log_s):
    """The LSE ``m + log_s`` as the ``[..., 2]`` pair ``(hi, lo)`` of the token-stage contract
    (``kernels/lse_pair.py``): ``hi = fl(m + log_s)``, ``lo`` its rounding error (TwoSum), 0
    where ``hi`` is not finite."""
    hi = m + log_s
    t = hi - m
    lo = (m - (hi - t)) + (log_s - t)
    return torch.stack([hi, torch.where(torch.isfinite(hi), lo, torch.zeros_like(lo))], dim=-1)


def log_probs(z, lse, exact):
    """log softmax of the rows of ``z``: exact from :func:`row_stats` when ``exact``, else
    ``(z − hi) − lo`` with the given (e.g. vocabulary-global) LSE pairs ``lse [..., 2]``."""
    if not exact:
        return (z - lse[..., :1]) - lse[..., 1:]
    m, log_s = row_stats(z)
    return (z - m.unsqueeze(-1)) - log_s.unsqueeze(-1)


def _owned(targets, V, vocab_shard):
    """``(in_slice mask or None, safe index)``: under ``vocab_shard`` a label outside
    ``[0, V)`` belongs to another rank's vocabulary slice."""
    targets = targets.long()
    if not vocab_shard:
        return None, targets
    mine = (targets >= 0) & (targets < V)
    return mine, torch.where(mine, targets, torch.zeros_like(targets))


def token_forward(logits, labels, *, ignore_index, shift, temperature, logit_scale, softcap,
                  extras=(), block_v=None, vocab_shard=False):
    """Returns ``(logp, lse, {extra: tensor})`` as the Triton launcher does (``lse`` the
    ``[B, T, 2]`` pairs of :func:`lse_pair`; also its ``vocab_shard`` mode: raw target logit in
    ``logp``, the slice's max in ``is_top1``)."""
    del block_v  # Triton-only tuning knob
    B, T, V = logits.shape
    cdt = _compute_dtype(logits)
    dev = logits.device
    logp = torch.zeros(B, T, device=dev, dtype=cdt)
    lse = torch.zeros(B, T, 2, device=dev, dtype=cdt)
    outs = {name: torch.zeros(B, T, device=dev, dtype=cdt) for name in extras}
    for b, rows, pos, targets in _row_chunks(logits, labels, ignore_index, shift):
        z = _transform(logits[b, rows].to(cdt), logit_scale, temperature, softcap)
        m, log_s = row_stats(z)
        row_lse = lse_pair(m, log_s)  # the contract's LSE pair (for the backward)
        mine, index = _owned(targets, V, vocab_shard)
        z_y = z.gather(-1, index.unsqueeze(-1)).squeeze(-1)
        if vocab_shard:
            z_y = torch.where(mine, z_y, torch.zeros_like(z_y))
            logp[b, pos] = z_y
        else:
            logp[b, pos] = (z_y - m) - log_s
        lse[b, rows] = row_lse
        if "entropy" in outs or "log_sum_sq_probs" in outs:
            logq = (z - m.unsqueeze(-1)) - log_s.unsqueeze(-1)
            p = logq.exp()
            if "entropy" in outs:
                # p·log p is 0·(−inf) for −inf logits: count those entries as 0.
                outs["entropy"][b, pos] = -torch.where(p > 0, p * logq, 0.0).sum(-1)
            if "log_sum_sq_probs" in outs:
                outs["log_sum_sq_probs"][b, pos] = torch.logsumexp(2.0 * logq, dim=-1)
        if "mean_logit" in outs:
            outs["mean_logit"][b, pos] = z.mean(-1)
        if "is_top1" in outs:
            row_max = z.max(-1).values
            outs["is_top1"][b, pos] = row_max if vocab_shard else (z_y >= row_max).to(cdt)
    return logp, lse, outs


def token_backward(logits, labels, lse, grad_out, *, ignore_index, shift, temperature,
                   logit_scale, softcap, grad_logp=None, entropy=None, grad_entropy=None,
                   log_sum_sq_probs=None, grad_log_sum_sq_probs=None, grad_mean_logit=None,
                   block_v=None, vocab_shard=False):
    """Writes ∂loss/∂logits into ``grad_out`` (may be ``logits`` itself).  Under
    ``vocab_shard`` the one-hot term is applied only to labels inside ``[0, V)``."""
    del block_v
    V = logits.shape[-1]
    cdt = _compute_dtype(logits)
    for b, rows, pos, targets in backward_chunks(logits, labels, ignore_index, shift, grad_out):
        x = logits[b, rows].to(cdt)
        z = _transform(x, logit_scale, temperature, softcap)
        # The row's own exact log softmax; a vocabulary slice needs the given global LSE.
        logq = log_probs(z, lse[b, rows].to(cdt), exact=not vocab_shard)
        p = logq.exp()
        if grad_logp is None:
            dz = torch.zeros_like(z)
        else:
            g = grad_logp[b, pos].to(cdt).unsqueeze(-1)
            dz = p * -g
            mine, index = _owned(targets, V, vocab_shard)
            if mine is not None:
                g = torch.where(mine.unsqueeze(-1), g, torch.zeros_like(g))
            dz.scatter_add_(-1, index.unsqueeze(-1), g)
        if grad_entropy is not None:
            h = entropy[b, pos].to(cdt).unsqueeze(-1)
            g_h = grad_entropy[b, pos].to(cdt).unsqueeze(-1)
            dz -= g_h * torch.where(p > 0, p * (logq + h), 0.0)
        if grad_log_sum_sq_probs is not None:
            inv_s2 = torch.exp(-log_sum_sq_probs[b, pos].to(cdt)).unsqueeze(-1)
            g_q = grad_log_sum_sq_probs[b, pos].to(cdt).unsqueeze(-1)
            dz += 2.0 * g_q * p * (p * inv_s2 - 1.0)
        if grad_mean_logit is not None:
            dz += grad_mean_logit[b, pos].to(cdt).unsqueeze(-1) / V
        dz_dx = _transform_grad(x, logit_scale, temperature, softcap)
        if not (isinstance(dz_dx, float) and dz_dx == 1.0):
            dz = dz * dz_dx
        grad_out[b, rows] = dz.to(grad_out.dtype)
    return grad_out
