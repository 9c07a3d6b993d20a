"""issue 24 item 2: ``apply(SFTTrainer)`` runs TRL's SFT loss on the three-GEMM plan, ``nll`` and
``dft``, padded and padding-free: one step's loss, gradients and metrics equal TRL's own step, and
the LM-head GEMMs are exactly the floor (3 over the labelled tokens).  Two logged steps of the same
switch with packing / padding_free: ``test_integration_trl_trainers.test_sft_matches_trl``."""
import contextlib
import math

import pytest

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
import torch  # noqa: E402

from _hf_tiny import preference_rows, tiny_model, tiny_tokenizer  # noqa: E402
from test_integration_trl_dpo_plan import _HeadFlops  # noqa: E402

pfi = pytest.importorskip("pyfused_po.integrations.trl")
RTOL, ATOL = 1e-4, 1e-5


def _sft(tmp_path, name, loss_type, padding_free, bf16=False):
    from trl import SFTConfig, SFTTrainer

    rows = [dict(prompt=r["prompt"], completion=r["chosen"]) for r in preference_rows(4)]
    args = SFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     use_cpu=True, bf16=bf16, save_strategy="no", seed=0, data_seed=0, loss_type=loss_type,
                     padding_free=padding_free, max_length=None if padding_free else 32)
    torch.manual_seed(0)
    return SFTTrainer(model=tiny_model(), args=args, processing_class=tiny_tokenizer(),
                      train_dataset=datasets.Dataset.from_list(rows))


def _step(trainer, batch, counter=None):
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    for values in trainer._metrics.values():
        values.clear()
    trainer._total_train_tokens = 0
    # Under the trainer's autocast, as training_step runs it (bf16: TRL's config default).
    with counter if counter is not None else contextlib.nullcontext(), trainer.accelerator.autocast():
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return loss.detach(), grads, metrics


@pytest.mark.parametrize("loss_type, padding_free, bf16", [("nll", False, False), ("dft", True, False),
                                                          ("nll", True, True)])
def test_apply_sft_runs_the_plan_at_the_gemm_floor(tmp_path, loss_type, padding_free, bf16):
    """bf16 (accelerate's CPU autocast) is compared loosely: the head's GEMMs run in bf16 in both
    paths, in different chunkings."""
    rtol, atol, grad_tol = (RTOL, ATOL, 1e-6) if not bf16 else (2e-2, 2e-2, 2e-2)
    base = _sft(tmp_path, "base", loss_type, padding_free, bf16)
    fused = _sft(tmp_path, "fused", loss_type, padding_free, bf16)
    pfi.apply(fused, backend="torch")
    assert "compute_loss" in vars(fused)  # the plan's step, chosen silently
    batch = next(iter(fused.get_train_dataloader()))
    assert ("position_ids" in batch and batch["input_ids"].shape[0] == 1) == padding_free
    weight = fused.model.get_output_embeddings().weight
    counter = _HeadFlops(weight.shape[0])
    loss, grads, metrics = _step(fused, batch, counter)
    b_loss, b_grads, b_metrics = _step(base, batch)
    labelled = int((batch["labels"][:, 1:] != -100).sum())
    unit = 2 * weight.shape[0] * weight.shape[1]
    assert counter.flops == 3 * labelled * unit, counter.flops / (labelled * unit)
    torch.testing.assert_close(loss, b_loss, rtol=rtol, atol=atol)
    assert grads.keys() == b_grads.keys() and grads
    for name, g in b_grads.items():
        scale = 1.0 if not bf16 else float(g.abs().max())  # bf16: relative to the tensor's largest entry
        torch.testing.assert_close(grads[name], g, rtol=rtol, atol=grad_tol * scale, msg=name)
    assert metrics.keys() == b_metrics.keys() and {"entropy", "mean_token_accuracy", "num_tokens"} <= set(metrics)
    for key in b_metrics:
        assert math.isclose(metrics[key], b_metrics[key], rel_tol=rtol, abs_tol=atol), (key, metrics[key],
                                                                                        b_metrics[key])
