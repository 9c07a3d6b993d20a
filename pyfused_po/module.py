"""``FusedPreferenceLoss``: token stage → sequence stage → objective stage in one module."""
import torch
from torch import nn

from .preference_loss import REDUCTIONS, PreferenceLossOutput, preference_loss, resolve_hyperparameters
from .sequence import label_mask, masked_mean, sequence_sums, split_pairs
from .token_logprobs import token_logprobs
from .validation import check_tensor


class FusedPreferenceLoss(nn.Module):
    """A preference loss straight from logits, for batches laid out ``[chosen; rejected]``.

    One forward pass and one backward pass over the logits per step; the only
    ``[tokens, vocab]`` allocation in loss + backward is the logits' gradient (none with
    ``inplace_backward=True``).  Reference log-probs are either given per sequence
    (``ref_chosen_logps`` / ``ref_rejected_logps``, as TRL precomputes them) or computed
    from ``ref_logits`` in the same call, forward only.

    Args:
        loss_type, beta, reduction, **hyperparameters: as :func:`pyfused_po.preference_loss`.
        ignore_index, shift, temperature, logit_scale, softcap, backend, inplace_backward:
            as :func:`pyfused_po.token_logprobs`.
        logit_metrics: also log TRL's ``logits/chosen`` and ``logits/rejected`` (mean of the
            transformed logits over labelled tokens), computed in the same kernel pass.
    """

    def __init__(self, loss_type="sigmoid", beta=0.1, *, ignore_index=-100, shift=False,
                 temperature=1.0, logit_scale=1.0, softcap=None, backend="auto",
                 inplace_backward=False, reduction="mean", logit_metrics=True, **hyperparameters):
        super().__init__()
        resolve_hyperparameters(loss_type, beta, hyperparameters)  # fail at construction
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.loss_type, self.beta, self.reduction = loss_type, beta, reduction
        self.hyperparameters = dict(hyperparameters)
        self.token_kwargs = dict(ignore_index=ignore_index, shift=shift, temperature=temperature,
                                 logit_scale=logit_scale, softcap=softcap, backend=backend)
        self.inplace_backward = inplace_backward
        self.logit_metrics = logit_metrics

    def extra_repr(self):
        return f"loss_type={self.loss_type!r}, beta={self.beta}, {self.token_kwargs}"

    def _sequence_logps(self, logits, labels, *, inplace, with_mean_logit):
        extras = ("mean_logit",) if with_mean_logit else ()
        out = token_logprobs(logits, labels, extras=extras, inplace_backward=inplace, **self.token_kwargs)
        logps = out.logps if extras else out
        sums = sequence_sums(logps, labels, ignore_index=self.token_kwargs["ignore_index"],
                             shift=self.token_kwargs["shift"])
        return sums, (out.mean_logit if extras else None)

    def forward(self, logits=None, labels=None, ref_chosen_logps=None, ref_rejected_logps=None,
                ref_logits=None) -> PreferenceLossOutput:
        """``logits``: ``[2P, T, V]``; ``labels``: ``[2P, T]`` (``ignore_index`` marks prompt and
        padding); reference log-probs ``[P]`` each, or ``ref_logits`` like ``logits``."""
        if logits is None or labels is None:
            raise ValueError("FusedPreferenceLoss.forward needs logits= and labels=")
        check_tensor("labels", labels, floating=False)
        if labels.dim() != 2:
            raise ValueError(f"labels must be [batch, seq] with the batch laid out [chosen; rejected], "
                             f"got shape {tuple(labels.shape)}")
        split_pairs(labels)  # raises on an odd batch
        if ref_logits is not None and (ref_chosen_logps is not None or ref_rejected_logps is not None):
            raise ValueError("pass either ref_logits or ref_chosen_logps/ref_rejected_logps, not both")
        policy, mean_logit = self._sequence_logps(logits, labels, inplace=self.inplace_backward,
                                                  with_mean_logit=self.logit_metrics)
        if ref_logits is not None:
            if tuple(ref_logits.shape) != tuple(logits.shape):
                raise ValueError(f"ref_logits must have the shape of logits {tuple(logits.shape)}, "
                                 f"got {tuple(ref_logits.shape)}")
            with torch.no_grad():
                ref, _ = self._sequence_logps(ref_logits.detach(), labels, inplace=False, with_mean_logit=False)
            ref_chosen_logps, ref_rejected_logps = split_pairs(ref.logps)
        chosen_logps, rejected_logps = split_pairs(policy.logps)
        chosen_lengths, rejected_lengths = split_pairs(policy.lengths)
        result = preference_loss(
            chosen_logps, rejected_logps, ref_chosen_logps, ref_rejected_logps,
            loss_type=self.loss_type, beta=self.beta, chosen_lengths=chosen_lengths,
            rejected_lengths=rejected_lengths, reduction=self.reduction, **self.hyperparameters,
        )
        if mean_logit is not None:
            mask = label_mask(labels, ignore_index=self.token_kwargs["ignore_index"],
                              shift=self.token_kwargs["shift"])
            chosen_mask, rejected_mask = split_pairs(mask)
            chosen_mean, rejected_mean = split_pairs(mean_logit.detach())
            result.metrics["logits/chosen"] = masked_mean(chosen_mean, chosen_mask)
            result.metrics["logits/rejected"] = masked_mean(rejected_mean, rejected_mask)
        return result
