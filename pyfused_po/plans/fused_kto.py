"""Three GEMMs for :class:`~pyfused_po.FusedKTOLoss` on a trainable LM head: the KTO-specific
part of the fused plan (the engine: :mod:`pyfused_po.plans.fused_gradient`).

KTO separates over sequences.  Sequence i's loss is λ·(1 − σ(±β(r_i − z₀))) (``kto``) or
1 − σ(βr_i) / σ(βr_i) (``apo_zero_unpaired``), with r_i = ℓ_i − ℓʳ_i; its gradient depends on
ℓ_i alone given the batch constants: the reference point z₀ (always detached in
:func:`~pyfused_po.modules.kto.kto_loss`, whether it comes from ``kl=``, from the mismatched pairs'
``policy_kl_logps``/``ref_kl_logps`` or is 0), the reference sums (detached), the flags, λ_D/λ_U
and the mean's 1/B.  So both loss types run on chunks of whole sequences, padded ``[B, T]`` or
packed (``cu_seqlens=`` / ``position_ids=``).  KL inputs that require grad change nothing: the
staged path detaches them too (their gradient is None in both plans).

Falls back to the staged path (returns ``None`` or is not chosen, :func:`applies`) for
``reduction="none"`` (a vector loss), vocabulary or sequence parallelism (``token_offset=``),
``linear_impl="fused"``, grad mode off, ``torch.compile`` tracing, no head input requiring grad,
a sequence with more labelled tokens than one chunk holds (unless ``module.long_group_plan =
"three_gemm"``; the reason is logged once and kept in ``module.fallback_reason``), and on CUDA chunks under
:data:`~pyfused_po.plans.fused_gradient.MIN_CUDA_CHUNK_TOKENS` tokens when the batch needs more than
one.  Only ``loss`` carries a gradient: ``losses``, rewards and metrics are detached.
"""
import torch

from .fused_gradient import FusedHead, note_fallback, plan_may_run
from .head_source import run_token_stage


def applies(module, source, token_offset=None):
    """Whether :func:`fused_forward` may run for this call (see the module docstring)."""
    return (isinstance(source, tuple) and token_offset is None and plan_may_run(module, source)
            and module.loss_kwargs["reduction"] != "none")


def fused_forward(module, batch, ref_logps, objective):
    """The module's forward with the gradient formed per chunk of sequences; ``None`` to fall back.

    ``batch``: the call's :mod:`pyfused_po.sequence.kto_batch` (padded or packed, one representation);
    ``objective(policy_sums, ref_sums)``: the module's :class:`~pyfused_po.modules.kto.KTOLossOutput` from
    ``[S]`` per-sequence sums (the flags and KL inputs bound by the caller)."""
    source, ref_source = batch.sources
    head = FusedHead.build(source, batch.token_labels, batch.token_kwargs, linear_impl=module.linear_impl,
                           chunk_tokens=getattr(module, "chunk_tokens", None))
    if head is None:
        return None
    singles = batch.groups  # a KTO sequence is a group of one
    group = singles.of_tokens(batch.sequence_of(head.pos))
    chunks = head.chunks(group, singles.num_groups, getattr(module, "long_group_plan", "staged"))
    note_fallback(module, head.fallback_reason)
    if chunks is None:
        return None
    if ref_source is not None:
        with torch.no_grad():  # forward only, once: the staged path's reference sums
            ref_tokens = run_token_stage(module, ref_source, batch.token_labels, token_kwargs=batch.token_kwargs)
            ref_logps = batch.sums(ref_tokens.logps)
    with torch.no_grad():  # the objective's input checks (flags, reference, KL) before any GEMM
        objective(torch.zeros(batch.num_sequences, dtype=head.source[0].dtype, device=group.device), ref_logps)

    head.run(chunks, group, lambda tokens: objective(batch.sums(tokens.logps), ref_logps).loss)
    with torch.no_grad():
        result = objective(batch.sums(head.tokens().logps), ref_logps)
    result.loss = head.attach(result.loss)
    return result
