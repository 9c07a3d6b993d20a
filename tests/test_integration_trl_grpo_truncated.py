"""issue 28 item 1 (the TRL switch): ``apply(GRPOTrainer, truncated_support=True)`` scores the policy
under the distribution its sampler drew from (temperature, then the trainer's top-k / top-p), against
the float64 sort-based reference of ``tests/test_rl_truncated.py`` (which agrees with Hugging Face's
warpers); the reference model keeps the full softmax; the loss runs TRL's on that forward (the
three-GEMM plan scores the full softmax, so it is refused, logged); bad settings are refused by name."""
import logging
import math
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
import torch  # noqa: E402

from test_integration_trl_dpo_plan import _HeadFlops  # noqa: E402
from test_integration_trl_grpo_plan import B, P, _trainer  # noqa: E402
from test_rl_truncated import _reference  # noqa: E402

pfi = pytest.importorskip("pyfused_po.integrations.trl")
T, TOP_K, TOP_P, K = 0.7, 8, 0.9, 4


@pytest.fixture(scope="module")
def truncated(tmp_path_factory):
    from _hf_tiny import tiny_model

    tmp = tmp_path_factory.mktemp("grpo-truncated")
    tiny_model().save_pretrained(tmp / "model")
    return _trainer(tmp, str(tmp / "model"), "grpo", "t", beta=0.1, top_k=TOP_K, top_p=TOP_P)


def _greedy_batch(trainer):
    """Prompts and greedy completions (each token the argmax of its row: always in the kept set)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 61, (B, P), generator=g)
    with torch.no_grad():
        for _ in range(K):
            logits = trainer.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return ids


def _scored(model, ids, labels):
    with torch.no_grad():
        return model(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels, fused_lm_head=True)


def test_policy_log_probs_are_the_samplers_truncated_ones(truncated, caplog):
    with caplog.at_level(logging.WARNING, logger="pyfused_po"):
        pfi.apply(truncated, backend="torch", truncated_support=True)
    assert "_compute_loss" not in vars(truncated)  # the plan is refused, and says why
    assert any("truncated_support=True" in r.getMessage() for r in caplog.records)
    ids = _greedy_batch(truncated)
    labels = ids.clone()
    labels[:, :P] = -100
    labels[1, P] = 5  # one token that the sampler may not have kept: scored all the same
    with torch.no_grad():
        logits = truncated.model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].double()
        ref_logits = truncated.ref_model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[:, :-1].double()
    mask = labels[:, 1:] != -100
    rows, targets = logits[mask], labels[:, 1:][mask]
    want_logp, want_entropy, kept = _reference(rows, targets, T, top_k=TOP_K, top_p=TOP_P)
    assert (kept.sum(-1) < logits.shape[-1]).all()  # every row truncated
    out = _scored(truncated.model, ids, labels)
    torch.testing.assert_close(out.log_probs[mask].double(), want_logp, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy[mask].double(), want_entropy, rtol=1e-5, atol=1e-5)
    greedy = mask.clone()
    greedy[1, P - 1] = False
    assert torch.isfinite(out.log_probs[greedy]).all()  # greedy tokens are kept
    assert out.log_probs[1, P - 1] == -math.inf  # token 5 is outside that row's kept set: −inf
    # The reference model keeps the full softmax (TRL's KL compares full distributions).
    ref = _scored(truncated.ref_model, ids, labels)
    full = torch.log_softmax(ref_logits[mask] / T, -1).gather(-1, targets[:, None])[:, 0]
    torch.testing.assert_close(ref.log_probs[mask].double(), full, rtol=1e-5, atol=1e-5)


def test_grpo_step_on_the_truncated_forward(truncated):
    """A training step's loss and LM-head gradient are finite on greedy completions (all kept); the
    truncated path runs staged: 4 LM-head GEMMs per labelled token."""
    pfi.apply(truncated, backend="torch", truncated_support=True)
    ids = _greedy_batch(truncated)
    completion_mask = torch.ones(B, K, dtype=torch.long)
    batch = dict(prompt_ids=ids[:, :P], prompt_mask=torch.ones(B, P, dtype=torch.long), completion_ids=ids[:, P:],
                 completion_mask=completion_mask, advantages=torch.tensor([1.0, -0.5, 0.7, -1.2]),
                 num_items_in_batch=completion_mask.sum(), ref_per_token_logps=torch.full((B, K), -2.0))
    truncated.model.train()
    truncated.model.zero_grad(set_to_none=True)
    truncated.current_gradient_accumulation_steps = 1
    weight = truncated.model.get_output_embeddings().weight
    counter = _HeadFlops(weight.shape[0])
    with counter:
        loss = truncated.compute_loss(truncated.model, batch)
        loss.backward()
    assert counter.flops == 4 * B * K * 2 * weight.shape[0] * weight.shape[1], counter.flops
    grad = weight.grad
    assert math.isfinite(float(loss)) and grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0
    assert math.isfinite(truncated._metrics["train"]["entropy"][-1])


@pytest.mark.parametrize("setting, value, words", [
    ("top_k", 0, "does not truncate"),
    ("repetition_penalty", 1.2, "repetition_penalty=1.2"),
])
def test_samplers_pyfused_po_cannot_match_are_refused_by_name(truncated, setting, value, words):
    saved = getattr(truncated, setting)
    setattr(truncated, setting, value)
    if setting == "top_k":
        truncated.top_p = 1.0
    try:
        with pytest.raises(ValueError, match=words):
            pfi.apply(truncated, backend="torch", truncated_support=True)
    finally:
        setattr(truncated, setting, saved)
        truncated.top_p = TOP_P


def test_truncated_support_needs_a_sampling_trainer(truncated):
    with pytest.raises(TypeError, match="GRPOTrainer / RLOOTrainer"):
        pfi.apply(truncated.model, truncated_support=True)
