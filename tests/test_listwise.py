"""Listwise objectives on groups of K responses (issue 25): values and gradients in float64
against formulas written here from the definitions, the K = 2 equalities with the pair
losses, the group layouts and their named errors."""
import pytest
import torch

import pyfused_po
from pyfused_po.sequence.groups import group_layout
from pyfused_po.objectives.listwise_loss import NOT_ON_GROUPS, listwise_plan, listwise_preference_loss
from pyfused_po.objectives.listwise import listwise_types

from _listwise_reference import (groups, log_sigmoid, ref_adpo, ref_lipo_lambda, ref_pairwise, ref_plackett_luce,
                                 ref_softmax_dpo, reference)

F64 = torch.float64


def _batch(S, seed, score_values=None):
    g = torch.Generator().manual_seed(seed)
    logps = (-5.0 * torch.rand(S, generator=g, dtype=F64)).requires_grad_()
    ref = -5.0 * torch.rand(S, generator=g, dtype=F64)
    if score_values is None:
        scores = torch.randperm(S, generator=g).to(F64)
    else:
        scores = torch.tensor(score_values, dtype=F64)
    lengths = torch.randint(1, 9, (S,), generator=g).to(F64)
    return logps, ref, scores, lengths


def _assert_same(ours, theirs, logps, tol=1e-12):
    assert torch.allclose(ours, theirs, rtol=tol, atol=tol), (ours, theirs)
    (g_ours,) = torch.autograd.grad(ours.sum(), logps, retain_graph=True)
    (g_theirs,) = torch.autograd.grad(theirs.sum(), logps)
    assert torch.allclose(g_ours, g_theirs, rtol=1e-10, atol=1e-12), (g_ours, g_theirs)


RAGGED_IDS = [2, 0, 1, 0, 2, 1, 0, 2, 2, 1]  # groups of 3, 3 and 4, interleaved


@pytest.mark.parametrize("top_m", [None, 1, 2, 7])
def test_plackett_luce_matches_formula(top_m):
    logps, ref, scores, _ = _batch(10, seed=1)
    ids = torch.tensor(RAGGED_IDS)
    out = listwise_preference_loss(logps, ref, scores, group_index=ids, loss_type="plackett_luce", beta=0.7,
                                   top_m=top_m)
    expected = reference(lambda u, psi: ref_plackett_luce(u, psi, top_m), logps, ref, scores, RAGGED_IDS, 0.7)
    _assert_same(out.losses, expected, logps)
    assert torch.allclose(out.loss, expected.mean(), rtol=1e-12)


def test_softmax_dpo_matches_formula():
    logps, ref, scores, _ = _batch(10, seed=2)
    out = listwise_preference_loss(logps, ref, scores, group_index=torch.tensor(RAGGED_IDS),
                                   loss_type="softmax_dpo", beta=0.4)
    _assert_same(out.losses, reference(ref_softmax_dpo, logps, ref, scores, RAGGED_IDS, 0.4), logps)


def test_lipo_lambda_matches_formula_with_tied_grades():
    # Graded scores with ties (tied members form no pair); u spread so the policy ranks differ from ψ.
    logps, ref, _, _ = _batch(10, seed=3)
    scores = torch.tensor([2.0, 1.0, 3.0, 2.0, 0.0, 2.0, 1.0, 2.0, 2.0, 0.0], dtype=F64)
    out = listwise_preference_loss(logps, ref, scores, group_index=torch.tensor(RAGGED_IDS),
                                   loss_type="lipo_lambda", beta=1.3)
    _assert_same(out.losses, reference(ref_lipo_lambda, logps, ref, scores, RAGGED_IDS, 1.3), logps)


@pytest.mark.parametrize("tau", [0.5, 2.0])
def test_adpo_matches_formula_with_ties(tau):
    logps, ref, _, _ = _batch(10, seed=14)
    scores = torch.tensor([2.0, 1.0, 3.0, 2.0, 0.0, 2.0, 1.0, 2.0, 2.0, 0.0], dtype=F64)
    out = listwise_preference_loss(logps, ref, scores, group_index=torch.tensor(RAGGED_IDS), loss_type="adpo",
                                   beta=0.8, adpo_tau=tau)
    expected = reference(lambda u, psi: ref_adpo(u, psi, tau), logps, ref, scores, RAGGED_IDS, 0.8)
    _assert_same(out.losses, expected, logps)


def test_adpo_limits():
    """τ → 0: q is one-hot on the best, the loss is softmax_dpo; K = 2: cDPO with ε = σ(−1/τ)
    less the target's entropy."""
    logps, ref, scores, _ = _batch(12, seed=15)
    sharp = listwise_preference_loss(logps, ref, scores, group_size=4, loss_type="adpo", adpo_tau=1e-3)
    best = listwise_preference_loss(logps, ref, scores, group_size=4, loss_type="softmax_dpo")
    _assert_same(sharp.losses, best.losses, logps)
    P, tau = 6, 0.7
    ours = pyfused_po.preference_loss(logps[:P], logps[P:], ref[:P], ref[P:], loss_type="adpo", adpo_tau=tau)
    eps = torch.sigmoid(torch.tensor(-1 / tau, dtype=F64))
    entropy = -(eps * torch.log(eps) + (1 - eps) * torch.log1p(-eps))
    cdpo = pyfused_po.preference_loss(logps[:P], logps[P:], ref[:P], ref[P:], loss_type="sigmoid",
                                      label_smoothing=eps.item())
    _assert_same(ours.losses, cdpo.losses - entropy, logps)


def test_plackett_luce_top_1_is_softmax_dpo():
    logps, ref, scores, _ = _batch(12, seed=4)
    a = listwise_preference_loss(logps, ref, scores, group_size=4, loss_type="plackett_luce", top_m=1)
    b = listwise_preference_loss(logps, ref, scores, group_size=4, loss_type="softmax_dpo")
    assert torch.allclose(a.losses, b.losses, rtol=1e-12)


def _sigmoid_pair(u, eps):
    return lambda i, j: -(1 - eps) * log_sigmoid(u[i] - u[j]) - eps * log_sigmoid(u[j] - u[i])


PAIRWISE_CASES = {
    # name: (hyper-parameters, reference of one ordered pair from (u, r = ℓ − ℓʳ, ℓ, n) by position)
    "sigmoid": ({"label_smoothing": 0.2},
                lambda u, r, l, n, beta: _sigmoid_pair(u, 0.2)),
    "hinge": ({}, lambda u, r, l, n, beta: lambda i, j: torch.clamp(1 - (u[i] - u[j]), min=0.0)),
    "ipo": ({}, lambda u, r, l, n, beta: lambda i, j: (r[i] / n[i] - r[j] / n[j] - 1 / (2 * beta)) ** 2),
    "simpo": ({"simpo_gamma": 0.3},
              lambda u, r, l, n, beta: lambda i, j: -log_sigmoid(beta * (l[i] / n[i] - l[j] / n[j]) - 0.3)),
}


@pytest.mark.parametrize("name", sorted(PAIRWISE_CASES))
def test_pairwise_loss_is_mean_over_ordered_pairs(name):
    """Ties (scores 3, 1, 1) form no pair: that group has two ordered pairs, not three."""
    hyper, pair_ref = PAIRWISE_CASES[name]
    beta = 0.6
    logps, ref, _, lengths = _batch(10, seed=5)
    scores = torch.tensor([3.0, 0.0, 1.0, 1.0, 5.0, 2.0, 1.0, 4.0, 2.0, 9.0], dtype=F64)
    out = listwise_preference_loss(logps, ref, scores, group_index=torch.tensor(RAGGED_IDS), loss_type=name,
                                   beta=beta, lengths=lengths, **hyper)
    expected = []
    for members in groups(scores, RAGGED_IDS):
        r = [logps[i] - ref[i] for i in members]
        u = [beta * x for x in r]
        psi = [float(scores[i]) for i in members]
        one = pair_ref(u, r, [logps[i] for i in members], [lengths[i] for i in members], beta)
        expected.append(ref_pairwise(one)(u, psi))
    _assert_same(out.losses, torch.stack(expected), logps)


@pytest.mark.parametrize("name", sorted(listwise_types()))
def test_listwise_gradients_by_finite_differences(name):
    _, ref, scores, _ = _batch(10, seed=6)
    ids = torch.tensor(RAGGED_IDS)

    def f(x):
        return listwise_preference_loss(x, ref, scores, group_index=ids, loss_type=name, beta=0.9).loss

    x = _batch(10, seed=7)[0].detach().requires_grad_()
    assert torch.autograd.gradcheck(f, (x,))


PAIR_TYPES = sorted(set(pyfused_po.loss_types()) - set(NOT_ON_GROUPS) - set(listwise_types()))


def _pairs_as_groups(P, seed):
    """[chosen; rejected] sums of P pairs, and the same as groups of two (scores 1, 0)."""
    g = torch.Generator().manual_seed(seed)
    logps = (-6.0 * torch.rand(2 * P, generator=g, dtype=F64)).requires_grad_()
    ref = -6.0 * torch.rand(2 * P, generator=g, dtype=F64)
    lengths = torch.randint(0, 7, (2 * P,), generator=g).to(F64)
    scores = torch.cat([torch.ones(P, dtype=F64), torch.zeros(P, dtype=F64)])
    group_index = torch.cat([torch.arange(P), torch.arange(P)])
    return logps, ref, lengths, scores, group_index


def _compare_with_pairs(group_type, pair_type, hyper=None, seed=8, P=5):
    hyper = hyper or {}
    logps, ref, lengths, scores, group_index = _pairs_as_groups(P, seed)
    ours = listwise_preference_loss(logps, ref, scores, group_index=group_index, loss_type=group_type, beta=0.3,
                                    lengths=lengths, **hyper)
    theirs = pyfused_po.preference_loss(logps[:P], logps[P:], ref[:P], ref[P:], loss_type=pair_type, beta=0.3,
                                        chosen_lengths=lengths[:P], rejected_lengths=lengths[P:], **hyper)
    _assert_same(ours.losses, theirs.losses, logps)
    assert torch.allclose(ours.loss, theirs.loss, rtol=1e-12, atol=1e-15)
    assert torch.allclose(ours.rewards, torch.cat([theirs.chosen_rewards, theirs.rejected_rewards]), rtol=1e-12)
    m, t = ours.metrics, theirs.metrics
    for name, other in (("rewards/rank_0", "rewards/chosen"), ("rewards/rank_1", "rewards/rejected"),
                        ("rewards/accuracies", "rewards/accuracies"), ("rewards/margins", "rewards/margins")):
        assert torch.allclose(m[name], t[other], rtol=1e-12, atol=1e-15), name
    return ours, theirs


@pytest.mark.parametrize("loss_type", PAIR_TYPES)
def test_every_pair_loss_on_groups_of_two_equals_the_pair_loss(loss_type):
    ours, theirs = _compare_with_pairs(loss_type, loss_type)
    for name, value in theirs.metrics.items():  # the loss's own metrics (nll_loss, log_odds_ratio, …)
        if not name.startswith(("rewards/", "logps/")):
            assert torch.allclose(ours.metrics[name], value, rtol=1e-12), name


@pytest.mark.parametrize("group_type", ["plackett_luce", "softmax_dpo"])
def test_listwise_losses_on_groups_of_two_equal_dpo(group_type):
    _compare_with_pairs(group_type, "sigmoid")


@pytest.mark.parametrize("loss_type", sorted(listwise_types()))
def test_listwise_losses_registered_on_pairs_equal_groups_of_two(loss_type):
    """preference_loss(loss_type=<listwise>) on pairs is the listwise loss of groups of two."""
    _compare_with_pairs(loss_type, loss_type)


def test_group_index_in_any_order_equals_group_size():
    logps, ref, scores, lengths = _batch(12, seed=9)
    base = listwise_preference_loss(logps, ref, scores, group_size=3, loss_type=["plackett_luce", "sigmoid"],
                                    loss_weights=[1.0, 0.5], beta=0.2, lengths=lengths)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    ids = torch.arange(12) // 3
    out = listwise_preference_loss(logps[perm], ref[perm], scores[perm], group_index=ids[perm],
                                   loss_type=["plackett_luce", "sigmoid"], loss_weights=[1.0, 0.5], beta=0.2,
                                   lengths=lengths[perm])
    _assert_same(out.losses, base.losses, logps)
    assert torch.allclose(out.rewards, base.rewards[perm], rtol=1e-12)
    parts = [listwise_preference_loss(logps, ref, scores, group_size=3, loss_type=t, beta=0.2, lengths=lengths).losses
             for t in ("plackett_luce", "sigmoid")]
    mixed = listwise_preference_loss(logps, ref, scores, group_size=3, loss_type=["plackett_luce", "sigmoid"],
                                     loss_weights=[1.0, 0.5], beta=0.2, lengths=lengths)
    _assert_same(mixed.losses, parts[0] + 0.5 * parts[1], logps)  # loss_weights mix the per-group losses


def test_nll_term_on_a_named_member_per_group():
    logps, ref, scores, lengths = _batch(9, seed=10)
    nll_index = torch.tensor([1, 5, 6])  # groups of 3: one member of each, not always the best
    base = listwise_preference_loss(logps, ref, scores, group_size=3, loss_type="softmax_dpo")
    out = listwise_preference_loss(logps, ref, scores, group_size=3, loss_type="softmax_dpo", lengths=lengths,
                                   nll_index=nll_index, nll_alpha=0.25)
    nll = -(logps[1] + logps[5] + logps[6]) / (lengths[1] + lengths[5] + lengths[6])
    _assert_same(out.losses, base.losses + 0.25 * nll, logps)
    assert torch.allclose(out.metrics["nll_loss"], nll.detach(), rtol=1e-12)


def test_rank_metrics():
    logps, ref, _, _ = _batch(6, seed=11)
    scores = torch.tensor([0.0, 2.0, 1.0, 5.0, 7.0, 6.0], dtype=F64)
    out = listwise_preference_loss(logps, ref, scores, group_size=3, loss_type="softmax_dpo", beta=2.0)
    u = (2.0 * (logps - ref)).detach()
    # Rows by descending score: group 0 = (1, 2, 0), group 1 = (4, 5, 3).
    for k, (a, b) in enumerate([(1, 4), (2, 5), (0, 3)]):
        assert torch.allclose(out.metrics[f"rewards/rank_{k}"], (u[a] + u[b]) / 2, rtol=1e-12)
    pairs = [(1, 2), (1, 0), (2, 0), (4, 5), (4, 3), (5, 3)]
    assert torch.allclose(out.metrics["rewards/accuracies"],
                          torch.tensor(sum(float(u[i] > u[j]) for i, j in pairs) / 6, dtype=F64))
    assert torch.allclose(out.metrics["rewards/margins"], sum(u[i] - u[j] for i, j in pairs) / 6, rtol=1e-12)


def _errors_case(**change):
    logps, ref, scores, lengths = _batch(6, seed=12)
    kw = dict(policy_logps=logps, ref_logps=ref, scores=scores, group_size=3, loss_type="plackett_luce")
    kw.update(change)
    return kw


@pytest.mark.parametrize("change, error, match", [
    (dict(group_size=4), ValueError, "group_size=4 does not divide the 6 sequences"),
    (dict(group_size=1), ValueError, "group_size must be an integer >= 2"),
    (dict(group_size=None), ValueError, "exactly one of group_size"),
    (dict(group_index=torch.tensor([0, 0, 1, 1, 2, 2])), ValueError, "exactly one of group_size"),
    (dict(group_size=None, group_index=torch.tensor([0, 0, 2, 2, 3, 3])), ValueError, "group 1 is empty"),
    (dict(group_size=None, group_index=torch.tensor([0, 0, 0, 1, 1, 2])), ValueError, "group 2 has one sequence"),
    (dict(group_size=None, group_index=torch.tensor([0, 0, 0, -1, 1, 1])), ValueError, "group ids >= 0"),
    (dict(group_size=None, group_index=torch.tensor([0, 0, 0, 1, 1, 2]), num_groups=2), ValueError,
     r"group ids in \[0, 2\)"),
    (dict(group_size=None, group_index=torch.tensor([0.0, 0, 0, 1, 1, 1])), TypeError, "group_index must be an int"),
    (dict(group_size=None, group_index=torch.tensor([0, 0, 1, 1])), ValueError, r"group_index must have shape \(6,\)"),
    (dict(scores=torch.tensor([1.0, float("nan"), 0, 1, 2, 3], dtype=F64)), ValueError,
     "scores must be finite.*sequence 1"),
    (dict(scores=torch.tensor([1.0, 2.0, 3.0], dtype=F64)), ValueError, r"scores must have shape \(6,\)"),
    (dict(scores=None), ValueError, "scores=\\[S\\] is required"),
    (dict(scores=torch.tensor([1.0, 1, 1, 0, 1, 2], dtype=F64)), ValueError, "group 0: all its scores tie"),
    (dict(scores=torch.tensor([2.0, 1, 0, 1, 2, 2], dtype=F64)), ValueError,
     "plackett_luce.*group 1 ties two of its first"),
    (dict(scores=torch.tensor([2.0, 1, 0, 3, 3, 2], dtype=F64), loss_type="softmax_dpo"), ValueError,
     "group 1 has two best responses"),
    (dict(ref_logps=None), ValueError, "needs ref_logps"),
    (dict(loss_type="aot"), ValueError, "'aot' does not apply to groups"),
    (dict(loss_type="plackett_luce", top_m=0), ValueError, "top_m must be None"),
    (dict(loss_type="adpo", adpo_tau=0.0), ValueError, "adpo_tau must be a finite number > 0"),
    (dict(loss_type="sigmoid", label_smoothing=torch.full((6,), 0.1)), ValueError, "per-pair tensor"),
    (dict(nll_index=torch.tensor([0, 1]), lengths=torch.ones(6, dtype=F64)), ValueError,
     "nll_index\\[1\\] = 1 is a sequence of group 0"),
    (dict(nll_index=torch.tensor([0, 9]), lengths=torch.ones(6, dtype=F64)), ValueError, r"in \[0, 6\)"),
    (dict(nll_index=torch.tensor([0, 3])), ValueError, "nll_index needs lengths"),
])
def test_bad_groups_get_named_errors(change, error, match):
    with pytest.raises(error, match=match):
        listwise_preference_loss(**_errors_case(**change))


def test_ties_below_top_m_are_allowed():
    """Plackett–Luce with top_m = 1 only needs a unique best; ties further down are defined."""
    logps, ref, _, _ = _batch(6, seed=13)
    scores = torch.tensor([5.0, 1, 1, 3, 0, 0], dtype=F64)
    out = listwise_preference_loss(logps, ref, scores, group_size=3, loss_type="plackett_luce", top_m=1)
    expected = reference(lambda u, psi: ref_plackett_luce(u, psi, 1), logps, ref, scores, [0, 0, 0, 1, 1, 1], 0.1)
    _assert_same(out.losses, expected, logps)


GROUP_TYPES = sorted(set(pyfused_po.loss_types()) - set(NOT_ON_GROUPS))


@pytest.mark.parametrize("loss_type", GROUP_TYPES)
def test_gradient_separates_over_groups(loss_type):
    """What a plan that forms the gradient per chunk of whole groups relies on: ∂loss/∂ℓ of one
    group's sequences is unchanged when every other group's sums are placeholders (−1), with the
    ListwisePlan built once and an NLL member per group."""
    logps, ref, _, lengths = _batch(10, seed=16)
    # Distinct scores within each group (Plackett-Luce orders every position).
    scores = torch.tensor([2.0, 1.0, 3.0, 2.0, 0.0, 2.1, 0.5, 2.4, 2.5, 0.0], dtype=F64)
    ids = torch.tensor(RAGGED_IDS)
    plan = listwise_plan(10, scores, group_index=ids, loss_type=loss_type, beta=0.5,
                         nll_index=torch.tensor([3, 5, 0]), nll_alpha=0.3)
    (full,) = torch.autograd.grad(plan.loss(logps, ref, lengths).loss, logps)
    for g in range(3):
        mine = ids == g
        x = torch.where(mine, logps.detach(), torch.full_like(logps, -1.0)).requires_grad_()
        (part,) = torch.autograd.grad(plan.loss(x, ref, lengths).loss, x)
        assert torch.allclose(part[mine], full[mine], rtol=1e-12, atol=1e-15), (g, part[mine], full[mine])
    assert torch.allclose(plan.loss(logps, ref, lengths).losses,
                          listwise_preference_loss(logps, ref, scores, group_index=ids, loss_type=loss_type, beta=0.5,
                                                   lengths=lengths, nll_index=torch.tensor([3, 5, 0]),
                                                   nll_alpha=0.3).losses, rtol=0, atol=0)


def test_layout_argument_is_exclusive():
    logps, ref, scores, _ = _batch(6, seed=17)
    layout = group_layout(scores, num_sequences=6, group_size=3)
    with pytest.raises(ValueError, match="not both"):
        listwise_preference_loss(logps, ref, scores, layout=layout)
    with pytest.raises(ValueError, match="layout describes 6 sequences, the batch has 4"):
        listwise_preference_loss(logps[:4], ref[:4], layout=layout)


@pytest.mark.parametrize("loss_type", ["plackett_luce", "softmax_dpo", "lipo_lambda", "adpo", "sigmoid", "ipo"])
def test_empty_batch_gives_zero(loss_type):
    """No sequences: no groups, a loss of 0 (not NaN) and losses of shape [0], as for pairs."""
    empty = torch.zeros(0, dtype=F64, requires_grad=True)
    for groups_of in (dict(group_size=3), dict(group_index=torch.zeros(0, dtype=torch.long))):
        out = listwise_preference_loss(empty, empty.detach(), torch.zeros(0), loss_type=loss_type,
                                       lengths=torch.zeros(0, dtype=F64), **groups_of)
        out.loss.backward()
        assert out.loss.item() == 0.0 and out.losses.shape == (0,)


def test_integer_scores_and_low_precision_sums():
    logps, ref, scores, _ = _batch(6, seed=18)
    base = listwise_preference_loss(logps.float(), ref.float(), scores, group_size=3, loss_type="plackett_luce")
    ints = listwise_preference_loss(logps.bfloat16().float(), ref.float(), scores.long(), group_size=3,
                                    loss_type="plackett_luce")
    bf16 = listwise_preference_loss(logps.bfloat16(), ref.float(), scores.long(), group_size=3,
                                    loss_type="plackett_luce")
    assert base.losses.dtype == torch.float32 and bf16.losses.dtype == torch.float32
    assert torch.equal(ints.losses, bf16.losses)  # bf16 sums are widened to fp32 before the math
    assert torch.allclose(base.losses, bf16.losses, rtol=2e-2)
