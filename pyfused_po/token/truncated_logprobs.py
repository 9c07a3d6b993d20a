"""Token stage under a truncated sampler: log p̃(label) from logits or from hidden states + LM head.

:func:`truncated_token_logprobs` is the entry point (:func:`pyfused_po.integrations.rl.rl_token_logprobs`
calls it when ``top_k`` / ``top_p`` / ``min_p`` or ``batch_invariant`` is given).  The per-row math
(kept set, ``log p̃``, entropy of ``p̃``, gradients with the kept set held fixed) is
:mod:`pyfused_po.token.truncated_support`; this module runs it over the labelled tokens in tiles:

* logits path: a tile is ``logits[rows]`` (a gather of ``C`` rows);
* hidden path: a tile is ``H[rows]·Wᵀ (+ b)``, one GEMM per tile; the backward recomputes it and
  forms ``dH[rows] = G·W``, ``dW += Gᵀ·H[rows]``, ``db += Σ G`` (fp32 accumulators).  At most one
  ``[C, V]`` tile exists at a time: ``[N, V]`` is never materialized.

The per-row fold runs on the resolved backend: ``"torch"`` is :mod:`pyfused_po.token.truncated_support`
(``torch.topk`` / ``torch.sort`` of each tile's rows; the CPU path and the float64 reference),
``"triton"`` is ``kernels/truncated_select.py`` (a radix select of the thresholds in at most 18
streaming passes over each row, no sort).  The tiles themselves (the gather of logits rows, the
GEMMs of the hidden path) are PyTorch on both.

**Batch invariance** (``batch_invariant=True``).  A token's results are computed in a tile of exactly
:data:`~pyfused_po.token.torch_backend.invariant_tiles.INVARIANT_TILE_ROWS` rows (the last tile padded with
copies of a real row whose results are dropped and whose gradient rows are zeroed), every tile by
its own GEMM / reduction of the same shape (:mod:`pyfused_po.token.torch_backend.invariant_tiles`, shared
with the token stage's own invariant mode).  No reduction ever runs over the token dimension except ``dW`` / ``db`` (which are sums over
the batch by definition), so a token's ``log p̃``, entropy, logits gradient and ``dH`` row do not
depend on how many tokens there are, on their values, on the token's position or on
``chunk_tokens``.  This rests on one property of the libraries: a GEMM (or row reduction) of a fixed
shape reduces each output element in the same order whatever the other rows hold and wherever the
row sits in the tile.  The CPU tests check it bitwise; on CUDA the ``gpu`` test in
``tests/test_batch_invariance.py`` must confirm it for cuBLAS (which promises run-to-run
determinism for a fixed shape, not slot independence).
"""
from typing import NamedTuple, Optional

import torch

from .autograd_guard import first_derivative_only
from .linear_token_logprobs import validate_linear_inputs
from .mixed_precision import autocast_off, cast_operands
from .packed_layout import run_packed
from .token_logprobs import make_token_config, validate_token_inputs
from .torch_backend.linear import (
    _chunk_logits,
    _mm,
    chunk_budget,
    chunk_size,
    compute_dtype,
    gemm_into,
    labelled_tokens,
    labels_2d,
)
from .torch_backend.invariant_tiles import pad_rows, tiles
from .truncated_support import SamplerSpec, fold_backward, fold_forward, sampler_spec
from ..validation import checked_labels

TORCH_FOLD_TEMPORARIES = 8


class TruncatedLogprobs(NamedTuple):
    """Per-token results shaped like ``labels``.

    * ``logps`` — ``log p̃(label)`` (``−inf`` outside the kept set, 0 where ignored);
    * ``entropy`` — ``H(p̃)`` (``None`` unless asked for);
    * ``outside`` — bool, ``True`` where a labelled token lies outside the kept set
      (``int(outside.sum())`` is the count of such tokens).
    """

    logps: torch.Tensor
    entropy: Optional[torch.Tensor]
    outside: torch.Tensor


class _Plan:
    """What a forward / backward needs besides tensors: the sampler, the transform, the tiling."""

    def __init__(self, spec: SamplerSpec, config, with_entropy, invariant, chunk_tokens, backend):
        self.spec, self.with_entropy, self.invariant, self.chunk_tokens = spec, with_entropy, invariant, chunk_tokens
        self.transform = dict(logit_scale=config.logit_scale, temperature=config.temperature, softcap=config.softcap)
        self.ignore_index, self.shift = config.ignore_index, config.shift
        self.fold_forward, self.fold_backward = _folds(backend, spec)
        # The PyTorch fold holds several [C, V] temporaries (the sort's values and int64 indices,
        # softmax, cumsum, masks): its default tile is a fraction of the chunked backend's budget.
        self.tile_divisor = TORCH_FOLD_TEMPORARIES if backend == "torch" else 1

    def index(self, labels):
        return labelled_tokens(labels_2d(labels), self.ignore_index, self.shift)

    def tiles(self, rows, V, device):
        C = chunk_size(rows.numel(), V, device, self.chunk_tokens)
        if self.chunk_tokens is None:
            C = min(C, max(1, chunk_budget(V, device) // max(V, 1) // self.tile_divisor))
        return tiles(rows, C, self.invariant)

    def forward(self, tile_logits, rows, targets, V, cdt):
        """``(logp [M], stats [M, 2], entropy [M] or None)`` over the labelled tokens;
        ``tile_logits(idx)`` returns the raw logits rows of a tile."""
        M, dev = rows.numel(), rows.device
        logp = torch.empty(M, device=dev, dtype=cdt)
        stats = torch.empty(M, 2, device=dev, dtype=cdt)
        entropy = torch.empty(M, device=dev, dtype=cdt) if self.with_entropy else None
        for c0, c1, idx in self.tiles(rows, V, dev):
            n = c1 - c0
            y = pad_rows(targets[c0:c1], idx.numel())
            lp, st, ent = self.fold_forward(tile_logits(idx), y, with_entropy=self.with_entropy,
                                            **self.transform)
            logp[c0:c1], stats[c0:c1] = lp[:n], st[:n]
            if entropy is not None:
                entropy[c0:c1] = ent[:n]
        return logp, stats, entropy

    def tile_gradients(self, tile_logits, rows, targets, stats, grad_logp, grad_entropy, entropy, V):
        """Yields ``(c0, c1, idx, G)`` with ``G = ∂L/∂x`` of each tile (``[len(idx), V]``, compute
        dtype, padded rows zero)."""
        for c0, c1, idx in self.tiles(rows, V, rows.device):
            size = idx.numel()

            def part(t):  # upstream gradients and saved entropy: padded rows get 0
                return None if t is None else pad_rows(t[c0:c1], size, fill="zero")

            y, st = pad_rows(targets[c0:c1], size), pad_rows(stats[c0:c1], size)
            G = self.fold_backward(tile_logits(idx), y, st, grad_logp=part(grad_logp),
                                   grad_entropy=part(grad_entropy), entropy=part(entropy), **self.transform)
            yield c0, c1, idx, G


def _folds(backend, spec: SamplerSpec):
    """``(fold_forward, fold_backward)`` of a resolved backend, both with the PyTorch fold's
    signature minus the spec (:mod:`pyfused_po.token.truncated_support`), on raw tiles in the input dtype
    (the Triton kernels read bf16 / fp16 rows as they are)."""
    if backend == "torch":  # rows widened to the compute dtype first (fp32, or float64)
        return (lambda x, *a, **k: fold_forward(x.to(compute_dtype(x)), *a, spec=spec, **k),
                lambda x, *a, **k: fold_backward(x.to(compute_dtype(x)), *a, **k))
    try:
        from ..kernels import truncated_launch
    except ImportError as err:  # triton missing (e.g. macOS) or broken
        raise ImportError("backend='triton' needs the triton package (pip install triton); "
                          "use backend='torch' without it") from err
    select = dict(top_k=spec.top_k, top_p=spec.top_p, min_p=spec.min_p, minp_first=spec.order == "vllm")
    return lambda x, *a, **k: truncated_launch.fold_forward(x, *a, **select, **k), truncated_launch.fold_backward


def _scatter(values, pos, labels, fill=0.0):
    out = torch.full((labels.numel(),), fill, device=labels.device, dtype=values.dtype)
    out[pos] = values
    return out.view(labels.shape)


def _outputs(ctx, saved, logp, entropy, pos, labels):
    """Saves ``saved`` (+ the entropy when computed) and returns ``(logps, entropy or empty)`` shaped
    like ``labels`` from the per-labelled-token values."""
    ctx.save_for_backward(*saved, *(() if entropy is None else (entropy,)))
    ctx.set_materialize_grads(False)
    ent = _scatter(entropy, pos, labels) if entropy is not None else logp.new_empty(0)
    return _scatter(logp, pos, labels), ent


def check_sources(entry, logits, hidden, weight, bias):
    """Exactly one source: ``logits``, or ``hidden`` with ``weight`` (and ``bias``)."""
    if (logits is None) == (hidden is None):
        raise ValueError(f"{entry} needs exactly one of logits= or hidden= (with weight=), got "
                         f"{'both' if logits is not None else 'neither'}")
    if hidden is not None and weight is None:
        raise ValueError("hidden= needs weight= (the LM head, [vocab, hidden_dim])")
    if logits is not None and (weight is not None or bias is not None):
        raise ValueError("weight=/bias= go with hidden=, not with logits=")


def _gather(g, pos, dtype):
    return None if g is None else g.reshape(-1).index_select(0, pos).to(dtype)


class TruncatedLogitsFunction(torch.autograd.Function):
    """``forward(logits, labels, plan)`` → ``(logps, entropy or empty)`` shaped like ``labels``."""

    @staticmethod
    def forward(ctx, logits, labels, plan):
        V = logits.shape[-1]
        x2 = logits.reshape(-1, V)
        rows, pos, targets = plan.index(labels)
        cdt = compute_dtype(logits)
        logp, stats, entropy = plan.forward(lambda idx: x2.index_select(0, idx), rows, targets, V, cdt)
        ctx.plan = plan
        return _outputs(ctx, (logits, labels, rows, pos, targets, stats), logp, entropy, pos, labels)

    @staticmethod
    @first_derivative_only("truncated_token_logprobs")
    def backward(ctx, grad_logp, grad_entropy):
        logits, labels, rows, pos, targets, stats, *entropy = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_logp is None and grad_entropy is None):
            return None, None, None
        V, cdt = logits.shape[-1], stats.dtype
        x2 = logits.reshape(-1, V)
        grad = torch.zeros(x2.shape, dtype=logits.dtype, device=logits.device)
        tiles = ctx.plan.tile_gradients(lambda idx: x2.index_select(0, idx), rows, targets, stats,
                                        _gather(grad_logp, pos, cdt), _gather(grad_entropy, pos, cdt),
                                        entropy[0] if entropy else None, V)
        for c0, c1, idx, G in tiles:
            grad.index_copy_(0, idx[: c1 - c0], G[: c1 - c0].to(grad.dtype))
        return grad.view(logits.shape), None, None


class TruncatedLinearFunction(torch.autograd.Function):
    """``forward(hidden, weight, bias, labels, plan, mm_dtype)`` → ``(logps, entropy or empty)``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, plan, mm_dtype):
        rows, pos, targets = plan.index(labels)
        h, w, b = cast_operands(mm_dtype, hidden, weight, bias)
        h2 = h.reshape(-1, h.shape[-1])
        cdt = compute_dtype(hidden)
        with autocast_off(hidden.device.type):
            logp, stats, entropy = plan.forward(lambda idx: _chunk_logits(h2, w, b, idx)[1], rows, targets,
                                                weight.shape[0], cdt)
        ctx.plan, ctx.mm_dtype = plan, mm_dtype
        return _outputs(ctx, (hidden, weight, bias, labels, rows, pos, targets, stats), logp, entropy, pos, labels)

    @staticmethod
    @first_derivative_only("truncated_token_logprobs")
    def backward(ctx, grad_logp, grad_entropy):
        hidden, weight, bias, labels, rows, pos, targets, stats, *entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        if not (need_h or need_w or need_b) or (grad_logp is None and grad_entropy is None):
            return None, None, None, None, None, None
        h, w, b = cast_operands(ctx.mm_dtype, hidden, weight, bias)
        h2 = h.reshape(-1, h.shape[-1])
        V, cdt = w.shape[0], stats.dtype
        gh = torch.zeros(h2.shape, device=h.device, dtype=cdt) if need_h else None
        gw = torch.zeros(w.shape, device=w.device, dtype=cdt) if need_w else None
        gb = torch.zeros(V, device=w.device, dtype=cdt) if need_b else None
        with autocast_off(hidden.device.type):
            tiles = ctx.plan.tile_gradients(lambda idx: _chunk_logits(h2, w, b, idx)[1], rows, targets, stats,
                                            _gather(grad_logp, pos, cdt), _gather(grad_entropy, pos, cdt),
                                            entropy[0] if entropy else None, V)
            for c0, c1, idx, G in tiles:
                G = G.to(h.dtype)  # the GEMM operands' dtype, as the staged backward's in-place G
                if gh is not None:  # one fixed-shape GEMM per tile; only the real rows are kept
                    gh.index_copy_(0, idx[: c1 - c0], _mm(G, w, cdt)[: c1 - c0])
                if gw is not None:
                    gemm_into(gw, G.t(), h2.index_select(0, idx), accumulate=True)
                if gb is not None:
                    gb += G.sum(0, dtype=cdt)
        gh = None if gh is None else gh.to(hidden.dtype).view(hidden.shape)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(bias.dtype)
        return gh, gw, gb, None, None, None


def truncated_token_logprobs(labels, *, logits=None, hidden=None, weight=None, bias=None, temperature=1.0,
                             top_k=None, top_p=None, min_p=None, order="hf", with_entropy=False, shift=False,
                             ignore_index=-100, logit_scale=1.0, softcap=None, backend="auto",
                             batch_invariant=False, chunk_tokens=None, cu_seqlens=None, position_ids=None):
    """``log p̃(label)`` under the sampler's truncated distribution, as a :class:`TruncatedLogprobs`.

    ``p̃`` is ``softmax(z / T)`` restricted to the kept set of ``top_k`` → ``top_p`` → ``min_p``
    (``order="hf"``; ``"vllm"`` applies ``min_p`` first), renormalized: see
    :mod:`pyfused_po.token.truncated_support` for the exact rules (ties kept, labels outside the set give
    ``−inf``).  Sources, ``shift``, ``ignore_index``, ``logit_scale``, ``softcap``, packed
    ``cu_seqlens`` / ``position_ids`` as in :func:`pyfused_po.integrations.rl.rl_token_logprobs`.
    ``batch_invariant``: a token's results are bitwise independent of the rest of the batch (module
    docstring).  ``chunk_tokens``: tokens per tile (default: the chunked backend's budget; not used
    under ``batch_invariant``).  ``backend`` is validated as everywhere ("triton" needs a
    float16/bfloat16/float32 input); it picks the per-row fold (PyTorch, or the Triton radix-select
    kernels), the tiles are PyTorch on both.
    Gradients flow to the logits (or hidden, weight, bias) through ``logps`` and ``entropy``.
    """
    spec = sampler_spec(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p, order=order)
    if cu_seqlens is not None or position_ids is not None:
        return run_packed(lambda y, s: truncated_token_logprobs(
            y, logits=logits, hidden=hidden, weight=weight, bias=bias, temperature=temperature, top_k=top_k,
            top_p=top_p, min_p=min_p, order=order, with_entropy=with_entropy, shift=s, ignore_index=ignore_index,
            logit_scale=logit_scale, softcap=softcap, backend=backend, batch_invariant=batch_invariant,
            chunk_tokens=chunk_tokens), labels, cu_seqlens=cu_seqlens, position_ids=position_ids, shift=shift,
            ignore_index=ignore_index)
    config = make_token_config(ignore_index, shift, temperature, logit_scale, softcap, (), batch_invariant)
    labels = checked_labels("labels", labels, config.ignore_index)
    check_sources("truncated_token_logprobs", logits, hidden, weight, bias)
    if logits is not None:
        resolved = validate_token_inputs(logits, labels, config, backend)
        plan = _Plan(spec, config, bool(with_entropy), config.batch_invariant, chunk_tokens, resolved)
        logps, entropy = TruncatedLogitsFunction.apply(logits, labels, plan)
    else:
        resolved, _, mm_dtype = validate_linear_inputs(hidden, weight, bias, labels, config, backend, "chunked",
                                                       chunk_tokens)
        plan = _Plan(spec, config, bool(with_entropy), config.batch_invariant, chunk_tokens, resolved)
        logps, entropy = TruncatedLinearFunction.apply(hidden, weight, bias, labels, plan, mm_dtype)
    return TruncatedLogprobs(logps, entropy if with_entropy else None, logps == float("-inf"))
