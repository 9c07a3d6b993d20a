"""The TRL switch on the real SmolLM2-135M-Instruct (vocabulary 49,152, tied head).

* DPO: two optimizer steps (last block trainable) on two shipped pairs with and without ``apply()``; every logged
  metric matches TRL's own fused-LM-head path.
* GRPO-style scoring: per-token log-probs and entropy at temperature 0.7 (what GRPOTrainer /
  RLOOTrainer patch), from pyfused_po's head vs TRL's own, and both vs float64 logits.

The torch backend: the Triton interpreter is far too slow at this vocabulary on a CPU.  Real
model, so a few seconds each; skipped when the model package is not installed.
"""
import copy
import math
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
import torch  # noqa: E402

from pyfused_po.testing import smollm2  # noqa: E402

pfi = pytest.importorskip("pyfused_po.integrations.trl")

if smollm2.unavailable_reason():
    pytest.skip(smollm2.unavailable_reason(), allow_module_level=True)

_TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "epoch", "step"}


@pytest.fixture(scope="module")
def real():
    return smollm2.load()


def test_dpo_logged_metrics_match_trl_on_smollm2(real, tmp_path):
    from trl import DPOConfig, DPOTrainer

    model, tokenizer = real
    rows = smollm2.preference_pairs()[:2]

    def last_layer_trainable(m):
        # Only the last block trains (the tied head/embeddings frozen): the same parity check, a
        # fraction of the CPU time of a full 135M backward.
        m.requires_grad_(False)
        m.model.layers[-1].requires_grad_(True)
        return m

    def run(name, switch):
        args = DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=1, max_steps=2,
                         learning_rate=1e-5, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         seed=0, data_seed=0, max_length=40, bf16=False, gradient_checkpointing=False)
        trainer = DPOTrainer(model=last_layer_trainable(copy.deepcopy(model)), ref_model=copy.deepcopy(model),
                             args=args, processing_class=tokenizer, train_dataset=datasets.Dataset.from_list(rows))
        if switch:
            pfi.apply(trainer, backend="torch")
        trainer.train()
        return [{k: v for k, v in row.items() if k not in _TIMING} for row in trainer.state.log_history]

    base, fused = run("base", False), run("fused", True)
    assert len(base) == len(fused) == 3 and {"entropy", "mean_token_accuracy", "rewards/margins"} <= set(base[0])
    for b, f in zip(base, fused):
        assert b.keys() == f.keys()
        for key in b:
            assert math.isclose(b[key], f[key], rel_tol=1e-3, abs_tol=1e-4), (key, b[key], f[key])


def test_grpo_style_token_logprobs_on_smollm2(real):
    from trl.trainer.utils import add_fused_lm_head

    model, tokenizer = real
    ids, labels, mask = smollm2.pair_batch(tokenizer, smollm2.preference_pairs()[:1])
    policy = copy.deepcopy(model)
    add_fused_lm_head(policy, temperature=0.7, outputs=("log_probs", "entropy"))  # as GRPOTrainer does
    with torch.no_grad():
        trl_out = policy(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        pfi.apply(policy, backend="torch")
        out = policy(input_ids=ids, attention_mask=mask, labels=labels, fused_lm_head=True)
        logits = model(input_ids=ids, attention_mask=mask).logits.double()[:, :-1] / 0.7
    logp = torch.log_softmax(logits, -1)
    y = labels[:, 1:]
    valid = y != -100
    want = logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * valid
    want_entropy = -(logp.exp() * logp).sum(-1) * valid
    assert valid.sum() >= 10
    torch.testing.assert_close(out.log_probs.double(), want, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(out.entropy.double(), want_entropy, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(out.log_probs, trl_out.log_probs, rtol=1e-4, atol=2e-4)
    torch.testing.assert_close(out.entropy, trl_out.entropy, rtol=1e-4, atol=2e-4)
