"""Vocabulary-parallel token stage: logits or LM head sharded along the vocabulary.

Every rank of ``group`` holds the same tokens and labels and one contiguous slice of
the vocabulary (``vocab_start`` is where its slice begins; slices lie end to end in
rank order, uneven sizes allowed).  Forward: each rank reduces its slice in the usual
single read (``vocab_shard`` kernels), then **one** ``all_gather`` of the per-token
slice statistics gives every rank the full-vocabulary log-probs and extras
(:mod:`.vocab_stats`).  The results are replicated, so every rank computes the same
loss; the backward then needs **no communication**: rank r's logits gradient is
``g·(onehot(y) − p)`` restricted to its slice, with p from the global lse, and the
one-hot applied only where the label is in the slice.

The fused-linear variant also returns the LM-head gradient of the local
``weight_shard`` only; the hidden states' gradient ``Σ_r G_r·W_r`` is a sum over the
group (see ``reduce_grad_hidden``).
"""
import torch
import torch.distributed as dist

from .. import _backend, _dispatch
from ..token.autograd_guard import first_derivative_only
from ..token.linear_token_logprobs import validate_linear_inputs
from ..token.mixed_precision import autocast_off, cast_operands
from ..token.token_logprobs import (
    TokenConfig,
    _rows_view,
    logits_view,
    make_token_config,
    pack_results,
    resolve_backend,
    run_token_backward,
    validate_token_config,
)
from ..token.torch_backend import linear as _chunked
from ..validation import check_inplace_target, check_same_device, check_tensor, checked_labels
from .vocab_stats import (
    SLICE_IGNORE,
    all_gather_stats,
    check_layout,
    combine_stats,
    pack_stats,
    slice_config,
    slice_labels,
)


def _check_group(group, vocab_start):
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("vocabulary parallelism needs an initialized torch.distributed process group "
                         "(torch.distributed.init_process_group); got none")
    if group is None:
        raise ValueError("group must be the vocabulary-parallel process group, got None")
    if isinstance(vocab_start, bool) or not isinstance(vocab_start, int) or vocab_start < 0:
        raise ValueError(f"vocab_start must be an int >= 0 (first vocabulary id of this rank's slice), "
                         f"got {vocab_start!r}")


def _check_label_floor(labels, ignore_index):
    if labels.is_cuda:
        return
    bad = (labels != ignore_index) & (labels < 0)
    if bool(bad.any()):
        raise ValueError(f"labels must be >= 0 or equal ignore_index={ignore_index}, "
                         f"got {labels[bad].flatten()[0].item()}")


class _SliceFold:
    """A token-stage backend (``token_forward`` / ``token_backward``) in ``vocab_shard`` mode,
    for the chunked fused-linear algorithm."""

    def __init__(self, base):
        self.base = base

    def token_forward(self, *args, **kw):
        return self.base.token_forward(*args, vocab_shard=True, **kw)

    def token_backward(self, *args, **kw):
        return self.base.token_backward(*args, vocab_shard=True, **kw)


def _combine(lse, target, outs, config, v_local, vocab_start, group, labels, token_labels):
    """One all_gather, then the full-vocabulary values; also returns ``V_local / V``.
    ``token_labels``: the global label of each statistic's token (``lse``'s order)."""
    gathered = all_gather_stats(pack_stats(lse, target, outs, config.extras, v_local, vocab_start), group)
    total = check_layout(gathered, labels, config.ignore_index)
    logp, lse_all, extras = combine_stats(gathered, config.extras, token_labels)
    return logp, lse_all, extras, v_local / total


def _scaled_mean_grad(g, ratio):
    # The kernels add g_M / V_local per logit; the mean is over the full V.
    return None if g is None else g * ratio


class VocabParallelTokenLogprobsFunction(torch.autograd.Function):
    """``forward(logits_shard, labels, config, backend, inplace, group, vocab_start)`` →
    ``(logps, *extras)`` shaped like ``labels``, identical on every rank of ``group``."""

    @staticmethod
    def forward(ctx, logits, labels, config: TokenConfig, backend, inplace, group, vocab_start):
        ops = _backend.token_ops(backend)
        B, T = _rows_view(labels)
        x3 = logits_view(logits, B, T, inplace=inplace)
        v_local = x3.shape[-1]
        y2 = slice_labels(labels.reshape(B, T), vocab_start, v_local, config.ignore_index)
        kernel_config = slice_config(config)  # the kernels see slice-relative labels
        target, lse, outs = ops.token_forward(x3, y2, extras=config.extras, vocab_shard=True,
                                              **kernel_config.kernel_kwargs())
        shift = int(config.shift)
        # lse ([B, T, 2] pairs) is per logits row; the other outputs sit at the label's position (row + shift).
        lse_at_label = torch.zeros_like(lse)
        lse_at_label[:, shift:] = lse[:, :T - shift]
        logp, lse_all, extras, ratio = _combine(lse_at_label, target, outs, config, v_local, vocab_start,
                                                group, labels, labels.reshape(-1))
        valid = (y2 != SLICE_IGNORE)
        valid[:, :shift] = False
        zero = torch.zeros((), dtype=logp.dtype, device=logp.device)
        logp = torch.where(valid.reshape(-1), logp, zero).view(B, T)
        extras = {k: torch.where(valid.reshape(-1), v, zero).view(B, T) for k, v in extras.items()}
        lse_rows = torch.zeros_like(lse)
        lse_rows[:, :T - shift] = lse_all.view(B, T, 2)[:, shift:]
        ctx.config, ctx.backend, ctx.inplace, ctx.rows, ctx.ratio = kernel_config, backend, inplace, (B, T), ratio
        saved_names = [n for n in ("entropy", "log_sum_sq_probs") if n in extras]
        ctx.saved_names = saved_names
        ctx.save_for_backward(logits, y2, lse_rows, *[extras[n] for n in saved_names])
        results = [logp.view(labels.shape)] + [extras[n].view(labels.shape) for n in config.extras]
        if "is_top1" in config.extras:
            ctx.mark_non_differentiable(results[1 + config.extras.index("is_top1")])
        ctx.set_materialize_grads(False)
        return tuple(results)

    @staticmethod
    @first_derivative_only("vocab_parallel_token_logprobs")
    def backward(ctx, grad_logp, *grad_extras):
        none = (None,) * 7
        if not ctx.needs_input_grad[0]:
            return none
        logits, y2, lse_rows, *saved = ctx.saved_tensors
        # No communication: lse, entropy and log Σp² are already the global values; the
        # kernels add g_M / V_local per logit, and the mean is over the full V.
        grad_logits = run_token_backward(logits, y2, lse_rows, dict(zip(ctx.saved_names, saved)), grad_logp,
                                         grad_extras, ctx.config, ctx.backend, ctx.inplace, ctx.rows,
                                         vocab_shard=True, mean_grad_scale=ctx.ratio)
        return (grad_logits,) + none[1:]


def _config(ignore_index, shift, temperature, logit_scale, softcap, extras):
    config = make_token_config(ignore_index, shift, temperature, logit_scale, softcap, extras)
    validate_token_config(config)
    return config


@_dispatch.register  # token_logprobs(..., vocab_parallel_group=) runs it
def vocab_parallel_token_logprobs(logits_shard, labels, *, group, vocab_start, ignore_index=-100,
                                  shift=False, temperature=1.0, logit_scale=1.0, softcap=None, extras=(),
                                  inplace_backward=False, backend="auto"):
    """:func:`pyfused_po.token_logprobs` over a vocabulary sharded across ``group``.

    Args:
        logits_shard: ``[..., T, V_r]`` this rank's vocabulary slice of the logits.
        labels: ``[..., T]`` full-vocabulary token ids, the same on every rank.
        group: the vocabulary-parallel (tensor-parallel) process group.
        vocab_start: first vocabulary id of this rank's slice; slices must lie end to
            end in rank order (``start_r = V_0 + … + V_{r−1}``), sizes may differ.
        Everything else: as :func:`pyfused_po.token_logprobs`.

    Returns:
        The full-vocabulary log-probs (and extras), identical on every rank.  Forward: one
        ``all_gather`` of ``O(tokens)`` statistics; backward: none.  The gradient reaching
        ``logits_shard`` is this rank's slice of the unsharded gradient, provided every rank
        back-propagates the same loss (as tensor parallelism does).
    """
    config = _config(ignore_index, shift, temperature, logit_scale, softcap, extras)
    check_tensor("logits_shard", logits_shard, floating=True, min_dim=2)
    check_tensor("labels", labels, floating=False, min_dim=1)
    labels = checked_labels("labels", labels, ignore_index)
    check_same_device(logits_shard=logits_shard, labels=labels)
    if tuple(logits_shard.shape[:-1]) != tuple(labels.shape):
        raise ValueError(f"logits_shard must have shape labels.shape + (V_r,) = {tuple(labels.shape)} + (V_r,), "
                         f"got logits_shard {tuple(logits_shard.shape)} and labels {tuple(labels.shape)}")
    _check_group(group, vocab_start)
    resolved = resolve_backend(backend, logits_shard, "logits_shard")
    _check_label_floor(labels, ignore_index)
    if inplace_backward:
        check_inplace_target("logits_shard", logits_shard)
    results = VocabParallelTokenLogprobsFunction.apply(logits_shard, labels, config, resolved,
                                                       bool(inplace_backward), group, vocab_start)
    return pack_results(results, config.extras)


class VocabParallelLinearFunction(torch.autograd.Function):
    """``forward(hidden, weight_shard, bias_shard, labels, config, backend, chunk_tokens, group,
    vocab_start, reduce_grad_hidden, mm_dtype)`` → ``(logps, *extras)`` shaped like ``labels``
    (``mm_dtype``: :mod:`pyfused_po.token.mixed_precision`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, config, backend, chunk_tokens, group, vocab_start,
                reduce_grad_hidden, mm_dtype):
        fold = _SliceFold(_backend.token_ops(backend))
        D, T, v_local = hidden.shape[-1], labels.shape[-1], weight.shape[0]
        rows, pos, targets = _chunked.labelled_tokens(_chunked.labels_2d(labels), config.ignore_index, config.shift)
        global_targets = targets
        targets = slice_labels(targets, vocab_start, v_local, config.ignore_index)
        kw = dict(ignore_index=SLICE_IGNORE, temperature=config.temperature,
                  logit_scale=config.logit_scale, softcap=config.softcap, chunk_tokens=chunk_tokens, fold=fold)
        h, w, b = cast_operands(mm_dtype, hidden, weight, bias)
        with autocast_off(hidden.device.type):
            target, lse, outs = _chunked.linear_forward(h.reshape(-1, D), w, b, rows, targets,
                                                        extras=config.extras, **kw)
        logp, lse_all, extras, ratio = _combine(lse, target, outs, config, v_local, vocab_start, group, labels,
                                                global_targets)

        def scatter(v):  # [M] per labelled token → zeros shaped like labels
            full = torch.zeros(labels.numel(), device=labels.device, dtype=v.dtype)
            full[pos] = v
            return full.view(labels.shape)

        results = [scatter(logp)] + [scatter(extras[n]) for n in config.extras]
        saved_names = [n for n in ("entropy", "log_sum_sq_probs") if n in extras]
        ctx.saved_names, ctx.kw, ctx.ratio, ctx.mm_dtype = saved_names, kw, ratio, mm_dtype
        ctx.config, ctx.group, ctx.reduce, ctx.hidden_shape = config, group, reduce_grad_hidden, hidden.shape
        ctx.save_for_backward(hidden, weight, bias, rows, pos, targets, lse_all, *[extras[n] for n in saved_names])
        if "is_top1" in config.extras:
            ctx.mark_non_differentiable(results[1 + config.extras.index("is_top1")])
        ctx.set_materialize_grads(False)
        return tuple(results)

    @staticmethod
    @first_derivative_only("vocab_parallel_linear_token_logprobs")
    def backward(ctx, grad_logp, *grad_extras):
        hidden, weight, bias, rows, pos, targets, lse, *saved = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        none = (None,) * 11
        if not (need_h or need_w or need_b):
            return none
        named = dict(zip(ctx.config.extras, grad_extras))

        def gather(g):
            return None if g is None else g.reshape(-1).index_select(0, pos).to(lse.dtype).contiguous()

        grads = dict(grad_logp=gather(grad_logp), grad_entropy=gather(named.get("entropy")),
                     grad_log_sum_sq_probs=gather(named.get("log_sum_sq_probs")),
                     grad_mean_logit=_scaled_mean_grad(gather(named.get("mean_logit")), ctx.ratio))
        if all(g is None for g in grads.values()):
            return none
        saved = dict(zip(ctx.saved_names, saved))
        D = hidden.shape[-1]
        h, w, b = cast_operands(ctx.mm_dtype, hidden, weight, bias)
        with autocast_off(hidden.device.type):
            gh, gw, gb = _chunked.linear_backward(
                h.reshape(-1, D), w, b, rows, targets, lse, entropy=saved.get("entropy"),
                log_sum_sq_probs=saved.get("log_sum_sq_probs"), need_hidden=need_h, need_weight=need_w,
                need_bias=need_b, grad_hidden_dtype=None if ctx.mm_dtype is None else hidden.dtype, **grads, **ctx.kw)
        if gh is not None:
            if ctx.reduce:
                # dH = Σ_r G_r·W_r: each rank holds one term (Megatron's column-parallel input
                # all-reduce; skip it here when the framework already does it).
                dist.all_reduce(gh, group=ctx.group)
            gh = gh.to(hidden.dtype).view(ctx.hidden_shape)
        gw = None if gw is None else gw.to(weight.dtype)
        gb = None if gb is None else gb.to(bias.dtype)
        return (gh, gw, gb) + none[3:]


@_dispatch.register
def vocab_parallel_linear_token_logprobs(hidden, weight_shard, labels, *, group, vocab_start, bias_shard=None,
                                         ignore_index=-100, shift=False, temperature=1.0, logit_scale=1.0,
                                         softcap=None, extras=(), backend="auto", chunk_tokens=None,
                                         reduce_grad_hidden=True):
    """:func:`pyfused_po.linear_token_logprobs` with the LM head sharded along the vocabulary.

    Args:
        hidden: ``[..., T, D]`` the same on every rank of ``group``.
        weight_shard: ``[V_r, D]`` rows ``vocab_start … vocab_start + V_r − 1`` of the LM head.
        bias_shard: optional ``[V_r]`` slice of the bias.
        reduce_grad_hidden: all-reduce ``grad_hidden`` over ``group`` in the backward (the one
            collective of this path's backward: ``dH = Σ_r G_r·W_r`` has one term per rank).
            Pass ``False`` when the tensor-parallel framework already reduces the LM head's
            input gradient (Megatron's ``copy_to_tensor_model_parallel_region``).
        Everything else: as :func:`vocab_parallel_token_logprobs` and
        :func:`pyfused_po.linear_token_logprobs` (chunked implementation only).

    Returns:
        Full-vocabulary log-probs (and extras), identical on every rank; ``weight_shard`` /
        ``bias_shard`` receive their slice of the unsharded gradient.
    """
    config = _config(ignore_index, shift, temperature, logit_scale, softcap, extras)
    _check_group(group, vocab_start)
    # The single-device checks apply to the slice (its V_r rows); labels are checked
    # against the full vocabulary after the forward's gather.
    check_tensor("labels", labels, floating=False, min_dim=1)
    labels = checked_labels("labels", labels, ignore_index)
    resolved, _, mm_dtype = validate_linear_inputs(hidden, weight_shard, bias_shard, labels.new_full(labels.shape, ignore_index)
                                         if labels.numel() else labels, config, backend, "chunked", chunk_tokens)
    _check_label_floor(labels, ignore_index)
    results = VocabParallelLinearFunction.apply(hidden, weight_shard, bias_shard, labels, config, resolved,
                                                chunk_tokens, group, vocab_start, bool(reduce_grad_hidden), mm_dtype)
    return pack_results(results, config.extras)
