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
      dW        += Gᵀ·H[rows_c] (fp32, accumulated inside the GEMM: addmm_ / out=)
      db        += Σ_rows G     (fp32)

  or, with fewer labelled tokens than vocabulary entries, vocabulary-outer: per slice of the
  head, all tokens' ``G`` (global lse), ``dW``/``db`` of the slice written once, ``dH += G·W_s``
  (see :func:`linear_backward` for the choice).
* Frozen head (``input_grad_rows``): the forward also stores ``∂ log p/∂h`` (two GEMMs a step).

Peak extra memory is one ``[C, V]`` chunk in the input dtype, one ``[C, D]`` gather of
hidden rows (``[M, D]`` vocabulary-outer, plus the fp32 ``[M, D]`` dH accumulator), the
``[V, D]`` fp32 weight accumulator and O(N) per-token vectors.

``fold`` is any module with the token-stage contract (``token_forward`` /
``token_backward`` on ``[B, T, V]`` views): :mod:`pyfused_po.token.torch_backend` makes this
the pure-PyTorch backend (CPU users, float64 references); :mod:`pyfused_po.kernels`
makes it the "chunked" Triton variant (cuBLAS GEMMs + Triton fold).
"""
import math
import types

import torch

from . import token as _torch_fold
from .invariant_tiles import pad_rows, tile_ranges, tile_rows, tiles

# Elements of one [C, V] logits chunk: 128M on CUDA (256 MB in bf16, about 1k tokens
# at a 128k vocabulary, large enough for cuBLAS to run near peak); 4M on the CPU.
CUDA_CHUNK_ELEMENTS = 1 << 27
CPU_CHUNK_ELEMENTS = 1 << 22
# Chunk edges (tokens, vocabulary entries) are multiples of this when the shape allows it:
# the GEMM tiles (cuBLAS 128/256, CPU micro-kernels) then never get a ragged edge mid-stream.
GEMM_TILE = 256


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


def chunk_budget(V, device, chunk_tokens=None):
    """Elements of one logits tile: ``chunk_tokens · V`` when given, else the device budget."""
    if chunk_tokens is not None:
        return max(1, int(chunk_tokens)) * max(V, 1)
    return CUDA_CHUNK_ELEMENTS if device.type == "cuda" else CPU_CHUNK_ELEMENTS


def _round_to_tile(n):
    return n - n % GEMM_TILE if n >= GEMM_TILE else max(1, n)


def chunk_size(M, V, device, chunk_tokens=None):
    """Tokens per chunk: ``chunk_tokens``, or as many as fit the per-device element budget,
    rounded down to a multiple of :data:`GEMM_TILE`."""
    if chunk_tokens is not None:
        return max(1, int(chunk_tokens))
    budget = chunk_budget(V, device)
    return max(1, min(max(M, 1), _round_to_tile(budget // max(V, 1))))


# Tokens per chunk of the three-GEMM plan (fused_pairs): its dW GEMM reduces over one chunk
# and reads + writes the fp32 [V, D] accumulator once per chunk, 8 bytes per output element
# for 2·C FLOPs, so C/4 FLOP per accumulator byte.  4096 is TRL 1.16's token tile (its dW is
# read and written once per 4096 tokens, so (2K − 1)/(2K) of TRL's dW traffic for K chunks)
# and 1024 FLOP/byte, several times an H100's ~300 balance: the accumulator stays off the
# critical path.  The chunk is [C, V] in the input dtype; with C ≤ D it is no larger than the
# copy of dW in the weight's dtype that the end of every trainable-head step holds next to the
# fp32 dW, so it does not raise the step's peak (bench/work_counters.py's peak model).
GRADIENT_CHUNK_TOKENS = 4096


def gradient_chunk_size(M, D, staged):
    """Tokens per chunk of the three-GEMM plan: the larger of the staged chunk ``staged``
    (:func:`chunk_size`) and ``min(M, 4096, D)`` (D rounded to the GEMM tile)."""
    return max(staged, min(max(M, 1), GRADIENT_CHUNK_TOKENS, _round_to_tile(max(D, 1))))


def vocab_slice_width(M, V, budget):
    """Vocabulary entries per slice for the vocabulary-outer backward (all M tokens × one slice
    in one tile), or ``None`` when a slice of at least :data:`GEMM_TILE` entries does not fit."""
    width = budget // max(M, 1)
    if width < min(GEMM_TILE, V):
        return None
    return min(V, _round_to_tile(width))


# Largest |G| a half-precision operand is made to hold before its GEMMs (fp16's max is 65504).
OPERAND_MAX_EXPONENT = 14


def operand_scale(max_abs_upstream, dtype, temperature, logit_scale):
    """A power of two ``s`` for forming ``G = ∂L/∂X`` in a half-precision GEMM operand before the
    caller's loss scale is known (the stored-gradient plans): the fold runs with ``s·g`` and the
    fp32 GEMM products are multiplied by ``1/s``, both exact.

    ``|G| ≤ |g|·|logit_scale / temperature|`` (``|onehot − p| ≤ 1``, softcap's derivative ≤ 1), so
    ``s`` puts the largest element at most at 2^14.  Without it an fp16 ``G`` of a small ``g``
    (a small β, many pairs, or just an unlikely token's ``g·p``) falls below fp16's smallest
    subnormal before ``GradScaler``'s factor arrives, and whole LM-head rows come out 0 (issue 26,
    class 2).  1 for fp32 / fp64 operands (no range to protect) and for ``g = 0``."""
    if dtype not in (torch.float16, torch.bfloat16):
        return 1.0
    bound = float(max_abs_upstream) * abs(float(logit_scale) / float(temperature))
    if not bound > 0 or bound == float("inf"):
        return 1.0
    exponent = OPERAND_MAX_EXPONENT - math.ceil(math.log2(bound))
    return 2.0 ** max(-100, min(100, exponent))


def _chunk_logits(hidden2d, weight, bias, idx):
    """``H[idx]·Wᵀ (+ b)`` in the input dtype: an O(C·D) gather, then one GEMM."""
    h = hidden2d.index_select(0, idx)
    return h, _tile_logits(h, weight, bias)


def _tile_logits(h, weight, bias, out=None):
    """``h·Wᵀ (+ b)`` in the input dtype, one GEMM (into ``out`` when given)."""
    if bias is None:
        return torch.matmul(h, weight.t(), out=out)
    return torch.addmm(bias, h, weight.t(), out=out)


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


def gemm_into(out, a, b, *, accumulate, alpha=1.0):
    """``out (+)= alpha·a·b`` inside the GEMM, in ``out``'s (fp32/fp64) dtype: no temporary product.

    bf16/fp16 operands on CUDA use cuBLAS's fp32 output (``out_dtype``); elsewhere the
    operands are widened first (exact products, the CPU path), then ``addmm_`` / ``mm(out=)``.
    ``alpha`` (a power of two from :func:`operand_scale`) is applied to the fp32 product.
    """
    beta = 1.0 if accumulate else 0.0  # beta = 0: out's old contents are ignored, NaN included
    if a.dtype != out.dtype and out.is_cuda:
        try:
            if accumulate or alpha != 1.0:
                torch.addmm(out, a, b, out_dtype=out.dtype, beta=beta, alpha=alpha, out=out)
            else:
                torch.mm(a, b, out_dtype=out.dtype, out=out)
            return out
        except (TypeError, RuntimeError):
            pass
    a, b = a.to(out.dtype), b.to(out.dtype)
    if accumulate or alpha != 1.0:
        torch.addmm(out, a, b, beta=beta, alpha=alpha, out=out)
    else:
        torch.mm(a, b, out=out)
    return out


def linear_forward(hidden2d, weight, bias, rows, targets, *, ignore_index, temperature,
                   logit_scale, softcap, extras=(), chunk_tokens=None, fold=_torch_fold,
                   input_grad_rows=False, batch_invariant=False):
    """Per labelled token: ``(logp [M], lse [M, 2], {extra: [M]})`` in the compute dtype
    (``lse``: the token stage's LSE pairs).

    ``input_grad_rows=True`` (frozen head: only ``hidden`` wants a gradient, only ``logp``
    gets one) appends ``J [M, D]`` (compute dtype), ``J_t = ∂ log p_t / ∂h_t =
    (W[y_t] − Σ_v softmax_tv·W_v)·dz/dx``: while the chunk's logits are in memory the fold
    turns them into ``∂ log p / ∂X`` (upstream gradient 1) and one more GEMM gives ``J``, so
    the backward is ``dH[rows] = g ⊙ J`` with no GEMM — two GEMMs per step instead of three.

    ``batch_invariant=True``: tiles of exactly ``invariant_tiles.tile_rows()`` tokens (padded) instead
    of ``C``-token chunks, and the fold in its invariant mode: every GEMM and row reduction has one
    shape whatever ``M`` and ``chunk_tokens`` are (:mod:`pyfused_po.token.torch_backend.invariant_tiles`).
    """
    M, V = rows.numel(), weight.shape[0]
    cdt = compute_dtype(hidden2d)
    dev = hidden2d.device
    logp = torch.zeros(M, device=dev, dtype=cdt)
    lse = torch.zeros(M, 2, device=dev, dtype=cdt)  # LSE pairs (hi, lo), as the token stage's
    outs = {name: torch.zeros(M, device=dev, dtype=cdt) for name in extras}
    J = torch.empty(M, hidden2d.shape[1], device=dev, dtype=cdt) if input_grad_rows else None
    C = chunk_size(M, V, dev, chunk_tokens)
    kw = dict(ignore_index=ignore_index, shift=False, temperature=temperature,
              logit_scale=logit_scale, softcap=softcap, **_invariant_kw(batch_invariant))
    for c0, c1, idx in tiles(rows, C, batch_invariant):
        n = c1 - c0  # real rows; an invariant tile has idx.numel() rows, the tail copies of the last
        _, x = _chunk_logits(hidden2d, weight, bias, idx)
        y = pad_rows(targets[c0:c1], idx.numel()).unsqueeze(0)
        lp, ls, ex = fold.token_forward(x.unsqueeze(0), y, extras=extras, **kw)
        logp[c0:c1] = lp[0, :n]
        lse[c0:c1] = ls[0, :n]
        for name in extras:
            outs[name][c0:c1] = ex[name][0, :n]
        if J is not None:
            x3 = x.unsqueeze(0)
            # Upstream s (a power of two, not 1) so that fp16's range holds G; J = (G·W)/s exactly.
            s = operand_scale(1.0, x.dtype, temperature, logit_scale)
            fold.token_backward(x3, y, ls, x3, grad_logp=torch.full_like(lp, s), **kw)
            if n == idx.numel():
                gemm_into(J[c0:c1], x, weight, accumulate=False, alpha=1.0 / s)
            else:  # the padded tile's GEMM has the fixed shape too
                J[c0:c1] = gemm_into(J.new_empty(idx.numel(), J.shape[1]), x, weight, accumulate=False,
                                     alpha=1.0 / s)[:n]
    if J is not None:
        return logp, lse, outs, J
    return logp, lse, outs


def _invariant_kw(batch_invariant):
    """The fold's ``batch_invariant`` keyword, passed only when on (the vocabulary-parallel slice
    folds do not take it: that combination is refused before any launch)."""
    return dict(batch_invariant=True) if batch_invariant else {}


def _is_plain_fold(fold):
    """The token-stage modules (PyTorch, Triton) take labels over the whole vocabulary; a
    wrapper such as the distributed slice fold already runs in ``vocab_shard`` mode."""
    return isinstance(fold, types.ModuleType)


# The vocabulary-outer backward relabels every (labelled) token relative to its slice: a label
# in another slice becomes OTHER_SLICE, and the fold runs with ignore_index=SLICE_IGNORE, a value
# no relative label takes.  The caller's ignore_index must not reach the fold there: a non-negative
# one (e.g. 0, a pad id) equals the relative label of id v0 + ignore_index in the slice at v0, and
# that token's gradient row would be dropped.
OTHER_SLICE = -1
SLICE_IGNORE = -2


def _slice_targets(targets, v0, width):
    """Labels relative to the slice ``[v0, v0 + width)``; others become :data:`OTHER_SLICE`
    (the row is still reduced, without a one-hot term)."""
    rel = targets - v0
    return torch.where((rel >= 0) & (rel < width), rel, torch.full_like(rel, OTHER_SLICE))


def linear_backward(hidden2d, weight, bias, rows, targets, lse, *, grad_logp=None,
                    entropy=None, grad_entropy=None, log_sum_sq_probs=None,
                    grad_log_sum_sq_probs=None, grad_mean_logit=None, need_hidden=True,
                    need_weight=True, need_bias=True, ignore_index, temperature, logit_scale,
                    softcap, chunk_tokens=None, fold=_torch_fold, grad_hidden_dtype=None,
                    batch_invariant=False):
    """``(grad_hidden [N, D], grad_weight [V, D] fp32, grad_bias [V] fp32)``.

    ``grad_hidden`` is in ``grad_hidden_dtype`` (default: the input dtype; fp32 when the
    operands were cast down from fp32 by autocast, so that rounding is not added).
    Per-token upstream gradients and saved values are ``[M]`` aligned with ``rows``;
    a gradient not needed is returned as ``None``.  Every GEMM writes or accumulates
    straight into its fp32 result (:func:`gemm_into`); no ``[V, D]`` product per chunk.

    ``batch_invariant=True``: token-outer over the forward's fixed tiles (never vocabulary-outer,
    whose slice width and ``dH`` GEMMs depend on ``M``); a padded row's upstream gradients are 0, so
    its ``G`` row is 0 and adds nothing to ``dW`` / ``db``.  Each token's ``G`` row and ``dH`` row are
    then bitwise independent of the batch; ``dW`` / ``db`` are sums over the batch and are not (each
    tile's contribution comes from the same fixed-shape GEMM).
    """
    M, V = rows.numel(), weight.shape[0]
    cdt = compute_dtype(hidden2d)
    dev = hidden2d.device
    gh_dtype = grad_hidden_dtype or hidden2d.dtype
    upstream = dict(grad_logp=grad_logp, entropy=entropy, grad_entropy=grad_entropy,
                    log_sum_sq_probs=log_sum_sq_probs, grad_log_sum_sq_probs=grad_log_sum_sq_probs,
                    grad_mean_logit=grad_mean_logit)
    kw = dict(ignore_index=ignore_index, shift=False, temperature=temperature,
              logit_scale=logit_scale, softcap=softcap, **_invariant_kw(batch_invariant))
    gh = torch.zeros(hidden2d.shape, device=dev, dtype=gh_dtype) if need_hidden else None
    # dW and db are written by the first chunk's GEMM (or each slice's), not zero-filled first.
    alloc = torch.zeros if M == 0 else torch.empty
    gw = alloc(weight.shape, device=dev, dtype=cdt) if need_weight else None
    gb = alloc(V, device=dev, dtype=cdt) if (need_bias and bias is not None) else None
    # Loop order.  Token-outer finishes each chunk's dH rows inside the chunk and adds every
    # chunk's Gᵀ·H into the whole fp32 dW: dW is read and written once per token chunk,
    # 2·V·D·⌈M/C⌉ words.  Vocabulary-outer takes all M tokens against one slice of the head:
    # that slice's dW (and db) is written once, and the fp32 dH [M, D] is read and written once
    # per slice, 2·M·D·⌈V/S⌉ words.  With fewer labelled tokens than vocabulary entries
    # (M < V: every preference batch against a 32k–256k vocabulary) the accumulator that is
    # re-read is the smaller one; it needs a slice of ≥ GEMM_TILE entries for all M tokens
    # within the chunk budget, and the lse the forward saved (each slice sees the global one).
    width = vocab_slice_width(M, V, chunk_budget(V, dev, chunk_tokens)) \
        if need_weight and M < V and _is_plain_fold(fold) and not batch_invariant else None
    if width is not None and M > 0:
        _vocab_outer(hidden2d, weight, bias, rows, targets, lse, upstream, kw, fold, width, gh, gw, gb, cdt)
        return gh, gw, gb
    C = chunk_size(M, V, dev, chunk_tokens)
    if batch_invariant:
        _invariant_token_outer(hidden2d, weight, bias, rows, targets, lse, upstream, kw, fold, C, gh, gw, gb, cdt)
        return gh, gw, gb

    def part(t, c0, c1):
        return None if t is None else t[c0:c1].unsqueeze(0)

    for c0 in range(0, M, C):
        c1 = min(M, c0 + C)
        idx = rows[c0:c1]
        h, x = _chunk_logits(hidden2d, weight, bias, idx)
        x3 = x.unsqueeze(0)
        # In place: the recomputed logits chunk becomes G = ∂L/∂X_c.
        fold.token_backward(x3, targets[c0:c1].unsqueeze(0), lse[c0:c1].unsqueeze(0), x3,
                            **{k: part(v, c0, c1) for k, v in upstream.items()}, **kw)
        G = x
        if gh is not None:  # rows finished inside the chunk: written once
            gh.index_copy_(0, idx, _mm(G, weight, gh_dtype))
        _add_weight_grads(gw, gb, G, h, c0 > 0, cdt)
    return gh, gw, gb


def _add_weight_grads(gw, gb, G, h, accumulate, cdt):
    """``dW (+)= Gᵀ·H`` and ``db (+)= Σ G`` of one chunk, in the fp32 (fp64) accumulators."""
    if gw is not None:
        gemm_into(gw, G.t(), h, accumulate=accumulate)
    if gb is not None:
        if accumulate:
            gb += G.sum(0, dtype=cdt)
        else:
            torch.sum(G, 0, dtype=cdt, out=gb)


def _invariant_token_outer(hidden2d, weight, bias, rows, targets, lse, upstream, kw, fold, C, gh, gw, gb, cdt):
    """The token-outer backward under ``batch_invariant=True``: chunks of whole fixed tiles (``C``
    rounded to a multiple of the tile, at least one).  Each tile's logits GEMM, fold and ``dH`` GEMM
    have the fixed shape, so a token's ``G`` and ``dH`` rows do not depend on the batch; ``dW`` /
    ``db`` are accumulated once per chunk from the chunk's ``G`` (their traffic is the default
    token-outer loop's, not once per 128-token tile)."""
    M, step = rows.numel(), tile_rows()
    C = max(step, C - C % step)
    for c0, c1 in tile_ranges(M, C):
        chunk = list(tiles(rows[c0:c1], None, True))
        h = hidden2d.index_select(0, torch.cat([idx for _, _, idx in chunk]))
        G = torch.empty(h.shape[0], weight.shape[0], device=h.device, dtype=h.dtype)
        for j, (t0, t1, idx) in enumerate(chunk):
            n, g = t1 - t0, G[j * step:(j + 1) * step]
            _tile_logits(h[j * step:(j + 1) * step], weight, bias, out=g)
            a, b = c0 + t0, c0 + t1
            # In place: the tile's recomputed logits become its G (padded rows: upstream 0, so G rows 0).
            fold.token_backward(g.unsqueeze(0), pad_rows(targets[a:b], step).unsqueeze(0),
                                pad_rows(lse[a:b], step).unsqueeze(0), g.unsqueeze(0),
                                **{k: None if v is None else pad_rows(v[a:b], step, fill="zero").unsqueeze(0)
                                   for k, v in upstream.items()}, **kw)
            if gh is not None:
                gh.index_copy_(0, idx[:n], _mm(g, weight, gh.dtype)[:n])
        _add_weight_grads(gw, gb, G, h, c0 > 0, cdt)


def _vocab_outer(hidden2d, weight, bias, rows, targets, lse, upstream, kw, fold, width, gh, gw, gb, cdt):
    """The vocabulary-outer backward: per slice ``[v0, v1)``, ``G = ∂L/∂X[:, v0:v1]`` for all
    labelled tokens (the fold in ``vocab_shard`` mode with the global lse), then
    ``dW[v0:v1] = Gᵀ·H`` and ``db[v0:v1] = Σ G`` written once, ``dH += G·W[v0:v1]`` in fp32."""
    M, V = rows.numel(), weight.shape[0]
    h = hidden2d.index_select(0, rows)
    acc_h = torch.zeros(M, h.shape[1], device=h.device, dtype=cdt) if gh is not None else None
    up = {k: None if v is None else v.unsqueeze(0) for k, v in upstream.items()}
    lse3 = lse.unsqueeze(0)
    kw = dict(kw, ignore_index=SLICE_IGNORE)  # every row here is labelled (see OTHER_SLICE)
    for v0 in range(0, V, width):
        v1 = min(V, v0 + width)
        w = weight[v0:v1]
        x = torch.matmul(h, w.t()) if bias is None else torch.addmm(bias[v0:v1], h, w.t())
        x3 = x.unsqueeze(0)
        if up["grad_mean_logit"] is not None:  # the fold divides by its own width, not V
            up["grad_mean_logit"] = upstream["grad_mean_logit"].unsqueeze(0) * ((v1 - v0) / V)
        fold.token_backward(x3, _slice_targets(targets, v0, v1 - v0).unsqueeze(0), lse3, x3,
                            vocab_shard=True, **up, **kw)
        G = x
        if gw is not None:
            gemm_into(gw[v0:v1], G.t(), h, accumulate=False)
        if gb is not None:
            gb[v0:v1] = G.sum(0, dtype=cdt)
        if acc_h is not None:
            gemm_into(acc_h, G, w, accumulate=v0 > 0)
    if gh is not None:
        gh.index_copy_(0, rows, acc_h.to(gh.dtype))
