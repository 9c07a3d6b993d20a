"""use_preference_loss's DPOConfig check: TRL 1.15/1.16's own `sigmoid` loss ignores
label_smoothing (only exo_pair, robust, aot and aot_unpaired read it), so a smoothed pyfused_po
sigmoid would train differently from the TRL run it replaces."""
import types

import pytest

pytest.importorskip("trl")

from pyfused_po import FusedPreferenceLoss  # noqa: E402
from pyfused_po.integrations.trl_preference_loss import dpo_config_mismatches  # noqa: E402


def _trainer(loss_type, label_smoothing):
    args = types.SimpleNamespace(loss_weights=None, discopop_tau=None)
    return types.SimpleNamespace(args=args, loss_types=[loss_type], loss_weights=[1.0], beta=0.1, ld_alpha=None,
                                 use_weighting=False, f_divergence_type="reverse_kl", label_smoothing=label_smoothing)


def test_smoothed_sigmoid_is_refused_even_when_dpo_config_agrees():
    lines = dpo_config_mismatches(_trainer("sigmoid", 0.1), FusedPreferenceLoss("sigmoid", beta=0.1,
                                                                                label_smoothing=0.1))
    assert len(lines) == 1 and "ignores DPOConfig's label_smoothing" in lines[0] and "sigmoid" in lines[0], lines


def test_unsmoothed_sigmoid_matches_trl_whatever_dpo_config_says():
    assert dpo_config_mismatches(_trainer("sigmoid", 0.1), FusedPreferenceLoss("sigmoid", beta=0.1)) == []


@pytest.mark.parametrize("loss_type", ["robust", "exo_pair"])
def test_types_trl_smooths_still_compare_values(loss_type):
    assert dpo_config_mismatches(_trainer(loss_type, 0.1), FusedPreferenceLoss(loss_type, beta=0.1,
                                                                              label_smoothing=0.1)) == []
    lines = dpo_config_mismatches(_trainer(loss_type, 0.2), FusedPreferenceLoss(loss_type, beta=0.1,
                                                                               label_smoothing=0.1))
    assert lines == [f"label_smoothing: DPOConfig 0.2, loss_fn 0.1 (used by ['{loss_type}'])"], lines


def test_mixed_types_check_both_rules():
    # sigmoid + robust share one label_smoothing in pyfused_po; TRL smooths robust with DPOConfig's
    # value and sigmoid not at all, so no single value matches a DPOConfig of 0.1.
    trainer = _trainer("sigmoid", 0.1)
    trainer.loss_types, trainer.loss_weights = ["sigmoid", "robust"], [1.0, 1.0]
    unsmoothed = dpo_config_mismatches(trainer, FusedPreferenceLoss(["sigmoid", "robust"], beta=0.1))
    assert unsmoothed == ["label_smoothing: DPOConfig 0.1, loss_fn 0.0 (used by ['robust'])"], unsmoothed
    smoothed = dpo_config_mismatches(trainer, FusedPreferenceLoss(["sigmoid", "robust"], beta=0.1,
                                                                  label_smoothing=0.1))
    assert len(smoothed) == 1 and "ignores DPOConfig's label_smoothing" in smoothed[0], smoothed


# issue 26 class 4: every setting of the module is checked against what TRL's loss of the same name computes with.

def test_bco_delta_trl_lacks_is_refused():
    """TRL 1.16's bco_pair is -logσ(βΔc) - logσ(-βΔr): no delta.  bco_delta=0.5 gave loss 1.4471
    against TRL's 1.3819 and was accepted."""
    assert dpo_config_mismatches(_trainer("bco_pair", 0.0), FusedPreferenceLoss("bco_pair", beta=0.1)) == []
    lines = dpo_config_mismatches(_trainer("bco_pair", 0.0), FusedPreferenceLoss("bco_pair", beta=0.1,
                                                                                bco_delta=0.5))
    assert lines == ["bco_delta: TRL's ['bco_pair'] has no bco_delta (it computes the loss at bco_delta=0.0), "
                     "loss_fn has 0.5; leave it at 0.0"], lines


@pytest.mark.parametrize("option, line", [
    (dict(bco_running_mean=True), "bco_running_mean: TRL's bco_pair has no running mean"),
    (dict(reduction="sum"), "reduction: TRL averages the per-pair losses, loss_fn has reduction='sum'"),
])
def test_module_options_trl_lacks_are_refused(option, line):
    lines = dpo_config_mismatches(_trainer("bco_pair", 0.0), FusedPreferenceLoss("bco_pair", beta=0.1, **option))
    assert len(lines) == 1 and lines[0].startswith(line), lines


def test_a_hyperparameter_without_known_trl_equivalent_is_refused(monkeypatch):
    """A hyper-parameter later added to a TRL-named objective is refused until its TRL value is known."""
    from pyfused_po.objectives import get_objective

    objective = get_objective("hinge")
    monkeypatch.setitem(objective.hyperparameters, "hinge_margin", 1.0)
    lines = dpo_config_mismatches(_trainer("hinge", 0.0), FusedPreferenceLoss("hinge", beta=0.1))
    assert len(lines) == 1 and lines[0].startswith("hinge_margin: TRL's ['hinge'] has no hinge_margin"), lines
