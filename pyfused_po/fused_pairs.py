"""Three GEMMs for a trainable LM head: the exact gradient is formed during the forward.

The staged fused-linear path runs four ``[M, D] × [D, V]`` GEMMs per step: the forward's
logits, and in the backward the recomputed logits, ``dH`` and ``dW``.  The recompute exists
only because the per-token upstream gradient ``g_t = ∂L/∂ log p_t`` is unknown while the
forward holds the logits.  :class:`~pyfused_po.FusedPreferenceLoss` knows its objective, and
for most objectives ``g_t`` of a pair's tokens depends only on that pair's sums and on batch
constants fixed by the labels (the mean's 1/P, the NLL term's token count, the lengths).
Then, per chunk of whole pairs:

1. ``X = H_c·Wᵀ (+ b)`` (GEMM 1) and the token fold: ``log p``, lse and the extras;
2. the module's own sequence stage and objective on the batch, with the chunk's per-token
   log-probs as autograd leaves and placeholders (−1 per token) for the other pairs' tokens;
   ``∂L/∂ log p`` of the chunk's tokens is exact because no pair's gradient depends on
   another pair's values (the placeholders never reach it);
3. the fold turns ``X`` in place into ``G = ∂L/∂X``; ``dH[rows] = G·W`` (GEMM 2) and
   ``dW += Gᵀ·H_c`` (GEMM 3, fp32, in place), ``db += Σ G``.

The loss and metrics are then computed once on the whole batch's sums, by the same functions
as the staged path; the backward only multiplies the stored ``dH``/``dW``/``db`` by the incoming
gradient (a scalar).  Only ``loss`` carries a gradient: ``losses``, rewards and metrics are
detached (they are detached metrics in the staged path too, except ``losses``).

Chunks hold at most ``C`` labelled tokens: ``module.chunk_tokens`` when that attribute is set,
else :func:`~pyfused_po.torch_backend.linear.gradient_chunk_size` (min(4096, D) tokens: TRL's
token tile, capped so the chunk is no larger than dW; or the staged chunk when that is larger): each chunk re-reads the fp32 dW,
so the chunk's reduction length sets the accumulator traffic.

Memory: ``dW`` (fp32 ``[V, D]``), ``db`` and ``dH`` (``[B·T, D]``, hidden's dtype) live from the
forward to the backward instead of only during the backward.

Falls back to the staged path (returns ``None`` or is not chosen, :func:`applies`) when the
gradient does not separate over pairs or the plan cannot run: AOT (``aot``, ``aot_unpaired``
sort across the batch), ``bco_running_mean`` (δ includes the current batch), WPO combined with
an NLL term (``sft``, ``cpo``, ``simpo``, ``alphapo``, ``orpo``: the batch-mean NLL's gradient
is weighted by every pair's WPO weight), ``expo`` (logits only), ``reduction="none"`` (a vector
loss), vocabulary or sequence parallelism, ``linear_impl="fused"``, any other input that
requires grad (``weights``, ``token_weights``, reference tensors, soft labels), grad mode off,
``torch.compile`` tracing, a pair with more labelled tokens than one chunk holds, and on CUDA
chunks under :data:`MIN_CUDA_CHUNK_TOKENS` tokens when the batch needs more than one (the
per-chunk fp32 dW traffic would cost more than the GEMM saved).
"""
import torch
from torch.autograd.function import once_differentiable

from .linear_token_logprobs import validate_linear_inputs
from .mixed_precision import autocast_off, cast_operands
from .token_logprobs import TokenLogprobs, make_token_config
from .torch_backend import linear as _chunked
from .torch_backend import token as _torch_fold

NOT_SEPARABLE = frozenset({"aot", "aot_unpaired"})
NLL_TERM = frozenset({"sft", "cpo", "simpo", "alphapo", "orpo"})
PLACEHOLDER_LOGP = -1.0
# On CUDA each chunk's dW GEMM reads and writes the fp32 [V, D] accumulator: with a reduction
# over C tokens it does 2·C·V·D FLOPs for 8·V·D bytes, C/4 FLOP/byte.  Under ~1024 tokens that is
# below an H100's bf16 balance (~200–300 FLOP/byte) and the accumulator traffic costs more than
# the saved GEMM: the staged path (vocabulary-outer, dW written once) is faster.  The default
# chunk (torch_backend.linear.gradient_chunk_size, min(4096, D) tokens) is above it at real heads; only an explicit
# ``module.chunk_tokens`` below it falls back, when the batch needs more than one chunk.  A
# prediction from the model in bench/work_counters.py, to be checked on a GPU.
MIN_CUDA_CHUNK_TOKENS = 1024


def _types(module):
    return [module.loss_type] if isinstance(module.loss_type, str) else list(module.loss_type)


def applies(module, source, labels, ref_chosen_logps, ref_rejected_logps, token_weights, weights,
            label_smoothing):
    """Whether :func:`fused_forward` may run for this call (see the module docstring)."""
    hidden, weight, bias = source
    types = set(_types(module))
    others = (ref_chosen_logps, ref_rejected_logps, token_weights, weights, label_smoothing)
    return (getattr(module, "fused_gradient", True) and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and any(t is not None and t.requires_grad for t in source)
            and not (types & NOT_SEPARABLE) and not module.bco_running_mean and not module.expo
            and not (module.use_weighting and types & NLL_TERM)
            and module.reduction != "none" and module.linear_impl in ("auto", "chunked")
            and not module.parallel.vocab_parallel and not module.parallel.sequence_parallel
            and not any(isinstance(t, torch.Tensor) and t.requires_grad for t in others))


def _pair_chunks(pair_of_token, pairs, budget_tokens):
    """Contiguous pair ranges ``[(p0, p1)]`` whose labelled tokens fit ``budget_tokens`` each,
    or ``None`` when one pair alone does not."""
    counts = torch.bincount(pair_of_token, minlength=pairs).tolist()
    if pairs and max(counts) > budget_tokens:
        return None
    chunks, p0, used = [], 0, 0
    for p, n in enumerate(counts):
        if used + n > budget_tokens and p > p0:
            chunks.append((p0, p))
            p0, used = p, 0
        used += n
    if pairs:
        chunks.append((p0, pairs))
    return chunks


def fused_forward(module, source, ref_source, labels, ref_chosen_logps, ref_rejected_logps, ref_token_logps,
                  token_weights, nll_labels, weights, label_smoothing):
    """The module's forward with the gradient formed per chunk of pairs; ``None`` to fall back."""
    hidden, weight, bias = source
    tk = module.token_kwargs
    token_labels = module._token_labels(labels, nll_labels)
    extras = module._policy_extras()
    config = make_token_config(tk["ignore_index"], tk["shift"], tk["temperature"], tk["logit_scale"],
                               tk["softcap"], extras)
    chunk_tokens = getattr(module, "chunk_tokens", None)
    backend, _, mm_dtype = validate_linear_inputs(hidden, weight, bias, token_labels, config, tk["backend"],
                                                  module.linear_impl, chunk_tokens)
    B, T = labels.shape
    P = B // 2
    if labels.numel() == 0:  # no tokens (T = 0): the staged path defines the empty-batch result
        return None
    rows, pos, targets = _chunked.labelled_tokens(token_labels.reshape(-1, T), config.ignore_index, config.shift)
    M, V = rows.numel(), weight.shape[0]
    C = _chunked.chunk_size(M, V, hidden.device, chunk_tokens)
    if chunk_tokens is None and weight.requires_grad:  # only dW is re-read per chunk
        C = _chunked.gradient_chunk_size(M, weight.shape[1], C)
    pair = torch.div(pos, T, rounding_mode="floor") % max(P, 1)
    if hidden.is_cuda and M > C and C < MIN_CUDA_CHUNK_TOKENS:  # a small head at a large vocabulary
        return None
    chunks = _pair_chunks(pair, P, C) if M else None
    if chunks is None:
        return None
    if ref_source is not None and module.needs_reference:
        with torch.no_grad():  # forward only, once: the staged path's reference sums
            ref_token_logps = module._token_stage(ref_source, labels).logps
    fold = _torch_fold if backend == "torch" else _kernels()
    need_h, need_w = hidden.requires_grad, weight.requires_grad
    need_b = bias is not None and bias.requires_grad
    h2, w, b = cast_operands(mm_dtype, hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach(),
                             None if bias is None else bias.detach())
    cdt = _chunked.compute_dtype(h2)
    # Per-token values, flattened like labels: real ones filled chunk by chunk.
    names = ("logps",) + extras
    real = {n: torch.zeros(B * T, device=labels.device, dtype=cdt) for n in names}
    placeholder = {n: torch.zeros(B * T, device=labels.device, dtype=cdt) for n in names}
    placeholder["logps"][pos] = PLACEHOLDER_LOGP
    if "log_sum_sq_probs" in placeholder:
        placeholder["log_sum_sq_probs"][pos] = PLACEHOLDER_LOGP  # WPO weight exp(0) = 1
    gh = torch.zeros(h2.shape, device=h2.device, dtype=hidden.dtype) if need_h else None
    # dW/db: written by the first chunk's GEMM, accumulated in place by the others.
    gw = torch.empty(weight.shape, device=w.device, dtype=cdt) if need_w else None
    gb = torch.empty(V, device=w.device, dtype=cdt) if need_b else None
    kw = dict(ignore_index=config.ignore_index, shift=False, temperature=config.temperature,
              logit_scale=config.logit_scale, softcap=config.softcap)
    with autocast_off(hidden.device.type):
        for k, (p0, p1) in enumerate(chunks):
            sel = ((pair >= p0) & (pair < p1)).nonzero().squeeze(1)
            idx, y = rows.index_select(0, sel), targets.index_select(0, sel).unsqueeze(0)
            h_c, x = _chunked._chunk_logits(h2, w, b, idx)  # GEMM 1
            x3 = x.unsqueeze(0)
            lp, lse, outs = fold.token_forward(x3, y, extras=extras, **kw)
            where = pos.index_select(0, sel)
            for n in names:
                real[n][where] = (lp if n == "logps" else outs[n])[0]
            g = _chunk_upstream(module, lp[0], where, placeholder, real, extras, labels, ref_token_logps,
                                token_weights, nll_labels, ref_chosen_logps, ref_rejected_logps, weights,
                                label_smoothing)
            fold.token_backward(x3, y, lse, x3, grad_logp=g.unsqueeze(0), **kw)  # X becomes G in place
            if gh is not None:
                gh.index_copy_(0, idx, _chunked._mm(x, w, gh.dtype))  # GEMM 2
            if gw is not None:
                _chunked.gemm_into(gw, x.t(), h_c, accumulate=k > 0)  # GEMM 3
            if gb is not None:
                if k > 0:
                    gb += x.sum(0, dtype=cdt)
                else:
                    torch.sum(x, 0, dtype=cdt, out=gb)
        del h_c, x, x3  # the last chunk is freed before dW is cast to the weight's dtype
    with torch.no_grad():
        policy = _token_values(real, extras, labels.shape)
        columns = module._columns_from_tokens(policy, None, labels, ref_token_logps, token_weights, nll_labels)
        result = module._objective(columns, ref_chosen_logps, ref_rejected_logps, weights, label_smoothing)
    grads = (None if gh is None else gh.view(hidden.shape), None if gw is None else gw.to(weight.dtype),
             None if gb is None else gb.to(bias.dtype))
    result.loss = _StoredGradient.apply(result.loss, hidden, weight, bias, *grads)
    return result


def _kernels():
    from . import kernels

    return kernels


def _token_values(flat, extras, shape):
    return TokenLogprobs(flat["logps"].view(shape), **{n: flat[n].view(shape) for n in extras})


def _chunk_upstream(module, lp, where, placeholder, real, extras, labels, ref_token_logps, token_weights,
                    nll_labels, ref_chosen_logps, ref_rejected_logps, weights, label_smoothing):
    """``∂L/∂ log p`` of the chunk's tokens: the module's sequence stage and objective on the
    whole batch, the chunk's log-probs as leaves, placeholders elsewhere (exact by separability)."""
    leaf = lp.detach().requires_grad_(True)
    with torch.enable_grad():
        tokens = {n: placeholder[n].clone() for n in placeholder}
        for n in extras:
            tokens[n][where] = real[n][where]
        tokens["logps"] = tokens["logps"].index_put((where,), leaf)
        policy = _token_values(tokens, extras, labels.shape)
        columns = module._columns_from_tokens(policy, None, labels, ref_token_logps, token_weights, nll_labels)
        loss = module._objective(columns, ref_chosen_logps, ref_rejected_logps, weights, label_smoothing).loss
        (g,) = torch.autograd.grad(loss, leaf, allow_unused=True)
    return torch.zeros_like(lp) if g is None else g.to(lp.dtype)


class _StoredGradient(torch.autograd.Function):
    """``loss`` connected to ``hidden``/``weight``/``bias`` through gradients computed in the
    forward: the backward scales them by the incoming (scalar) gradient."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, gh, gw, gb):
        ctx.grads = (gh, gw, gb)
        return loss.detach().clone()

    @staticmethod
    @once_differentiable  # the stored gradients are numbers, not a graph: no double backward
    def backward(ctx, grad):
        if ctx.grads is None:
            raise RuntimeError("FusedPreferenceLoss's fused-gradient loss can be backpropagated once (its "
                               "gradients were formed in the forward); set module.fused_gradient = False "
                               "for retain_graph=True")
        gh, gw, gb = ctx.grads
        ctx.grads = None  # hand the buffers over (AccumulateGrad may then keep them without a copy)
        out = [None if t is None else (t * grad.to(t.dtype) if bool(grad != 1) else t) for t in (gh, gw, gb)]
        return (None, *out, None, None, None)
