"""axolotl: a plugin that switches its preference runs to pyfused_po.

In an axolotl YAML::

    rl: dpo            # or ipo, kto, orpo, simpo
    plugins:
      - pyfused_po.integrations.axolotl.PyfusedPOPlugin

axolotl loads the plugin by that dotted name and calls its hooks (``axolotl.integrations.base``,
``BasePlugin``).  Two are used:

* ``pre_model_load(cfg)``, before the model is loaded: a run this plugin cannot switch is
  refused there, by name, rather than after the model has loaded;
* ``post_trainer_create(cfg, trainer)``, on the built trainer: for ``rl: dpo | ipo | kto``
  :func:`pyfused_po.integrations.trl.apply`, which picks the switch from what the trainer class
  looks like (TRL >= 1.15's fused-LM-head protocol; TRL 0.24's ``concatenated_forward``; TRL 1.9 to
  1.14, axolotl 0.19's pin, as far as that routing covers them) and raises a named error for a
  layout it does not know; for ``rl: orpo | simpo`` :func:`.trl_orpo_cpo.switch`.

axolotl's ``rl: dpo`` and ``rl: ipo`` build ``AxolotlDPOTrainer`` (a ``trl.DPOTrainer``), ``rl: kto``
``AxolotlKTOTrainer`` (a ``trl.KTOTrainer``), ``rl: orpo`` / ``rl: simpo`` subclasses of TRL's
experimental ``ORPOTrainer`` / ``CPOTrainer``.  Runs without ``rl`` (axolotl's SFT trainer is a
Transformers ``Trainer``, not TRL's) and the online ones (``grpo``, ...) are refused.

axolotl is not a dependency: without it the plugin is a plain class with the same hooks.
"""
from .trl import apply
from .trl_orpo_cpo import is_orpo_cpo_trainer, switch

__all__ = ["PyfusedPOPlugin", "SWITCHED_RL"]

try:  # axolotl's base class when axolotl is installed; the hooks below are all the plugin needs
    from axolotl.integrations.base import BasePlugin as _Base
except ImportError:
    _Base = object

# axolotl's `rl:` values whose trainer pyfused_po switches (axolotl 0.19, utils/schemas/enums.RLType).
SWITCHED_RL = ("dpo", "ipo", "kto", "orpo", "simpo")


def _rl(cfg):
    """The run's ``rl`` value as a string (axolotl keeps an ``RLType`` str enum), or ``None``."""
    rl = cfg.get("rl") if hasattr(cfg, "get") else getattr(cfg, "rl", None)
    return None if rl is None else str(getattr(rl, "value", rl))


class PyfusedPOPlugin(_Base):
    """axolotl plugin: ``post_trainer_create`` switches the trainer of an ``rl: dpo | ipo | kto | orpo |
    simpo`` run; ``pre_model_load`` refuses other runs."""

    def pre_model_load(self, cfg):
        rl = _rl(cfg)
        if rl in SWITCHED_RL:
            return
        what = "axolotl's SFT trainer" if rl is None else "a trainer whose log-probs pyfused_po does not compute"
        raise ValueError(f"pyfused_po.integrations.axolotl.PyfusedPOPlugin switches axolotl runs with rl: "
                         f"{' | '.join(SWITCHED_RL)}; this config has rl: {rl} ({what}). Remove the plugin "
                         f"from `plugins:` for this run")

    def post_trainer_create(self, cfg, trainer):
        self.pre_model_load(cfg)  # a config changed after loading, or a caller skipping that hook
        if is_orpo_cpo_trainer(trainer):
            switch(trainer)
        else:
            apply(trainer)
