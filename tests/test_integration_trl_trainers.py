"""TRL's SFT, GRPO and RLOO trainers with and without ``pyfused_po.integrations.trl.apply``.

Two optimizer steps on a tiny random Llama, all local.  Every logged value (loss, grad_norm,
entropy, mean_token_accuracy, num_tokens, rewards, kl, clip ratios, ...) must match the
trainer's own fused-LM-head path; only wall-clock entries may differ.  GRPO/RLOO sample at
temperature 0.7 and score with it (policy and reference), with a KL term (beta > 0) so the
reference model's head is switched too; their completions come from the same seeded sampler
in both runs.  The torch backend keeps these fast (the Triton path is covered by the DPO/KTO
parity tests); TRL's chunked path differs from it by float32 rounding only.  float32 (these
configs default to bf16 autocast): TRL 1.15 runs its Triton kernel on the CPU under the
interpreter, whose bf16 dot is wrong, so its bf16 numbers are no reference (TRL 1.16 folds in torch).
"""
import math
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
import torch  # noqa: E402

from _hf_tiny import preference_rows, tiny_model, tiny_tokenizer  # noqa: E402

pfi = pytest.importorskip("pyfused_po.integrations.trl")

RTOL, ATOL = 1e-4, 1e-5
_TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "step_time"}


def _logs(trainer):
    from transformers import set_seed

    set_seed(0)  # the same sampled completions in both runs, whatever ran in between
    trainer.train()
    return [{k: v for k, v in row.items() if k not in _TIMING} for row in trainer.state.log_history]


def _assert_same_logs(base, fused, expected_keys=()):
    assert len(base) == len(fused) == 3  # two steps and the summary
    assert set(expected_keys) <= set(base[0])
    for b, f in zip(base, fused):
        assert b.keys() == f.keys()
        for key in b:
            assert math.isclose(b[key], f[key], rel_tol=RTOL, abs_tol=ATOL), (key, b[key], f[key])


def _switched(trainer, **settings):
    """apply() kept TRL's settings on every model TRL gave a fused head."""
    kept = {name: pfi.trl_head_settings(model) for name, model in (("model", trainer.model),
                                                                   ("ref_model", getattr(trainer, "ref_model", None)))
            if model is not None}
    pfi.apply(trainer, backend="torch")
    for name, before in kept.items():
        after = pfi.trl_head_settings(getattr(trainer, name))
        assert after == before, (name, before, after)
        assert "_pyfused_po_fused_forward" in vars(pfi.head_owner(getattr(trainer, name)))
    for key, value in settings.items():
        assert kept["model"][key] == value
    return trainer


@pytest.mark.parametrize("mode", ["packing", "padding_free"])
def test_sft_matches_trl(tmp_path, mode):
    """packing (bfd: one padding-free row with position_ids / cu_seq_lens) and padding_free
    without packing; TRL masks the label at every document start, the fused head sees it."""
    from trl import SFTConfig, SFTTrainer

    extra = dict(packing=True, max_length=24) if mode == "packing" else dict(padding_free=True, max_length=None)
    rows = [dict(prompt=r["prompt"], completion=r["chosen"]) for r in preference_rows(8)]

    def make(name):
        args = SFTConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=2,
                         learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         seed=0, data_seed=0, bf16=False, **extra)
        torch.manual_seed(0)
        return SFTTrainer(model=tiny_model(), args=args, processing_class=tiny_tokenizer(),
                          train_dataset=datasets.Dataset.from_list(rows))

    base, fused = make("base"), _switched(make("fused"), outputs=("log_probs", "entropy", "is_top1"))
    batch = next(iter(fused.get_train_dataloader()))
    assert "position_ids" in batch and batch["input_ids"].shape[0] == 1  # padding-free rows reach the head
    _assert_same_logs(_logs(base), _logs(fused), ("loss", "entropy", "mean_token_accuracy", "num_tokens"))


def _reward(completions, **kwargs):
    return [float(len(c)) for c in completions]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """GRPO/RLOO load their reference model from the policy's path."""
    path = tmp_path_factory.mktemp("tiny") / "model"
    tiny_model().save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("kind", ["grpo", "rloo"])
def test_rl_trainers_match_trl(tmp_path, model_dir, kind):
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config, trainer_cls = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
    rows = [dict(prompt=r["prompt"]) for r in preference_rows(4)]

    def make(name):
        args = config(output_dir=str(tmp_path / name), per_device_train_batch_size=4, num_generations=2,
                      max_completion_length=4, max_steps=2, learning_rate=1e-2, logging_steps=1, report_to=[],
                      use_cpu=True, save_strategy="no", seed=0, data_seed=0, temperature=0.7, beta=0.1, bf16=False)
        torch.manual_seed(0)
        return trainer_cls(model=model_dir, reward_funcs=_reward, args=args, processing_class=tiny_tokenizer(),
                           train_dataset=datasets.Dataset.from_list(rows))

    base, fused = make("base"), _switched(make("fused"), temperature=0.7, outputs=("log_probs", "entropy"))
    assert pfi.trl_head_settings(fused.ref_model)["temperature"] == 0.7
    base_logs, fused_logs = _logs(base), _logs(fused)
    assert base_logs[1]["kl"] > 0  # step 2: the reference term is live
    _assert_same_logs(base_logs, fused_logs, ("loss", "entropy", "kl", "reward", "num_tokens"))
