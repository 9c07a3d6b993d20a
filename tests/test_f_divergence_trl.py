"""f-divergence scores keep TRL's constant where it does not cancel (issue 26, class 5).

TRL 1.16 scores a log-ratio u as f'(e^u) with the constant: 1 − e^{−u} (forward KL),
log 2 + log σ(u) (JS), (e^{(α−1)u} − 1)/(α − 1) (α-divergence).  The constant cancels in
s_w − s_l, but ``ipo`` and ``sigmoid_norm`` divide each side by its own length, leaving
c·(1/n_w − 1/n_l); dropping it put ``ipo`` with forward KL and lengths (2, 12) 4.5 off TRL.
Here pyfused_po is compared with TRL's own ``DPOTrainer._compute_loss`` (tests/_trl_dpo_loss.py).
"""
import pytest
import torch

pytest.importorskip("trl")

import pyfused_po  # noqa: E402
from _trl_dpo_loss import trl_dpo_loss  # noqa: E402

# The loss types TRL 1.16 accepts with a non-default f_divergence_type (besides "sft", which has no scores).
TRL_F_LOSS_TYPES = ["sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"]
F_DIVERGENCES = [("forward_kl", 1.0), ("js_divergence", 1.0), ("alpha_divergence", 0.5),
                 ("alpha_divergence", 3.0)]


def _batch(lengths, seed=0):
    """Per-token log-probs ``[2P, T]``, completion mask ``[2P, T+1]`` (position 0 a prompt token) and
    reference sums, for pairs whose chosen / rejected responses have the given lengths."""
    g = torch.Generator().manual_seed(seed)
    pairs = len(lengths)
    width = max(max(pair) for pair in lengths)
    mask = torch.zeros(2 * pairs, width + 1, dtype=torch.long)
    for i, (n_chosen, n_rejected) in enumerate(lengths):
        mask[i, 1:1 + n_chosen] = 1
        mask[pairs + i, 1:1 + n_rejected] = 1
    token_logps = -torch.rand(2 * pairs, width, generator=g, dtype=torch.float64) * 0.4
    ref = (token_logps * mask[:, 1:]).sum(1) + torch.randn(2 * pairs, generator=g, dtype=torch.float64) * 0.5
    return token_logps, mask, ref[:pairs], ref[pairs:]


def _ours(token_logps, mask, ref_chosen, ref_rejected, **kwargs):
    sums = (token_logps * mask[:, 1:]).sum(1)
    lengths = mask[:, 1:].sum(1).double()
    pairs = ref_chosen.numel()
    return pyfused_po.preference_loss(sums[:pairs], sums[pairs:], ref_chosen, ref_rejected,
                                      chosen_lengths=lengths[:pairs], rejected_lengths=lengths[pairs:], **kwargs)


def test_issue_example_ipo_forward_kl_lengths_2_12():
    batch = _batch([(2, 12)])
    kwargs = dict(loss_type="ipo", beta=0.1, f_divergence_type="forward_kl")
    expected = trl_dpo_loss(*batch, **kwargs)
    got = _ours(*batch, **kwargs).loss
    assert torch.allclose(got, expected, rtol=1e-12, atol=0), (got.item(), expected.item())


@pytest.mark.parametrize("f_type,coef", F_DIVERGENCES)
@pytest.mark.parametrize("loss_type", TRL_F_LOSS_TYPES)
def test_matches_trl_loss(loss_type, f_type, coef):
    # Unequal lengths (where the constant survives length normalization), equal ones, and an empty
    # rejected response (TRL clamps the length to 1, as pyfused_po does).
    batch = _batch([(2, 12), (5, 5), (9, 1), (3, 0)], seed=1)
    kwargs = dict(loss_type=loss_type, beta=0.3, f_divergence_type=f_type, f_alpha_divergence_coef=coef)
    hyper = {"label_smoothing": 0.2} if loss_type in ("robust", "exo_pair") else {}
    rtol = 1e-12
    if f_type == "alpha_divergence":  # TRL's alpha branch knows fp16/bf16/fp32 only (a KeyError on float64)
        batch, rtol = tuple(x.float() if x.is_floating_point() else x for x in batch), 2e-6
    elif loss_type == "exo_pair":  # TRL builds ε as a float32 tensor, so log(1 − ε), log ε are fp32-rounded
        rtol = 1e-6
    expected = trl_dpo_loss(*batch, **kwargs, **hyper)
    got = _ours(*batch, **kwargs, **hyper).loss
    assert torch.allclose(got.double(), expected.double(), rtol=rtol, atol=0), (got.item(), expected.item())


@pytest.mark.parametrize("loss_type", ["ipo", "sigmoid_norm"])
def test_module_from_logits_matches_trl(loss_type):
    """End to end: FusedPreferenceLoss counts the lengths from the labels, as TRL from its mask."""
    g = torch.Generator().manual_seed(3)
    token_logps, mask, ref_chosen, ref_rejected = _batch([(2, 12), (7, 3)], seed=2)
    logits = torch.randn(4, mask.shape[1] - 1, 9, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (4, mask.shape[1] - 1), generator=g)
    labels[mask[:, 1:] == 0] = -100
    scored = torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    kwargs = dict(loss_type=loss_type, beta=0.2, f_divergence_type="forward_kl")
    expected = trl_dpo_loss(scored, mask, ref_chosen, ref_rejected, **kwargs)
    got = pyfused_po.FusedPreferenceLoss(backend="torch", **kwargs)(
        logits=logits, labels=labels, ref_chosen_logps=ref_chosen, ref_rejected_logps=ref_rejected).loss
    assert torch.allclose(got, expected, rtol=1e-12, atol=0), (got.item(), expected.item())
