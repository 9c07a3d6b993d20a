"""TRL trainers that score tokens themselves: ``DPOTrainer.concatenated_forward`` (TRL 0.24);
``KTOTrainer.forward`` is in :mod:`.trl_legacy_kto`, the model side in :mod:`.trl_legacy_head`.

Before TRL 1.15's fused-LM-head protocol (:mod:`.trl`), ``DPOTrainer`` asked the model for
``[rows, seq, vocab]`` logits and gathered the log-probs itself, in
``concatenated_forward(model, batch, is_ref_model=False)``.  :func:`legacy_apply` replaces
that method on the trainer instance by one computing the same dictionary (``chosen_logps``,
``rejected_logps``, ``mean_chosen_logits``, ``mean_rejected_logits``, ``nll_loss``,
``policy_weights``) from the backbone's hidden states and the LM head through
:func:`pyfused_po.linear_token_logprobs`: logits exist only one chunk of scored tokens at a
time, never for prompt or padding positions, never as a ``[tokens, vocab]`` tensor.

What TRL 0.24 computes, and therefore what this reproduces (position ``t`` of the joined row):

* the rows are ``[prompt; completion]`` joined, flushed left and truncated (``max_length``,
  ``truncation_mode``); with ``padding_free`` all rows are one stream with ``position_ids``;
* position ``t`` scores token ``t + 1`` (``torch.roll``; the last position wraps to token 0)
  where the completion mask of ``t + 1`` is set; the per-token log-probs are rolled back by
  one and summed over positions ``1..``, so the wrapped score never enters a sum;
* ``mean_*_logits``: the mean of every logit of the scored positions (wrapped one included)
  = the mean over those positions of each position's mean logit (each has ``V`` logits);
* ``nll_loss`` (``rpo_alpha`` or ``"sft"``): cross-entropy of the chosen rows' positions
  ``..T-2`` with ``ignore_index=0`` on labels zeroed outside the mask (token id 0 is dropped
  too, as in TRL);
* ``"ipo"`` divides by the scored count, ``ld_alpha`` splits the rolled per-token log-probs at
  the shorter completion's length, ``use_weighting`` (WPO) subtracts each position's
  ``log Σ p²`` from the rolled log-probs (TRL's own alignment, kept as is);
* ``use_logits_to_keep`` keeps the last ``k`` positions, ``k`` reaching one before the first
  completion token: the same values (the fused path scores only masked rows anyway).

The log-probs are float32 whatever the model's dtype (TRL's are in the logits' dtype).  The
model is called through its wrappers (PEFT, DDP, accelerate's autocast) with an extra keyword
that the causal LM's patched ``forward`` answers with the token results instead of logits.
Refused, with a named error: encoder-decoder models, vision inputs (``pixel_values``), MoE
router auxiliary loss, ``use_liger_loss`` (Liger's own fused loss, which never calls
``concatenated_forward``), ``use_weighting`` with ``padding_free`` (TRL 0.24 fails on it).
"""
import inspect

import torch

from ..token.linear_token_logprobs import linear_token_logprobs
from .trl_legacy_head import common_refusals, method_layout, replace_method, run_head
from .trl_legacy_kto import KTO_STATE, kto_forward, kto_layout, kto_refusals

__all__ = ["is_legacy_trainer", "legacy_apply"]

# Parameters of the trainer method this module replaces (after self).
_SIGNATURE = ("model", "batch", "is_ref_model")
# Trainer attributes the replacement reads, as TRL 0.24's DPOTrainer.__init__ sets them.
_STATE = ("args", "pad_token_id", "is_encoder_decoder", "max_length", "truncation_mode", "use_logits_to_keep",
          "padding_free", "use_weighting", "aux_loss_enabled", "loss_type")
_VISION = ("pixel_values", "pixel_attention_mask", "image_sizes")


def _layouts(trainer):
    """``[(how, method name, its replacement, attributes it reads, refusals)]`` for each TRL 0.24
    layout ``trainer`` (an instance or a class) has, ``how`` as :func:`.trl_legacy_head.method_layout`."""
    cls = trainer if isinstance(trainer, type) else type(trainer)
    found = [(method_layout(cls, "concatenated_forward", _SIGNATURE, ("concatenated_inputs",)),
              "concatenated_forward", _concatenated_forward, _STATE, _dpo_refusals),
             (kto_layout(cls), "forward", kto_forward, KTO_STATE, kto_refusals)]
    return [layout for layout in found if layout[0] is not None]


def is_legacy_trainer(trainer):
    """True when ``trainer`` (an instance or a class) computes its log-probs itself, as TRL 0.24
    does: ``concatenated_forward(self, model, batch, is_ref_model=False)`` next to
    ``concatenated_inputs`` (``DPOTrainer`` and its subclasses), or
    ``forward(self, model, batch)`` next to ``get_batch_logps``, ``kto_loss`` and
    ``_compute_kl_logps`` (``KTOTrainer``), that method being TRL's own (a subclass that redefines
    it computes something this module does not know).  Decided on the class's methods, not on a
    version number."""
    return any(layout[0] == "trl" for layout in _layouts(trainer))


def _dpo_refusals(trainer):
    """What of a DPO ``trainer``'s settings the replacement cannot reproduce (empty: nothing)."""
    refused = common_refusals(trainer, "concatenated_forward")
    if trainer.use_weighting and trainer.padding_free:
        refused.append("use_weighting=True with padding_free=True (TRL 0.24's own step fails on it)")
    return refused


def _checked_layout(trainer):
    """``(method name, its replacement)`` for ``trainer``'s layout, or a named error."""
    name = type(trainer).__name__
    layouts = _layouts(trainer)
    if layouts and layouts[0][0] == "overridden":
        method = layouts[0][1]
        owner = getattr(type(trainer), method).__qualname__
        raise TypeError(f"{name} redefines TRL's {method} ({owner}); pyfused_po.integrations.trl_legacy replaces "
                        "TRL's own method and cannot know what this one computes")
    if not layouts:
        raise TypeError(
            f"{name} has neither concatenated_forward(model, batch, is_ref_model) next to concatenated_inputs "
            "(TRL 0.24's DPOTrainer) nor forward(model, batch) next to get_batch_logps / kto_loss (TRL 0.24's "
            "KTOTrainer), so pyfused_po.integrations.trl_legacy cannot switch it")
    _, method, replacement, state, refusals = layouts[0]
    missing = [a for a in state if not hasattr(trainer, a)]
    if missing:
        raise TypeError(f"{name} has {method} but not the attributes {missing} that TRL 0.24's trainer sets; "
                        "its layout is unknown to pyfused_po.integrations.trl_legacy")
    refused = refusals(trainer)
    if refused:
        raise ValueError(f"pyfused_po.integrations.trl_legacy cannot reproduce {name}'s step with "
                         f"{'; '.join(refused)}; leave this trainer unswitched")
    return method, replacement


def _token_head(targets, keep, extras, backend, impl):
    """The head stage: per-token results of ``targets`` (``-100`` = not scored) from the
    last ``keep`` hidden positions (all when ``None``)."""

    def stage(hidden, labels, weight, bias, transform):
        return linear_token_logprobs(hidden, weight, labels, bias=bias, extras=extras, backend=backend, impl=impl,
                                     **transform)

    def head(causal_lm, hidden):
        return run_head(causal_lm, hidden if keep is None else hidden[:, -keep:], targets, stage)

    return head


def _flush_and_truncate(trainer, attention_mask, *tensors):
    """TRL 0.24's layout of the joined rows: flushed left, cut to ``max_length`` keeping the
    start or the end (``keep_end`` flushes right first; with ``token_type_ids`` TRL flushes
    left there, which the caller signals by passing them, last)."""
    from trl.trainer.utils import flush_left, flush_right

    limit = trainer.max_length
    if limit is None or limit >= attention_mask.size(1):
        return flush_left(attention_mask, *tensors)
    if trainer.truncation_mode == "keep_start":
        return tuple(t[:, :limit] for t in flush_left(attention_mask, *tensors))
    if trainer.truncation_mode == "keep_end":
        first = flush_left if len(tensors) == 3 else flush_right
        return flush_left(*(t[:, -limit:] for t in first(attention_mask, *tensors)))
    raise ValueError(f"Unknown truncation mode: {trainer.truncation_mode!r}; TRL knows 'keep_end' and 'keep_start'")


def _joined_rows(trainer, batch):
    """``(input_ids, loss_mask, token_type_ids or None, attention_mask)`` of the ``2B`` rows
    ``[chosen; rejected]``, laid out as TRL 0.24 lays them out."""
    from trl.trainer.utils import pad_to_length

    cat = trainer.concatenated_inputs(batch, padding_value=trainer.pad_token_id)
    vision = [k for k in _VISION if k in cat]
    if vision:
        raise ValueError(f"pyfused_po.integrations.trl_legacy scores text-only batches; this one has {vision}")
    prompt_mask = cat["prompt_attention_mask"]
    input_ids = torch.cat((cat["prompt_input_ids"], cat["completion_input_ids"]), dim=1)
    attention_mask = torch.cat((prompt_mask, cat["completion_attention_mask"]), dim=1)
    loss_mask = torch.cat((torch.zeros_like(prompt_mask), cat["completion_attention_mask"]), dim=1)
    tensors = [input_ids, loss_mask]
    if "token_type_ids" in cat:
        tensors.append(pad_to_length(cat["token_type_ids"], input_ids.shape[1], 0))
    attention_mask, *tensors = _flush_and_truncate(trainer, attention_mask, *tensors)
    return (*tensors, attention_mask) if len(tensors) == 3 else (*tensors, None, attention_mask)


def _concatenated_forward(self, model, batch, is_ref_model=False, *, backend, impl):
    """Drop-in for TRL 0.24's ``DPOTrainer.concatenated_forward`` (module docstring)."""
    n = batch["prompt_input_ids"].shape[0]
    input_ids, loss_mask, token_type_ids, attention_mask = _joined_rows(self, batch)
    kwargs = {"use_cache": False}
    if token_type_ids is not None:
        kwargs["token_type_ids"] = token_type_ids
    keep = None
    if self.use_logits_to_keep:  # from one position before the first completion token on
        keep = int(loss_mask.shape[1] - loss_mask.nonzero(as_tuple=True)[1].min()) + 1
    position_ids = None
    if self.padding_free:  # one stream of the unpadded tokens
        present = attention_mask.bool()
        input_ids, loss_mask = input_ids[present].unsqueeze(0), loss_mask[present].unsqueeze(0)
        position_ids = attention_mask.cumsum(1)[present].unsqueeze(0) - 1
        kwargs["position_ids"] = position_ids
    else:
        kwargs["attention_mask"] = attention_mask
    # Position t scores token t + 1 where that token is a completion token (torch.roll: the last wraps).
    labels, scored = input_ids.roll(-1, 1), loss_mask.roll(-1, 1).bool()
    if keep is not None:
        labels, scored = labels[:, -keep:], scored[:, -keep:]
    extras = ("mean_logit",) + (("log_sum_sq_probs",) if self.use_weighting else ())
    head = _token_head(labels.masked_fill(~scored, -100), keep, extras, backend, impl)
    tokens = model(input_ids, pyfused_po_head=head, **kwargs)
    logps = tokens.logps  # 0 where not scored
    per_token = logps.roll(1, 1)  # TRL's alignment: the score of token t at position t
    if self.padding_free:
        rows = torch.zeros(attention_mask.shape, device=per_token.device, dtype=per_token.dtype)
        rows[attention_mask.bool()] = per_token
        per_token = rows
    all_logps = per_token[:, 1:].sum(-1)
    output = {}
    if self.use_weighting:  # WPO, eq. 2: TRL subtracts position t's log Σp² from the rolled log-prob at t
        with torch.no_grad():
            adjusted = (per_token - tokens.log_sum_sq_probs) * scored
            weights = adjusted.sum(-1) / scored.sum(-1)
            output["policy_weights"] = torch.clamp(torch.exp(weights[:n] + weights[n:]), max=1)
    if self.args.rpo_alpha is not None or "sft" in self.loss_type:
        # TRL: cross-entropy of the chosen rows' positions ..T-2, labels zeroed off the mask, ignore_index=0.
        counted = scored[:n, :-1] & (labels[:n, :-1] != 0)
        output["nll_loss"] = -(logps[:n, :-1] * counted).sum() / counted.sum()
    if "ipo" in self.loss_type:
        all_logps = all_logps / scored.sum(-1)
    if self.args.ld_alpha is not None and not is_ref_model:
        all_logps = _length_desensitized(per_token, scored, n, self.args.ld_alpha)
    output["chosen_logps"], output["rejected_logps"] = all_logps[:n], all_logps[n:]
    mean = tokens.mean_logit.detach()
    if self.padding_free:  # the rejected rows start at the (n + 1)-th position id 0
        split = (position_ids == 0).nonzero(as_tuple=True)[1][n]
        parts = ((mean[0, :split], scored[0, :split]), (mean[0, split:], scored[0, split:]))
    else:
        parts = ((mean[:n], scored[:n]), (mean[n:], scored[n:]))
    output["mean_chosen_logits"], output["mean_rejected_logits"] = (m[s].mean() for m, s in parts)
    return output


def _length_desensitized(per_token, scored, n, ld_alpha):
    """LD-DPO as TRL 0.24 computes it: over the first ``len_i`` positions of each rolled row,
    weight 1 on the first ``min(len_chosen, len_rejected)`` and ``ld_alpha`` on the rest."""
    lengths = scored.sum(1)
    public = torch.min(lengths[:n], lengths[n:]).repeat(2)
    position = torch.arange(per_token.size(1), device=per_token.device).expand_as(per_token)
    front = position < public.unsqueeze(1)
    within = position < lengths.unsqueeze(1)
    return (per_token * (front & within)).sum(1) + ld_alpha * (per_token * (~front & within)).sum(1)


def legacy_apply(trainer, *, backend="auto", linear_impl="auto"):
    """Switch a trainer with one of TRL 0.24's layouts (:func:`is_legacy_trainer`) to the
    fused-linear path: its policy, its reference model (when it has one; with PEFT and no
    reference model the adapter-disabled policy is scored through the same path) and every
    later call of the replaced method (``concatenated_forward`` / ``forward``: training,
    evaluation, reference log-probs).  ``backend`` / ``linear_impl``: as
    :func:`pyfused_po.linear_token_logprobs`.  Returns the trainer.  Call it after constructing
    the trainer and before ``train()``.  Raises ``TypeError`` for another layout, ``ValueError``
    for settings it cannot reproduce."""
    method, replacement = _checked_layout(trainer)
    return replace_method(trainer, method, replacement, backend=backend, impl=linear_impl)
