"""Checks shared by the tests of the TRL switches (every TRL layout): the LM-head GEMM counter and
the comparison of two ``Trainer.train`` runs' logs."""
import pytest
import torch


class HeadFlops(torch.utils._python_dispatch.TorchDispatchMode):
    """2·m·k·n of every mm / addmm / addmm_ / bmm / baddbmm with an operand dimension equal to ``vocab``."""

    OPERANDS = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.flops = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = self.OPERANDS.get(func.overloadpacket.__name__)
        if where is not None:
            a, b = args[where[0]], args[where[1]]
            if self.vocab in tuple(a.shape) + tuple(b.shape):
                self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        return func(*args, **(kwargs or {}))


_TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}


def train_logs(trainer):
    """``trainer.train()``'s log history without the timing entries."""
    trainer.train()
    return [{k: v for k, v in row.items() if k not in _TIMING} for row in trainer.state.log_history]


def assert_logs_match(base, fused, rows, metric, rel=1e-4, abs=1e-5):
    """Two runs' logs: ``rows`` entries each (``metric`` logged in the first), the same keys, the same
    values (to ``rel`` / ``abs``)."""
    assert len(base) == len(fused) == rows and metric in base[0]
    for b, f in zip(base, fused):
        assert b.keys() == f.keys()
        for key in b:
            assert f[key] == pytest.approx(b[key], rel=rel, abs=abs), (key, b[key], f[key])


def peft_dpo_trainer(output_dir, **config):
    """A ``DPOTrainer`` on the tiny Llama with a LoRA adapter (r = 4) on ``q_proj``, ``v_proj`` and
    ``lm_head`` and no reference model (the adapter-disabled policy is the reference); the adapter's
    ``B`` moved off 0 so it changes the scores.  ``config``: ``DPOConfig`` fields of the case."""
    import datasets
    from peft import LoraConfig
    from trl import DPOConfig, DPOTrainer

    from _hf_tiny import preference_rows, tiny_model, tiny_tokenizer

    args = DPOConfig(output_dir=str(output_dir), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     use_cpu=True, save_strategy="no", bf16=False, seed=0, **config)
    torch.manual_seed(0)
    made = DPOTrainer(model=tiny_model(), args=args, processing_class=tiny_tokenizer(),
                      train_dataset=datasets.Dataset.from_list(preference_rows(4)),
                      peft_config=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "lm_head"]))
    assert made.ref_model is None
    with torch.no_grad():
        for name, p in made.model.named_parameters():
            if "lora_B" in name:
                p.add_(torch.randn_like(p), alpha=0.3)
    return made
