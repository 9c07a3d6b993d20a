"""LLaMA-Factory: switch its DPO and KTO trainers to pyfused_po's fused-linear path.

LLaMA-Factory 0.9.x (which pins ``trl>=0.18,<=0.24``) trains preference stages with its own
``CustomDPOTrainer`` (``stage: dpo``, every ``pref_loss``: sigmoid, hinge, ipo, kto_pair, orpo,
simpo, with ``ld_alpha``, ``pref_ftx``, ``pref_bco_weight``) and ``CustomKTOTrainer``
(``stage: kto``).  Both subclass TRL's trainers but compute the log-probs themselves, from
``model(**batch).logits.float()`` over every row and position.  :func:`apply` replaces that
method on the trainer instance (``concatenated_forward`` / ``forward``) by one returning the same
values from :func:`pyfused_po.linear_token_logprobs` (:mod:`.llamafactory_forward` states the
contract): no ``[rows, seq, vocab]`` logits, none for prompt or padding positions.  The losses
and metrics stay LLaMA-Factory's.

Two ways to switch it on:

* on a trainer you built: ``pyfused_po.integrations.llamafactory.apply(trainer)``, before ``train()``;
* for ``llamafactory-cli``-style runs, a launcher script calling :func:`enable` before
  LLaMA-Factory builds its trainer::

      from pyfused_po.integrations import llamafactory
      llamafactory.enable()            # every CustomDPOTrainer / CustomKTOTrainer built from now on
      from llamafactory.train.tuner import run_exp
      run_exp()                        # python launch.py my_dpo.yaml  (or torchrun ... launch.py my_dpo.yaml)

Refused by name: encoder-decoder models, vision-language batches, a logit softcap (the
``logits/*`` metrics use a linear head's column sums), a subclass that redefines the method.
"""
import importlib

from .llamafactory_forward import dpo_concatenated_forward, kto_forward
from .trl_legacy_head import replace_method

__all__ = ["TRAINERS", "apply", "enable", "is_llamafactory_trainer"]

# (module, class) of the trainers switched; the method each computes its log-probs in; its replacement.
TRAINERS = {
    "dpo": ("llamafactory.train.dpo.trainer", "CustomDPOTrainer", "concatenated_forward", dpo_concatenated_forward),
    "kto": ("llamafactory.train.kto.trainer", "CustomKTOTrainer", "forward", kto_forward),
}
# Attributes each replacement reads, as LLaMA-Factory 0.9.x's __init__ sets them.
_STATE = {"dpo": ("finetuning_args", "loss_type", "ld_alpha", "is_encoder_decoder"),
          "kto": ("is_encoder_decoder",)}
_WHO = "pyfused_po.integrations.llamafactory"


def _defining_module(cls, name):
    """The module of the class in ``cls``'s MRO that defines ``name`` (``""`` if none does)."""
    for klass in cls.__mro__:
        if name in vars(klass):
            return getattr(klass, "__module__", "") or ""
    return ""


def _stage(trainer):
    """``"dpo"`` / ``"kto"`` when ``trainer`` (an instance or a class) is, or subclasses without
    redefining the method, LLaMA-Factory's trainer of that stage; ``None`` otherwise."""
    cls = trainer if isinstance(trainer, type) else type(trainer)
    for stage, (module, name, method, _) in TRAINERS.items():
        if any(k.__name__ == name and k.__module__ == module for k in cls.__mro__) and \
                _defining_module(cls, method) == module:
            return stage
    return None


def is_llamafactory_trainer(trainer):
    """True when ``trainer`` (an instance or a class) is LLaMA-Factory's ``CustomDPOTrainer`` or
    ``CustomKTOTrainer``, or a subclass keeping its log-prob method."""
    return _stage(trainer) is not None


def _checked_stage(trainer):
    name = type(trainer).__name__
    stage = _stage(trainer)
    if stage is None:
        known = ", ".join(f"{module}.{cls}" for module, cls, _, _ in TRAINERS.values())
        raise TypeError(f"{_WHO}.apply switches LLaMA-Factory's {known} (or a subclass that keeps their "
                        f"log-prob method); {name} is neither")
    missing = [a for a in _STATE[stage] if not hasattr(trainer, a)]
    if missing:
        raise TypeError(f"{name} lacks {missing}, which LLaMA-Factory 0.9's trainer sets; its layout is unknown "
                        f"to {_WHO}")
    if trainer.is_encoder_decoder:
        raise ValueError(f"{_WHO} cannot reproduce {name}'s step on an encoder-decoder model "
                         "(is_encoder_decoder=True); leave this trainer unswitched")
    return stage


def apply(trainer, *, backend="auto", linear_impl="auto"):
    """Switch a LLaMA-Factory ``CustomDPOTrainer`` / ``CustomKTOTrainer``: its policy, its reference
    model (with LoRA and no reference model the adapter-disabled policy goes through the same path)
    and every later call of its log-prob method (training, evaluation, reference log-probs).
    ``backend`` / ``linear_impl``: as :func:`pyfused_po.linear_token_logprobs`.  Returns the trainer.
    Raises ``TypeError`` for another trainer, ``ValueError`` for a model it cannot reproduce."""
    stage = _checked_stage(trainer)
    _, _, method, replacement = TRAINERS[stage]
    return replace_method(trainer, method, replacement, backend=backend, impl=linear_impl)


def enable(*, backend="auto", linear_impl="auto"):
    """Make every ``CustomDPOTrainer`` / ``CustomKTOTrainer`` that LLaMA-Factory builds from now on
    call :func:`apply` at the end of its construction (its workflows import the class from its
    module when they run, so this takes effect for ``llamafactory.train.tuner.run_exp``).  Each
    module attribute is replaced by a subclass of the same name; calling again replaces the
    options.  Returns the classes now in place, by stage."""
    options = dict(backend=backend, linear_impl=linear_impl)
    switched = {}
    for stage, (module_name, name, _, _) in TRAINERS.items():
        module = importlib.import_module(module_name)
        current = getattr(module, name)
        if getattr(current, "_pyfused_po_options", None) is not None:
            current._pyfused_po_options = options
            switched[stage] = current
            continue

        cls = _switched_class(current, options)
        setattr(module, name, cls)
        switched[stage] = cls
    return switched


def _switched_class(base, options):
    """A subclass of ``base`` with its name and module whose ``__init__`` ends with :func:`apply`."""

    def __init__(self, *args, **kwargs):
        base.__init__(self, *args, **kwargs)
        apply(self, **type(self)._pyfused_po_options)

    return type(base.__name__, (base,), {"__init__": __init__, "__module__": base.__module__,
                                          "__qualname__": base.__qualname__, "_pyfused_po_options": options})
