"""Three GEMMs for :class:`~pyfused_po.FusedPreferenceLoss` on a trainable LM head: the
preference-specific part of the fused plan (the engine: :mod:`pyfused_po.fused_gradient`).

For most objectives ``g_t = ∂L/∂ log p_t`` of a pair's tokens depends only on that pair's sums
and on batch constants fixed by the labels (the mean's 1/P, the NLL term's token count, the
lengths), so the engine runs on chunks of whole pairs with the module's own sequence stage and
objective as ``loss_of``.  The loss and metrics are then computed once on the whole batch's sums,
by the same functions as the staged path.  Only ``loss`` carries a gradient: ``losses``, rewards
and metrics are detached (they are detached metrics in the staged path too, except ``losses``).

Chunks hold at most ``C`` labelled tokens: ``module.chunk_tokens`` when that attribute is set,
else :func:`~pyfused_po.torch_backend.linear.gradient_chunk_size` (min(4096, D) tokens: TRL's
token tile, capped so the chunk is no larger than dW; or the staged chunk when that is larger): each
chunk re-reads the fp32 dW, so the chunk's reduction length sets the accumulator traffic.

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

``module.token_capture`` (a :class:`~pyfused_po.fused_gradient.TokenCapture`) receives the
policy's per-token log-probs and the extras it asks for, computed in the same fold.
"""
import torch

from .fused_gradient import MIN_CUDA_CHUNK_TOKENS, FusedHead, plan_may_run  # noqa: F401  (re-exported)

NOT_SEPARABLE = frozenset({"aot", "aot_unpaired"})
NLL_TERM = frozenset({"sft", "cpo", "simpo", "alphapo", "orpo"})


def _types(module):
    return [module.loss_type] if isinstance(module.loss_type, str) else list(module.loss_type)


def applies(module, source, labels, ref_chosen_logps, ref_rejected_logps, token_weights, weights,
            label_smoothing):
    """Whether :func:`fused_forward` may run for this call (see the module docstring)."""
    types = set(_types(module))
    others = (ref_chosen_logps, ref_rejected_logps, token_weights, weights, label_smoothing)
    return (plan_may_run(module, source, others)
            and not (types & NOT_SEPARABLE) and not module.bco_running_mean and not module.expo
            and not (module.use_weighting and types & NLL_TERM)
            and module.reduction != "none")


def fused_forward(module, source, ref_source, labels, ref_chosen_logps, ref_rejected_logps, ref_token_logps,
                  token_weights, nll_labels, weights, label_smoothing):
    """The module's forward with the gradient formed per chunk of pairs; ``None`` to fall back."""
    token_labels = module._token_labels(labels, nll_labels)
    extras = module._policy_extras()
    capture = getattr(module, "token_capture", None)
    wanted = extras + tuple(e for e in (capture.extras if capture is not None else ()) if e not in extras)
    head = FusedHead.build(source, token_labels, module.token_kwargs, extras=wanted, upstream_extras=extras,
                           linear_impl=module.linear_impl, chunk_tokens=getattr(module, "chunk_tokens", None))
    if head is None:
        return None
    B, T = labels.shape
    P = B // 2
    pair = torch.div(head.pos, T, rounding_mode="floor") % max(P, 1)
    chunks = head.chunks(pair, P)
    if chunks is None:
        return None
    if capture is not None:
        capture.planned()  # the plan delivers the policy's values; the reference stage below is not them
    if ref_source is not None and module.needs_reference:
        with torch.no_grad():  # forward only, once: the staged path's reference sums
            ref_token_logps = module._token_stage(ref_source, labels).logps

    def loss_of(policy):
        columns = module._columns_from_tokens(policy, None, labels, ref_token_logps, token_weights, nll_labels)
        return module._objective(columns, ref_chosen_logps, ref_rejected_logps, weights, label_smoothing).loss

    head.run(chunks, pair, loss_of)
    with torch.no_grad():
        columns = module._columns_from_tokens(head.tokens(extras), None, labels, ref_token_logps, token_weights,
                                              nll_labels)
        result = module._objective(columns, ref_chosen_logps, ref_rejected_logps, weights, label_smoothing)
    if capture is not None:
        capture.offer(head.tokens(capture.extras), from_plan=True)
    result.loss = head.attach(result.loss)
    return result
