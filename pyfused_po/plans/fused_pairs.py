"""Three GEMMs for :class:`~pyfused_po.FusedPreferenceLoss` on a trainable LM head: the
preference-specific part of the fused plan (the engine: :mod:`pyfused_po.plans.fused_gradient`).

For most objectives ``g_t = ∂L/∂ log p_t`` of a pair's tokens depends only on that pair's sums
and on batch constants fixed by the labels (the mean's 1/P, the NLL term's token count, the
lengths), so the engine runs on chunks of whole pairs with the module's own sequence stage and
objective as ``loss_of``.  Pairs come from the batch's one representation
(:mod:`pyfused_po.sequence.batch_layout`): the padded ``[chosen; rejected]`` rows and every packed or
pair layout alike (``cu_seqlens=``, ``position_ids=``, ``pair_layout=``, ``chosen_index=``);
a sequence in no pair is a group of its own (its gradient is 0); a batch of groups of K responses
(:mod:`pyfused_po.modules.preference_groups`) runs on chunks of whole groups with the listwise objective.  The loss and metrics are then computed once on the whole batch's sums,
by the same functions as the staged path.  Only ``loss`` carries a gradient: ``losses``, rewards
and metrics are detached (they are detached metrics in the staged path too, except ``losses``).

Chunks hold at most ``C`` labelled tokens: ``module.chunk_tokens`` when that attribute is set,
else :func:`~pyfused_po.token.torch_backend.linear.gradient_chunk_size` (min(4096, D) tokens: TRL's
token tile, capped so the chunk is no larger than dW; or the staged chunk when that is larger): each
chunk re-reads the fp32 dW, so the chunk's reduction length sets the accumulator traffic.

Falls back to the staged path (returns ``None`` or is not chosen, :func:`applies`) when the
gradient does not separate over pairs or the plan cannot run: AOT (``aot``, ``aot_unpaired``
sort across the batch), ``bco_running_mean`` (δ includes the current batch), WPO combined with
an NLL term (``sft``, ``cpo``, ``simpo``, ``alphapo``, ``orpo``: the batch-mean NLL's gradient
is weighted by every pair's WPO weight), ``expo`` (logits only), ``reduction="none"`` (a vector
loss), vocabulary or sequence parallelism, ``linear_impl="fused"``, any other input that
requires grad (``weights``, ``token_weights``, reference tensors, soft labels), grad mode off,
``torch.compile`` tracing, a pair with more labelled tokens than one chunk holds (see
:func:`~pyfused_po.token.torch_backend.linear.gradient_chunk_size`; named: logged once and kept in
``module.fallback_reason``, and ``module.long_group_plan = "three_gemm"`` keeps three GEMMs with a
chunk as long as the pair), and on CUDA
chunks under :data:`MIN_CUDA_CHUNK_TOKENS` tokens when the batch needs more than one (the
per-chunk fp32 dW traffic would cost more than the GEMM saved).

``module.token_capture`` (a :class:`~pyfused_po.plans.fused_gradient.TokenCapture`) receives the
policy's per-token log-probs and the extras it asks for, computed in the same fold.
"""
import torch

from .fused_gradient import MIN_CUDA_CHUNK_TOKENS, FusedHead, note_fallback, plan_may_run  # noqa: F401  (re-exported)

NOT_SEPARABLE = frozenset({"aot", "aot_unpaired"})
NLL_TERM = frozenset({"sft", "cpo", "simpo", "alphapo", "orpo"})


def _types(module):
    return [module.loss_type] if isinstance(module.loss_type, str) else list(module.loss_type)


def applies(module, source, others):
    """Whether :func:`fused_forward` may run for this call (see the module docstring); ``others``:
    the inputs whose gradient the plan does not form (reference sums, token weights, pair weights,
    soft labels)."""
    types = set(_types(module))
    return (plan_may_run(module, source, others)
            and not (types & NOT_SEPARABLE) and not module.bco_running_mean and not module.expo
            and not (module.use_weighting and types & NLL_TERM)
            and module.reduction != "none")


def fused_forward(module, batch, source, *, extras, objective, reference, capture=None):
    """The forward with the gradient formed per chunk of pairs; ``None`` to fall back.

    ``batch``: the call's :mod:`~pyfused_po.sequence.preference_batch` (padded or packed, the same
    questions); ``extras``: the policy extras the objective reads; ``objective(columns)``: the
    module's objective stage on per-sequence columns; ``reference()``: the reference's per-token
    log-probs (forward only) or ``None``, called once the plan is sure to run.  ``module`` gives
    the options: ``linear_impl``, ``chunk_tokens`` (attribute, optional) and ``long_group_plan``."""
    linear_impl, chunk_tokens = module.linear_impl, getattr(module, "chunk_tokens", None)
    long_groups = getattr(module, "long_group_plan", "staged")
    wanted = extras + tuple(e for e in (capture.extras if capture is not None else ()) if e not in extras)
    head = FusedHead.build(source, batch.token_labels, batch.token_kwargs, extras=wanted, upstream_extras=extras,
                           linear_impl=linear_impl, chunk_tokens=chunk_tokens)
    if head is None:
        return None
    groups = batch.groups
    pair = groups.of_tokens(batch.sequence_of(head.pos))
    chunks = head.chunks(pair, groups.num_groups, long_groups)
    note_fallback(module, head.fallback_reason)
    if chunks is None:
        return None
    if capture is not None:
        capture.planned()  # the plan delivers the policy's values; the reference stage below is not them
    ref_tokens = reference()

    def loss_of(policy):
        return objective(batch.columns(policy, None, ref_tokens)).loss

    head.run(chunks, pair, loss_of)
    with torch.no_grad():
        result = objective(batch.columns(head.tokens(extras), None, ref_tokens))
    if capture is not None:
        capture.offer(head.tokens(capture.extras), from_plan=True)
    result.loss = head.attach(result.loss)
    return result
