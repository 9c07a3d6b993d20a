"""TRL's ORPOTrainer / CPOTrainer (``trl.experimental`` in TRL 1.x, ``trl`` in 0.24) with and without
``pyfused_po.integrations.trl_orpo_cpo.switch`` (what axolotl's ``rl: orpo`` / ``rl: simpo`` run).

The installed TRL's own trainer is the reference: one batch of a tiny random Llama (fp32), its
``get_batch_loss_metrics`` before and after the switch on the same trainer: loss, every parameter
gradient and every logged metric; the switched step never calls the LM head.
"""
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
pytest.importorskip("datasets")
import torch  # noqa: E402

from _trl_odds_ratio import odds_ratio_trainer, trainer_classes  # noqa: E402

from pyfused_po.integrations.trl_orpo_cpo import is_orpo_cpo_trainer, switch  # noqa: E402

pytestmark = pytest.mark.slow  # builds TRL trainers
RTOL, ATOL = 1e-5, 1e-6


def _step(trainer, batch):
    trainer.model.zero_grad(set_to_none=True)
    loss, metrics = trainer.get_batch_loss_metrics(trainer.model, batch)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    return loss.detach(), metrics, grads


CASES = {"orpo": ("ORPO", {}), "simpo": ("CPO", dict(loss_type="simpo", cpo_alpha=0.0)),
         "simpo_nll": ("CPO", dict(loss_type="simpo", cpo_alpha=0.5)), "cpo_sigmoid": ("CPO", {}),
         "cpo_ipo": ("CPO", dict(loss_type="ipo"))}


@pytest.mark.parametrize("case", CASES)
def test_matches_trl(tmp_path, case):
    name, config = CASES[case]
    trainer = odds_ratio_trainer(tmp_path, name, **config)
    batch = next(iter(trainer.get_train_dataloader()))
    calls = []
    trainer.model.get_output_embeddings().register_forward_hook(lambda *a: calls.append(1))
    base_loss, base_metrics, base_grads = _step(trainer, batch)
    assert calls, "TRL's own step should call the LM head"
    calls.clear()
    assert is_orpo_cpo_trainer(trainer) and switch(trainer, backend="torch") is trainer
    loss, metrics, grads = _step(trainer, batch)
    assert not calls, "the switched step formed logits"
    torch.testing.assert_close(loss, base_loss, rtol=RTOL, atol=ATOL)
    assert metrics.keys() == base_metrics.keys() and "logits/chosen" in metrics
    for key in base_metrics:
        assert metrics[key] == pytest.approx(base_metrics[key], rel=RTOL, abs=ATOL), key
    assert grads.keys() == base_grads.keys() and base_grads
    for n, g in base_grads.items():
        torch.testing.assert_close(grads[n], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(), msg=lambda m: f"{n}: {m}")


def test_refusals(tmp_path):
    trainer = odds_ratio_trainer(tmp_path, "ORPO")
    trainer.aux_loss_enabled = True
    with pytest.raises(ValueError, match="router"):
        switch(trainer)
    assert "concatenated_forward" not in vars(trainer)
    trainer.aux_loss_enabled = False
    switch(trainer, backend="torch")
    batch = next(iter(trainer.get_train_dataloader()))
    labels = batch["chosen_labels"].clone()
    scored = labels != -100
    labels[scored] = (labels[scored] + 1) % trainer.model.config.vocab_size  # no longer the input tokens
    with pytest.raises(ValueError, match="two scorings"):
        trainer.concatenated_forward(trainer.model, dict(batch, chosen_labels=labels))
    with pytest.raises(TypeError, match="ORPOTrainer"):
        switch(object())
    trainer_cls, _ = trainer_classes("CPO")
    redefines = type("Redefines", (trainer_cls,), {"concatenated_forward": lambda self, model, batch: None})
    assert is_orpo_cpo_trainer(type("Keeps", (trainer_cls,), {})) and not is_orpo_cpo_trainer(redefines)


def test_apply_routes_orpo_and_cpo_to_their_switch(tmp_path):
    """The one-line switch takes ORPO / CPO trainers too (it used to raise TypeError for them)."""
    from pyfused_po.integrations.trl import apply

    trainer = odds_ratio_trainer(tmp_path, "ORPO")
    assert "concatenated_forward" not in vars(trainer)
    assert apply(trainer, backend="torch") is trainer
    assert "concatenated_forward" in vars(trainer)  # the switch's replacement, on the instance
