"""TRL 1.16's own DPO loss on given per-token log-probs, for tests that compare against TRL.

``DPOTrainer._compute_loss`` is called on a stand-in trainer (only the attributes it reads) and a
stand-in model whose fused LM head returns the given per-token log-probs, so the loss formulas
(f-divergence scores, length normalization, loss types) are TRL's code, not a copy of it.
"""
import collections
import types

import torch

from trl.trainer.dpo_trainer import DPOTrainer


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    gather = gather_for_metrics


def trl_dpo_loss(token_logps, completion_mask, ref_chosen_logps, ref_rejected_logps, *, loss_type, beta,
                 f_divergence_type="reverse_kl", f_alpha_divergence_coef=1.0, label_smoothing=0.0,
                 discopop_tau=0.05):
    """TRL's batch loss.  ``token_logps``: ``[2P, T]`` policy log-probs of tokens 1..T (0 where not
    scored); ``completion_mask``: ``[2P, T + 1]`` over the input ids (position 0 must be prompt, so
    TRL's unshifted ``ipo`` lengths equal the scored-token counts)."""
    assert not completion_mask[:, 0].any(), "position 0 is a prompt token in these tests"
    rows, length = completion_mask.shape
    logps = token_logps * completion_mask[:, 1:]

    def model(**kwargs):
        zeros = torch.zeros(rows, length - 1, dtype=logps.dtype)
        return types.SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros,
                                     is_top1=torch.zeros(rows, length - 1, dtype=torch.bool))

    trainer = types.SimpleNamespace(
        model=types.SimpleNamespace(training=True), accelerator=_Accelerator(), aux_loss_enabled=False,
        precompute_ref_logps=True, ld_alpha=None, f_divergence_type=f_divergence_type,
        f_alpha_divergence_coef=f_alpha_divergence_coef, loss_types=[loss_type], loss_weights=[1.0], beta=beta,
        label_smoothing=label_smoothing, use_weighting=False, args=types.SimpleNamespace(discopop_tau=discopop_tau),
        _metrics=collections.defaultdict(lambda: collections.defaultdict(list)), _total_train_tokens=0, _tp_size=1)
    inputs = {"input_ids": torch.zeros(rows, length, dtype=torch.long),
              "attention_mask": torch.ones(rows, length, dtype=torch.long), "completion_mask": completion_mask,
              "ref_chosen_logps": ref_chosen_logps, "ref_rejected_logps": ref_rejected_logps}
    return DPOTrainer._compute_loss(trainer, model, inputs, False)
