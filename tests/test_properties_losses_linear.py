"""Property-based checks of the objective stage (every loss type) and the fused-linear
token stage (both implementations) against independent float64 references."""
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyfused_po
from reference import max_rel_err, token_logprobs_ref
from test_losses import CASES, check_all, make_inputs, run_case

SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@settings(max_examples=60, **SETTINGS)
@given(case=st.sampled_from(CASES), beta=st.sampled_from([0.1, 0.5, 2.0, 5.0]),  # |βh| = 50 needs log-probs of −50/β
       pairs=st.integers(8, 16), seed=st.integers(0, 2**31 - 1))
def test_every_loss_matches_its_formula(case, beta, pairs, seed):
    loss_type, ref_fn, hp = case
    d = make_inputs(beta, P=pairs, seed=seed)
    if loss_type == "orpo":  # log(1 − e^ℓ̄) needs ℓ̄ < 0 and an empty response has no odds: none here
        d["pc"][0], d["nc"][0] = -0.3, 1.0
    out, leaves, ref, ref_leaves = run_case(loss_type, ref_fn, hp, beta, d)
    check_all(out, leaves, ref, ref_leaves, pairs)


GRAD_TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("impl", ["chunked", "fused"])
@settings(max_examples=20, **SETTINGS)
@given(n=st.integers(1, 12), d=st.integers(1, 40), v=st.integers(1, 150),
       dtype=st.sampled_from([torch.float32, torch.bfloat16]), shift=st.booleans(),
       with_bias=st.booleans(), softcap=st.sampled_from([None, 4.0]), seed=st.integers(0, 2**31 - 1))
def test_linear_token_logprobs_match_reference(impl, n, d, v, dtype, shift, with_bias, softcap, seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(2, n, d, generator=g).to(dtype)
    weight = (torch.randn(v, d, generator=g) * 2 / math.sqrt(d)).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype) if with_bias else None
    labels = torch.randint(0, v, (2, n), generator=g)
    labels[torch.rand(2, n, generator=g) < 0.3] = -100
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    out = pyfused_po.linear_token_logprobs(leaves[0], leaves[1], labels, bias=leaves[2] if with_bias else None,
                                           shift=shift, softcap=softcap, backend="triton", impl=impl)
    ref_leaves = [t.detach().double().requires_grad_() for t in leaves]
    logits = ref_leaves[0] @ ref_leaves[1].t() + (ref_leaves[2] if with_bias else 0.0)
    ref = token_logprobs_ref(logits, labels, shift=shift, softcap=softcap)["logps"]
    # fp32 lse error grows with |z|; with bf16 inputs the chunked path's logits are bf16
    # GEMM outputs (rounded, as a model's bf16 logits are: ≤ 2⁻⁹·|z|).
    scale = max(1.0, logits.detach().abs().max().item())
    value_tol = 1e-5 if dtype == torch.float32 else 4e-3
    assert (out.double() - ref).abs().max().item() <= value_tol * scale
    w = torch.randn(2, n, generator=g, dtype=torch.float64)
    got = torch.autograd.grad((w * out.double()).sum(), leaves)
    want = torch.autograd.grad((w * ref).sum(), ref_leaves)
    for a, b in zip(got, want):
        assert max_rel_err(a, b) <= GRAD_TOL[dtype]


def test_chunked_linear_path_is_bitwise_deterministic():
    hidden, weight = torch.randn(2, 9, 33), torch.randn(101, 33)
    labels = torch.randint(0, 101, (2, 9))
    runs = []
    for _ in range(2):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = pyfused_po.linear_token_logprobs(h, w, labels, backend="triton", impl="chunked", chunk_tokens=4)
        out.sum().backward()
        runs.append((out, h.grad, w.grad))
    for a, b in zip(*runs):
        assert torch.equal(a, b)
