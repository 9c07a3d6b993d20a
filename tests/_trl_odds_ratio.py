"""TRL's ORPOTrainer / CPOTrainer on the tiny local model, wherever the installed TRL keeps them
(``trl.experimental.orpo`` / ``.cpo`` in TRL 1.x, ``trl`` in 0.24)."""
import importlib

import pytest


def trainer_classes(name):
    """``(Trainer, Config)`` for ``name`` ``"ORPO"`` or ``"CPO"``; skips the test where TRL has neither."""
    for module in (f"trl.experimental.{name.lower()}", "trl"):
        try:
            found = importlib.import_module(module)
            return getattr(found, f"{name}Trainer"), getattr(found, f"{name}Config")
        except (ImportError, AttributeError):
            continue
    pytest.skip(f"this TRL has no {name}Trainer")


def odds_ratio_trainer(output_dir, name, **config):
    """A ``name`` trainer (``"ORPO"`` / ``"CPO"``) on a tiny random Llama and four preference rows, fp32."""
    import datasets

    from _hf_tiny import preference_rows, tiny_model, tiny_tokenizer

    trainer_cls, config_cls = trainer_classes(name)
    args = config_cls(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=1, report_to=[],
                      use_cpu=True, save_strategy="no", bf16=False, seed=0, beta=0.2, **config)
    return trainer_cls(model=tiny_model(1), args=args, processing_class=tiny_tokenizer(),
                       train_dataset=datasets.Dataset.from_list(preference_rows(4)))
