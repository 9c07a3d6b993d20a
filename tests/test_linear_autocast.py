"""linear_token_logprobs under torch.autocast (fp32 master weights, bf16/fp16 GEMMs).

What the GEMMs see are the operands rounded to the autocast dtype, so the float64
reference is computed on those rounded operands (the cast's own gradient is the identity).
The backward runs outside the autocast region, as autograd runs it on CUDA.
"""
import pytest
import torch

from pyfused_po import FusedPreferenceLoss, linear_token_logprobs
from test_linear_token_logprobs import DIFF_EXTRAS, IMPL_IDS, IMPLS, TOL, check, make_inputs, reference, run

CAST = [torch.bfloat16, torch.float16]
CAST_IDS = ["bf16", "fp16"]


def _rounded(t, dtype):
    return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)


@pytest.mark.parametrize("backend,impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("dtype", CAST, ids=CAST_IDS)
def test_fp32_inputs_run_in_autocast_dtype(backend, impl, dtype):
    hidden, weight, bias, labels = make_inputs(torch.float32, T=9, D=29, V=203)
    kw = dict(shift=True, softcap=5.0)
    coeffs = {n: torch.randn(labels.shape) for n in ("logps",) + DIFF_EXTRAS}
    ref_values, ref_grads = reference(*(_rounded(t, dtype) for t in (hidden, weight, bias)), labels, coeffs, **kw)
    with torch.autocast("cpu", dtype=dtype):
        out = linear_token_logprobs(hidden, weight, labels, bias=bias, extras=DIFF_EXTRAS, backend=backend,
                                    impl=impl, chunk_tokens=6, **kw)
    values = out._asdict()
    sum((coeffs[n] * values[n]).sum() for n in coeffs).backward()
    grads = [hidden.grad, weight.grad, bias.grad]
    check(values, grads, ref_values, ref_grads, TOL[dtype], ("logps",) + DIFF_EXTRAS)
    assert all(g.dtype == torch.float32 for g in grads)
    # The fp32 accumulators reach the fp32 parameters unrounded (F.linear under autocast
    # would round grad_weight to bf16/fp16 first).
    assert (weight.grad.to(dtype).float() != weight.grad).any()


@pytest.mark.parametrize("backend,impl", IMPLS, ids=IMPL_IDS)
def test_backward_outside_autocast_equals_inside(backend, impl):
    """Forward and backward use the same operand dtype wherever the backward runs."""
    grads = []
    for inside in (True, False):
        torch.manual_seed(0)
        hidden, weight, bias, labels = make_inputs(torch.float32, T=7, D=19, V=97)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend, impl=impl).sum()
            if inside:
                loss.backward()
        if not inside:
            loss.backward()
        grads.append([hidden.grad, weight.grad, bias.grad])
    for a, b in zip(*grads):
        if impl == "fused":  # fp32 atomics: the order of additions varies
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(a, b)


def test_mixed_dtypes_need_autocast():
    """bf16 hidden states with an fp32 head: accepted under autocast, each gradient in its
    input's dtype; outside autocast the mismatch is an error that names it."""
    hidden, weight, bias, labels = make_inputs(torch.float32, T=6, D=17, V=61)
    hidden = hidden.detach().bfloat16().requires_grad_()
    with pytest.raises(TypeError, match=r"weight must have the dtype of hidden \(torch.bfloat16\) outside "
                                        r"torch.autocast, got torch.float32"):
        linear_token_logprobs(hidden, weight, labels, bias=bias, backend="torch")
    coeffs = {"logps": torch.randn(labels.shape)}
    ref_values, ref_grads = reference(hidden, _rounded(weight, torch.bfloat16), _rounded(bias, torch.bfloat16),
                                      labels, coeffs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, values, grads = run(hidden, weight, bias, labels, coeffs, (), backend="torch")
    check(values, grads, ref_values, ref_grads, TOL[torch.bfloat16], ("logps",))
    assert [g.dtype for g in grads] == [torch.bfloat16, torch.float32, torch.float32]


def test_float64_is_not_autocast():
    """autocast leaves float64 alone (as it does for F.linear): exact float64 results."""
    hidden, weight, bias, labels = make_inputs(torch.float64, T=5, D=13, V=41)
    coeffs = {"logps": torch.randn(labels.shape)}
    ref_values, ref_grads = reference(hidden, weight, bias, labels, coeffs)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, values, grads = run(hidden, weight, bias, labels, coeffs, (), backend="torch")
    assert out.dtype == torch.float64
    check(values, grads, ref_values, ref_grads, 1e-10, ("logps",))


def test_module_hidden_path_under_autocast():
    """FusedPreferenceLoss(hidden=, weight=) under autocast equals the same loss on the
    rounded operands, and the fp32 head's gradient is not rounded."""
    torch.manual_seed(1)
    hidden, weight, _, labels = make_inputs(torch.float32, lead=(4,), T=8, D=23, V=83, bias=False)
    ref_logps = torch.randn(4)
    loss_fn = FusedPreferenceLoss("sigmoid", beta=0.2, shift=True, backend="torch")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_fn(labels=labels, hidden=hidden, weight=weight, ref_chosen_logps=ref_logps[:2],
                       ref_rejected_logps=ref_logps[2:]).loss
    loss.backward()
    h16, w16 = _rounded(hidden, torch.bfloat16), _rounded(weight, torch.bfloat16)
    expected = loss_fn(labels=labels, hidden=h16, weight=w16, ref_chosen_logps=ref_logps[:2],
                       ref_rejected_logps=ref_logps[2:]).loss
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=1e-7)
    assert weight.grad.dtype == torch.float32
    torch.testing.assert_close(weight.grad, w16.grad.float(), rtol=2e-2, atol=1e-3)
    assert (weight.grad.bfloat16().float() != weight.grad).any()
