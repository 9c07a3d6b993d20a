"""issue 24 item 2: ``apply(KTOTrainer)`` runs TRL's KTO loss on the three-GEMM plan, both loss
types, the KL pass forward-only: one step's loss, gradients and metrics equal TRL's own step, and
the LM-head GEMMs are exactly the floor (3 over the policy's labelled tokens, 1 over the
reference's, 1 over the mismatched KL completions' for each of policy and reference).
``test_integration_trl.test_kto_switch_matches_trl`` runs two logged steps of the same switch."""
import math

import pytest

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
import torch  # noqa: E402

from _hf_tiny import preference_rows, tiny_model, tiny_tokenizer  # noqa: E402
from test_integration_trl import ATOL, RTOL  # noqa: E402
from test_integration_trl_dpo_plan import _HeadFlops  # noqa: E402
from test_integration_trl_sft_plan import _step  # noqa: E402

pfi = pytest.importorskip("pyfused_po.integrations.trl")


def _kto(tmp_path, name, loss_type):
    from trl import KTOConfig, KTOTrainer

    rows = []
    for r in preference_rows(4, seed=1):
        rows += [dict(prompt=r["prompt"], completion=r["chosen"], label=True),
                 dict(prompt=r["prompt"], completion=r["rejected"], label=False)]
    # bf16=False: TRL's config defaults to bf16, whose autocast the switched forward enters itself
    # (accelerate's, kept by the patch) while TRL's runs it only inside training_step.
    args = KTOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", seed=0, data_seed=0, max_length=32,
                     loss_type=loss_type, desirable_weight=1.0, undesirable_weight=1.5)
    torch.manual_seed(0)
    return KTOTrainer(model=tiny_model(), ref_model=tiny_model(1), args=args, processing_class=tiny_tokenizer(),
                      train_dataset=datasets.Dataset.from_list(rows))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_apply_kto_runs_the_plan_at_the_gemm_floor(tmp_path, loss_type):
    base, fused = _kto(tmp_path, "base", loss_type), _kto(tmp_path, "fused", loss_type)
    pfi.apply(fused, backend="torch")
    assert "_compute_loss" in vars(fused)  # the plan's step, chosen silently
    batch = next(iter(fused.get_train_dataloader()))
    weight = fused.model.get_output_embeddings().weight
    counter = _HeadFlops(weight.shape[0])
    loss, grads, metrics = _step(fused, batch, counter)
    b_loss, b_grads, b_metrics = _step(base, batch)
    unit = 2 * weight.shape[0] * weight.shape[1]
    labelled = int((batch["completion_mask"][:, 1:] != 0).sum())
    kl = int((batch["KL_completion_mask"][:, 1:] != 0).sum()) if fused.calculate_KL else 0
    assert counter.flops == unit * (4 * labelled + 2 * kl), counter.flops / (unit * (4 * labelled + 2 * kl))
    torch.testing.assert_close(loss, b_loss, rtol=RTOL, atol=ATOL)
    assert grads.keys() == b_grads.keys() and grads
    for name, g in b_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=RTOL, atol=1e-5, msg=name)
    assert metrics.keys() == b_metrics.keys()
    for key in b_metrics:
        assert math.isclose(metrics[key], b_metrics[key], rel_tol=RTOL, abs_tol=ATOL), (key, metrics[key],
                                                                                        b_metrics[key])
