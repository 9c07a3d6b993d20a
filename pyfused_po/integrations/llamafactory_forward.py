"""LLaMA-Factory's own log-prob methods, computed on the fused-linear path.

LLaMA-Factory 0.9.x subclasses TRL 0.24's trainers and scores tokens itself
(``llamafactory/train/{dpo,kto}/trainer.py``, ``train/trainer_utils.get_batch_logps``).  The
contract these drop-ins reproduce, read from 0.9.5's source (row ``r``, position ``t`` of a
padded ``[R, T]`` batch; ``IGNORE_INDEX = -100``):

* ``logps_r = Σ_{t ≥ 1, y_{r,t} ≠ -100} log p(y_{r,t} | row r, positions < t)``: hidden row
  ``t - 1`` scores label ``t``; ``valid_length_r`` counts those labels;
* with ``ld_alpha`` (DPO, policy only: the reference passes ``is_ref_model=True``), over the
  shifted labels: the first ``start_r + min(len_chosen, len_rejected)`` positions (``start_r``
  the first labelled one) weigh 1, the later labelled ones ``ld_alpha``;
* ``CustomDPOTrainer.concatenated_forward(model, batch, is_ref_model=False)`` (batch rows
  ``[chosen; rejected]``, keys ``input_ids``, ``attention_mask``, ``labels``) returns
  ``chosen_logps``, ``rejected_logps`` (divided by ``valid_length`` for ``pref_loss`` ipo, orpo
  and simpo), ``chosen_logits``, ``rejected_logits`` (the ``[B, T, V]`` float32 logits, read
  only as ``.mean()`` for the ``logits/*`` metrics) and ``chosen_logps_avg`` (the average
  log-prob, for ``pref_ftx`` and ORPO's SFT term); it pops ``labels`` from the batch it is
  given, after a detached copy when the trainer has a reference (``use_ref_model``);
* ``CustomKTOTrainer.forward(model, batch, prefix="")`` scores ``{prefix}input_ids`` (``prefix``
  ``""`` or ``"kl_"``) and returns ``(logits, logps, logps / valid_length)``; the trainer reads
  the logits only as ``nansum()`` of the chosen and rejected rows (``logits/*_sum``).

In the logits' place the drop-ins return, per position, the mean (DPO) or the sum (KTO) of
that position's ``V`` logits (:mod:`.logit_sums`): ``[R, T]`` instead of ``[R, T, V]``, whose
``.mean()`` / ``nansum()`` are the logits'.  The log-probs come from
:func:`pyfused_po.linear_token_logprobs`, logits formed one chunk of labelled tokens at a time.
Everything downstream (``pref_loss`` sigmoid / hinge / ipo / kto_pair / orpo / simpo,
``pref_ftx``, ``pref_bco_weight``, the KTO loss, every logged metric) is LLaMA-Factory's own code.
"""
import torch

from .logit_sums import scored_rows

__all__ = ["IGNORE_INDEX", "dpo_concatenated_forward", "kto_forward"]

IGNORE_INDEX = -100  # llamafactory.extras.constants.IGNORE_INDEX: labels never scored
# Model inputs of a text-only batch; anything else (pixel_values, image_grid_thw, rope_deltas, ...)
# belongs to a vision-language model, whose forward this path does not reproduce.
_TEXT_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
# CustomKTOTrainer.forward passes these of `{prefix}*` to the model; a batch holds them, the labels and
# the tags for both prefixes ("" the completions, "kl_" the mismatched ones); position_ids it ignores.
_KTO_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
_KTO_KEYS = tuple(p + k for p in ("", "kl_") for k in _TEXT_INPUTS + ("labels",)) + ("kto_tags",)
_AVERAGED = ("ipo", "orpo", "simpo")  # pref_loss values whose trainer divides logps by valid_length
_WHO = "pyfused_po.integrations.llamafactory"


def _check_inputs(batch, allowed):
    """A named error for a batch with inputs other than ``allowed`` (a vision-language batch)."""
    other = sorted(set(batch) - set(allowed))
    if other:
        raise ValueError(f"{_WHO} scores text-only batches of a causal LM; this batch also has {other}")


def _sums(per_token, labels, ld_alpha=None):
    """LLaMA-Factory's ``get_batch_logps`` on per-token log-probs aligned with ``labels``:
    ``(logps [R], valid_length [R])`` over the shifted labels, LD-DPO's split when ``ld_alpha``."""
    per_token, mask = per_token[:, 1:], labels[:, 1:] != IGNORE_INDEX
    valid_length = mask.sum(-1)
    if ld_alpha is None:
        return (per_token * mask).sum(-1), valid_length
    n = labels.shape[0] // 2
    shorter = torch.min(valid_length[:n], valid_length[n:])
    public = mask.int().argmax(1) + torch.cat((shorter, shorter))  # first labelled position + shorter length
    front = torch.arange(per_token.shape[1], device=per_token.device) < public.unsqueeze(1)
    return (per_token * (front & mask)).sum(-1) + ld_alpha * (per_token * (~front & mask)).sum(-1), valid_length


def dpo_concatenated_forward(self, model, batch, is_ref_model=False, *, backend, impl):
    """Drop-in for ``CustomDPOTrainer.concatenated_forward`` (module docstring)."""
    if self.finetuning_args.use_ref_model:  # LLaMA-Factory works on a copy then; otherwise it pops from `batch`
        batch = dict(batch)
    labels = batch.pop("labels")
    _check_inputs(batch, _TEXT_INPUTS)
    inputs = {k: batch[k] for k in _TEXT_INPUTS if k in batch}
    per_token, means = scored_rows(model, inputs, labels, backend=backend, impl=impl, metric="mean", who=_WHO)
    all_logps, valid_length = _sums(per_token, labels, None if is_ref_model else self.ld_alpha)
    if self.loss_type in _AVERAGED:
        all_logps = all_logps / valid_length
    n = inputs["input_ids"].shape[0] // 2
    chosen_logps, rejected_logps = all_logps.split(n)
    chosen_avg = chosen_logps if self.loss_type in _AVERAGED else chosen_logps / valid_length[:n]
    return {"chosen_logps": chosen_logps, "rejected_logps": rejected_logps, "chosen_logits": means[:n],
            "rejected_logits": means[n:], "chosen_logps_avg": chosen_avg}


def kto_forward(self, model, batch, prefix="", *, backend, impl):
    """Drop-in for ``CustomKTOTrainer.forward`` (module docstring)."""
    _check_inputs(batch, _KTO_KEYS)
    labels = batch[f"{prefix}labels"]
    inputs = {k: batch[prefix + k] for k in _KTO_INPUTS if prefix + k in batch}
    per_token, sums = scored_rows(model, inputs, labels, backend=backend, impl=impl, metric="sum", who=_WHO)
    logps, valid_length = _sums(per_token, labels)
    return sums, logps, logps / valid_length
