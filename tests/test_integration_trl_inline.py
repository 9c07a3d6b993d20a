"""TRL 1.9–1.14's DPOTrainer and KTOTrainer (logits formed inline in ``_compute_loss``) with and without
``apply(trainer)`` (``pyfused_po.integrations.trl_inline``).

Runs only where the installed TRL has that layout (its own environment: the README's "TRL 1.9–1.14",
.ci/run's side checks); elsewhere the module skips.  Each case takes one batch of a tiny random
Llama (fp32), runs the trainer's own step (logits, ``selective_log_softmax``: the reference) and the
switched one on the same trainer, and compares the loss, every parameter gradient and every logged
metric.  The LM-head GEMMs of the switched step are counted (matmul FLOPs whose operands carry the
vocabulary): exactly the floor — 3 GEMMs over the policy's labelled tokens, 1 over the reference's
(plus, for KTO, 1 over the KL completions' labelled tokens for each model) — so no logits are formed
for prompt or padding rows, and the LM head module is never called.
"""
import math
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
import torch  # noqa: E402

from _hf_tiny import preference_rows, tiny_model, tiny_tokenizer  # noqa: E402
from _trl_switch_checks import HeadFlops, assert_logs_match, peft_dpo_trainer, train_logs  # noqa: E402

from pyfused_po.integrations.trl import apply  # noqa: E402
from pyfused_po.integrations.trl_inline_layout import is_inline_trainer  # noqa: E402

if not is_inline_trainer(trl.DPOTrainer):
    pytest.skip(f"trl=={trl.__version__}'s DPOTrainer does not form its logits in _compute_loss (the TRL 1.9-1.14 "
                "layout)", allow_module_level=True)

pytestmark = pytest.mark.slow  # builds TRL trainers
RTOL, ATOL = 1e-5, 1e-6
_SWITCHED = ("_compute_loss", "compute_ref_log_probs", "_compute_kl_logps")


def _restore(trainer):
    """Back to the class's own step (the models keep the fused head, which answers plain calls
    with their own forward)."""
    from pyfused_po.integrations.trl_plan import clear_plan

    clear_plan(trainer)
    for name in _SWITCHED:
        vars(trainer).pop(name, None)


def _step(trainer, batch):
    """``(loss, gradients, metrics, LM-head FLOPs, LM-head module calls)`` of one training step."""
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    for values in trainer._metrics.values():
        values.clear()
    trainer._total_train_tokens = 0
    head = trainer.model.get_output_embeddings()
    counter, calls = HeadFlops(head.weight.shape[0]), []
    hooks = [m.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
             for m in (trainer.model, trainer.ref_model) if m is not None]
    try:
        with counter:
            loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
            loss.backward()
    finally:
        for hook in hooks:
            hook.remove()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return loss.detach(), grads, metrics, counter.flops, len(calls)


def _compare(trainer, batch, gemm_rows, backend="torch"):
    """TRL's step against the switched one; the switched one's LM-head FLOPs are ``gemm_rows`` GEMMs
    of one token row each against the ``[V, D]`` head (``2·D·V`` FLOPs per row)."""
    _restore(trainer)
    base = _step(trainer, batch)
    assert base[4] > 0, "TRL's own step should call the LM head"
    apply(trainer, backend=backend)
    try:
        loss, grads, metrics, flops, calls = _step(trainer, batch)
    finally:
        _restore(trainer)
    b_loss, b_grads, b_metrics, _, _ = base
    weight = trainer.model.get_output_embeddings().weight
    assert calls == 0, "the switched step called the LM head (formed logits)"
    assert flops == 2 * weight.shape[0] * weight.shape[1] * gemm_rows, flops / (2 * weight.numel())
    torch.testing.assert_close(loss, b_loss, rtol=RTOL, atol=ATOL)
    assert grads.keys() == b_grads.keys() and grads
    for name, g in b_grads.items():  # float32 rounding, scaled by the tensor's largest entry
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(),
                                   msg=lambda m, n=name: f"{n}: {m}")
    assert metrics.keys() == b_metrics.keys()
    for key in b_metrics:
        assert math.isclose(metrics[key], b_metrics[key], rel_tol=RTOL, abs_tol=ATOL), (key, metrics[key],
                                                                                        b_metrics[key])
    return b_metrics


def _labelled(mask):
    return int((mask[:, 1:] != 0).sum())


@pytest.fixture(scope="module")
def dpo(tmp_path_factory):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("dpo")), per_device_train_batch_size=4, max_steps=1,
                     report_to=[], use_cpu=True, save_strategy="no", bf16=False, seed=0, beta=0.2)
    torch.manual_seed(0)
    trainer = DPOTrainer(model=tiny_model(), ref_model=tiny_model(1), args=args, processing_class=tiny_tokenizer(),
                         train_dataset=datasets.Dataset.from_list(preference_rows(4)))
    return trainer, next(iter(trainer.get_train_dataloader()))


def _configure(trainer, loss_types, weights=None, label_smoothing=0.0, ld_alpha=None, use_weighting=False):
    trainer.loss_types, trainer.loss_weights = list(loss_types), weights or [1.0] * len(loss_types)
    trainer.label_smoothing, trainer.ld_alpha, trainer.use_weighting = label_smoothing, ld_alpha, use_weighting


# Every loss type of TRL 1.9-1.14's DPOTrainer (label smoothing where TRL reads it).
DPO_LOSSES = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]


@pytest.mark.parametrize("loss_type", DPO_LOSSES)
def test_dpo_loss_types_match_trl(dpo, loss_type):
    trainer, batch = dpo
    _configure(trainer, [loss_type], label_smoothing=0.1 if loss_type in ("exo_pair", "robust", "aot") else 0.0)
    # aot / aot_unpaired sort across the batch: no pair's gradient is its own, so the staged plan runs
    # (logits, recompute, dH, dW), still over the labelled tokens only.
    policy = 4 if loss_type in ("aot", "aot_unpaired") else 3
    metrics = _compare(trainer, batch, (policy + 1) * _labelled(batch["completion_mask"]))
    assert abs(metrics["rewards/margins"]) > 1e-3


@pytest.mark.parametrize("case", ["ld_alpha", "wpo", "weighted_mix"])
def test_dpo_options_match_trl(dpo, case):
    trainer, batch = dpo
    config = dict(ld_alpha=dict(loss_types=["sigmoid"], ld_alpha=0.4),
                  wpo=dict(loss_types=["sigmoid"], use_weighting=True),
                  weighted_mix=dict(loss_types=["sigmoid", "sft", "ipo"], weights=[1.0, 0.5, 0.3]))[case]
    _configure(trainer, **config)
    _compare(trainer, batch, 4 * _labelled(batch["completion_mask"]))


def test_dpo_triton_kernels_match_trl(dpo):
    trainer, batch = dpo
    _configure(trainer, ["sigmoid"])
    _compare(trainer, batch, 4 * _labelled(batch["completion_mask"]), backend="triton")


def test_dpo_precomputed_reference_matches_trl(dpo):
    """compute_ref_log_probs (TRL's precompute pass; LD-DPO weighted) through the fused head: one GEMM
    over the labelled tokens; and a step that reads the precomputed sums (no reference pass)."""
    trainer, batch = dpo
    _configure(trainer, ["sigmoid"], ld_alpha=0.4)
    inputs = trainer._prepare_inputs(batch)
    base = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
    apply(trainer, backend="torch")
    try:
        weight = trainer.model.get_output_embeddings().weight
        counter = HeadFlops(weight.shape[0])
        with counter:
            fused = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
    finally:
        _restore(trainer)
    assert counter.flops == 2 * weight.numel() * _labelled(batch["completion_mask"])
    for got, want in zip(fused, base):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    precomputed = dict(batch, ref_chosen_logps=base[0], ref_rejected_logps=base[1])
    trainer.precompute_ref_logps = True
    try:
        _compare(trainer, precomputed, 3 * _labelled(batch["completion_mask"]))
    finally:
        trainer.precompute_ref_logps = False


@pytest.mark.parametrize("setting, match", [
    (dict(f_divergence_type="js_divergence"), "f_divergence_type"),
    (dict(aux_loss_enabled=True), "router auxiliary loss"),
    (dict(loss_types=["sigmoid", "robust"], loss_weights=[1.0, 1.0], label_smoothing=0.1), "label_smoothing"),
])
def test_dpo_refuses_what_it_cannot_reproduce(dpo, setting, match):
    """A named ValueError, and the trainer runs its own step, also after an earlier switch (each
    apply decides from the settings in force)."""
    trainer, _ = dpo
    _configure(trainer, ["sigmoid"])
    apply(trainer)
    assert all(name in vars(trainer) for name in _SWITCHED[:2])
    saved = {k: getattr(trainer, k) for k in setting}
    vars(trainer).update(setting)
    try:
        with pytest.raises(ValueError, match=match):
            apply(trainer)
    finally:
        vars(trainer).update(saved)
    assert not any(name in vars(trainer) for name in _SWITCHED)


def test_dpo_refuses_liger_and_other_layouts(dpo):
    trainer, _ = dpo
    _configure(trainer, ["sigmoid"])
    trainer.args.use_liger_kernel = True
    try:
        with pytest.raises(ValueError, match="use_liger_kernel"):
            apply(trainer)
    finally:
        trainer.args.use_liger_kernel = False
    redefines = type("Redefines", (trl.DPOTrainer,), {"_compute_loss": lambda self, model, inputs,
                                                      return_outputs: None})
    assert not is_inline_trainer(redefines) and is_inline_trainer(type("Keeps", (trl.DPOTrainer,), {}))
    original = type(trainer)
    trainer.__class__ = redefines
    try:
        from pyfused_po.integrations.trl_inline import inline_apply
        with pytest.raises(TypeError, match="redefines TRL's"):
            inline_apply(trainer)
    finally:
        trainer.__class__ = original
    with pytest.raises(RuntimeError, match="trl_inline"):  # not a trainer of any known layout
        apply(object())


@pytest.mark.parametrize("bf16", [False, True])
def test_dpo_training_logs_match_trl(tmp_path, bf16):
    """Two optimizer steps through Trainer.train (accelerate prepares the switched models).  bf16
    (DPOConfig's default; accelerate's CPU autocast) is compared more loosely: the first step's
    gradient norms differ by 2e-4 relative (bf16 head GEMMs in other chunkings), so the second
    step's values by up to 1.4e-3 relative (mean logits, 2026-12-07)."""
    from trl import DPOConfig, DPOTrainer

    def run(name, switch):
        args = DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=2,
                         learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         bf16=bf16, seed=0, data_seed=0, loss_type=["sigmoid", "sft"], loss_weights=[1.0, 0.5])
        torch.manual_seed(0)
        made = DPOTrainer(model=tiny_model(), ref_model=tiny_model(1), args=args, processing_class=tiny_tokenizer(),
                          train_dataset=datasets.Dataset.from_list(preference_rows(4)))
        return train_logs(apply(made, backend="torch") if switch else made)

    tolerance = dict(rel=5e-3, abs=1e-4) if bf16 else {}
    assert_logs_match(run("base", False), run("fused", True), 3, "logps/chosen", **tolerance)


@pytest.fixture(scope="module")
def kto(tmp_path_factory):
    from trl import KTOConfig, KTOTrainer

    rows = []
    for r in preference_rows(4, seed=1):
        rows += [dict(prompt=r["prompt"], completion=r["chosen"], label=True),
                 dict(prompt=r["prompt"], completion=r["rejected"], label=False)]
    args = KTOConfig(output_dir=str(tmp_path_factory.mktemp("kto")), per_device_train_batch_size=4, max_steps=1,
                     report_to=[], use_cpu=True, bf16=False, save_strategy="no", seed=0, data_seed=0, max_length=32,
                     desirable_weight=1.0, undesirable_weight=1.5)
    torch.manual_seed(0)
    trainer = KTOTrainer(model=tiny_model(), ref_model=tiny_model(1), args=args, processing_class=tiny_tokenizer(),
                         train_dataset=datasets.Dataset.from_list(rows))
    return trainer, next(iter(trainer.get_train_dataloader()))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl(kto, loss_type):
    """One step (the KL pass forward-only through the fused head), then the precompute pass
    (completion and KL reference sums)."""
    trainer, batch = kto
    trainer.loss_type, trainer.calculate_KL = loss_type, loss_type == "kto"  # as KTOTrainer.__init__ sets them
    kl = _labelled(batch["KL_completion_mask"]) if trainer.calculate_KL else 0
    metrics = _compare(trainer, batch, 4 * _labelled(batch["completion_mask"]) + 2 * kl)
    assert {"logits/chosen", "logits/rejected", "logps/chosen", "kl", "entropy"} <= metrics.keys()
    inputs = trainer._prepare_inputs(batch)
    base = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
    apply(trainer, backend="torch")
    try:
        fused = trainer.compute_ref_log_probs(trainer.ref_model, inputs)
    finally:
        _restore(trainer)
    torch.testing.assert_close(fused[0], base[0], rtol=RTOL, atol=ATOL)
    assert (fused[1] is None) == (base[1] is None) == (loss_type != "kto")
    if base[1] is not None:
        torch.testing.assert_close(fused[1], base[1], rtol=RTOL, atol=ATOL)


def test_dpo_peft_lora_head_matches_trl(tmp_path):
    """PEFT without a reference model (the adapter-disabled policy is the reference, through the same
    head) and a LoRA adapter on the LM head (its delta enters as extra head columns)."""
    made = peft_dpo_trainer(tmp_path, loss_type=["sigmoid", "sft"])
    batch = next(iter(made.get_train_dataloader()))
    # The policy's three GEMMs run on the head widened by the adapter's r = 4 columns, the reference's one
    # on the base head: 3·(D + r) + D over the labelled tokens, in units of D.
    width = made.model.get_output_embeddings().weight.shape[1]
    metrics = _compare(made, batch, _labelled(batch["completion_mask"]) * (3 * (width + 4) + width) / width)
    assert abs(metrics["rewards/margins"]) > 1e-3
