"""``pyfused_po.integrations.axolotl.PyfusedPOPlugin`` through axolotl's plugin hooks.

Where axolotl's ``axolotl.integrations.base`` imports (axolotl 0.19's wheel ``--no-deps`` and
``addict`` on ``PYTHONPATH``, as .ci/run installs them), the plugin is loaded by its dotted name
through axolotl's own ``PluginManager`` and must subclass its ``BasePlugin``; elsewhere it is the
duck-typed class and its hooks are called directly.  The trainers are the installed TRL's own
``DPOTrainer`` / ``KTOTrainer`` / ``CPOTrainer`` (axolotl's ``AxolotlDPOTrainer`` /
``AxolotlKTOTrainer`` / ``AxolotlCPOTrainer`` subclass them without touching how they score tokens;
axolotl's trainer modules need numba and more, so they are not imported here; ORPO's parity is in
tests/test_integration_trl_orpo_cpo.py).  TRL >= 1.15 or 0.24: whatever routing ``integrations.trl.apply``
has for the installed TRL is what the plugin gets; TRL 1.9 (axolotl 0.19's pin) is not installed here.
Each run compares one step's loss and gradients with the plain trainer's.
"""
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
import torch  # noqa: E402

from _hf_tiny import preference_rows, tiny_model, tiny_tokenizer  # noqa: E402
from _trl_odds_ratio import odds_ratio_trainer  # noqa: E402

from pyfused_po.integrations.axolotl import PyfusedPOPlugin  # noqa: E402

try:
    from axolotl.integrations.base import BasePlugin, PluginManager
    from axolotl.utils.dict import DictDefault
except ImportError:
    BasePlugin = PluginManager = None
    DictDefault = dict
    if os.environ.get("PYFUSED_PO_REQUIRE_AXOLOTL"):  # CI's axolotl step: a fallback would hide a failure
        raise

NAME = "pyfused_po.integrations.axolotl.PyfusedPOPlugin"


@pytest.fixture
def plugin():
    """The plugin as axolotl gets it: loaded by its dotted name through the PluginManager when
    axolotl is present, else the class itself."""
    if PluginManager is None:
        yield PyfusedPOPlugin()
        return
    manager = PluginManager.get_instance()
    manager.register(NAME)
    try:
        yield manager
    finally:
        manager.plugins.pop(NAME, None)


def test_base_class():
    if BasePlugin is None:
        assert PyfusedPOPlugin.__mro__[1:] == (object,)
    else:
        assert issubclass(PyfusedPOPlugin, BasePlugin)
        manager = PluginManager.get_instance()
        manager.register(NAME)
        try:
            assert isinstance(manager.plugins[NAME], PyfusedPOPlugin)
        finally:
            manager.plugins.pop(NAME)


class _RLType(str):
    """Stands for axolotl's ``RLType`` (a str enum whose ``.value`` is the YAML word)."""

    @property
    def value(self):
        return str(self)


@pytest.mark.parametrize("rl, match", [(None, "SFT trainer"), ("grpo", "does not compute")])
def test_refuses_runs_it_cannot_switch(plugin, rl, match):
    with pytest.raises(ValueError, match=match) as info:
        plugin.pre_model_load(DictDefault(rl=rl))
    assert "Remove the plugin" in str(info.value)
    for accepted in ("dpo", "ipo", "kto", "orpo", "simpo", _RLType("dpo")):
        plugin.pre_model_load(DictDefault(rl=accepted))


def _dpo(tmp_path, name):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     use_cpu=True, save_strategy="no", bf16=False, seed=0, beta=0.2, loss_type=["ipo"])
    return DPOTrainer(model=tiny_model(1), ref_model=tiny_model(), args=args, processing_class=tiny_tokenizer(),
                      train_dataset=datasets.Dataset.from_list(preference_rows(4)))


def _kto(tmp_path, name):
    from trl import KTOConfig, KTOTrainer

    rows = [dict(prompt=r["prompt"], completion=r[side], label=side == "chosen")
            for r in preference_rows(2) for side in ("chosen", "rejected")]
    args = KTOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     use_cpu=True, save_strategy="no", bf16=False, seed=0, beta=0.2)
    return KTOTrainer(model=tiny_model(1), ref_model=tiny_model(), args=args, processing_class=tiny_tokenizer(),
                      train_dataset=datasets.Dataset.from_list(rows))


def _simpo(tmp_path, name):
    """axolotl's rl: simpo builds a CPOTrainer subclass with loss_type="simpo"."""
    return odds_ratio_trainer(tmp_path / name, "CPO", loss_type="simpo", cpo_alpha=0.5)


def _loss_and_grads(trainer):
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}


def _is_switched(trainer):
    """apply() acted: a replaced trainer method (TRL 0.24) or pyfused_po's forward on the model (TRL >= 1.15)."""
    from pyfused_po.integrations.trl_head import head_owner
    from pyfused_po.integrations.trl_patch_state import PATCH_MARK

    replaced = {"concatenated_forward", "forward"} & set(vars(trainer))
    return bool(replaced) or PATCH_MARK in vars(head_owner(trainer.model))


@pytest.mark.slow
@pytest.mark.parametrize("rl, build", [("ipo", _dpo), ("kto", _kto), ("simpo", _simpo)])
def test_run_is_switched(tmp_path, plugin, rl, build):
    cfg = DictDefault(rl=rl)
    plugin.pre_model_load(cfg)
    base, fused = build(tmp_path, "base"), build(tmp_path, "fused")
    plugin.post_trainer_create(cfg, fused)
    assert _is_switched(fused) and not _is_switched(base)
    (base_loss, base_grads), (loss, grads) = _loss_and_grads(base), _loss_and_grads(fused)
    torch.testing.assert_close(loss, base_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == base_grads.keys() and grads
    for name, g in base_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-4, atol=1e-5 * g.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")
