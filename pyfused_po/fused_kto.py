"""Three GEMMs for :class:`~pyfused_po.FusedKTOLoss` on a trainable LM head: the KTO-specific
part of the fused plan (the engine: :mod:`pyfused_po.fused_gradient`).

KTO separates over sequences.  Sequence i's loss is λ·(1 − σ(±β(r_i − z₀))) (``kto``) or
1 − σ(βr_i) / σ(βr_i) (``apo_zero_unpaired``), with r_i = ℓ_i − ℓʳ_i; its gradient depends on
ℓ_i alone given the batch constants: the reference point z₀ (always detached in
:func:`~pyfused_po.kto.kto_loss`, whether it comes from ``kl=``, from the mismatched pairs'
``policy_kl_logps``/``ref_kl_logps`` or is 0), the reference sums (detached), the flags, λ_D/λ_U
and the mean's 1/B.  So both loss types run on chunks of whole sequences, padded ``[B, T]`` or
packed (``cu_seqlens=`` / ``position_ids=``).  KL inputs that require grad change nothing: the
staged path detaches them too (their gradient is None in both plans).

Falls back to the staged path (returns ``None`` or is not chosen, :func:`applies`) for
``reduction="none"`` (a vector loss), vocabulary or sequence parallelism (``token_offset=``),
``linear_impl="fused"``, grad mode off, ``torch.compile`` tracing, no head input requiring grad,
a sequence with more labelled tokens than one chunk holds (unless ``module.long_group_plan =
"three_gemm"``; the reason is logged once and kept in ``module.fallback_reason``), and on CUDA chunks under
:data:`~pyfused_po.fused_gradient.MIN_CUDA_CHUNK_TOKENS` tokens when the batch needs more than
one.  Only ``loss`` carries a gradient: ``losses``, rewards and metrics are detached.
"""
import torch

from . import packed_columns
from .batch_layout import SequenceGroups
from .fused_gradient import FusedHead, note_fallback, plan_may_run
from .packing import check_desirable_flags


def applies(module, source, token_offset=None):
    """Whether :func:`fused_forward` may run for this call (see the module docstring)."""
    return (isinstance(source, tuple) and token_offset is None and plan_may_run(module, source)
            and module.loss_kwargs["reduction"] != "none")


def fused_forward(module, source, ref_source, labels, is_desirable, ref_logps, objective, *, cu_seqlens=None,
                  position_ids=None):
    """The module's forward with the gradient formed per chunk of sequences; ``None`` to fall back.

    ``objective(policy_sums, ref_sums)``: the module's :class:`~pyfused_po.kto.KTOLossOutput` from
    ``[S]`` per-sequence sums (the flags and KL inputs bound by the caller)."""
    kw = module.token_kwargs
    if cu_seqlens is None and position_ids is None:
        token_labels, token_kwargs, groups = labels, kw, labels.shape[0]

        def sums(token_logps):
            return module._sums(token_logps, labels)

        def reference(src):
            return module._token_stage(src, labels)
    else:
        batch = packed_columns.packed_batch(module, labels, cu_seqlens, position_ids, None)
        groups = batch.layout.num_sequences
        check_desirable_flags(is_desirable, groups)
        source = batch.source(source, "hidden")
        ref_source = batch.source(ref_source, "ref_hidden" if isinstance(ref_source, tuple) else "ref_logits")
        token_labels, token_kwargs = batch.labels, dict(kw, shift=False)  # labels shifted within each sequence
        mask = token_labels != batch.ignore_index

        def sums(token_logps):
            return batch.layout.sums(torch.where(mask, token_logps, token_logps.new_zeros(())))

        def reference(src):
            return packed_columns.token_stage(module, src, token_labels).logps
    head = FusedHead.build(source, token_labels, token_kwargs, linear_impl=module.linear_impl,
                           chunk_tokens=getattr(module, "chunk_tokens", None))
    if head is None:
        return None
    if cu_seqlens is None and position_ids is None:
        sequence = torch.div(head.pos, labels.shape[1], rounding_mode="floor")
    else:
        sequence = batch.layout.segments.reshape(-1).index_select(0, head.pos)
    singles = SequenceGroups.singles(groups, labels.device)  # a KTO sequence is a group of one
    group = singles.of_tokens(sequence)
    chunks = head.chunks(group, singles.num_groups, getattr(module, "long_group_plan", "staged"))
    note_fallback(module, head.fallback_reason)
    if chunks is None:
        return None
    if ref_source is not None:
        with torch.no_grad():  # forward only, once: the staged path's reference sums
            ref_logps = sums(reference(ref_source))
    with torch.no_grad():  # the objective's input checks (flags, reference, KL) before any GEMM
        objective(torch.zeros(groups, dtype=head.source[0].dtype, device=labels.device), ref_logps)

    head.run(chunks, group, lambda tokens: objective(sums(tokens.logps), ref_logps).loss)
    with torch.no_grad():
        result = objective(sums(head.tokens().logps), ref_logps)
    result.loss = head.attach(result.loss)
    return result
