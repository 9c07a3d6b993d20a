"""TRL DPOTrainer / KTOTrainer with and without pyfused_po's switch: same losses, metrics, gradients.

A tiny random Llama, a word-level tokenizer and four preference rows, all local; two
optimizer steps on the CPU.  The reference is TRL's own fused-LM-head path (its chunked
torch log-softmax); the switched run computes the same per-token quantities through
``pyfused_po.linear_token_logprobs``.
"""
import math
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
import torch  # noqa: E402

from _hf_tiny import preference_rows, tiny_model, tiny_tokenizer  # noqa: E402

pfi = pytest.importorskip("pyfused_po.integrations.trl")

# TRL's own reference forward (no_grad) and policy forward differ by ~1e-4 nats per sequence in
# float32 even when policy == reference, where pyfused_po gives exactly the same value on both; the
# tolerances below cover that noise, which IPO's 1/(2β) target amplifies.
RTOL, ATOL = 1e-3, 1e-4
# Wall-clock / throughput entries differ between runs by nature; everything else must match.
_TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "epoch", "step"}


def _dpo(tmp_path, name, peft=False, bf16=False, **config):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=2,
                     learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                     seed=0, data_seed=0, max_length=32, bf16=bf16, **config)
    peft_config = None
    if peft:
        from peft import LoraConfig
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 init_lora_weights=False)
    torch.manual_seed(0)
    # Same seed: the reference starts as an exact copy of the policy, as TRL's default would.
    return DPOTrainer(model=tiny_model(), ref_model=None if peft else tiny_model(), args=args,
                      processing_class=tiny_tokenizer(), train_dataset=datasets.Dataset.from_list(preference_rows(4)),
                      peft_config=peft_config)


def _grads(trainer):
    """Gradients of one compute_loss on the first batch (before any step)."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    for values in trainer._metrics.values():
        values.clear()
    return loss.detach(), grads


def _logs(trainer):
    trainer.train()
    return [{k: v for k, v in row.items() if k not in _TIMING} for row in trainer.state.log_history]


def _assert_same_logs(base, fused):
    assert len(base) == len(fused) == 3  # two steps and the summary
    for b, f in zip(base, fused):
        assert b.keys() == f.keys()
        for key in b:
            assert math.isclose(b[key], f[key], rel_tol=RTOL, abs_tol=ATOL), (key, b[key], f[key])


def _compare(tmp_path, peft=False, **config):
    base, fused = _dpo(tmp_path, "base", peft, **config), _dpo(tmp_path, "fused", peft, **config)
    assert pfi.apply(fused) is fused
    base_loss, base_grads = _grads(base)
    fused_loss, fused_grads = _grads(fused)
    torch.testing.assert_close(fused_loss, base_loss, rtol=RTOL, atol=ATOL)
    assert base_grads.keys() == fused_grads.keys() and base_grads
    for name, g in base_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=RTOL, atol=1e-5, msg=name)
    _assert_same_logs(_logs(base), _logs(fused))
    return fused, fused_grads


def test_dpo_switch_matches_trl(tmp_path):
    """sigmoid + IPO mixture, LD-DPO and WPO at once: every per-token field TRL asks for is used."""
    _compare(tmp_path, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], ld_alpha=0.5, use_weighting=True)


def test_dpo_switch_matches_trl_lora(tmp_path):
    """PEFT LoRA, no ref model (the reference is the adapter-disabled policy); the frozen head gets no gradient."""
    fused, grads = _compare(tmp_path, peft=True, loss_type="sigmoid")
    assert all("lora_" in name for name in grads)
    head = fused.model.get_base_model().get_output_embeddings().weight
    assert head.grad is None and not head.requires_grad


def test_dpo_switch_matches_trl_bf16(tmp_path):
    """accelerate's bf16 mixed precision.  The trainer prepares the reference model at
    construction, wrapping its forward in autocast; the patch keeps that autocast, so at
    step 1 (policy == reference) the rewards are exactly 0 as in TRL, and the head's GEMMs
    run in bf16 in both models.  The torch backend is used because the Triton interpreter
    truncates bf16 stores where the GPU rounds them to nearest; its numerics equal TRL's."""
    base, fused = _dpo(tmp_path, "base", bf16=True), _dpo(tmp_path, "fused", bf16=True)
    pfi.apply(fused, backend="torch")
    base_logs, fused_logs = _logs(base), _logs(fused)
    for logs in (base_logs, fused_logs):
        assert all(logs[0][k] == 0.0 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    _assert_same_logs(base_logs, fused_logs)


def test_patch_warns_when_it_would_drop_accelerate_autocast():
    from _hf_tiny import tiny_model

    model = tiny_model()
    model._original_forward = model.forward  # what accelerate's prepare() leaves with mixed precision
    with pytest.warns(UserWarning, match="accelerate's mixed-precision autocast"):
        pfi.patch_model(model)


@pytest.mark.parametrize("bf16", [False, True], ids=["fp32", "bf16"])
def test_kto_switch_matches_trl(tmp_path, bf16):
    """KTO, also under accelerate's bf16 autocast (torch backend there: see the DPO bf16 test)."""
    from trl import KTOConfig, KTOTrainer

    rows = []
    for i, r in enumerate(preference_rows(4, seed=1)):
        rows.append(dict(prompt=r["prompt"], completion=r["chosen"], label=True))
        rows.append(dict(prompt=r["prompt"], completion=r["rejected"], label=False))

    def make(name):
        args = KTOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=2,
                         learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         seed=0, data_seed=0, max_length=32, bf16=bf16)
        torch.manual_seed(0)
        return KTOTrainer(model=tiny_model(), ref_model=tiny_model(), args=args, processing_class=tiny_tokenizer(),
                          train_dataset=datasets.Dataset.from_list(rows))

    base, fused = make("base"), pfi.apply(make("fused"), backend="torch" if bf16 else "auto")
    _assert_same_logs(_logs(base), _logs(fused))


def test_use_preference_loss_matches_trl_sigmoid(tmp_path):
    from pyfused_po import FusedPreferenceLoss

    base, fused = _dpo(tmp_path, "base", loss_type="sigmoid"), _dpo(tmp_path, "fused", loss_type="sigmoid")
    pfi.use_preference_loss(fused, FusedPreferenceLoss("sigmoid", beta=base.beta))
    base_loss, base_grads = _grads(base)
    fused_loss, fused_grads = _grads(fused)
    torch.testing.assert_close(fused_loss, base_loss, rtol=RTOL, atol=ATOL)
    for name, g in base_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=RTOL, atol=1e-5, msg=name)
    base_logs, fused_logs = _logs(base), _logs(fused)
    for b, f in zip(base_logs[:2], fused_logs[:2]):
        for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margins",
                    "logps/chosen", "logps/rejected", "logits/chosen", "logits/rejected"):
            assert math.isclose(b[key], f[key], rel_tol=RTOL, abs_tol=ATOL), (key, b[key], f[key])


def test_rejects_other_trainers_and_versions(monkeypatch):
    with pytest.raises(TypeError, match="DPOTrainer"):
        pfi.apply(object())
    monkeypatch.setattr(pfi.metadata, "version", lambda name: "1.15.0")
    with pytest.raises(RuntimeError, match=r"trl==1\.15\.0"):
        pfi.apply(object())
