"""LLaMA-Factory 0.9.5's CustomDPOTrainer / CustomKTOTrainer, with and without
``pyfused_po.integrations.llamafactory.apply``.

Runs where LLaMA-Factory's trainer modules import: next to TRL 0.24 (its pin is
``trl>=0.18,<=0.24``, so TRL 0.24's environment, README "Older TRL (0.24)") with the
``llamafactory`` wheel and ``omegaconf`` installed ``--no-deps`` on ``PYTHONPATH`` (.ci/run does
this, with ``PYFUSED_PO_REQUIRE_LLAMAFACTORY=1`` so that a failed import fails); elsewhere the
module skips.  Two stand-ins, both outside what is compared: the version check
is off (``DISABLE_VERSION_CHECK=1``: LLaMA-Factory asks for ``datasets<=4``, TRL 0.24's
environment has 5.0.1), and where ``torchaudio`` is absent (no wheel exists for torch 2.13) an empty
module takes its name (LLaMA-Factory imports it at module level, for audio inputs only).

Each case builds the real trainer on a tiny random Llama (fp32), runs LLaMA-Factory's own
``get_batch_loss_metrics`` and the switched one on the same batch, and compares the loss, every
policy gradient and every logged metric.  The reference is LLaMA-Factory's step itself (logits
formed, ``get_batch_logps``); the switched step never calls an LM head.
"""
import importlib.util
import os
import sys
import types

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("DISABLE_VERSION_CHECK", "1")
pytest.importorskip("trl")
pytest.importorskip("transformers")
if importlib.util.find_spec("torchaudio") is None:  # after transformers has probed for it
    sys.modules.setdefault("torchaudio", types.ModuleType("torchaudio"))
try:
    from llamafactory.hparams import FinetuningArguments
    from llamafactory.train.dpo.trainer import CustomDPOTrainer
    from llamafactory.train.kto.trainer import CustomKTOTrainer
except ImportError as exc:  # absent, or TRL too new for it
    if os.environ.get("PYFUSED_PO_REQUIRE_LLAMAFACTORY"):  # CI's LLaMA-Factory step: a skip would hide a failure
        raise
    pytest.skip(f"LLaMA-Factory's trainers do not import here ({exc})", allow_module_level=True)
import torch  # noqa: E402

from _hf_tiny import tiny_model, tiny_tokenizer  # noqa: E402

from pyfused_po.integrations import llamafactory  # noqa: E402

pytestmark = pytest.mark.slow  # builds LLaMA-Factory trainers (its import alone takes ~10 s)
RTOL, ATOL = 1e-5, 1e-6
VOCAB = 61  # tiny_tokenizer's


def _args(tmp_path, **kw):
    from transformers import Seq2SeqTrainingArguments

    return Seq2SeqTrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, report_to=[],
                                    use_cpu=True, save_strategy="no", remove_unused_columns=False, seed=0, **kw)


def _moved(model, seed):
    """The policy moved off the reference so that rewards and margins are not 0."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p), alpha=0.3)
    return model


def _dpo_trainer(tmp_path, ref=True, peft_config=None, **finetuning):
    finetuning = dict(stage="dpo", pref_beta=0.2, **finetuning)
    model = _moved(tiny_model(), 1)
    if peft_config is not None:
        from peft import get_peft_model

        model = get_peft_model(model, peft_config)
    return CustomDPOTrainer(model=model, ref_model=tiny_model() if ref else None,
                            finetuning_args=FinetuningArguments(**finetuning), processor=None, args=_args(tmp_path),
                            tokenizer=tiny_tokenizer())


def _rows(n, lengths, seed):
    """``n`` rows of ``T = 10`` tokens: a prompt of ``p`` tokens (labels -100), a response up to
    ``lengths[i]``, right padding (attention 0, labels -100)."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, VOCAB, (n, 10), generator=g)
    attention_mask, labels = torch.ones_like(input_ids), input_ids.clone()
    for i, (prompt, end) in enumerate(lengths):
        labels[i, :prompt] = -100
        labels[i, end:], attention_mask[i, end:], input_ids[i, end:] = -100, 0, 0
    return input_ids, attention_mask, labels


def _pairs():
    """Two pairs ``[chosen; rejected]`` whose responses differ in length (LD-DPO's split matters)."""
    input_ids, attention_mask, labels = _rows(4, [(3, 10), (2, 7), (3, 6), (2, 10)], seed=0)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def _head_calls(trainer):
    calls = []
    for model in (trainer.model, trainer.ref_model):
        if model is not None:
            model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    return calls


def _step(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, dict(batch))
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


def _compare(trainer, batch, backend="torch"):
    """LLaMA-Factory's step, then the switched one: the same loss, metrics and gradients, no LM head call."""
    calls = _head_calls(trainer)
    base_loss, base_metrics, base_grads = _step(trainer, batch)
    assert calls, "LLaMA-Factory's own step should call the LM head"
    calls.clear()
    if hasattr(trainer, "running"):  # pref_bco_weight's running mean starts afresh for the second step
        from trl.trainer.utils import RunningMoments

        trainer.running = RunningMoments(trainer.accelerator)
    llamafactory.apply(trainer, backend=backend)
    loss, metrics, grads = _step(trainer, batch)
    assert not calls, "the switched step formed logits"
    torch.testing.assert_close(loss, base_loss, rtol=RTOL, atol=ATOL)
    assert metrics.keys() == base_metrics.keys()
    for key in base_metrics:
        assert metrics[key] == pytest.approx(base_metrics[key], rel=RTOL, abs=ATOL), key
    assert grads.keys() == base_grads.keys() and base_grads
    for name, base_grad in base_grads.items():
        torch.testing.assert_close(grads[name], base_grad, rtol=1e-4, atol=1e-5 * base_grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
    return base_metrics


DPO_CASES = {
    "sigmoid": dict(pref_loss="sigmoid"),
    "hinge": dict(pref_loss="hinge"),
    "ipo": dict(pref_loss="ipo"),
    "kto_pair": dict(pref_loss="kto_pair"),
    "orpo": dict(pref_loss="orpo"),
    "simpo": dict(pref_loss="simpo", simpo_gamma=0.3),
    "ld_alpha": dict(pref_loss="sigmoid", ld_alpha=0.4),
    "ftx_bco_smoothing": dict(pref_loss="sigmoid", pref_ftx=0.5, pref_bco_weight=0.3, dpo_label_smoothing=0.1),
}


@pytest.mark.parametrize("case", DPO_CASES)
def test_dpo_matches_llamafactory(tmp_path, case):
    options = DPO_CASES[case]
    trainer = _dpo_trainer(tmp_path, ref=options["pref_loss"] not in ("orpo", "simpo"), **options)
    metrics = _compare(trainer, _pairs())
    assert abs(metrics["logps/chosen"] - metrics["logps/rejected"]) > 1e-3
    assert ("odds_ratio_loss" in metrics) == (case == "orpo")


def test_ld_alpha_changes_the_policy_sums(tmp_path):
    """The case above is not vacuous: LD-DPO's weight reaches the policy's sums (the shorter
    response of each pair bounds the full-weight part) and not the reference's."""
    trainer = llamafactory.apply(_dpo_trainer(tmp_path, pref_loss="sigmoid", ld_alpha=0.4), backend="torch")
    with torch.no_grad():
        policy = trainer.concatenated_forward(trainer.model, _pairs())
        plain = trainer.concatenated_forward(trainer.model, _pairs(), is_ref_model=True)
    assert not torch.allclose(policy["chosen_logps"], plain["chosen_logps"])


def test_triton_kernels_match_llamafactory(tmp_path):
    _compare(_dpo_trainer(tmp_path, pref_loss="ipo", ld_alpha=0.5), _pairs(), backend="triton")


def test_peft_lora_head_matches_llamafactory(tmp_path):
    """LoRA without a reference model: LLaMA-Factory scores the reference with the adapter disabled,
    through the switched method too; the head's adapter enters as extra columns."""
    from peft import LoraConfig

    trainer = _dpo_trainer(tmp_path, ref=False, pref_loss="sigmoid", finetuning_type="lora",
                           peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    with torch.no_grad():  # LoRA's B starts at 0: move it so the adapter changes the scores
        for name, p in trainer.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p), alpha=0.3)
    metrics = _compare(trainer, _pairs())
    assert abs(metrics["rewards/margins"]) > 1e-3


def _kto_batch():
    input_ids, attention_mask, labels = _rows(4, [(3, 10), (2, 7), (3, 6), (2, 10)], seed=1)
    kl_ids, kl_mask, kl_labels = _rows(4, [(2, 9), (3, 10), (2, 8), (3, 7)], seed=2)
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, kl_input_ids=kl_ids,
                kl_attention_mask=kl_mask, kl_labels=kl_labels, kto_tags=torch.tensor([True, False, False, True]))


@pytest.mark.parametrize("ftx", [0.0, 0.5])
def test_kto_matches_llamafactory(tmp_path, ftx):
    trainer = CustomKTOTrainer(model=_moved(tiny_model(), 1), ref_model=tiny_model(),
                               finetuning_args=FinetuningArguments(stage="kto", pref_beta=0.2, pref_ftx=ftx),
                               processor=None, args=_args(tmp_path), tokenizer=tiny_tokenizer())
    batch = _kto_batch()
    metrics = _compare(trainer, batch)
    assert {"logits/chosen_sum", "logits/rejected_sum", "kl"} <= metrics.keys()
    # The KL completions' log-probs themselves (the "kl" metric is clamped at 0, so it can hide them).
    with torch.no_grad():
        fused = trainer.forward(trainer.model, batch, prefix="kl_")
        base = type(trainer).forward(trainer, trainer.model, batch, prefix="kl_")
    for got, want in zip(fused[1:], base[1:]):
        torch.testing.assert_close(got, want, rtol=RTOL, atol=ATOL)


def test_enable_switches_trainers_built_by_the_workflow(tmp_path, monkeypatch):
    """enable() makes the classes LLaMA-Factory's workflows import switch themselves; two optimizer
    steps through Trainer.train (accelerate prepares the switched model) log what the plain run logs."""
    import llamafactory.train.dpo.trainer as dpo_module
    import llamafactory.train.kto.trainer as kto_module

    monkeypatch.setattr(dpo_module, "CustomDPOTrainer", CustomDPOTrainer)
    monkeypatch.setattr(kto_module, "CustomKTOTrainer", CustomKTOTrainer)
    pairs = _pairs()

    def run(name, cls):
        def collate(pair_ids):  # pair i: chosen row i, rejected row 2 + i
            rows = list(pair_ids) + [2 + i for i in pair_ids]
            return {k: v[rows] for k, v in pairs.items()}

        trainer = cls(model=_moved(tiny_model(), 1), ref_model=tiny_model(), processor=None,
                      finetuning_args=FinetuningArguments(stage="dpo", pref_beta=0.2, pref_loss="sigmoid",
                                                          disable_shuffling=True),
                      args=_args(tmp_path / name, max_steps=2, learning_rate=1e-2, logging_steps=1),
                      tokenizer=tiny_tokenizer(), train_dataset=[0, 1, 1, 0], data_collator=collate)
        trainer.train()
        timing = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}
        return trainer, [{k: v for k, v in row.items() if k not in timing} for row in trainer.state.log_history]

    _, base = run("base", CustomDPOTrainer)
    switched = llamafactory.enable(backend="torch")
    assert dpo_module.CustomDPOTrainer is switched["dpo"] and kto_module.CustomKTOTrainer is switched["kto"]
    assert llamafactory.enable(backend="torch") == switched  # idempotent
    trainer, fused = run("fused", dpo_module.CustomDPOTrainer)
    assert "concatenated_forward" in vars(trainer)
    assert len(base) == len(fused) == 3 and "logits/chosen" in base[0]
    for b, f in zip(base, fused):
        assert b.keys() == f.keys()
        for key in b:
            assert f[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key


def test_refusals(tmp_path):
    trainer = _dpo_trainer(tmp_path, pref_loss="sigmoid")
    llamafactory.apply(trainer, backend="torch")
    with pytest.raises(ValueError, match="pixel_values"):
        trainer.concatenated_forward(trainer.model, dict(_pairs(), pixel_values=torch.zeros(4, 3, 2, 2)))
    config = trainer.model.config
    config.final_logit_softcapping = 30.0  # what lm_head_transform reads (Gemma 2/3)
    try:
        with pytest.raises(ValueError, match="softcap"):
            trainer.concatenated_forward(trainer.model, _pairs())
    finally:
        del config.final_logit_softcapping
    plain = _dpo_trainer(tmp_path, pref_loss="sigmoid")
    plain.is_encoder_decoder = True
    with pytest.raises(ValueError, match="encoder-decoder"):
        llamafactory.apply(plain)
    assert "concatenated_forward" not in vars(plain)
    with pytest.raises(TypeError, match="CustomDPOTrainer"):
        llamafactory.apply(object())
    redefines = type("Redefines", (CustomDPOTrainer,), {"concatenated_forward": lambda self, m, b, r=False: {}})
    keeps = type("Keeps", (CustomDPOTrainer,), {})
    assert llamafactory.is_llamafactory_trainer(keeps) and not llamafactory.is_llamafactory_trainer(redefines)
    assert llamafactory.is_llamafactory_trainer(CustomKTOTrainer)
