"""Truncated-support log-probs (``rl_token_logprobs(top_k=, top_p=, min_p=)``).

The reference is written here, in float64, from the definition (a per-row loop over the values in
descending order), and is itself checked against Hugging Face's warpers
(``TemperatureLogitsWarper → TopKLogitsWarper → TopPLogitsWarper → MinPLogitsWarper``); vLLM's
order (min-p before top-k / top-p) is checked against the same warpers composed in that order.
Gradients are checked against autograd through ``log_softmax`` of the logits masked to the
reference's kept set (held fixed).
"""
import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from pyfused_po.integrations import rl

T = 0.8
CASES = [dict(top_k=7), dict(top_p=0.8), dict(min_p=0.1), dict(top_k=12, top_p=0.7),
         dict(top_k=9, top_p=0.9, min_p=0.05), dict(top_p=0.5, min_p=0.2)]


def _reference_kept(z, top_k=None, top_p=None, min_p=None, order="hf"):
    """Kept set of one float64 row of temperature-scaled logits, by walking the sorted values."""
    values = sorted(z.tolist(), reverse=True)
    kept = [True] * len(values)  # over `values` (descending)

    def apply_min_p():
        for i, v in enumerate(values):
            kept[i] = kept[i] and math.exp(v - values[0]) >= min_p

    if order == "vllm" and min_p:
        apply_min_p()
    live = [v for v, k in zip(values, kept) if k]
    if top_k is not None and top_k < len(live):
        kth = live[top_k - 1]
        for i, v in enumerate(values):
            kept[i] = kept[i] and v >= kth
    if top_p is not None and top_p < 1:
        live = [v for v, k in zip(values, kept) if k]
        norm = sum(math.exp(v - live[0]) for v in live)
        mass, last = 0.0, live[0]
        for v in live:
            if mass >= top_p:
                break
            last = v
            mass += math.exp(v - live[0]) / norm
        for i, v in enumerate(values):
            kept[i] = kept[i] and v >= last
    if order == "hf" and min_p:
        apply_min_p()
    cut = min(v for v, k in zip(values, kept) if k)
    return z >= cut


def _reference(logits, labels, temperature, **spec):
    """(log p̃ [N], H(p̃) [N], kept [N, V]) in float64 of rows ``logits [N, V]``."""
    z = logits.double() / temperature
    kept = torch.stack([_reference_kept(row, **spec) for row in z])
    logq = torch.log_softmax(z.masked_fill(~kept, -math.inf), -1)
    logp = logq.gather(-1, labels[:, None])[:, 0]
    entropy = _entropy(logq, kept)
    return logp, entropy, kept


def _entropy(logq, kept):
    """H of a distribution given by its log-probs on ``kept`` (the rest has p = 0); no 0·(−inf) in
    the graph, so autograd gives finite gradients."""
    logq = logq.masked_fill(~kept, 0.0)
    return -(logq.exp().masked_fill(~kept, 0.0) * logq).sum(-1)


def _hf_kept(logits, temperature, top_k=None, top_p=None, min_p=None, order="hf"):
    scores = TemperatureLogitsWarper(temperature)(None, logits.double())
    steps = {"k": lambda s: TopKLogitsWarper(top_k)(None, s) if top_k is not None else s,
             "p": lambda s: TopPLogitsWarper(top_p)(None, s) if top_p is not None else s,
             "m": lambda s: MinPLogitsWarper(min_p)(None, s) if min_p is not None else s}
    for step in ("kpm" if order == "hf" else "mkp"):
        scores = steps[step](scores)
    return torch.isfinite(scores)


def _data(seed, n=12, v=40, d=16):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, d, generator=g, dtype=torch.float64)
    weight = torch.randn(v, d, generator=g, dtype=torch.float64) / 2
    return hidden, weight


def _labels_inside_and_out(kept, seed):
    """Labels: most rows a kept token, every third row a token outside the kept set (if any)."""
    g = torch.Generator().manual_seed(seed)
    labels = []
    for i, row in enumerate(kept):
        pool = (~row if i % 3 == 2 and (~row).any() else row).nonzero()[:, 0]
        labels.append(int(pool[torch.randint(len(pool), (1,), generator=g)]))
    return torch.tensor(labels)


@pytest.mark.parametrize("order", ["hf", "vllm"])
@pytest.mark.parametrize("spec", CASES)
def test_reference_kept_set_matches_hugging_face_warpers(spec, order):
    hidden, weight = _data(0, n=32)
    logits = hidden @ weight.T
    kept = torch.stack([_reference_kept(row, order=order, **spec) for row in logits / T])
    assert torch.equal(kept, _hf_kept(logits, T, order=order, **spec))


def test_orders_differ_where_min_p_and_top_p_meet():
    """p = [0.5, 0.3, 0.2], top_p 0.6, min_p 0.5: Hugging Face keeps {0.5, 0.3}; vLLM drops 0.2 by
    min-p first, renormalizes to [0.625, 0.375] and top-p keeps only the first."""
    logits = torch.tensor([[math.log(0.5), math.log(0.3), math.log(0.2)]])
    labels = torch.tensor([1])
    hf, _ = rl.rl_token_logprobs(labels, logits=logits, top_p=0.6, min_p=0.5, backend="torch")
    vllm, _ = rl.rl_token_logprobs(labels, logits=logits, top_p=0.6, min_p=0.5, sampler_order="vllm",
                                   backend="torch")
    torch.testing.assert_close(hf, torch.tensor([math.log(0.3 / 0.8)]))
    assert vllm.item() == -math.inf
    assert torch.equal(_hf_kept(logits, 1.0, top_p=0.6, min_p=0.5), torch.tensor([[True, True, False]]))
    assert torch.equal(_hf_kept(logits, 1.0, top_p=0.6, min_p=0.5, order="vllm"), torch.tensor([[True, False, False]]))


@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("spec", CASES)
def test_float64_log_probs_entropy_and_gradients(spec, path):
    hidden, weight = _data(1)
    logits = hidden @ weight.T
    want_logp, want_entropy, kept = _reference(logits, torch.zeros(len(logits), dtype=torch.long), T, **spec)
    labels = _labels_inside_and_out(kept, 1)
    want_logp, want_entropy, _ = _reference(logits, labels, T, **spec)
    outside = ~kept.gather(-1, labels[:, None])[:, 0]
    assert outside.any() and not outside.all()
    g_logp = torch.linspace(0.5, 1.5, len(labels), dtype=torch.float64).masked_fill(outside, 0)
    g_entropy = torch.linspace(-0.3, 0.2, len(labels), dtype=torch.float64)

    # Reference gradients: autograd through the masked log_softmax, the mask held fixed.
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight)]
    z = (leaves[0] @ leaves[1].T) / T
    logq = torch.log_softmax(z.masked_fill(~kept, -math.inf), -1)
    ref_logp = logq.gather(-1, labels[:, None])[:, 0]
    ref_entropy = _entropy(logq, kept)
    ((ref_logp.masked_fill(outside, 0) * g_logp).sum() + (ref_entropy * g_entropy).sum()).backward()

    sources = dict(logits=logits.clone().requires_grad_(True)) if path == "logits" else \
        dict(hidden=hidden.clone().requires_grad_(True), weight=weight.clone().requires_grad_(True))
    logp, entropy, out = rl.rl_token_logprobs(labels, temperature=T, with_entropy=True, return_outside=True,
                                              backend="torch", **spec, **sources)
    assert logp.dtype == torch.float64
    assert torch.equal(out, outside) and int(out.sum()) == int(outside.sum())
    assert torch.all(logp[outside] == -math.inf)
    torch.testing.assert_close(logp[~outside], want_logp[~outside], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(entropy, want_entropy, rtol=1e-12, atol=1e-12)
    ((logp.masked_fill(outside, 0) * g_logp).sum() + (entropy * g_entropy).sum()).backward()
    if path == "logits":
        z_ref = (hidden @ weight.T).requires_grad_(True)
        lq = torch.log_softmax((z_ref / T).masked_fill(~kept, -math.inf), -1)
        lp = lq.gather(-1, labels[:, None])[:, 0].masked_fill(outside, 0)
        h = _entropy(lq, kept)
        want = torch.autograd.grad((lp * g_logp).sum() + (h * g_entropy).sum(), z_ref)[0]
        torch.testing.assert_close(sources["logits"].grad, want, rtol=1e-12, atol=1e-12)
        assert torch.all(sources["logits"].grad[~kept] == 0)  # zero outside the kept set
    else:
        torch.testing.assert_close(sources["hidden"].grad, leaves[0].grad, rtol=1e-11, atol=1e-12)
        torch.testing.assert_close(sources["weight"].grad, leaves[1].grad, rtol=1e-11, atol=1e-12)
