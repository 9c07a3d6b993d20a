"""Chunked pure-PyTorch token stage: the same contract as ``pyfused_po.kernels``.

Used on CPU tensors (and as the float64 reference in tests).  Rows are processed
in chunks of at most ``CHUNK_ELEMENTS`` logits, so the fp32 working set is bounded
whatever the sequence length; only the rows that carry a label are ever read.
Math runs in float32, or float64 for float64 inputs.
"""
import torch

from .invariant_tiles import pad_rows, tile_ranges, tile_rows

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


def backward_chunks(logits, labels, ignore_index, shift, grad_out, chunks=None, rows_of=None):
    """The labelled row chunks of :func:`_row_chunks` (or the given ``chunks``, whose logits rows
    are ``rows_of(chunk)``); once they are consumed, the rows
    without a label (ignored, or the last row under shift) are zeroed in ``grad_out``.
    Those rows are disjoint from the labelled ones, so zeroing them last is safe also
    when ``grad_out`` aliases the logits."""
    B, T, _ = logits.shape
    labelled = torch.zeros(B, T, dtype=torch.bool, device=logits.device)
    if chunks is None:
        chunks, rows_of = _row_chunks(logits, labels, ignore_index, shift), lambda c: (c[0], c[1])
    chunks = list(chunks)
    for chunk in chunks:
        labelled[rows_of(chunk)] = True
    yield from chunks
    grad_out[(~labelled).nonzero(as_tuple=True)] = 0


def _invariant_tiles(logits, labels, ignore_index, shift):
    """``batch_invariant=True``: the labelled rows of the whole ``[B, T]`` batch in tiles of exactly
    :func:`~pyfused_po.token.torch_backend.invariant_tiles.tile_rows` rows (module
    :mod:`~pyfused_po.token.torch_backend.invariant_tiles`).  Yields ``(src, rows, dst, targets, n)`` as
    :func:`_fold_chunks`; a tile of consecutive rows of one sequence is read as a view, any other
    (a ragged or padded one) through a gather of its rows."""
    B, T, _ = logits.shape
    valid = labels != ignore_index
    if shift:
        valid = torch.cat([torch.zeros_like(valid[:, :1]), valid[:, 1:]], dim=1)
    b_all, p_all = valid.nonzero(as_tuple=True)
    step = tile_rows()
    for c0, c1 in tile_ranges(b_all.numel(), step):
        b, pos, n = b_all[c0:c1], p_all[c0:c1], c1 - c0
        targets = pad_rows(labels[b, pos], step)
        first, last = int(pos[0]), int(pos[-1])
        if n == step and int(b[0]) == int(b[-1]) and last - first == n - 1:
            bb = int(b[0])
            rows = (bb, slice(first - int(shift), last + 1 - int(shift)))
            yield rows, rows, (bb, slice(first, last + 1)), targets, n
        else:
            src = (pad_rows(b, step), pad_rows(pos, step) - int(shift))
            yield src, (b, pos - int(shift)), (b, pos), targets, n


def _fold_chunks(logits, labels, ignore_index, shift, batch_invariant):
    """``(src, rows, dst, targets, n)`` per chunk of labelled rows: ``logits[src]`` are the chunk's
    rows; results of the first ``n`` of them (``None``: all; only invariant tiles are padded) go to
    ``out[dst]`` (per label position) or ``lse[rows]`` / ``grad[rows]`` (per logits row).
    Default: :func:`_row_chunks`; ``batch_invariant``: :func:`_invariant_tiles`."""
    if batch_invariant:
        yield from _invariant_tiles(logits, labels, ignore_index, shift)
        return
    for b, rows, pos, targets in _row_chunks(logits, labels, ignore_index, shift):
        yield (b, rows), (b, rows), (b, pos), targets, None


def _row_max(x, c):
    """``(x_max, m, m_err)`` per row of raw logits ``x`` with ``z = x·c``: the raw logit of the
    row's largest ``z`` (0 for a row without a finite one), ``m = fl(x_max·c)`` and its rounding
    error ``x_max·c − m`` (from float64, per row)."""
    top = (x if c > 0 else -x).max(dim=-1).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    x_max = top if c > 0 else -top
    m = x_max * c
    return x_max, m, (x_max.double() * c - m.double()).to(m.dtype)


def row_stats(x, logit_scale, temperature, softcap):
    """``(d, m, log s, m_err)`` per row of raw logits ``x`` (compute dtype): ``d = z − m`` with
    ``m`` the row's largest logit (0 for a row without a finite one), ``log s = log Σ_v e^{d_v}``
    and ``m_err`` the rounding error of ``m``.  ``log p = d − log s`` is exact in fp32 at any
    offset, where ``z − (m + log s)`` is not (the one-value LSE rounds log s to the ulp of
    |m|: ~2e-3 at 3e4).  Without a softcap ``d = (x − x_max)·scale/T``: the exact logits
    minus their max, not rounded to the ulp of a large |z| first (as the kernels; with a
    softcap the logit ``z`` itself is the reduced value)."""
    c = logit_scale / temperature
    if softcap is not None or c == 1.0:
        z = _transform(x, logit_scale, temperature, softcap)
        m = z.max(dim=-1).values
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        d = z - m.unsqueeze(-1)
        m_err = torch.zeros_like(m)
    else:
        x_max, m, m_err = _row_max(x, c)
        d = (x - x_max.unsqueeze(-1)) * c  # x − x_max is exact near the max (Sterbenz)
    return d, m, torch.logsumexp(d, dim=-1), m_err


def lse_pair(m, log_s, m_err=None):
    """The LSE ``m + log_s`` (+ ``m_err``, the max logit's rounding error) as the ``[..., 2]``
    pair ``(hi, lo)`` of the token-stage contract (``kernels/lse_pair.py``): ``hi = fl(m + log_s)``,
    ``lo`` its rounding error (TwoSum) plus ``m_err``, 0 where ``hi`` is not finite."""
    hi = m + log_s
    t = hi - m
    lo = (m - (hi - t)) + (log_s - t)
    if m_err is not None:
        lo = lo + m_err
    return torch.stack([hi, torch.where(torch.isfinite(hi), lo, torch.zeros_like(lo))], dim=-1)


def log_probs(x, lse, exact, *, logit_scale, temperature, softcap):
    """log softmax of the rows of raw logits ``x``: exact from :func:`row_stats` when ``exact``,
    else ``(z − hi) − lo`` with the given (e.g. vocabulary-global) LSE pairs ``lse [..., 2]``.
    Without a softcap and with scale/T ≠ 1, ``z − hi`` is formed around the rows' own max as
    ``(x − x_max)·c + ((m − hi) + m_err)`` (``m − hi`` exact when the two are close): the exact
    ``x·c − hi`` the kernels' FMA gives, without a float64 copy of the rows."""
    if exact:
        d, _, log_s, _ = row_stats(x, logit_scale, temperature, softcap)
        return d - log_s.unsqueeze(-1)
    c = logit_scale / temperature
    hi, lo = lse[..., :1], lse[..., 1:]
    if softcap is not None or c == 1.0:
        return (_transform(x, logit_scale, temperature, softcap) - hi) - lo
    x_max, m, m_err = _row_max(x, c)
    return (x - x_max.unsqueeze(-1)) * c + ((m.unsqueeze(-1) - hi) + m_err.unsqueeze(-1)) - lo


def first_max_index(x, logit_scale, temperature, softcap):
    """Index of each row's first largest logit, as ``argmax`` picks it (the lowest id wins a
    tie), decided on the kernels' logit key (``kernels/fast_math.logit_key``): the raw logit,
    negated when ``scale/T < 0``, or ``z`` itself with a softcap."""
    if softcap is not None:
        key = _transform(x, logit_scale, temperature, softcap)
    else:
        key = -x if logit_scale / temperature < 0 else x
    return key.argmax(-1)


def _owned(targets, V, vocab_shard):
    """``(in_slice mask or None, safe index)``: under ``vocab_shard`` a label outside
    ``[0, V)`` belongs to another rank's vocabulary slice."""
    targets = targets.long()
    if not vocab_shard:
        return None, targets
    mine = (targets >= 0) & (targets < V)
    return mine, torch.where(mine, targets, torch.zeros_like(targets))


def token_forward(logits, labels, *, ignore_index, shift, temperature, logit_scale, softcap,
                  extras=(), block_v=None, vocab_shard=False, batch_invariant=False):
    """Returns ``(logp, lse, {extra: tensor})`` as the Triton launcher does (``lse`` the
    ``[B, T, 2]`` pairs of :func:`lse_pair`; also its ``vocab_shard`` mode: raw target logit in
    ``logp``, the slice's max in ``is_top1``, +inf where the owned label loses inside the slice).
    ``batch_invariant``: fixed-shape tiles (:func:`_invariant_tiles`), so a row's results do not
    depend on the batch."""
    del block_v  # Triton-only tuning knob
    B, T, V = logits.shape
    cdt = _compute_dtype(logits)
    dev = logits.device
    logp = torch.zeros(B, T, device=dev, dtype=cdt)
    lse = torch.zeros(B, T, 2, device=dev, dtype=cdt)
    outs = {name: torch.zeros(B, T, device=dev, dtype=cdt) for name in extras}
    tkw = dict(logit_scale=logit_scale, temperature=temperature, softcap=softcap)
    for src, rows, dst, targets, n in _fold_chunks(logits, labels, ignore_index, shift, batch_invariant):
        x = logits[src].to(cdt)
        d, m, log_s, m_err = row_stats(x, **tkw)
        lse[rows] = lse_pair(m, log_s, m_err)[:n]  # the contract's LSE pair (for the backward)
        mine, index = _owned(targets, V, vocab_shard)
        if vocab_shard:
            z_y = _transform(x.gather(-1, index.unsqueeze(-1)).squeeze(-1), **tkw)
            logp[dst] = torch.where(mine, z_y, torch.zeros_like(z_y))[:n]
        else:
            logp[dst] = (d.gather(-1, index.unsqueeze(-1)).squeeze(-1) - log_s)[:n]
        if "entropy" in outs or "log_sum_sq_probs" in outs:
            logq = d - log_s.unsqueeze(-1)
            p = logq.exp()
            if "entropy" in outs:
                # p·log p is 0·(−inf) for −inf logits: count those entries as 0 (only those:
                # a NaN row stays NaN, as on the Triton path, never a plausible 0).
                outs["entropy"][dst] = -torch.where(p == 0, 0.0, p * logq).sum(-1)[:n]
            if "log_sum_sq_probs" in outs:
                outs["log_sum_sq_probs"][dst] = torch.logsumexp(2.0 * logq, dim=-1)[:n]
        if "mean_logit" in outs or "is_top1" in outs:
            z = _transform(x, **tkw)
            if "mean_logit" in outs:
                outs["mean_logit"][dst] = z.mean(-1)[:n]
            if "is_top1" in outs:
                top1 = first_max_index(x, **tkw) == index
                if vocab_shard:  # the slice's max, +inf where our label is beaten inside the slice
                    beaten = mine & ~top1
                    outs["is_top1"][dst] = torch.where(beaten, torch.full_like(z[..., 0], float("inf")),
                                                       z.max(-1).values)[:n]
                else:
                    outs["is_top1"][dst] = top1.to(cdt)[:n]
    return logp, lse, outs


def token_backward(logits, labels, lse, grad_out, *, ignore_index, shift, temperature,
                   logit_scale, softcap, grad_logp=None, entropy=None, grad_entropy=None,
                   log_sum_sq_probs=None, grad_log_sum_sq_probs=None, grad_mean_logit=None,
                   block_v=None, vocab_shard=False, batch_invariant=False):
    """Writes ∂loss/∂logits into ``grad_out`` (may be ``logits`` itself).  Under
    ``vocab_shard`` the one-hot term is applied only to labels inside ``[0, V)``.
    ``batch_invariant``: the forward's fixed-shape tiles; a padded row's upstream gradients are 0."""
    del block_v
    V = logits.shape[-1]
    cdt = _compute_dtype(logits)
    chunks = _fold_chunks(logits, labels, ignore_index, shift, batch_invariant)
    for src, rows, dst, targets, n in backward_chunks(logits, labels, ignore_index, shift, grad_out, chunks,
                                                      rows_of=lambda c: c[1]):
        x = logits[src].to(cdt)
        size = x.shape[0]

        def at(t):  # a per-position input of this chunk, compute dtype, [size, 1] (padded rows: 0)
            return pad_rows(t[dst].to(cdt), size, fill="zero").unsqueeze(-1)

        # The row's own exact log softmax; a vocabulary slice needs the given global LSE.
        logq = log_probs(x, lse[src].to(cdt), exact=not vocab_shard, logit_scale=logit_scale,
                         temperature=temperature, softcap=softcap)
        p = logq.exp()
        if grad_logp is None:
            dz = torch.zeros_like(logq)
        else:
            g = at(grad_logp)
            dz = p * -g
            mine, index = _owned(targets, V, vocab_shard)
            if mine is not None:
                g = torch.where(mine.unsqueeze(-1), g, torch.zeros_like(g))
            dz.scatter_add_(-1, index.unsqueeze(-1), g)
        if grad_entropy is not None:
            dz -= at(grad_entropy) * torch.where(p == 0, 0.0, p * (logq + at(entropy)))
        if grad_log_sum_sq_probs is not None:
            inv_s2 = torch.exp(-at(log_sum_sq_probs))
            dz += 2.0 * at(grad_log_sum_sq_probs) * p * (p * inv_s2 - 1.0)
        if grad_mean_logit is not None:
            dz += at(grad_mean_logit) / V
        dz_dx = _transform_grad(x, logit_scale, temperature, softcap)
        if not (isinstance(dz_dx, float) and dz_dx == 1.0):
            dz = dz * dz_dx
        grad_out[rows] = dz[:n].to(grad_out.dtype)
    return grad_out
