"""Chunked fused-linear token stage: GEMM per chunk of tokens, then the token fold.

Per-token log-probs of ``x = H·Wᵀ (+ b)`` without ever holding ``[N, V]``:

* The caller compacts the labelled tokens into ``rows`` (row of ``hidden`` that
  predicts the token) and ``targets`` (its label), so ignored tokens cost nothing.
* Tokens are processed in chunks of ``C`` rows.  Forward: ``X_c = H[rows_c]·Wᵀ (+ b)``
  in the input dtype (one cuBLAS GEMM), folded by ``fold.token_forward`` into
  ``logp``, ``lse`` and the extras.
* Backward recomputes ``X_c``, lets ``fold.token_backward`` overwrite it in place with
  ``G = ∂L/∂X_c`` (``g·(onehot − softmax)·dz/dx`` plus the extras' terms), then

      dH[rows_c] = G·W          (each row finished inside its chunk)
      dW        += Gᵀ·H[rows_c] (fp32 accumulator across chunks)
      db        += Σ_rows G     (fp32)

Peak extra memory is one ``[C, V]`` chunk in the input dtype, one ``[C, D]`` gather of
hidden rows, the ``[V, D]`` fp32 weight accumulator and O(N) per-token vectors.

``fold`` is any module with the token-stage contract (``token_forward`` /
``token_backward`` on ``[B, T, V]`` views): :mod:`pyfused_po.torch_backend` makes this
the pure-PyTorch backend (CPU users, float64 references); :mod:`pyfused_po.kernels`
makes it the "chunked" Triton variant (cuBLAS GEMMs + Triton fold).
"""
import torch

from . import token as _torch_fold

# Elements of one [C, V] logits chunk: 128M on CUDA (256 MB in bf16, about 1k tokens
# at a 128k vocabulary, large enough for cuBLAS to run near peak); 4M on the CPU.
CUDA_CHUNK_ELEMENTS = 1 << 27
CPU_CHUNK_ELEMENTS = 1 << 22


def compute_dtype(x):
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def labels_2d(labels):
    """``[..., T]`` labels as ``[rows, T]`` (also for T = 0, where ``reshape(-1, T)`` is ambiguous)."""
    rows = 1
    for n in labels.shape[:-1]:
        rows *= n
    return labels.reshape(rows, labels.shape[-1])


def labelled_tokens(labels2d, ignore_index, shift):
    """``(rows, pos, targets)`` of the tokens that carry a label, as int64 ``[M]``.

    ``labels2d`` is ``[B, T]``; indices are into its flattening (and into the matching
    ``[B·T, D]`` flattening of ``hidden``).  ``pos`` is where the result goes (the
    label's position), ``rows`` the hidden row that predicts it (``pos − 1`` under
    ``shift``: the row at ``t`` predicts the label at ``t + 1``).
    ``nonzero`` costs one host sync on CUDA (M decides the grid and the chunks); it
    replaces copying ``hidden[mask]``, which would also sync.
    """
    valid = labels2d != ignore_index
    if shift and valid.shape[1] > 0:
        valid[:, 0] = False  # position 0 has no prediction
    pos = valid.reshape(-1).nonzero().squeeze(1)
    rows = pos - int(shift)
    targets = labels2d.reshape(-1)[pos].long()
    return rows, pos, targets


def chunk_size(M, V, device, chunk_tokens=None):
    """Tokens per chunk: ``chunk_tokens`` or as many as fit the per-device element budget."""
    if chunk_tokens is not None:
        return max(1, int(chunk_tokens))
    budget = CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS
    return max(1, min(max(M, 1), budget // max(V, 1)))


def _chunk_logits(hidden2d, weight, bias, idx):
    """``H[idx]·Wᵀ (+ b)`` in the input dtype: an O(C·D) gather, then one GEMM."""
    h = hidden2d.index_select(0, idx)
    if bias is None:
        return h, torch.matmul(h, weight.t())
    return h, torch.addmm(bias, h, weight.t())


def _mm(a, b, dtype):
    """``a·b`` returned in ``dtype`` (fp32 for bf16/fp16 operands: the product is never
    rounded to the operands' precision)."""
    if a.dtype == dtype:
        return torch.mm(a, b)
    if a.is_cuda:
        try:  # cuBLAS GEMM with an fp32 output
            return torch.mm(a, b, out_dtype=dtype)
        except (TypeError, RuntimeError):
            return torch.mm(a, b).to(dtype)
    return torch.mm(a.to(dtype), b.to(dtype))  # CPU: widen the operands (exact products)


def _accumulate_mm(acc, a, b):
    """``acc += a·b`` with ``acc`` fp32/fp64 and ``a``, ``b`` in the input dtype."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    else:
        acc.add_(_mm(a, b, acc.dtype))


def linear_forward(hidden2d, weight, bias, rows, targets, *, ignore_index, temperature,
                   logit_scale, softcap, extras=(), chunk_tokens=None, fold=_torch_fold):
    """Per labelled token: ``(logp [M], lse [M], {extra: [M]})`` in the compute dtype."""
    M, V = rows.numel(), weight.shape[0]
    cdt = compute_dtype(hidden2d)
    dev = hidden2d.device
    logp = torch.zeros(M, device=dev, dtype=cdt)
    lse = torch.zeros(M, device=dev, dtype=cdt)
    outs = {name: torch.zeros(M, device=dev, dtype=cdt) for name in extras}
    C = chunk_size(M, V, dev, chunk_tokens)
    kw = dict(ignore_index=ignore_index, shift=False, temperature=temperature,
              logit_scale=logit_scale, softcap=softcap)
    for c0 in range(0, M, C):
        c1 = min(M, c0 + C)
        _, x = _chunk_logits(hidden2d, weight, bias, rows[c0:c1])
        lp, ls, ex = fold.token_forward(x.unsqueeze(0), targets[c0:c1].unsqueeze(0),
                                        extras=extras, **kw)
        logp[c0:c1] = lp[0]
        lse[c0:c1] = ls[0]
        for name in extras:
            outs[name][c0:c1] = ex[name][0]
    return logp, lse, outs


def linear_backward(hidden2d, weight, bias, rows, targets, lse, *, grad_logp=None,
                    entropy=None, grad_entropy=None, log_sum_sq_probs=None,
                    grad_log_sum_sq_probs=None, grad_mean_logit=None, need_hidden=True,
                    need_weight=True, need_bias=True, ignore_index, temperature, logit_scale,
                    softcap, chunk_tokens=None, fold=_torch_fold, grad_hidden_dtype=None):
    """``(grad_hidden [N, D], grad_weight [V, D] fp32, grad_bias [V] fp32)``.

    ``grad_hidden`` is in ``grad_hidden_dtype`` (default: the input dtype; fp32 when the
    operands were cast down from fp32 by autocast, so that rounding is not added).
    Per-token upstream gradients and saved values are ``[M]`` aligned with ``rows``;
    a gradient not needed is returned as ``None``.
    """
    M, V = rows.numel(), weight.shape[0]
    cdt = compute_dtype(hidden2d)
    dev = hidden2d.device
    gh_dtype = grad_hidden_dtype or hidden2d.dtype
    gh = torch.zeros(hidden2d.shape, device=dev, dtype=gh_dtype) if need_hidden else None
    gw = torch.zeros(weight.shape, device=dev, dtype=cdt) if need_weight else None
    gb = torch.zeros(V, device=dev, dtype=cdt) if (need_bias and bias is not None) else None
    C = chunk_size(M, V, dev, chunk_tokens)
    kw = dict(ignore_index=ignore_index, shift=False, temperature=temperature,
              logit_scale=logit_scale, softcap=softcap)

    def part(t, c0, c1):
        return None if t is None else t[c0:c1].unsqueeze(0)

    for c0 in range(0, M, C):
        c1 = min(M, c0 + C)
        idx = rows[c0:c1]
        h, x = _chunk_logits(hidden2d, weight, bias, idx)
        x3 = x.unsqueeze(0)
        # In place: the recomputed logits chunk becomes G = ∂L/∂X_c.
        fold.token_backward(
            x3, targets[c0:c1].unsqueeze(0), lse[c0:c1].unsqueeze(0), x3,
            grad_logp=part(grad_logp, c0, c1), entropy=part(entropy, c0, c1),
            grad_entropy=part(grad_entropy, c0, c1),
            log_sum_sq_probs=part(log_sum_sq_probs, c0, c1),
            grad_log_sum_sq_probs=part(grad_log_sum_sq_probs, c0, c1),
            grad_mean_logit=part(grad_mean_logit, c0, c1), **kw,
        )
        G = x
        if gh is not None:
            gh.index_copy_(0, idx, _mm(G, weight, gh_dtype))
        if gw is not None:
            _accumulate_mm(gw, G.t(), h)
        if gb is not None:
            gb += G.sum(0, dtype=cdt)
    return gh, gw, gb
