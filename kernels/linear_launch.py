"""Launchers for the fused-linear kernels: the contract of ``torch_backend.linear``.

Both take ``hidden2d [N, D]`` (any strides, read in place), ``weight [V, D]``, optional
``bias [V]`` and the compacted labelled tokens ``rows``/``targets`` (int64 ``[M]``).
``linear_forward`` returns per-token fp32 ``(logp [M], lse [M, 2], {extra: [M]})`` (``lse``: the
LSE pairs of ``kernels/lse_pair.py``);
``linear_backward`` returns ``(grad_hidden [N, D], grad_weight [V, D], grad_bias [V])``
as fp32 accumulators (``None`` where not needed).
"""
import os

import torch
import triton

from .linear_backward import linear_backward_kernel
from .linear_forward import linear_forward_kernel
from .lse_pair import lse_pair_torch
from .token_launch import flip_key

# max key, s, key_y, a, q, Σz, max logit, its rounding error, label is the split's first maximizer:
# the forward's partial statistics
N_STATS = 9


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def linear_config(V, D, dtype, block_v=None):
    """``dict(BLOCK_M, BLOCK_V, BLOCK_D, num_warps)`` for the device in use.

    GPU: 128×128 output tiles with 64-deep K slices are the usual sweet spot for
    bf16 tensor-core dots (a 128×128 fp32 accumulator in 8 warps).  Interpreter: the
    smallest legal dot tiles keep CPU tests quick and cover the multi-tile paths.
    ``GROUP_M`` token blocks form one group of the grouped program order
    (``kernels.linear_tile.grouped_program``): 8 keeps a group's hidden rows and fp32 dH
    rows (8 · 128 rows · D · 6 B = 24 MB at D = 4096) inside a Hopper L2.  The interpreter
    uses 2 so that small tests cover several groups and a ragged last group.
    """
    if _interpreting():
        cfg = dict(BLOCK_M=16, BLOCK_V=64, BLOCK_D=16, GROUP_M=2, num_warps=4)
    else:
        cfg = dict(BLOCK_M=128, BLOCK_V=128, BLOCK_D=64 if dtype != torch.float32 else 32, GROUP_M=8,
                   num_warps=8)
    if block_v is not None:
        cfg["BLOCK_V"] = block_v
    return cfg


def _dot_flags(dtype):
    # The 3.9 interpreter's bf16 dot is wrong: upcast operands to fp32 there.  fp32
    # inputs use exact ("ieee") dots so they match torch.matmul without TF32.
    return dict(DOT_FP32=_interpreting(),
                INPUT_PRECISION="ieee" if dtype == torch.float32 else "tf32")


def _softcap_args(softcap):
    return (0.0 if softcap is None else float(softcap)), softcap is not None


# Vocabulary splits of the forward under batch_invariant=True: a constant, so that the split
# boundaries (and with them the order in which a row's statistics are combined) do not depend on
# the number of tokens.  8 splits keep a few-token forward at 8 programs per token block; the
# partial statistics cost 9 · 8 · 4 = 288 bytes per token.
INVARIANT_SPLITS = 8


def _num_splits(m_blocks, n_tiles, device, splits):
    """Vocabulary splits: enough programs to fill the GPU (≈4 per SM) when tokens are few."""
    if splits is not None:
        return max(1, min(int(splits), n_tiles))
    if _interpreting():
        return min(2, n_tiles)  # exercise the split combine in CPU tests
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_tiles, triton.cdiv(4 * sms, max(m_blocks, 1))))


def linear_forward(hidden2d, weight, bias, rows, targets, *, ignore_index, temperature,
                   logit_scale, softcap, extras=(), splits=None, block_v=None, batch_invariant=False):
    """Per labelled token: fp32 ``(logp [M], lse [M, 2], {extra: [M]})`` (``lse``: LSE pairs).

    ``batch_invariant=True``: :data:`INVARIANT_SPLITS` vocabulary splits whatever ``M`` (the
    default adds splits when tokens are few) and an ordered combine (:func:`combine_splits`).  A
    row's tiles are ``[BLOCK_M, BLOCK_V]`` dots of one shape, so its statistics then do not depend
    on the batch."""
    del ignore_index  # the tokens were compacted: every target is a real label
    M = rows.numel()
    V, D = weight.shape
    dev = hidden2d.device
    f32 = dict(device=dev, dtype=torch.float32)
    if M == 0:
        return (torch.zeros(0, **f32), torch.zeros(0, 2, **f32),
                {name: torch.zeros(0, **f32) for name in extras})
    cfg = linear_config(V, D, hidden2d.dtype, block_v)
    m_blocks = triton.cdiv(M, cfg["BLOCK_M"])
    n_tiles = triton.cdiv(V, cfg["BLOCK_V"])
    if batch_invariant and splits is None:
        splits = min(2, n_tiles) if _interpreting() else INVARIANT_SPLITS
    if batch_invariant and M % cfg["BLOCK_M"]:  # whole token blocks (see _whole_blocks), results sliced back
        rows_p, targets_p = _whole_blocks(M, cfg["BLOCK_M"], rows, targets)
        logp, lse, outs = linear_forward(hidden2d, weight, bias, rows_p, targets_p, ignore_index=None,
                                         temperature=temperature, logit_scale=logit_scale, softcap=softcap,
                                         extras=extras, splits=splits, block_v=block_v, batch_invariant=True)
        return logp[:M], lse[:M], {name: t[:M] for name, t in outs.items()}
    n_splits = _num_splits(m_blocks, n_tiles, dev, splits)
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)  # no empty split
    part = torch.zeros(N_STATS, n_splits, M, **f32)
    cap, has_cap = _softcap_args(softcap)
    want = set(extras)
    linear_forward_kernel[(m_blocks * n_splits,)](
        hidden2d, *hidden2d.stride(), weight, *weight.stride(),
        weight if bias is None else bias, rows, targets, part,
        M, V, D, tiles_per_split, n_splits,
        float(logit_scale), 1.0 / float(temperature), cap,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=has_cap,
        WANT_ENTROPY="entropy" in want, WANT_LSQ="log_sum_sq_probs" in want,
        WANT_MEAN="mean_logit" in want, WANT_TOP1="is_top1" in want, FLIP=flip_key(logit_scale, temperature, softcap),
        **_dot_flags(hidden2d.dtype), **cfg,
    )
    kz = key_scale(logit_scale, temperature, softcap)
    if batch_invariant:
        return combine_in_tiles(part, V, extras, kz)
    return combine_splits(part, V, extras, kz)


def key_scale(logit_scale, temperature, softcap):
    """``kz`` of ``kernels/fast_math.key_scales`` (``z = key·kz``, ``kz > 0``) as the kernels form
    it: the fp32 product of the fp32 scale and 1/T (1 with a softcap)."""
    if softcap is not None:
        return torch.tensor(1.0)
    kz = torch.tensor(float(logit_scale), dtype=torch.float32) * torch.tensor(1.0 / float(temperature),
                                                                               dtype=torch.float32)
    return -kz if flip_key(logit_scale, temperature, softcap) else kz


def _whole_blocks(M, block, *tensors, fill=None):
    """``tensors`` (``[M, ...]``) grown to a whole number of ``block`` tokens under
    ``batch_invariant=True``: copies of the last token (``fill=None``: indices, labels, LSE pairs) or
    zeros (``fill=0``: upstream gradients, so a padded token's gradient is 0; ``None`` stays ``None``).
    With whole blocks every token of a block is real or a copy of a real one, so no block holds
    masked rows computed from −inf keys next to a real token (a precaution for vectorized math
    libraries such as the interpreter's NumPy, whose special-value lanes may take another code path;
    not isolated as a cause of a difference)."""
    pad = -M % block
    out = []
    for t in tensors:
        if t is None or pad == 0:
            out.append(t)
            continue
        tail = t[-1:] if fill is None else torch.full_like(t[:1], fill)
        out.append(torch.cat([t, tail.expand(pad, *t.shape[1:])]))
    return out


# Tokens per combine under batch_invariant=True (see combine_in_tiles).
COMBINE_TILE = 128


def combine_in_tiles(part, V, extras, kz):
    """:func:`combine_splits` with ``ordered`` sums, on tiles of exactly :data:`COMBINE_TILE` tokens
    (the last one padded with copies of its last token): every elementwise op then runs on one
    shape.  On the GPU an elementwise op computes each element alike anyway; on the CPU a vectorized
    loop hands a length-dependent tail to scalar code whose ``exp`` / ``log`` may round differently,
    so without fixed tiles a token's statistics would depend on ``M`` and on its position."""
    M = part.shape[-1]
    logp, lse = torch.empty(M, **_like(part)), torch.empty(M, 2, **_like(part))
    outs = {name: torch.empty(M, **_like(part)) for name in extras}
    for c0 in range(0, M, COMBINE_TILE):
        c1 = min(M, c0 + COMBINE_TILE)
        tile = part[..., c0:c1]
        if c1 - c0 < COMBINE_TILE:
            tile = torch.cat([tile, tile[..., -1:].expand(*tile.shape[:-1], COMBINE_TILE - (c1 - c0))], dim=-1)
        lp, ls, ex = combine_splits(tile, V, extras, kz, ordered=True)
        logp[c0:c1], lse[c0:c1] = lp[: c1 - c0], ls[: c1 - c0]
        for name in extras:
            outs[name][c0:c1] = ex[name][: c1 - c0]
    return logp, lse, outs


def _like(t):
    return dict(device=t.device, dtype=t.dtype)


def _split_sum(t, ordered):
    """``Σ_k t[k]`` over the splits: ``t.sum(0)``, or with ``ordered`` ``((t₀ + t₁) + t₂) + …`` by
    elementwise adds, whose order no reduction kernel's choice for the shape ``[splits, M]`` can change."""
    if not ordered:
        return t.sum(0)
    acc = t[0]
    for k in range(1, t.shape[0]):
        acc = acc + t[k]
    return acc


def combine_splits(part, V, extras, kz, ordered=False):
    """Merges per-split statistics (max key ``k_k``, ``s_k``, target key, ``a_k`` in key units, ``q_k``,
    ``Σz_k``, the max logit ``fl(k_k·kz)`` and its rounding error; ``z = key·kz``): with
    ``K = max_k k_k`` and ``w_k = e^{(k_k − K)·kz}``, ``s = Σ w_k s_k``,
    ``log p_y = (key_y − K)·kz − log s`` (nothing rounded to the ulp of a large logit), the LSE pair
    of ``m + log s`` with ``m = fl(K·kz)`` and its rounding error in ``lo`` (``kernels/lse_pair.py``;
    both from the kernel, whose fp32 ``scale·(1/T)`` the backward uses: under the interpreter it
    is not torch's product),
    ``H = log s − kz·Σ w_k (a_k + s_k (k_k − K)) / s``,
    ``log Σp² = log Σ w_k² q_k − 2 log s``, ``mean = Σ_k Σz_k / V``, top-1 iff the label is the
    first maximizer of the first split that reaches ``K`` (``argmax``: the lowest id wins a tie).
    ``ordered``: the sums over splits in split order (:func:`_split_sum`; batch invariance)."""
    m, s, zy, a, q, zsum, m_top, m_err, top1 = part.unbind(0)
    kz = kz.to(part.device)
    mx = m.max(0).values
    mx_ref = torch.where(torch.isinf(mx), torch.zeros_like(mx), mx)
    w = torch.exp((m - mx_ref) * kz)
    s_tot = _split_sum(w * s, ordered)
    log_s = torch.log(s_tot)
    zy = _split_sum(zy, ordered)
    outs = {}
    if "entropy" in extras:
        # An empty split (k_k = −inf) has s_k = a_k = 0: its shift term is 0, not 0·(−inf).
        shift = torch.where(torch.isinf(m), torch.zeros_like(m), m - mx_ref)
        outs["entropy"] = log_s - kz * _split_sum(w * (a + s * shift), ordered) / s_tot
    if "log_sum_sq_probs" in extras:
        outs["log_sum_sq_probs"] = torch.log(_split_sum(w * w * q, ordered)) - 2.0 * log_s
    if "mean_logit" in extras:
        outs["mean_logit"] = _split_sum(zsum, ordered) / V
    first = m.argmax(0, keepdim=True)  # the first split holding the max key: its max logit is the row's
    if "is_top1" in extras:  # argmax's tie rule: the first split at the max holds the first maximizer
        outs["is_top1"] = top1.gather(0, first)[0]
    top, top_err = m_top.gather(0, first)[0], m_err.gather(0, first)[0]
    return (zy - mx_ref) * kz - log_s, lse_pair_torch(top, log_s, top_err), outs


def linear_backward(hidden2d, weight, bias, rows, targets, lse, *, grad_logp=None, entropy=None,
                    grad_entropy=None, log_sum_sq_probs=None, grad_log_sum_sq_probs=None,
                    grad_mean_logit=None, need_hidden=True, need_weight=True, need_bias=True,
                    ignore_index, temperature, logit_scale, softcap, block_v=None, grad_hidden_dtype=None,
                    grad_filter=None, batch_invariant=False):
    """fp32 ``(grad_hidden [N, D], grad_weight [V, D], grad_bias [V])``, ``None`` where not needed;
    ``lse``: the forward's ``[M, 2]`` LSE pairs.

    The accumulators are fp32 whatever ``grad_hidden_dtype`` asks (it is at most fp32).
    ``grad_filter``: ``None`` (exact) or a threshold ``≥ 0``: tiles whose every logits
    gradient is below it, relative to the token's upstream gradient, skip their dH/dW dots
    (``kernels.linear_backward``); with a threshold above 0 the vocabulary tiles are formed
    in :func:`mean_logit_order`.  Not applied when ``grad_mean_logit`` is given: that
    gradient is ``g_M / V`` on every id and would fall under any threshold above ``1/V``.

    ``batch_invariant=True`` (with ``need_hidden``): one launch per vocabulary tile
    (:func:`_per_vocab_tile`), so each ``dH`` element receives one atomic add per launch, in launch
    order: ``dH = ((0 + t₀) + t₁) + …`` with ``t_j`` a fixed-shape dot, whatever ``M`` is.  One launch
    for the whole grid would let the vocabulary tiles' adds land in any order.  ``dW`` / ``db`` still
    sum token blocks by atomics (not deterministic; they are sums over the batch anyway)."""
    del ignore_index, grad_hidden_dtype
    M = rows.numel()
    if tuple(lse.shape) != (M, 2) or not lse.is_contiguous() or lse.dtype != torch.float32:
        raise ValueError(f"lse must be the forward's contiguous float32 [M, 2] LSE pairs ({M}, 2), "
                         f"got {lse.dtype} {tuple(lse.shape)} with strides {lse.stride()}")
    V, D = weight.shape
    dev = hidden2d.device
    f32 = dict(device=dev, dtype=torch.float32)
    need_bias = need_bias and bias is not None
    gh = torch.zeros(hidden2d.shape, **f32) if need_hidden else None
    gw = torch.zeros(V, D, **f32) if need_weight else None
    gb = torch.zeros(V, **f32) if need_bias else None
    if M == 0 or not (need_hidden or need_weight or need_bias):
        return gh, gw, gb
    cfg = linear_config(V, D, hidden2d.dtype, block_v)
    dummy = lse
    cap, has_cap = _softcap_args(softcap)
    use_filter = grad_filter is not None and grad_mean_logit is None
    # Threshold 0 skips nothing: keep the id order so the result is exactly the unfiltered one.
    perm = mean_logit_order(hidden2d, weight, bias, rows) if use_filter and grad_filter > 0 else None
    grid = (triton.cdiv(M, cfg["BLOCK_M"]) * triton.cdiv(V, cfg["BLOCK_V"]),)
    if batch_invariant and need_hidden:
        names = ("grad_logp", "entropy", "grad_entropy", "log_sum_sq_probs", "grad_log_sum_sq_probs",
                 "grad_mean_logit")
        rows_p, targets_p, lse_p = _whole_blocks(M, cfg["BLOCK_M"], rows, targets, lse)
        upstream = _whole_blocks(M, cfg["BLOCK_M"], grad_logp, entropy, grad_entropy, log_sum_sq_probs,
                                 grad_log_sum_sq_probs, grad_mean_logit, fill=0.0)
        _per_vocab_tile(hidden2d, weight, bias, rows_p, targets_p, lse_p.contiguous(), gh, gw, gb, cfg,
                        dict(zip(names, upstream)),
                        dict(logit_scale=logit_scale, temperature=temperature, softcap=softcap))
        return gh, gw, gb
    linear_backward_kernel[grid](
        hidden2d, *hidden2d.stride(), weight, *weight.stride(),
        weight if bias is None else bias, rows, targets, rows if perm is None else perm,
        lse,
        dummy if grad_logp is None else grad_logp,
        dummy if entropy is None else entropy,
        dummy if grad_entropy is None else grad_entropy,
        dummy if log_sum_sq_probs is None else log_sum_sq_probs,
        dummy if grad_log_sum_sq_probs is None else grad_log_sum_sq_probs,
        dummy if grad_mean_logit is None else grad_mean_logit,
        dummy if gh is None else gh, *((0, 0) if gh is None else gh.stride()),
        dummy if gw is None else gw, *((0, 0) if gw is None else gw.stride()),
        dummy if gb is None else gb,
        M, V, D,
        float(logit_scale), 1.0 / float(temperature), cap, float(grad_filter) if use_filter else 0.0,
        HAS_BIAS=bias is not None, HAS_SOFTCAP=has_cap, FILTER=use_filter, PERMUTED=perm is not None,
        HAS_G=grad_logp is not None, GRAD_ENTROPY=grad_entropy is not None,
        GRAD_LSQ=grad_log_sum_sq_probs is not None, GRAD_MEAN=grad_mean_logit is not None,
        NEED_DH=need_hidden, NEED_DW=need_weight, NEED_DB=need_bias,
        **_dot_flags(hidden2d.dtype), **cfg,
    )
    return gh, gw, gb


def _per_vocab_tile(hidden2d, weight, bias, rows, targets, lse, gh, gw, gb, cfg, upstream, transform):
    """The backward as ``⌈V / BLOCK_V⌉`` launches of one vocabulary tile each (``batch_invariant``;
    ``rows`` padded to whole token blocks, the padded tokens' upstream gradients 0, so their ``G``
    rows are 0 and add exact zeros to the ``dH`` row they share with the last real token):
    the tile's head rows ``W[v0:v1]`` (bias, ``dW``, ``db`` slices alike) and labels relative to
    ``v0`` (a label outside the tile never matches a column).  The mean-logit gradient ``g_M / V``
    is passed as ``(g_M · w / V) / w`` for the tile's width ``w``."""
    M, D = rows.numel(), weight.shape[1]
    V, width = weight.shape[0], cfg["BLOCK_V"]
    grid = (triton.cdiv(M, cfg["BLOCK_M"]),)
    dummy = lse
    cap, has_cap = _softcap_args(transform["softcap"])
    g_mean = upstream["grad_mean_logit"]
    for v0 in range(0, V, width):
        v1 = min(V, v0 + width)
        w = weight[v0:v1]
        mean = None if g_mean is None else g_mean * ((v1 - v0) / V)
        linear_backward_kernel[grid](
            hidden2d, *hidden2d.stride(), w, *w.stride(),
            w if bias is None else bias[v0:v1], rows, targets - v0, rows,
            lse,
            *(dummy if upstream[k] is None else upstream[k] for k in (
                "grad_logp", "entropy", "grad_entropy", "log_sum_sq_probs", "grad_log_sum_sq_probs")),
            dummy if mean is None else mean,
            gh, *gh.stride(),
            dummy if gw is None else gw[v0:v1], *((0, 0) if gw is None else gw.stride()),
            dummy if gb is None else gb[v0:v1],
            M, v1 - v0, D,
            float(transform["logit_scale"]), 1.0 / float(transform["temperature"]), cap, 0.0,
            HAS_BIAS=bias is not None, HAS_SOFTCAP=has_cap, FILTER=False, PERMUTED=False,
            HAS_G=upstream["grad_logp"] is not None, GRAD_ENTROPY=upstream["grad_entropy"] is not None,
            GRAD_LSQ=upstream["grad_log_sum_sq_probs"] is not None, GRAD_MEAN=mean is not None,
            NEED_DH=True, NEED_DW=gw is not None, NEED_DB=gb is not None,
            **_dot_flags(hidden2d.dtype), **cfg,
        )


def mean_logit_order(hidden2d, weight, bias, rows):
    """Vocabulary ids by decreasing mean raw logit over the labelled tokens, int64 ``[V]``.

    ``mean_m x_m = mean(H[rows])·Wᵀ (+ b)``: two GEMVs, no ``[M, V]`` work.  Grouping the
    likely ids in the first tiles leaves the other tiles with uniformly small gradients,
    which the filter can skip (``bench/grad_filter_measure.py``: 6.6% → 24.8% of the
    128 × 128 tiles at 2⁻¹² on SmolLM2-135M).  The GEMVs accumulate in fp32 and round
    to the input dtype (an ordering heuristic: ties only move ids between tiles).
    """
    pick = torch.zeros(hidden2d.shape[0], device=hidden2d.device, dtype=hidden2d.dtype)
    pick[rows] = 1.0
    h_sum = pick @ hidden2d                      # Σ over the labelled rows, [D]
    x_mean = (weight @ h_sum).float() / rows.numel()
    if bias is not None:
        x_mean = x_mean + bias.float()
    return torch.argsort(x_mean, descending=True, stable=True)
