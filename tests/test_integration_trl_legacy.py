"""TRL 0.24's DPOTrainer (``concatenated_forward``) and KTOTrainer (``forward``), which compute their own
log-probs, with and without ``pyfused_po.integrations.trl_legacy.legacy_apply``.

Runs only where the installed TRL has that layout (TRL 0.24 needs transformers 4.5x: its own
environment, see the README's "Older TRL (0.24)"); elsewhere the module skips.  Each case takes
one batch of a tiny random Llama (fp32), runs TRL's own ``get_batch_loss_metrics`` and the
switched one on the same trainer, and compares the loss, every parameter gradient and every
logged metric.  The reference is TRL's step itself (logits formed, ``selective_log_softmax``).
No case forms logits in the switched step: the LM heads of the policy and the reference model
are never called.  The torch backend keeps the cases fast; one runs the Triton kernels.
"""
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # TRL 0.24 warns that KTOTrainer will move
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
import torch  # noqa: E402

from _hf_tiny import preference_rows, tiny_model, tiny_tokenizer  # noqa: E402
from _trl_switch_checks import assert_logs_match, peft_dpo_trainer, train_logs  # noqa: E402

from pyfused_po.integrations.trl_legacy import is_legacy_trainer, legacy_apply  # noqa: E402
from pyfused_po.integrations.trl import apply  # noqa: E402

if not is_legacy_trainer(trl.DPOTrainer):
    pytest.skip(f"trl=={trl.__version__}'s DPOTrainer has no concatenated_forward(model, batch, is_ref_model) "
                "(the TRL 0.24 layout); its switch is pyfused_po.integrations.trl (TRL >= 1.15) or .trl_inline "
                "(TRL 1.9-1.14)", allow_module_level=True)

pytestmark = pytest.mark.slow  # builds TRL trainers; 34 cases, about 50 s in all on 2 cores
RTOL, ATOL = 1e-5, 1e-6
# DPOConfig fields a case changes (the trainer reads them from args); other knobs are trainer attributes.
_ARGS = ("rpo_alpha", "ld_alpha")


def _moved_off_reference(trainer):
    with torch.no_grad():  # the policy moves away from the reference: rewards and margins are not 0
        for p in trainer.model.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    return trainer


@pytest.fixture(scope="module")
def trainer(tmp_path_factory):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path_factory.mktemp("dpo")), per_device_train_batch_size=4, max_steps=1,
                     report_to=[], use_cpu=True, save_strategy="no", bf16=False, seed=0, beta=0.2)
    torch.manual_seed(0)
    return _moved_off_reference(DPOTrainer(model=tiny_model(), args=args, processing_class=tiny_tokenizer(),
                                           train_dataset=datasets.Dataset.from_list(preference_rows(4))))


@pytest.fixture(scope="module")
def batch(trainer):
    return next(iter(trainer.get_train_dataloader()))


def _head_calls(trainer):
    """Counts the calls of the policy's and the reference model's LM heads."""
    calls = []
    for model in _models(trainer):
        model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    return calls


def _models(trainer):
    return [m for m in (trainer.model, trainer.ref_model) if m is not None]


def _step(trainer, batch):
    """TRL's loss, metrics and the policy's gradients for one batch."""
    from trl.trainer.utils import RunningMoments

    trainer.model.zero_grad(set_to_none=True)
    trainer.running = RunningMoments(trainer.accelerator)  # bco_pair's running mean starts afresh
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


def _compare(trainer, batch, backend="torch", **knobs):
    saved = {k: getattr(trainer.args if k in _ARGS else trainer, k) for k in knobs}
    for key, value in knobs.items():
        setattr(trainer.args if key in _ARGS else trainer, key, value)
    try:
        calls = _head_calls(trainer)
        base = _step(trainer, batch)
        assert calls, "TRL's own step should call the LM head"
        calls.clear()
        apply(trainer, backend=backend)  # the one-line switch routes it to legacy_apply
        fused = _step(trainer, batch)
        assert not calls, "the switched step formed logits"
    finally:
        for method in ("concatenated_forward", "forward"):  # back to the class's own methods
            vars(trainer).pop(method, None)
        for key, value in saved.items():
            setattr(trainer.args if key in _ARGS else trainer, key, value)
        for model in _models(trainer):
            model.get_output_embeddings()._forward_hooks.clear()
    (base_loss, base_metrics, base_grads), (loss, metrics, grads) = base, fused
    torch.testing.assert_close(loss, base_loss, rtol=RTOL, atol=ATOL)
    assert metrics.keys() == base_metrics.keys()
    for key in base_metrics:
        assert metrics[key] == pytest.approx(base_metrics[key], rel=RTOL, abs=ATOL, nan_ok=True), key
    assert grads.keys() == base_grads.keys() and base_grads
    for name, base_grad in base_grads.items():  # float32 rounding, scaled by the tensor's largest entry
        torch.testing.assert_close(grads[name], base_grad, rtol=1e-4, atol=1e-5 * base_grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    return base_metrics


LOSSES = ["sigmoid", "ipo", "hinge", "robust", "exo_pair", "bco_pair", "sppo_hard", "nca_pair", "aot", "aot_pair",
          "apo_zero", "apo_down", "discopop", "sft"]


@pytest.mark.parametrize("loss_type", LOSSES)
def test_loss_types_match_trl(trainer, batch, loss_type):
    metrics = _compare(trainer, batch, loss_type=[loss_type])
    assert abs(metrics["rewards/margins"]) > 1e-3
    assert ("nll_loss" in metrics) == (loss_type == "sft")


CASES = {
    "rpo_alpha": dict(rpo_alpha=0.5),
    "ld_alpha": dict(ld_alpha=0.4),
    "wpo": dict(use_weighting=True),
    "logits_to_keep": dict(use_logits_to_keep=True, rpo_alpha=1.0),
    "padding_free": dict(padding_free=True, rpo_alpha=0.5),
    "keep_start": dict(max_length=7, truncation_mode="keep_start"),
    "keep_end": dict(max_length=7, truncation_mode="keep_end", loss_type=["ipo"]),
    "weighted_mix": dict(loss_type=["sigmoid", "sft", "ipo"], loss_weights=[1.0, 0.5, 0.3]),
}


@pytest.mark.parametrize("case", CASES)
def test_options_match_trl(trainer, batch, case):
    metrics = _compare(trainer, batch, **CASES[case])
    assert ("nll_loss" in metrics) == (case in ("rpo_alpha", "logits_to_keep", "padding_free", "weighted_mix"))


def test_empty_prompt_row_matches_trl(trainer, batch):
    """A row whose first token is a completion token: TRL's roll scores its last position against
    token 0; that score enters the mean logits, WPO and LD-DPO sums but not the log-prob sums."""
    odd = dict(batch, prompt_attention_mask=batch["prompt_attention_mask"].clone())
    odd["prompt_attention_mask"][1] = 0
    _compare(trainer, odd, use_weighting=True, ld_alpha=0.4, rpo_alpha=0.5)


def test_triton_kernels_match_trl(trainer, batch):
    _compare(trainer, batch, backend="triton", rpo_alpha=0.5)


def test_training_logs_match_trl(tmp_path):
    """Two optimizer steps through Trainer.train (accelerate prepares the switched model)."""
    from trl import DPOConfig, DPOTrainer

    def run(name, switch):
        args = DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=2,
                         learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         bf16=False, seed=0, data_seed=0, rpo_alpha=0.5)
        torch.manual_seed(0)
        made = DPOTrainer(model=tiny_model(), args=args, processing_class=tiny_tokenizer(),
                          train_dataset=datasets.Dataset.from_list(preference_rows(4)))
        return train_logs(legacy_apply(made, backend="torch") if switch else made)

    assert_logs_match(run("base", False), run("fused", True), 3, "nll_loss")


@pytest.mark.parametrize("setting, match", [(dict(aux_loss_enabled=True), "router auxiliary loss"),
                                            (dict(is_encoder_decoder=True), "encoder-decoder"),
                                            (dict(use_weighting=True, padding_free=True), "padding_free")])
def test_refuses_what_it_cannot_reproduce(trainer, setting, match):
    saved = {k: getattr(trainer, k) for k in setting}
    vars(trainer).update(setting)
    try:
        with pytest.raises(ValueError, match=match):
            legacy_apply(trainer)
    finally:
        vars(trainer).update(saved)
    assert "concatenated_forward" not in vars(trainer)


def test_refuses_vision_batches_and_other_layouts(trainer, batch):
    legacy_apply(trainer, backend="torch")
    try:
        with pytest.raises(ValueError, match="pixel_values"):
            trainer.concatenated_forward(trainer.model, dict(batch, pixel_values=torch.zeros(4, 3, 2, 2)))
    finally:
        vars(trainer).pop("concatenated_forward")
    with pytest.raises(TypeError, match="concatenated_forward"):
        legacy_apply(object())
    assert not is_legacy_trainer(object())


def test_subclass_that_redefines_the_method_is_not_switched(trainer):
    """A subclass keeping TRL's concatenated_forward has the layout; one redefining it (as
    LLaMA-Factory's CustomDPOTrainer does, on its own batch keys) does not, and is refused by name."""
    keeps = type("Keeps", (trl.DPOTrainer,), {})
    redefines = type("Redefines", (trl.DPOTrainer,), {"concatenated_forward": lambda self, model, batch,
                                                      is_ref_model=False: {}})
    assert is_legacy_trainer(keeps) and not is_legacy_trainer(redefines)
    original = type(trainer)
    trainer.__class__ = redefines
    try:
        with pytest.raises(TypeError, match="redefines TRL's concatenated_forward"):
            legacy_apply(trainer)
    finally:
        trainer.__class__ = original
    assert "concatenated_forward" not in vars(trainer)


@pytest.fixture(scope="module")
def kto_trainer(tmp_path_factory):
    from trl import KTOConfig, KTOTrainer

    rows = [dict(prompt=r["prompt"], completion=r[side], label=side == "chosen")
            for r in preference_rows(3) for side in ("chosen", "rejected")]
    args = KTOConfig(output_dir=str(tmp_path_factory.mktemp("kto")), per_device_train_batch_size=6, max_steps=1,
                     report_to=[], use_cpu=True, save_strategy="no", bf16=False, seed=0, beta=0.2)
    torch.manual_seed(0)
    return _moved_off_reference(KTOTrainer(model=tiny_model(), args=args, processing_class=tiny_tokenizer(),
                                           train_dataset=datasets.Dataset.from_list(rows)))


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
def test_kto_matches_trl(kto_trainer, loss_type):
    """KTOTrainer.forward: completion and KL log-probs; the logits/*_sum metrics from the head's
    column sums instead of the logits."""
    batch = next(iter(kto_trainer.get_train_dataloader()))
    kto_trainer.calculate_KL = loss_type == "kto"  # as KTOTrainer.__init__ sets it for each loss type
    metrics = _compare(kto_trainer, batch, loss_type=loss_type)
    assert {"logits/chosen_sum", "logits/rejected_sum", "logps/chosen_sum"} <= metrics.keys()
    # The KL completions' log-probs themselves (the "kl" metric is clamped at 0, so it can hide them).
    with torch.no_grad():
        base = type(kto_trainer).forward(kto_trainer, kto_trainer.model, batch)
        legacy_apply(kto_trainer, backend="torch")
        try:
            fused = kto_trainer.forward(kto_trainer.model, batch)
        finally:
            vars(kto_trainer).pop("forward")
    for got, want in zip(fused[:2] + fused[4:], base[:2] + base[4:]):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)
    assert (base[4] is None) == (loss_type != "kto")


def test_peft_lora_head_matches_trl(tmp_path):
    """PEFT: no reference model (the adapter-disabled policy is the reference, through the same
    path) and a LoRA adapter on the LM head (its delta enters as extra head columns)."""
    made = peft_dpo_trainer(tmp_path, rpo_alpha=0.5)
    metrics = _compare(made, next(iter(made.get_train_dataloader())))
    assert abs(metrics["rewards/margins"]) > 1e-3


def test_kto_refuses_a_softcapped_head(kto_trainer):
    """The logits/*_sum metrics come from the head's column sums, exact only for a linear head."""
    batch = next(iter(kto_trainer.get_train_dataloader()))
    config = kto_trainer.model.config
    legacy_apply(kto_trainer, backend="torch")
    config.final_logit_softcapping = 30.0  # what lm_head_transform reads (Gemma 2/3)
    try:
        with pytest.raises(ValueError, match="softcap"):
            kto_trainer.forward(kto_trainer.model, batch)
    finally:
        del config.final_logit_softcapping
        vars(kto_trainer).pop("forward")
