"""TRL's ``ORPOTrainer`` and ``CPOTrainer`` (``trl.experimental`` since TRL 1.x, ``trl`` in 0.24):
``concatenated_forward`` through the fused-linear path.

Neither trainer uses TRL's fused LM head: ``concatenated_forward(model, batch)`` asks the model
for ``[2B, T, V]`` logits of the rows ``[chosen; rejected]`` (``concatenated_inputs``) and returns
``(chosen_logps, rejected_logps, chosen_logits, rejected_logits, nll_loss)``, where

* the log-probs are ``get_batch_logps`` of ``concatenated_labels`` (hidden row ``t - 1`` scores
  label ``t``; -100 not scored), averaged over the scored labels for ORPO always and for CPO when
  ``loss_type`` is ``ipo`` or ``simpo``, summed otherwise;
* ``nll_loss`` is the mean cross-entropy over the chosen rows: ORPO's of every attended token
  (prompt included: the labels are ``input_ids`` where ``attention_mask == 1``), CPO's of
  ``concatenated_labels`` (0 when ``cpo_alpha == 0``);
* the logits are read only as ``.mean()`` for the ``logits/*`` metrics: ORPO's without the last
  position, CPO's all positions.

:func:`switch` replaces the method on the trainer by one returning the same values; one pass of the
fused-linear path scores both label sets (each chosen position scores one token either way), and in
the logits' place it returns each position's mean logit (:mod:`.logit_sums`).  Refused by name:
encoder-decoder models, the MoE router loss, a chosen position whose two labels differ.
"""
import functools

import torch

from .logit_sums import scored_rows
from .trl_legacy_head import replace_method

__all__ = ["is_orpo_cpo_trainer", "switch"]

_KINDS = ("ORPOTrainer", "CPOTrainer")
_WHO = "pyfused_po.integrations.trl_orpo_cpo"


def _kind(trainer):
    """``"ORPOTrainer"`` / ``"CPOTrainer"`` when ``trainer`` (an instance or a class) is TRL's trainer of
    that name or a subclass keeping TRL's ``concatenated_forward``; ``None`` otherwise."""
    cls = trainer if isinstance(trainer, type) else type(trainer)
    for klass in cls.__mro__:
        if klass.__name__ in _KINDS and klass.__module__.startswith("trl."):
            owner = next((k for k in cls.__mro__ if "concatenated_forward" in vars(k)), None)
            return klass.__name__ if owner is not None and owner.__module__.startswith("trl.") else None
    return None


def is_orpo_cpo_trainer(trainer):
    """True for TRL's ``ORPOTrainer`` / ``CPOTrainer`` or a subclass that keeps their ``concatenated_forward``
    (axolotl's ``AxolotlORPOTrainer`` / ``AxolotlCPOTrainer`` do)."""
    return _kind(trainer) is not None


def _concatenated_forward(self, model, batch, *, kind, backend, impl):
    """Drop-in for TRL's ``ORPOTrainer`` / ``CPOTrainer.concatenated_forward`` (module docstring)."""
    # The id TRL pads the rows with (it enters the logit metrics): `padding_value` where the trainer has it
    # (ORPO; CPO in TRL 0.24), else `pad_token_id` (CPO in TRL 1.x).
    pad = self.padding_value if hasattr(self, "padding_value") else self.pad_token_id
    cat = self.concatenated_inputs(batch, is_encoder_decoder=False, padding_value=pad, device=self.accelerator.device)
    n = batch["chosen_labels"].shape[0]
    input_ids, attention_mask = cat["concatenated_input_ids"], cat["concatenated_attention_mask"]
    labels = cat["concatenated_labels"]
    chosen = labels[:n]
    nll_labels = chosen
    if kind == "ORPOTrainer":  # ORPO's NLL: every attended token of the chosen rows (CPO's: `chosen`)
        nll_labels = torch.where(attention_mask[:n] == 1, input_ids[:n], -100)
        if bool(((chosen != -100) & (nll_labels != -100) & (chosen != nll_labels)).any()):
            raise ValueError(f"{_WHO}: a chosen position has a label other than its input token; ORPO's NLL and "
                             "its log-probs would need two scorings")
    targets = torch.cat((torch.where(chosen != -100, chosen, nll_labels), labels[n:]))
    per_token, means = scored_rows(model, dict(input_ids=input_ids, attention_mask=attention_mask), targets,
                                   backend=backend, impl=impl, metric="mean", who=_WHO)
    scored = labels[:, 1:] != -100
    all_logps = (per_token[:, 1:] * scored).sum(-1)
    if kind == "ORPOTrainer" or self.loss_type in ("ipo", "simpo"):
        all_logps = all_logps / scored.sum(-1)
    counted = nll_labels[:, 1:] != -100
    if kind == "CPOTrainer" and self.cpo_alpha == 0:
        nll_loss = torch.tensor(0.0).to(self.accelerator.device)
    else:
        nll_loss = -(per_token[:n, 1:] * counted).sum() / counted.sum()
    if kind == "ORPOTrainer":  # TRL drops the last position of the logits it returns
        means = means[:, :-1]
    return all_logps[:n], all_logps[n:], means[:n], means[n:], nll_loss


def switch(trainer, *, backend="auto", linear_impl="auto"):
    """Replace ``trainer.concatenated_forward`` (TRL's ``ORPOTrainer`` / ``CPOTrainer``) by the fused one,
    and let its model answer the fused call (:func:`.trl_legacy_head.replace_method`).  Returns the
    trainer; ``TypeError`` for another trainer, ``ValueError`` for settings it cannot reproduce."""
    kind = _kind(trainer)
    if kind is None:
        raise TypeError(f"{_WHO} switches TRL's ORPOTrainer / CPOTrainer (or a subclass keeping their "
                        f"concatenated_forward); {type(trainer).__name__} is neither")
    refused = [what for what, on in (("an encoder-decoder model", trainer.is_encoder_decoder),
                                     ("the MoE router auxiliary loss", trainer.aux_loss_enabled)) if on]
    if refused:
        raise ValueError(f"{_WHO} cannot reproduce {type(trainer).__name__}'s step with {'; '.join(refused)}")
    return replace_method(trainer, "concatenated_forward", functools.partial(_concatenated_forward, kind=kind),
                          backend=backend, impl=linear_impl)
