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
    _check_against_reference(spec, path, "torch")


@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("spec", [CASES[1], CASES[4]])
def test_triton_backend_log_probs_entropy_and_gradients(spec, path):
    """The Triton fold (float32 inputs) against the same float64 reference, both paths."""
    _check_against_reference(spec, path, "triton")


def _check_against_reference(spec, path, backend):
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

    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = dict(rtol=1e-12, atol=1e-12) if backend == "torch" else dict(rtol=2e-5, atol=2e-5)
    sources = dict(logits=logits.to(dtype).requires_grad_(True)) if path == "logits" else \
        dict(hidden=hidden.to(dtype).requires_grad_(True), weight=weight.to(dtype).requires_grad_(True))
    logp, entropy, out = rl.rl_token_logprobs(labels, temperature=T, with_entropy=True, return_outside=True,
                                              backend=backend, **spec, **sources)
    assert logp.dtype == (torch.float64 if backend == "torch" else torch.float32)
    assert torch.equal(out, outside) and int(out.sum()) == int(outside.sum())
    assert torch.all(logp[outside] == -math.inf)
    torch.testing.assert_close(logp[~outside].double(), want_logp[~outside], **tol)
    torch.testing.assert_close(entropy.double(), want_entropy, **tol)
    ((logp.masked_fill(outside, 0) * g_logp.to(dtype)).sum() + (entropy * g_entropy.to(dtype)).sum()).backward()
    if path == "logits":
        z_ref = (hidden @ weight.T).requires_grad_(True)
        lq = torch.log_softmax((z_ref / T).masked_fill(~kept, -math.inf), -1)
        lp = lq.gather(-1, labels[:, None])[:, 0].masked_fill(outside, 0)
        h = _entropy(lq, kept)
        want = torch.autograd.grad((lp * g_logp).sum() + (h * g_entropy).sum(), z_ref)[0]
        torch.testing.assert_close(sources["logits"].grad.double(), want, **tol)
        assert torch.all(sources["logits"].grad[~kept] == 0)  # zero outside the kept set
    else:
        tol = dict(rtol=1e-11, atol=1e-12) if backend == "torch" else dict(rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(sources["hidden"].grad.double(), leaves[0].grad, **tol)
        torch.testing.assert_close(sources["weight"].grad.double(), leaves[1].grad, **tol)


@pytest.mark.parametrize("backend, dtype", [("torch", torch.float64), ("triton", torch.float32)])
def test_ties_at_the_boundaries_are_kept_whole(backend, dtype):
    """top-k 2 on [3, 2, 2, 1] keeps three values (both 2s), top-k 1 on [2, 2, 1] both 2s;
    top-p 0.4 on four equal values reaches 0.4 at the second and keeps all four (the tie with the
    last kept value)."""
    labels = torch.tensor([2, 3])
    logits = torch.tensor([[3.0, 2.0, 2.0, 1.0], [0.5, 0.5, 0.5, 0.5]], dtype=dtype)
    kw = dict(return_outside=True, backend=backend)
    logp, _, out = rl.rl_token_logprobs(labels[:1], logits=logits[:1], top_k=2, **kw)
    torch.testing.assert_close(logp, torch.log_softmax(logits[0, :3], -1)[2:3])
    logp, _, out = rl.rl_token_logprobs(torch.tensor([1]), logits=logits[:1, 1:], top_k=1, **kw)
    torch.testing.assert_close(logp, torch.tensor([math.log(0.5)], dtype=dtype))
    logp, _, out = rl.rl_token_logprobs(labels[1:], logits=logits[1:], top_p=0.4, **kw)
    torch.testing.assert_close(logp, torch.tensor([math.log(0.25)], dtype=dtype))
    assert not out.any()


def test_no_truncation_equals_the_full_softmax():
    """top_k ≥ V, top_p = 1 and min_p = 0 truncate nothing: the plain path's values."""
    hidden, weight = _data(2)
    logits = (hidden @ weight.T).float()
    labels = torch.arange(len(logits)) % logits.shape[-1]
    plain, _ = rl.rl_token_logprobs(labels, logits=logits, temperature=T, backend="torch")
    for spec in (dict(top_k=logits.shape[-1]), dict(top_p=1.0), dict(min_p=0.0), dict(top_k=10**6, top_p=1.0)):
        got, _ = rl.rl_token_logprobs(labels, logits=logits, temperature=T, backend="torch", batch_invariant=True,
                                      **spec)
        torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_triton_backend_float32_and_shift(path):
    """backend='triton' (same chunked implementation) on float32 with shift=True: the float64
    reference's values on the rows that predict the next label."""
    hidden, weight = _data(3, n=10)
    logits = hidden @ weight.T
    labels = torch.randint(0, weight.shape[0], (10,), generator=torch.Generator().manual_seed(3))
    want, want_h, _ = _reference(logits[:-1], labels[1:], T, top_k=15, top_p=0.9)
    src = dict(logits=logits.float()[None]) if path == "logits" else \
        dict(hidden=hidden.float()[None], weight=weight.float())
    got, got_h = rl.rl_token_logprobs(labels[None], temperature=T, top_k=15, top_p=0.9, with_entropy=True,
                                      shift=True, backend="triton", **src)
    assert got[0, 0] == 0
    inside = torch.isfinite(want)
    torch.testing.assert_close(got[0, 1:][inside].double(), want[inside], rtol=1e-5, atol=1e-5)
    assert torch.all(got[0, 1:][~inside] == -math.inf)
    torch.testing.assert_close(got_h[0, 1:].double(), want_h, rtol=1e-5, atol=1e-5)


def test_packed_stream_equals_rows():
    hidden, weight = _data(4, n=10)
    labels = torch.randint(0, weight.shape[0], (2, 5), generator=torch.Generator().manual_seed(4))
    kw = dict(temperature=T, top_k=11, top_p=0.85, with_entropy=True, shift=True, backend="torch")
    packed = rl.rl_token_logprobs(labels.reshape(1, 10), hidden=hidden[None], weight=weight,
                                  cu_seqlens=torch.tensor([0, 5, 10]), return_outside=True, **kw)
    rows = rl.rl_token_logprobs(labels, hidden=hidden.reshape(2, 5, -1), weight=weight, return_outside=True, **kw)
    for a, b in zip(packed, rows):
        assert torch.equal(a.reshape(2, 5), b)


@pytest.mark.parametrize("bad, message", [
    (dict(top_k=0), "top_k must be None or an int >= 1"), (dict(top_k=2.5), "top_k"), (dict(top_k=True), "top_k"),
    (dict(top_p=0.0), r"top_p must be None or a number in \(0, 1\]"), (dict(top_p=1.5), "top_p"),
    (dict(min_p=1.0), r"min_p must be None or a number in \[0, 1\)"), (dict(min_p=-0.1), "min_p"),
    (dict(temperature=0.0), "temperature must be a finite number > 0"), (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"), (dict(top_p=0.5, sampler_order="sglang"), "order must be one of"),
])
def test_bad_sampler_arguments_are_named(bad, message):
    logits = torch.zeros(2, 5)
    with pytest.raises(ValueError, match=message):
        rl.rl_token_logprobs(torch.zeros(2, dtype=torch.long), logits=logits, **bad)


def test_drop_ins_take_the_samplers_truncation():
    hidden, weight = _data(5)
    logits = hidden @ weight.T
    want, _, kept = _reference(logits, torch.zeros(len(logits), dtype=torch.long), T, top_k=8, top_p=0.9)
    labels = _labels_inside_and_out(kept, 5)
    want, _, _ = _reference(logits, labels, T, top_k=8, top_p=0.9)
    torch.testing.assert_close(rl.log_probs_from_logits(logits, labels, T, top_k=8, top_p=0.9), want)
    torch.testing.assert_close(rl.logprobs_from_logits(logits / T, labels, top_k=8, top_p=0.9), want)
