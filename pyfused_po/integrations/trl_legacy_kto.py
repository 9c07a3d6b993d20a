"""TRL 0.24's ``KTOTrainer.forward(model, batch)`` through the fused-linear path.

TRL 0.24 scores each completion with ``model(completion_input_ids, attention_mask).logits``
and ``get_batch_logps`` (hidden row ``t`` predicts label ``t + 1``; labels equal to
``label_pad_token_id`` are not counted), and the KL completions the same way without a
gradient.  ``forward`` returns ``(chosen_logps, rejected_logps, chosen_logits,
rejected_logits, KL_logps)``; the trainer reads the two logits tensors only for the metrics
``logits/chosen_sum`` / ``logits/rejected_sum``: their ``nansum``, the sum of every logit of
those rows, prompt and padding positions included.

:func:`kto_forward` returns the same log-probs from :func:`pyfused_po.linear_token_logprobs`
(logits formed one chunk of completion tokens at a time) and, in the logits' place, each
position's sum over the vocabulary, ``Σ_v (h·W_v + b_v) · scale = h · (Σ_v W_v) · scale + Σ b · scale``:
one ``[D]`` vector per step instead of ``[rows, seq, vocab]`` logits, with the same ``nansum``
(:mod:`.logit_sums`).  That identity needs a linear head, so a model with a logit softcap (Gemma 2/3) is refused.
"""
import torch

from ..token.linear_token_logprobs import linear_token_logprobs
from .logit_sums import vocab_logit_sums
from .trl_legacy_head import common_refusals, method_layout, run_head

__all__ = ["KTO_STATE", "kto_layout", "kto_refusals", "kto_forward"]

# Trainer attributes the replacement reads, as TRL 0.24's KTOTrainer.__init__ sets them.
KTO_STATE = ("is_encoder_decoder", "calculate_KL", "label_pad_token_id", "aux_loss_enabled", "args")
_METHODS = ("get_batch_logps", "kto_loss", "_compute_kl_logps")


def kto_layout(cls):
    """:func:`.trl_legacy_head.method_layout` of ``forward(self, model, batch)`` next to
    ``get_batch_logps``, ``kto_loss`` and ``_compute_kl_logps`` (TRL 0.24's ``KTOTrainer``)."""
    return method_layout(cls, "forward", ("model", "batch"), _METHODS)


def kto_refusals(trainer):
    """What of ``trainer``'s settings the replacement cannot reproduce (empty: nothing)."""
    return common_refusals(trainer, "forward")


def _completion_scores(trainer, model, input_ids, attention_mask, labels, backend, impl):
    """``(summed log-probs [R], per-position logit sums [R, T])`` of one padded completion batch."""
    ignore = trainer.label_pad_token_id

    def stage(hidden, targets, weight, bias, transform):
        sums = vocab_logit_sums(hidden, weight, bias, transform, "pyfused_po.integrations.trl_legacy")
        logps = linear_token_logprobs(hidden, weight, targets, bias=bias, ignore_index=ignore, shift=True,
                                      backend=backend, impl=impl, **transform)
        return logps, sums

    def head(causal_lm, hidden):
        return run_head(causal_lm, hidden, labels, stage)

    logps, sums = model(input_ids, attention_mask=attention_mask, use_cache=False, pyfused_po_head=head)
    return logps.sum(-1), sums


def kto_forward(self, model, batch, *, backend, impl):
    """Drop-in for TRL 0.24's ``KTOTrainer.forward`` (module docstring)."""
    kl_logps = None
    if self.calculate_KL:
        with torch.no_grad():
            kl_logps, _ = _completion_scores(self, model, batch["KL_completion_input_ids"],
                                             batch["KL_completion_attention_mask"], batch["KL_completion_labels"],
                                             backend, impl)
    logps, sums = _completion_scores(self, model, batch["completion_input_ids"], batch["completion_attention_mask"],
                                     batch["completion_labels"], backend, impl)
    if logps.shape[0] != len(batch["label"]):
        raise ValueError(f"the batch has {len(batch['label'])} labels but {logps.shape[0]} completions")
    chosen = [i for i, desirable in enumerate(batch["label"]) if desirable is True]
    rejected = [i for i, desirable in enumerate(batch["label"]) if desirable is False]
    return logps[chosen], logps[rejected], sums[chosen], sums[rejected], kl_logps
