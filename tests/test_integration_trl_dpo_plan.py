"""issue 24 item 2: ``apply(DPOTrainer)`` runs the three-GEMM plan when pyfused_po reproduces the
DPOConfig, silently, with TRL's losses, gradients and logged metric names; otherwise it keeps TRL's
loss and logs the reason once.

GEMMs are counted as FLOPs of the matmul-family aten ops whose operands carry the vocabulary
dimension (the tiny model's backbone has none), against the floor: 3 GEMMs over the policy's
labelled tokens (logits, dH, dW) and 1 over the reference pass's, 2·M·D·V FLOPs each.
"""
import logging
import math

import pytest

pytest.importorskip("trl")
import torch  # noqa: E402

from _trl_switch_checks import HeadFlops as _HeadFlops  # noqa: E402  (test_integration_trl_kto_plan imports it here)
from test_integration_trl import ATOL, RTOL, _dpo, _one_step  # noqa: E402

pfi = pytest.importorskip("pyfused_po.integrations.trl")


def _head_flops_of_one_step(trainer, batch):
    head = trainer.model.get_output_embeddings().weight
    counter = _HeadFlops(head.shape[0])
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    with counter:
        trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch)).backward()
    trainer.model.zero_grad(set_to_none=True)
    labelled = int((batch["completion_mask"][:, 1:] != 0).sum())
    return counter.flops, 2 * labelled * head.shape[1] * head.shape[0]


# Every type's numbers through the same FusedPreferenceLoss are test_integration_trl's
# _every_trl_loss_type; here a step runs for the types whose module logs more than TRL (filtered)
# and for one with a DPOConfig hyper-parameter of its own.
_STEPPED = ("bco_pair", "sft", "discopop")


def _every_loss_type_through_the_plan(base, fused, batch):
    """Each DPOTrainer loss type: the loss apply() builds from the DPOConfig agrees with it (no
    mismatch); for _STEPPED, one step's loss, gradients and every logged metric (exactly TRL's
    names) equal TRL's.  The loss type is switched on both trainers (building one per type costs
    seconds)."""
    from pyfused_po.integrations.trl_dpo_plan import dpo_loss_from_config
    from pyfused_po.integrations.trl_preference_loss import TRL_DPO_LOSS_TYPES, dpo_config_mismatches

    for loss_type in sorted(TRL_DPO_LOSS_TYPES):
        eps = 0.1 if loss_type in ("exo_pair", "robust") else 0.0
        for trainer in (base, fused):
            trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [loss_type], [1.0], eps
            trainer.ld_alpha, trainer.use_weighting = None, False
            trainer._total_train_tokens = 0
        fused.pyfused_po_loss = dpo_loss_from_config(fused, backend="torch")
        assert dpo_config_mismatches(fused, fused.pyfused_po_loss) == [], loss_type
        if loss_type not in _STEPPED:
            continue
        loss, grads, metrics, _, _ = _one_step(fused, batch=batch)
        b_loss, b_grads, b_metrics, _, _ = _one_step(base, batch=batch)
        torch.testing.assert_close(loss.detach(), b_loss.detach(), rtol=RTOL, atol=ATOL, msg=loss_type)
        for name, g in b_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=RTOL, atol=1e-5,
                                       msg=lambda m, n=name: f"{loss_type} {n}: {m}")
        assert metrics.keys() == b_metrics.keys(), loss_type
        for key in b_metrics:
            assert math.isclose(metrics[key], b_metrics[key], rel_tol=RTOL, abs_tol=ATOL), (loss_type, key)


def test_apply_dpo_runs_the_plan_at_the_gemm_floor(tmp_path):
    """sigmoid + IPO, LD-DPO and WPO: apply() switches the loss itself (no use_preference_loss call);
    then every loss type (_every_loss_type_through_the_plan).
    the step costs exactly the floor (3 policy GEMMs + 1 reference GEMM), where TRL's loss on
    pyfused_po's per-token forward (apply before the plan) costs 5 and TRL's own head more."""
    config = dict(loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], ld_alpha=0.5, use_weighting=True)
    base, fused = _dpo(tmp_path, "base", **config), _dpo(tmp_path, "fused", **config)
    pfi.apply(fused, backend="torch")
    assert fused.pyfused_po_loss.loss_type == ["sigmoid", "ipo"]
    batch = next(iter(fused.get_train_dataloader()))
    flops, gemm = _head_flops_of_one_step(fused, batch)
    base_flops, _ = _head_flops_of_one_step(base, batch)
    assert flops == 4 * gemm, flops / gemm  # 1.00x the floor
    assert base_flops > 5 * gemm, base_flops / gemm  # TRL's chunked head (9.33x the unit here)
    loss, grads, metrics, _, _ = _one_step(fused, batch=batch)
    assert "StoredGradient" in type(loss.grad_fn).__name__
    b_loss, b_grads, b_metrics, _, _ = _one_step(base, batch=batch)
    torch.testing.assert_close(loss.detach(), b_loss.detach(), rtol=RTOL, atol=ATOL)
    for name, g in b_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=RTOL, atol=1e-5, msg=name)
    assert metrics.keys() == b_metrics.keys()
    _every_loss_type_through_the_plan(base, fused, batch)
    pfi.patch_trainer_models(base, backend="torch")  # TRL's loss, pyfused_po's per-token forward
    staged_flops, _ = _head_flops_of_one_step(base, batch)
    assert staged_flops == 5 * gemm, staged_flops / gemm  # logits, recompute, dH, dW + the reference


def test_apply_dpo_falls_back_and_logs_the_reason_once(tmp_path, caplog):
    """sigmoid + robust with label_smoothing 0.1: TRL smooths robust only, pyfused_po shares one
    value, so no FusedPreferenceLoss reproduces it; TRL's loss stays (on the fused forward), and the
    reason is logged once however often apply() runs."""
    from pyfused_po.integrations import trl_plan

    trl_plan._LOGGED.clear()
    trainer = _dpo(tmp_path, "mixed", loss_type=["sigmoid", "robust"], label_smoothing=0.1)
    with caplog.at_level(logging.WARNING, logger="pyfused_po"):
        pfi.apply(trainer)
        pfi.apply(trainer)
    assert not hasattr(trainer, "pyfused_po_loss") and "_compute_loss" not in vars(trainer)
    reasons = [r.getMessage() for r in caplog.records if r.name == "pyfused_po"]
    assert len(reasons) == 1 and "label_smoothing" in reasons[0] and "4 LM-head GEMMs" in reasons[0], reasons
    assert pfi.trl_head_settings(trainer.model) is not None  # the per-token forward is switched
    # Each apply decides afresh (issue 26 class 1's sibling on the trainer): a plan installed for
    # a reproducible config is removed when the config in force no longer is.
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = ["sigmoid"], [1.0], 0.0
    pfi.apply(trainer)
    assert "_compute_loss" in vars(trainer) and trainer.pyfused_po_loss.loss_type == ["sigmoid"]
    trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = ["sigmoid", "robust"], [1.0, 1.0], 0.1
    pfi.apply(trainer)
    assert "_compute_loss" not in vars(trainer) and not hasattr(trainer, "pyfused_po_loss")
