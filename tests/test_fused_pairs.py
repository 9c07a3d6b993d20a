"""FusedPreferenceLoss on hidden states with the gradient formed in the forward (three GEMMs,
:mod:`pyfused_po.plans.fused_pairs`): loss, metrics and gradients equal the staged path in float64."""
import pytest
import torch

import pyfused_po
from pyfused_po import FusedPreferenceLoss

from _fused_plan import assert_same_plans as _assert_same, run_plan as _run

P, T, V, D = 3, 9, 40, 6


def _batch(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2 * P, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1 if bias else None
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    for i, n in enumerate([2, 3, 1, 4, 2, 5]):  # prompts of several lengths, and right padding
        labels[i, :n] = -100
    labels[1, -2:] = -100
    ref = dict(ref_chosen_logps=torch.randn(P, generator=g, dtype=torch.float64) - 25,
               ref_rejected_logps=torch.randn(P, generator=g, dtype=torch.float64) - 25)
    return hidden, weight, b, labels, ref


SEPARABLE = [t for t in pyfused_po.loss_types() if t not in ("aot", "aot_unpaired", "expo")]


@pytest.mark.parametrize("loss_type", SEPARABLE)
def test_every_separable_loss_type_equals_staged(loss_type):
    hidden, weight, bias, labels, ref = _batch(seed=len(loss_type))
    module = FusedPreferenceLoss(loss_type, beta=0.3, backend="torch")
    module.chunk_tokens = 16  # at most two sequences' tokens: several chunks of whole pairs
    _assert_same(module, hidden, weight, bias, labels, **ref)


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_batch_coupled_losses_fall_back(loss_type):
    hidden, weight, bias, labels, ref = _batch(seed=5)
    module = FusedPreferenceLoss(loss_type, beta=0.3, backend="torch")
    _assert_same(module, hidden, weight, bias, labels, expect_fused=False, **ref)


def test_weighting_ld_token_and_pair_weights_soft_labels_nll_labels():
    hidden, weight, bias, labels, ref = _batch(seed=11)
    g = torch.Generator().manual_seed(2)
    token_weights = torch.rand(2 * P, T, generator=g, dtype=torch.float64) + 0.5
    nll_labels = labels[:P].clone()
    prompt = (labels[:P] == -100) & (torch.arange(T) >= 1)
    nll_labels[prompt] = torch.randint(0, V, (int(prompt.sum()),), generator=g)  # the prompt joins the NLL term
    kw = dict(token_weights=token_weights, weights=torch.rand(P, generator=g, dtype=torch.float64) + 0.5,
              label_smoothing=torch.rand(P, generator=g, dtype=torch.float64) * 0.3, nll_labels=nll_labels, **ref)
    for loss_type, extra in (("sigmoid", dict(use_weighting=True)), (["sigmoid", "sft"], dict(loss_weights=[1.0, 0.5])),
                             ("robust", dict())):
        module = FusedPreferenceLoss(loss_type, beta=0.2, backend="torch", ld_alpha=0.6, softcap=5.0,
                                     temperature=0.8, **extra)
        module.chunk_tokens = 20
        kwargs = dict(kw) if loss_type != ["sigmoid", "sft"] else {k: v for k, v in kw.items() if k != "label_smoothing"}
        _assert_same(module, hidden, weight, bias, labels, **kwargs)


def test_wpo_with_an_nll_term_falls_back():
    hidden, weight, bias, labels, _ = _batch(seed=3)
    module = FusedPreferenceLoss("cpo", beta=0.2, backend="torch", use_weighting=True, cpo_alpha=1.0)
    _assert_same(module, hidden, weight, bias, labels, expect_fused=False)


def test_reference_hidden_frozen_head_sum_reduction_and_shift():
    hidden, weight, bias, labels, _ = _batch(seed=7, bias=False)
    ref_hidden = hidden + 0.1
    module = FusedPreferenceLoss("ipo", beta=0.2, backend="torch", shift=True, reduction="sum")
    staged, g_staged = _run(module, False, hidden, weight, None, labels, ref_hidden=ref_hidden)
    fused, g_fused = _run(module, True, hidden, weight, None, labels, ref_hidden=ref_hidden)
    assert "StoredGradient" in type(fused.loss.grad_fn).__name__
    torch.testing.assert_close(fused.loss, staged.loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(g_fused, g_staged):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    # Frozen head (LoRA): only dH, two GEMMs.
    h = hidden.clone().requires_grad_(True)
    out = module(hidden=h, weight=weight, labels=labels, ref_hidden=ref_hidden)
    out.loss.backward()
    torch.testing.assert_close(h.grad, g_staged[0] / 1.7, rtol=1e-10, atol=1e-12)


def test_a_pair_longer_than_the_chunk_falls_back_and_no_grad_does_no_gradient_work():
    hidden, weight, bias, labels, ref = _batch(seed=1)
    module = FusedPreferenceLoss("sigmoid", backend="torch")
    module.chunk_tokens = 4  # fewer tokens than any pair has
    _assert_same(module, hidden, weight, bias, labels, expect_fused=False, **ref)
    w = weight.clone().requires_grad_(True)
    with torch.no_grad():
        out = module(hidden=hidden, weight=w, labels=labels, **ref)
    assert out.loss.grad_fn is None


def test_double_backward_is_refused_and_accumulation_adds():
    hidden, weight, bias, labels, ref = _batch(seed=2)
    module = FusedPreferenceLoss("sigmoid", backend="torch")
    w = weight.clone().requires_grad_(True)
    out = module(hidden=hidden, weight=w, labels=labels, **ref)
    (gw,) = torch.autograd.grad(out.loss, w, create_graph=True)
    with pytest.raises(RuntimeError):
        gw.sum().backward()
    for _ in range(2):  # gradient accumulation over two micro-batches
        module(hidden=hidden, weight=w, labels=labels, **ref).loss.backward()
    torch.testing.assert_close(w.grad, 2 * gw.detach(), rtol=1e-12, atol=1e-14)


def test_autocast_bf16_matches_staged():
    hidden, weight, bias, labels, ref = _batch(seed=4)
    hidden, weight, bias = hidden.float(), weight.float(), bias.float()
    ref = {k: v.float() for k, v in ref.items()}
    module = FusedPreferenceLoss("sigmoid", beta=0.5, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        staged, g_staged = _run(module, False, hidden, weight, bias, labels, **ref)
        fused, g_fused = _run(module, True, hidden, weight, bias, labels, **ref)
    assert "StoredGradient" in type(fused.loss.grad_fn).__name__
    assert [g.dtype for g in g_fused] == [torch.float32] * 3
    torch.testing.assert_close(fused.loss, staged.loss, rtol=1e-6, atol=1e-6)  # same bf16 GEMM, same fold
    for a, b in zip(g_fused, g_staged):  # G rounded to bf16 before the dH/dW GEMMs in both
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_triton_fold_matches_staged():
    pytest.importorskip("triton")
    hidden, weight, bias, labels, ref = _batch(seed=6)
    hidden, weight, bias = hidden.float(), weight.float(), bias.float()
    ref = {k: v.float() for k, v in ref.items()}
    module = FusedPreferenceLoss("simpo", beta=0.5, backend="triton", logit_metrics=True)
    module.chunk_tokens = 16
    staged, g_staged = _run(module, False, hidden, weight, bias, labels, **ref)
    fused, g_fused = _run(module, True, hidden, weight, bias, labels, **ref)
    assert "StoredGradient" in type(fused.loss.grad_fn).__name__
    torch.testing.assert_close(fused.loss, staged.loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_fused, g_staged):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_token_capture_gets_the_policy_tokens_from_the_fused_plan():
    """The TRL switch's capture (module.token_capture plus its _token_stage wrapper) receives the
    policy's per-token log-probs and the asked extras from the plan's own fold, not the reference's
    (whose token stage runs first), equal to the token stage's, on both plans."""
    _policy_token_extras = pytest.importorskip("pyfused_po.integrations.trl_preference_loss")._policy_token_extras
    hidden, weight, bias, labels, _ = _batch(seed=12)
    module = FusedPreferenceLoss("sigmoid", beta=0.3, backend="torch")
    module.chunk_tokens = 16
    expected = pyfused_po.linear_token_logprobs(hidden, weight, labels, bias=bias, backend="torch",
                                                extras=("entropy", "is_top1"))
    for fused in (True, False):
        module.fused_gradient = fused
        captured = {}
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with _policy_token_extras(module, ("entropy", "is_top1"), captured):
            out = module(hidden=h, weight=w, bias=bias, labels=labels, ref_hidden=hidden * 0.5)
        assert ("StoredGradient" in type(out.loss.grad_fn).__name__) == fused
        assert "token_capture" not in vars(module) and "_token_stage" not in vars(module)
        for name in ("logps", "entropy", "is_top1"):
            torch.testing.assert_close(getattr(captured["policy"], name).detach(), getattr(expected, name),
                                       rtol=1e-12, atol=1e-12)
