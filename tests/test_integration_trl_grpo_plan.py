"""issue 24 item 2: ``apply(GRPOTrainer)`` / ``apply(RLOOTrainer)`` run the trainers' own losses on the
three-GEMM plan.  One step on a batch built as ``_prepare_inputs`` returns it (no generation): the
loss, the gradient of every trainable parameter and every metric ``_compute_loss`` logs equal the
trainer's own step (TRL 1.16's fused head, no pyfused_po), for each GRPO loss type, both
importance-sampling levels, clipping (ε_low ≠ ε_high, δ), β·KL (with and without the bias
correction), the off-policy mask and vLLM's importance-sampling ratio; and the LM head runs exactly
3 GEMMs per labelled token.  Configurations that do not separate keep TRL's loss, logged once.
Two logged training steps with generation: ``test_integration_trl_trainers.test_rl_trainers_match_trl``."""
import logging
import math
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
import torch  # noqa: E402

from _hf_tiny import preference_rows, tiny_model, tiny_tokenizer  # noqa: E402
from test_integration_trl_dpo_plan import _HeadFlops  # noqa: E402

pfi = pytest.importorskip("pyfused_po.integrations.trl")
pytestmark = pytest.mark.skipif(pfi.check_trl_version().split(".")[:2] != ["1", "16"],
                                reason="the plan reproduces TRL 1.16's GRPO / RLOO losses")
RTOL, ATOL = 1e-4, 1e-5
B, P, K = 4, 3, 6  # sequences, prompt and completion columns


def _reward(completions, **kwargs):
    return [0.0] * len(completions)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny-grpo") / "model"
    tiny_model().save_pretrained(path)
    return str(path)


def _trainer(tmp_path, model_dir, kind, name, **config):
    from trl import GRPOConfig, GRPOTrainer, RLOOConfig, RLOOTrainer

    config_cls, trainer_cls = (GRPOConfig, GRPOTrainer) if kind == "grpo" else (RLOOConfig, RLOOTrainer)
    config.setdefault("bf16", False)
    args = config_cls(output_dir=str(tmp_path / name), per_device_train_batch_size=B, num_generations=2,
                      max_completion_length=K, max_steps=1, report_to=[], use_cpu=True, save_strategy="no", seed=0,
                      data_seed=0, temperature=0.7, **config)
    torch.manual_seed(0)
    return trainer_cls(model=model_dir, reward_funcs=_reward, args=args, processing_class=tiny_tokenizer(),
                       train_dataset=datasets.Dataset.from_list([dict(prompt=r["prompt"]) for r in preference_rows(4)]))


@pytest.fixture(scope="module")
def grpo_pair(tmp_path_factory, model_dir):
    """TRL's own GRPOTrainer and one switched by apply(); cases change their settings on both."""
    tmp = tmp_path_factory.mktemp("grpo")
    base, fused = (_trainer(tmp, model_dir, "grpo", name, beta=0.1) for name in ("base", "fused"))
    return base, fused


def _batch(trainer, seed, *, tool_mask=False, old=True, k=K):
    """What GRPOTrainer._prepare_inputs returns, without generation: prompts (one left-padded),
    completions (two cut short by EOS padding), signed advantages, and old / reference / sampler
    log-probs within ±0.55 of the policy's own, so that ratios fall on both sides of the clip."""
    g = torch.Generator().manual_seed(seed)
    prompt_ids = torch.randint(3, 61, (B, P), generator=g)
    prompt_mask = torch.ones(B, P, dtype=torch.long)
    prompt_mask[0, 0] = 0
    completion_ids = torch.randint(3, 61, (B, k), generator=g)
    completion_mask = torch.ones(B, k, dtype=torch.long)
    completion_mask[1, 4:] = 0
    completion_mask[3, 2:] = 0
    with torch.no_grad():
        own, _, _ = trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([prompt_ids, completion_ids], 1), torch.cat([prompt_mask, completion_mask], 1), k)

    # Offsets from -0.5 to 0.5 in every row (rotated), so both clip sides are reached, plus jitter.
    spread = torch.linspace(-0.5, 0.5, k)
    spread = torch.stack([spread.roll(-2 * b) for b in range(B)])

    def near():
        return own + spread[:, torch.randperm(k, generator=g)] + 0.1 * (torch.rand(B, k, generator=g) - 0.5)

    batch = dict(prompt_ids=prompt_ids, prompt_mask=prompt_mask, completion_ids=completion_ids,
                 completion_mask=completion_mask, advantages=torch.tensor([1.0, -0.5, 0.7, -1.2]),
                 num_items_in_batch=completion_mask.sum() * 2, old_logps=(near() * completion_mask).sum(1),
                 ref_per_token_logps=near(), sampling_per_token_logps=near(),
                 importance_sampling_ratio=torch.rand(B, k, generator=g) + 0.5)
    if old:
        batch["old_per_token_logps"] = near()
    if tool_mask:
        batch["tool_mask"] = torch.ones(B, k, dtype=torch.long)
        batch["tool_mask"][0, 1:3] = 0
    return batch


def _step(trainer, batch, counter=None, accumulation=1):
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = accumulation  # set by Trainer.train(), read by the loss
    for values in trainer._metrics.values():
        values.clear()
    with counter if counter is not None else torch.enable_grad(), trainer.accelerator.autocast():
        loss = trainer.compute_loss(trainer.model, dict(batch))
        loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}
    return loss.detach(), grads, metrics


def _labelled(batch):
    return int(batch["completion_mask"].sum())


def _assert_same_step(base, fused, batch, *, accumulation=1, rtol=RTOL, atol=ATOL, grad_tol=1e-6):
    """One step of each: equal loss, gradients and metrics; the fused step's head runs 3 GEMMs per
    labelled token (the plan, not the staged fallback)."""
    weight = fused.model.get_output_embeddings().weight
    counter = _HeadFlops(weight.shape[0])
    loss, grads, metrics = _step(fused, batch, counter, accumulation)
    b_loss, b_grads, b_metrics = _step(base, batch, accumulation=accumulation)
    assert counter.flops == 3 * _labelled(batch) * 2 * weight.shape[0] * weight.shape[1]
    torch.testing.assert_close(loss, b_loss, rtol=rtol, atol=atol)
    assert grads.keys() == b_grads.keys() and grads
    for name, g in b_grads.items():
        scale = 1.0 if grad_tol < 1e-3 else float(g.abs().max())  # bf16: relative to the largest entry
        torch.testing.assert_close(grads[name], g, rtol=rtol, atol=grad_tol * scale, msg=name)
    assert float(b_grads["lm_head.weight"].abs().max()) > 1e-3  # the case has a gradient to compare
    assert metrics.keys() == b_metrics.keys()
    for key in b_metrics:
        same_nan = math.isnan(metrics[key]) and math.isnan(b_metrics[key])
        assert same_nan or math.isclose(metrics[key], b_metrics[key], rel_tol=rtol, abs_tol=atol), (
            key, metrics[key], b_metrics[key])
    return metrics


# (loss_type, importance_sampling_level, settings): every TRL 1.16 loss type, both levels, and each
# term that enters the gradient.  Settings prefixed "args." go to trainer.args, others to the trainer.
_CASES = [
    ("grpo", "token", {}),
    ("grpo", "sequence", {"epsilon_high": 0.28}),
    ("bnpo", "token", {"args.delta": 1.1, "epsilon_low": 0.1}),
    ("dr_grpo", "sequence", {"args.use_bias_correction_kl": True}),
    ("dapo", "token", {"use_vllm": True, "vllm_importance_sampling_correction": True}),
    ("luspo", "sequence", {"beta": 0.0}),
    ("cispo", "token", {"epsilon_high": 1.05}),
    ("sapo", "token", {}),
    ("vespo", "sequence", {"use_vllm": True, "vllm_importance_sampling_correction": True}),
    ("grpo", "token", {"off_policy_mask_threshold": 0.02}),
    ("bnpo", "sequence", {"old": False, "tool_mask": True}),
    ("dapo", "sequence", {"accumulation": 2, "args.steps_per_generation": 2}),
    # the entropy bonus: the plan differentiates the entropy too; adaptive, gated off then on
    ("grpo", "token", {"entropy_coef": 0.05, "accumulation": 2}),
    ("dr_grpo", "sequence", {"entropy_coef": 0.05, "use_adaptive_entropy": True}),
    ("bnpo", "token", {"entropy_coef": 0.05, "use_adaptive_entropy": True, "_last_world_entropy": 0.0}),
]


def _configure(trainer, loss_type, level, settings):
    defaults = {"beta": 0.1, "epsilon_low": 0.2, "epsilon_high": 0.2, "use_vllm": False,
                "vllm_importance_sampling_correction": False, "off_policy_mask_threshold": None,
                "entropy_coef": 0.0, "use_adaptive_entropy": False, "_last_world_entropy": float("inf"),
                "top_entropy_quantile": 1.0, "args.delta": None, "args.use_bias_correction_kl": False,
                "args.steps_per_generation": 1}
    trainer.loss_type, trainer.importance_sampling_level = loss_type, level
    for key, value in {**defaults, **{k: v for k, v in settings.items() if "." in k or hasattr(trainer, k)}}.items():
        target, name = (trainer.args, key[5:]) if key.startswith("args.") else (trainer, key)
        setattr(target, name, value)
    trainer._entropy_bonus_enabled = trainer.entropy_coef != 0.0 or trainer.use_adaptive_entropy  # as __init__
    trainer._entropy_window_stats = None


@pytest.mark.parametrize("loss_type, level, settings", _CASES,
                         ids=[f"{t}-{lvl}-{'-'.join(s) or 'plain'}" for t, lvl, s in _CASES])
def test_grpo_loss_types_match_trl_on_the_plan(grpo_pair, loss_type, level, settings):
    base, fused = grpo_pair
    for trainer in grpo_pair:
        _configure(trainer, loss_type, level, settings)
    pfi.apply(fused, backend="torch")  # decides afresh from the settings in force
    assert "_compute_loss" in vars(fused)
    batch = _batch(base, seed=len(loss_type) + len(settings), tool_mask=settings.get("tool_mask", False),
                   old=settings.get("old", True))
    metrics = _assert_same_step(base, fused, batch, accumulation=settings.get("accumulation", 1))
    assert "entropy" in metrics


def test_grpo_clipping_is_live_in_the_cases(grpo_pair):
    """The batches put ratios outside the clip range, so the clipped branches are compared."""
    base, fused = grpo_pair
    _configure(base, "grpo", "token", {})
    _configure(fused, "grpo", "token", {})
    pfi.apply(fused, backend="torch")
    metrics = _assert_same_step(base, fused, _batch(base, seed=4))
    assert metrics["clip_ratio/low_mean"] > 0 and metrics["clip_ratio/high_mean"] > 0 and metrics["kl"] > 0


def test_grpo_entropy_quantile_keeps_trl_loss_logged_once(grpo_pair, caplog):
    """A batch quantile of entropies (top_entropy_quantile < 1) does not separate: TRL's loss runs on
    the fused forward (4 GEMMs), its numbers unchanged, and apply() says why, once."""
    base, fused = grpo_pair
    for trainer in grpo_pair:
        _configure(trainer, "grpo", "token", {"top_entropy_quantile": 0.5, "entropy_coef": 0.05})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyfused_po"):
        pfi.apply(fused, backend="torch")
        pfi.apply(fused, backend="torch")
    records = [r for r in caplog.records if "top_entropy_quantile=0.5" in r.getMessage()]
    assert len(records) == 1 and "4 LM-head GEMMs" in records[0].getMessage()
    assert "_compute_loss" not in vars(fused)
    batch = _batch(base, seed=9)
    weight = fused.model.get_output_embeddings().weight
    counter = _HeadFlops(weight.shape[0])
    loss, grads, metrics = _step(fused, batch, counter)
    b_loss, b_grads, b_metrics = _step(base, batch)
    assert counter.flops > 3 * _labelled(batch) * 2 * weight.shape[0] * weight.shape[1]  # the staged path
    torch.testing.assert_close(loss, b_loss, rtol=RTOL, atol=ATOL)
    for name, g in b_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=RTOL, atol=1e-6, msg=name)
    assert metrics.keys() == b_metrics.keys()
    for key in b_metrics:
        assert math.isclose(metrics[key], b_metrics[key], rel_tol=RTOL, abs_tol=ATOL), key
    for trainer in grpo_pair:  # back to the separable default for the other tests
        _configure(trainer, "grpo", "token", {})


def test_grpo_completion_longer_than_a_chunk_falls_back_logged_once(grpo_pair, caplog, monkeypatch):
    """A completion with more labelled tokens than the plan's chunk (here 24 = D tokens, the staged
    budget shrunk to 4 tokens): the staged path runs (TRL's numbers), the reason is kept in
    ``trainer.fallback_reason`` and logged once however many steps."""
    from pyfused_po.token.torch_backend import linear

    base, fused = grpo_pair
    for trainer in grpo_pair:
        _configure(trainer, "grpo", "token", {})
    pfi.apply(fused, backend="torch")
    monkeypatch.setattr(linear, "CPU_CHUNK_ELEMENTS", 4 * fused.model.get_output_embeddings().weight.shape[0])
    batch = _batch(base, seed=11, k=30)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="pyfused_po"):
        for _ in range(2):
            loss, grads, metrics = _step(fused, batch)
    assert "longer than the three-GEMM chunk (24 tokens)" in fused.fallback_reason
    assert [r.getMessage() for r in caplog.records].count(f"GRPOTrainer: {fused.fallback_reason}") == 1
    b_loss, b_grads, b_metrics = _step(base, batch)
    torch.testing.assert_close(loss, b_loss, rtol=RTOL, atol=ATOL)
    for name, g in b_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=RTOL, atol=1e-6, msg=name)
    assert metrics.keys() == b_metrics.keys()
    monkeypatch.undo()
    _step(fused, _batch(base, seed=11))
    assert fused.fallback_reason is None  # the plan ran again


def test_grpo_eval_step_is_trl_loss_without_a_graph(grpo_pair):
    """prediction_step's no-grad call: the staged forward (no plan without a graph), TRL's loss and
    eval metrics (no accumulation divisor in eval)."""
    base, fused = grpo_pair
    for trainer in grpo_pair:
        _configure(trainer, "dr_grpo", "token", {"entropy_coef": 0.05})
    pfi.apply(fused, backend="torch")
    batch = _batch(base, seed=13)
    results = []
    for trainer in (fused, base):
        trainer.model.eval()
        trainer.current_gradient_accumulation_steps = 4  # not read in eval
        for values in trainer._metrics.values():
            values.clear()
        with torch.no_grad():
            loss = trainer.compute_loss(trainer.model, dict(batch))
        results.append((loss, {k: v[-1] for k, v in trainer._metrics["eval"].items() if v}))
        trainer.model.train()
    (loss, metrics), (b_loss, b_metrics) = results
    assert not loss.requires_grad
    torch.testing.assert_close(loss, b_loss, rtol=RTOL, atol=ATOL)
    assert metrics.keys() == b_metrics.keys() and "entropy" in metrics
    for key in b_metrics:
        assert math.isclose(metrics[key], b_metrics[key], rel_tol=RTOL, abs_tol=ATOL), key
    for trainer in grpo_pair:
        _configure(trainer, "grpo", "token", {})


def test_rloo_matches_trl_on_the_plan(tmp_path, model_dir):
    base, fused = (_trainer(tmp_path, model_dir, "rloo", name, beta=0.0, epsilon_high=0.25) for name in ("b", "f"))
    pfi.apply(fused, backend="torch")
    assert "_compute_loss" in vars(fused)
    batch = _batch(base, seed=3)
    metrics = _assert_same_step(base, fused, batch)
    assert {"entropy", "clip_ratio/low_mean", "clip_ratio/high_max", "clip_ratio/region_mean"} <= set(metrics)


def test_grpo_bf16_on_the_plan(tmp_path, model_dir):
    """bf16 autocast (TRL's default) compared loosely: the head's GEMMs run in bf16 in both paths."""
    base, fused = (_trainer(tmp_path, model_dir, "grpo", name, beta=0.1, bf16=True) for name in ("b", "f"))
    pfi.apply(fused, backend="torch")
    _assert_same_step(base, fused, _batch(base, seed=5), rtol=2e-2, atol=2e-2, grad_tol=2e-2)
