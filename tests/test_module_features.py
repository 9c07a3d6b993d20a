"""FusedPreferenceLoss on logits == preference_loss on float64 reference sequence sums, for the
module's sequence-stage features: LD-DPO, token weights, per-token reference log-probs, a
separate NLL mask, WPO weights, BCO's running mean, per-pair weights and soft labels."""
import math

import pytest
import torch

import pyfused_po
from reference import max_rel_err, token_logprobs_ref

P, T, V = 3, 9, 37
IGN = -100


def make_batch(dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(2 * P, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    ref_logits = (torch.randn(2 * P, T, V, generator=g, dtype=torch.float64) * 2).to(dtype)
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    prompt = [2, 3, 1, 2, 3, 1]  # per row; the chosen and rejected of a pair share it
    ends = [9, 4, 6, 7, 9, 2]  # response = [prompt, end): lengths 7, 1, 5 vs 4, 6, 1
    for r in range(2 * P):
        labels[r, :prompt[r]] = IGN
        labels[r, ends[r]:] = IGN
    return logits, ref_logits, labels, prompt


def ld_weights_ref(mask, alpha):
    """LD-DPO weights by explicit counting: 1 on the first min(n_w, n_l) response tokens."""
    w = torch.zeros(mask.shape, dtype=torch.float64)
    n = mask.sum(-1).tolist()
    for r in range(mask.shape[0]):
        shared = min(n[r % P], n[r % P + P])
        seen = 0
        for t in range(mask.shape[1]):
            if mask[r, t]:
                seen += 1
                w[r, t] = 1.0 if seen <= shared else alpha
    return w


def sums(values, mask, weights=None):
    v = values if weights is None else values * weights
    return torch.where(mask, v, torch.zeros_like(v)).sum(-1)


def compare(out, ref, logits, ref_logits_leaf, tol=1e-10):
    assert max_rel_err(out.losses, ref.losses) <= tol
    assert math.isclose(out.loss.item(), ref.loss.item(), rel_tol=tol, abs_tol=1e-12)
    for k, v in ref.metrics.items():
        assert math.isclose(out.metrics[k].item(), v.item(), rel_tol=tol, abs_tol=1e-12), k
    g = torch.autograd.grad(out.loss, logits)[0]
    g_ref = torch.autograd.grad(ref.loss, ref_logits_leaf)[0]
    assert max_rel_err(g, g_ref) <= tol


LOSS_CASES = [("sigmoid", {}), ("ipo", {}), ("simpo", {"cpo_alpha": 0.5}), ("orpo", {}), ("hdpo", {"hdpo_alpha": 0.5}),
              (["sigmoid", "sft"], {"loss_weights": [1.0, 0.3]})]


@pytest.mark.parametrize("loss_type,kw", LOSS_CASES)
def test_module_matches_preference_loss_on_sums(loss_type, kw):
    logits, ref_logits, labels, _ = make_batch()
    mask = labels != IGN
    module = pyfused_po.FusedPreferenceLoss(loss_type, beta=0.2, backend="torch", logit_metrics=False, **kw)
    x = logits.clone().requires_grad_()
    out = module(logits=x, labels=labels, ref_logits=ref_logits)
    xr = logits.clone().requires_grad_()
    tl = token_logprobs_ref(xr, labels)["logps"]
    rl = token_logprobs_ref(ref_logits, labels)["logps"]
    s, rs, n = sums(tl, mask), sums(rl, mask), mask.sum(-1).double()
    extra = {"loss_weights": kw["loss_weights"]} if "loss_weights" in kw else {}
    hp = {k: v for k, v in kw.items() if k != "loss_weights"}
    ref = pyfused_po.preference_loss(s[:P], s[P:], rs[:P], rs[P:], loss_type=loss_type, beta=0.2,
                                     chosen_lengths=n[:P], rejected_lengths=n[P:], nll_logps=s[:P],
                                     nll_lengths=n[:P], **extra, **hp)
    compare(out, ref, x, xr)


@pytest.mark.parametrize("ld_reference", [True, False])
def test_ld_alpha_token_weights_and_ref_token_logps(ld_reference):
    logits, ref_logits, labels, _ = make_batch(seed=1)
    mask = labels != IGN
    g = torch.Generator().manual_seed(5)
    tw = torch.rand(2 * P, T, generator=g, dtype=torch.float64) + 0.5
    ref_tokens = token_logprobs_ref(ref_logits, labels)["logps"]
    module = pyfused_po.FusedPreferenceLoss("sigmoid", beta=0.5, backend="torch", ld_alpha=0.3,
                                            ld_alpha_reference=ld_reference)
    x = logits.clone().requires_grad_()
    out = module(logits=x, labels=labels, ref_token_logps=ref_tokens, token_weights=tw)
    xr = logits.clone().requires_grad_()
    ref_out = token_logprobs_ref(xr, labels)
    ld = ld_weights_ref(mask, 0.3)
    s = sums(ref_out["logps"], mask, tw * ld)
    rs = sums(ref_tokens, mask, tw * ld if ld_reference else tw)
    n = mask.sum(-1).double()
    ref = pyfused_po.preference_loss(s[:P], s[P:], rs[:P], rs[P:], beta=0.5, chosen_lengths=n[:P],
                                     rejected_lengths=n[P:])
    ref.metrics["logits/chosen"] = ref_out["mean_logit"][:P][mask[:P]].mean()
    ref.metrics["logits/rejected"] = ref_out["mean_logit"][P:][mask[P:]].mean()
    compare(out, ref, x, xr)
    # the same reference through ref_logits gives the same loss
    same = module(logits=logits, labels=labels, ref_logits=ref_logits, token_weights=tw)
    assert max_rel_err(same.losses, ref.losses) <= 1e-10


def test_orpo_separate_nll_mask_includes_prompt():
    logits, _, labels, prompt = make_batch(seed=2)
    g = torch.Generator().manual_seed(7)
    full = torch.randint(0, V, (P, T), generator=g)
    nll_labels = torch.where(labels[:P] != IGN, labels[:P], full)  # prompt tokens too; padding kept below
    nll_labels[1, 6:] = IGN
    module = pyfused_po.FusedPreferenceLoss("orpo", beta=0.1, backend="torch", logit_metrics=False)
    x = logits.clone().requires_grad_()
    out = module(logits=x, labels=labels, nll_labels=nll_labels)
    xr = logits.clone().requires_grad_()
    mask = labels != IGN
    tl = token_logprobs_ref(xr, labels)["logps"]
    nll_mask = nll_labels != IGN
    nll_tokens = token_logprobs_ref(xr[:P], nll_labels)["logps"]
    s, n = sums(tl, mask), mask.sum(-1).double()
    ref = pyfused_po.preference_loss(s[:P], s[P:], loss_type="orpo", beta=0.1, chosen_lengths=n[:P],
                                     rejected_lengths=n[P:], nll_logps=sums(nll_tokens, nll_mask),
                                     nll_lengths=nll_mask.sum(-1).double())
    assert out.metrics["nll_loss"].item() != pytest.approx(  # the prompt tokens really count
        (-s[:P].sum() / n[:P].sum()).item())
    compare(out, ref, x, xr)
    bad = nll_labels.clone()
    bad[0, 5] = (labels[0, 5] + 1) % V
    with pytest.raises(ValueError, match="nll_labels must equal labels"):
        module(logits=logits, labels=labels, nll_labels=bad)


def test_wpo_weights_from_log_sum_sq_probs_and_pair_overrides():
    logits, ref_logits, labels, _ = make_batch(seed=3)
    mask = labels != IGN
    eps = torch.tensor([0.0, 0.2, 0.45], dtype=torch.float64)
    pw = torch.tensor([1.0, 0.5, 2.0], dtype=torch.float64)
    module = pyfused_po.FusedPreferenceLoss("sigmoid", beta=0.3, backend="torch", use_weighting=True,
                                            logit_metrics=False)
    x = logits.clone().requires_grad_()
    out = module(logits=x, labels=labels, ref_logits=ref_logits, weights=pw, label_smoothing=eps)
    xr = logits.clone().requires_grad_()
    r = token_logprobs_ref(xr, labels)
    n = mask.sum(-1).double()
    # WPO: w = exp(mean over the response of log p_t − log Σ_v p_v²), no gradient
    wpo = (sums((r["logps"] - r["log_sum_sq_probs"]).detach(), mask) / n.clamp(min=1))
    s = sums(r["logps"], mask)
    rs = sums(token_logprobs_ref(ref_logits, labels)["logps"], mask)
    ref = pyfused_po.preference_loss(s[:P], s[P:], rs[:P], rs[P:], beta=0.3, label_smoothing=eps, weights=pw,
                                     use_weighting=True, chosen_wpo_logps=wpo[:P], rejected_wpo_logps=wpo[P:])
    compare(out, ref, x, xr)


def test_bco_running_mean_buffer():
    logits, ref_logits, labels, _ = make_batch(seed=4)
    mask = labels != IGN
    beta = 0.2
    module = pyfused_po.FusedPreferenceLoss("bco_pair", beta=beta, backend="torch", bco_running_mean=True)
    seen = []
    for step in range(2):
        x = (logits + step).requires_grad_()
        out = module(logits=x, labels=labels, ref_logits=ref_logits)
        s = sums(token_logprobs_ref(x.detach(), labels)["logps"], mask)
        rs = sums(token_logprobs_ref(ref_logits, labels)["logps"], mask)
        seen.append(beta * (s - rs))
        delta = torch.cat(seen).mean()
        c, r = beta * (s[:P] - rs[:P]), beta * (s[P:] - rs[P:])
        expected = -torch.log(torch.sigmoid(c - delta)) - torch.log(torch.sigmoid(-(r - delta)))
        assert max_rel_err(out.losses, expected) <= 1e-10
        assert math.isclose(out.metrics["bco_delta"].item(), delta.item(), rel_tol=1e-12)
    module.eval()
    before = module.bco_reward_count.item()
    module(logits=logits, labels=labels, ref_logits=ref_logits)
    assert module.bco_reward_count.item() == before  # no update outside training
    assert "bco_reward_sum" in module.state_dict()


def test_triton_backend_under_interpreter_matches_torch():
    logits, ref_logits, labels, _ = make_batch(dtype=torch.float32, seed=6)
    tw = torch.rand(2 * P, T, dtype=torch.float32) + 0.5
    results = []
    for backend in ("triton", "torch"):
        module = pyfused_po.FusedPreferenceLoss("simpo", beta=0.4, backend=backend, ld_alpha=0.5,
                                                use_weighting=True, cpo_alpha=0.3)
        x = logits.clone().requires_grad_()
        out = module(logits=x, labels=labels, token_weights=tw)
        out.loss.backward()
        results.append((out, x.grad))
    (a, ga), (b, gb) = results
    assert max_rel_err(a.losses, b.losses) <= 1e-5
    assert max_rel_err(ga, gb) <= 1e-5
    for k in b.metrics:
        assert math.isclose(a.metrics[k].item(), b.metrics[k].item(), rel_tol=1e-5, abs_tol=1e-6), k


def test_bad_module_inputs():
    logits, ref_logits, labels, _ = make_batch()
    m = pyfused_po.FusedPreferenceLoss("sigmoid", backend="torch")
    with pytest.raises(ValueError, match="token_weights must have shape"):
        m(logits=logits, labels=labels, ref_logits=ref_logits, token_weights=torch.ones(2 * P, T + 1, dtype=torch.float64))
    with pytest.raises(ValueError, match="one reference source"):
        m(logits=logits, labels=labels, ref_logits=ref_logits, ref_token_logps=torch.zeros(2 * P, T, dtype=torch.float64))
    with pytest.raises(ValueError, match="nll_labels must be"):
        m(logits=logits, labels=labels, ref_logits=ref_logits, nll_labels=labels[:1])
    with pytest.raises(ValueError, match="ld_alpha"):
        pyfused_po.FusedPreferenceLoss("sigmoid", ld_alpha=1.5)
    with pytest.raises(ValueError, match="bco_running_mean"):
        pyfused_po.FusedPreferenceLoss("sigmoid", bco_running_mean=True)
    with pytest.raises(ValueError, match="does not apply"):
        pyfused_po.FusedPreferenceLoss("aot", f_divergence_type="forward_kl")
