"""Work-counter section "trainers through apply()": one step of each TRL 1.16 trainer, with and
without pyfused_po's ``apply(trainer)``, on the tiny local Llama of ``tests/_hf_tiny.py``.

Counted per step (``compute_loss`` + ``backward`` on one prepared batch, the backbone included in
the peak but not in the GEMMs):

* **LM-head GEMM FLOPs**: every matmul-family op of :class:`~bench.work_counters.WorkCounter` with
  an operand dimension equal to the vocabulary V (the tiny backbone has none; a batch with V
  tokens in one dimension is refused, it would be ambiguous).
* **The floor** in units of one ``2·D·V`` GEMM per labelled token: 3 per labelled token of each
  forward that builds a graph (2 when the head is frozen), 1 per labelled token of each
  forward-only pass (the reference model, KTO's KL completions).
* **Peak live bytes** of the step, the counter's own method (every storage created in the step).

GRPO runs with β = 0 (no reference pass), RLOO has none in its loss (its KL enters the reward);
their sampler's GEMMs are not counted (the batch is generated and scored before the counted step).
Each trainer is built once: TRL's own step is counted, then ``apply(trainer)`` runs and the same
batch is counted again.
"""
import os
import sys
import tempfile
from pathlib import Path

import torch

from bench.work_counters import _MATMUL_OPS, WorkCounter, _matmul_operands

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")


class HeadGemmCounter(WorkCounter):
    """A :class:`WorkCounter` whose ``gemm_flops`` keep only the LM head's GEMMs: the matmuls with
    an operand dimension equal to ``vocab``."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab = vocab

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        before = self.gemm_flops
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if name in _MATMUL_OPS:
            a, b = _matmul_operands(name, args)
            if self.vocab not in tuple(a.shape) + tuple(b.shape):
                self.gemm_flops = before  # a backbone matmul
        return out


def _tiny():
    sys.path.insert(0, str(ROOT / "tests"))
    import _hf_tiny

    return _hf_tiny


def _count(trainer, inputs, vocab):
    """One compute_loss + backward on prepared ``inputs`` under a HeadGemmCounter."""
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    counter = HeadGemmCounter(vocab)
    with counter, trainer.accelerator.autocast():
        trainer.compute_loss(trainer.model, inputs).backward()
        grads = [p.grad for p in trainer.model.parameters() if p.grad is not None]  # part of the step
    del grads
    trainer.model.zero_grad(set_to_none=True)
    return counter


def _labelled(mask):
    """Labelled tokens of a ``[B, T]`` prompt+completion mask: the first position predicts nothing."""
    return int((mask[:, 1:] != 0).sum())


def _dpo(tmp, peft):
    import datasets
    from trl import DPOConfig, DPOTrainer

    h = _tiny()
    args = DPOConfig(output_dir=str(tmp / "dpo"), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", seed=0, data_seed=0, max_length=32)
    lora = None
    if peft:
        from peft import LoraConfig
        lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    torch.manual_seed(0)
    trainer = DPOTrainer(model=h.tiny_model(), ref_model=None if peft else h.tiny_model(), args=args,
                         processing_class=h.tiny_tokenizer(), peft_config=lora,
                         train_dataset=datasets.Dataset.from_list(h.preference_rows(4)))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    m = _labelled(inputs["completion_mask"])
    floor = (2 if peft else 3) * m + m  # the policy's graph-building forward + the reference pass
    return trainer, inputs, m, floor


def _kto(tmp):
    import datasets
    from trl import KTOConfig, KTOTrainer

    h = _tiny()
    rows = []
    for r in h.preference_rows(4, seed=1):
        rows += [dict(prompt=r["prompt"], completion=r["chosen"], label=True),
                 dict(prompt=r["prompt"], completion=r["rejected"], label=False)]
    args = KTOConfig(output_dir=str(tmp / "kto"), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", seed=0, data_seed=0, max_length=32)
    torch.manual_seed(0)
    trainer = KTOTrainer(model=h.tiny_model(), ref_model=h.tiny_model(1), args=args,
                         processing_class=h.tiny_tokenizer(), train_dataset=datasets.Dataset.from_list(rows))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    m = _labelled(inputs["completion_mask"])
    kl = _labelled(inputs["KL_completion_mask"]) if trainer.calculate_KL else 0
    return trainer, inputs, m, 3 * m + m + 2 * kl  # policy + reference; KL: forward-only on both


def _sft(tmp):
    import datasets
    from trl import SFTConfig, SFTTrainer

    h = _tiny()
    rows = [dict(prompt=r["prompt"], completion=r["chosen"]) for r in h.preference_rows(4)]
    args = SFTConfig(output_dir=str(tmp / "sft"), per_device_train_batch_size=4, max_steps=1, report_to=[],
                     use_cpu=True, bf16=False, save_strategy="no", seed=0, data_seed=0, max_length=32)
    torch.manual_seed(0)
    trainer = SFTTrainer(model=h.tiny_model(), args=args, processing_class=h.tiny_tokenizer(),
                         train_dataset=datasets.Dataset.from_list(rows))
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    m = int((inputs["labels"][:, 1:] != -100).sum())
    return trainer, inputs, m, 3 * m


def _reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


def _rl(tmp, kind):
    """A GRPOTrainer (β = 0) or RLOOTrainer and one prepared batch; the floor is 3 GEMMs per
    completion token (no reference pass in the loss: β = 0 for GRPO; RLOO's KL is in its reward)."""
    import datasets
    from transformers import set_seed
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config, trainer_cls = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
    h = _tiny()
    path = tmp / f"{kind}-model"
    h.tiny_model().save_pretrained(path)
    args = config(output_dir=str(tmp / kind), per_device_train_batch_size=4, num_generations=2,
                  max_completion_length=8, max_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                  seed=0, data_seed=0, beta=0.0, bf16=False)
    torch.manual_seed(0)
    trainer = trainer_cls(model=str(path), reward_funcs=_reward, args=args, processing_class=h.tiny_tokenizer(),
                          train_dataset=datasets.Dataset.from_list([dict(prompt=r["prompt"])
                                                                    for r in h.preference_rows(4)]))
    set_seed(0)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer.train(), read by the loss
    # Sampling and scoring happen here, outside the counted step (the sampler's GEMMs not counted).
    inputs = trainer._prepare_inputs(next(iter(trainer.get_train_dataloader())))
    m = int(inputs["completion_mask"].sum())  # completion ids are the labels themselves: no shift
    return trainer, inputs, m, 3 * m


TRAINERS = [
    ("DPOTrainer", "trainable", lambda tmp: _dpo(tmp, peft=False), ""),
    ("DPOTrainer + LoRA", "frozen", lambda tmp: _dpo(tmp, peft=True), ""),
    ("KTOTrainer", "trainable", _kto, ""),
    ("SFTTrainer", "trainable", _sft, ""),
    ("GRPOTrainer (β = 0)", "trainable", lambda tmp: _rl(tmp, "grpo"), ""),
    ("RLOOTrainer", "trainable", lambda tmp: _rl(tmp, "rloo"), ""),
]


def trainer_rows(shape=None, trainers=None):
    """Finished rows of the section (the format of ``work_counters.run``'s rows), two per trainer:
    TRL's own step and the same step after ``apply(trainer)``; each trainer is its own sub-section
    so that ``× TRL`` compares the two."""
    from pyfused_po.integrations.trl import apply

    rows = []
    with tempfile.TemporaryDirectory() as d:
        for label, head, build, note in trainers or TRAINERS:
            trainer, inputs, m, floor = build(Path(d))
            vocab, dim = trainer.model.get_output_embeddings().weight.shape
            sizes = {n for v in inputs.values() if torch.is_tensor(v) for n in v.shape}
            if vocab in sizes:
                raise ValueError(f"{label}: a batch dimension equals V={vocab}; head GEMMs would be ambiguous")
            unit = 2 * dim * vocab
            for method, switch in ((f"TRL 1.16 {label}, its own step", None),
                                   (f"pyfused_po apply({label.split(' ')[0]}){note}", apply)):
                if switch is not None:
                    switch(trainer, backend="torch")
                c = _count(trainer, inputs, vocab)
                rows.append(dict(section=f"apply(): {label}", method=method, head=head, labelled_tokens=m,
                                 gemm_flops=c.gemm_flops, gemms=c.gemm_flops / (unit * m),
                                 floor_gemms=floor / m, gemm_vs_floor=c.gemm_flops / (unit * floor),
                                 peak_bytes=c.peak_bytes, acc_bytes=0,
                                 mm_calls={k: v for k, v in sorted(c.ops.items()) if k in _MATMUL_OPS}))
            del trainer
    return rows

