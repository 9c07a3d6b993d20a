"""linear_token_logprobs: values and gradients of hidden, weight and bias vs a float64 reference.

The reference builds the float64 logits ``h @ Wᵀ + b`` explicitly and applies the formulas
of ``tests/reference.py``; its gradients come from torch autograd in float64.
"""
import pytest
import torch

from pyfused_po.token.linear_token_logprobs import linear_token_logprobs
from pyfused_po.token.token_logprobs import TokenLogprobs
from reference import max_rel_err, token_logprobs_ref

EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
DIFF_EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logit")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}

# (backend, impl): the PyTorch backend, cuBLAS chunks + Triton fold, fully fused Triton.
IMPLS = [("torch", "chunked"), ("triton", "chunked"), ("triton", "fused")]
IMPL_IDS = ["torch", "triton-chunked", "triton-fused"]


def make_inputs(dtype, *, lead=(2,), T=11, D=37, V=301, bias=True, frozen_weight=False):
    """Odd D and V (not multiples of any block); logits of O(few) so the softmax is not flat."""
    hidden = torch.randn(*lead, T, D).to(dtype).requires_grad_()
    weight = (torch.randn(V, D) * 0.4).to(dtype).requires_grad_(not frozen_weight)
    b = (torch.randn(V) * 0.5).to(dtype).requires_grad_() if bias else None
    labels = torch.randint(0, V, (*lead, T))
    flat = labels.view(-1, T)
    flat[0, :4] = -100  # a prompt
    flat[-1, -2:] = -100  # padding
    return hidden, weight, b, labels


def reference(hidden, weight, bias, labels, coeffs, **kw):
    """float64 results and gradients of Σ_name Σ_t c_name,t · value_name,t."""
    leaves = [t.detach().double().requires_grad_(t.requires_grad) if t is not None else None
              for t in (hidden, weight, bias)]
    h, w, b = leaves
    logits = h @ w.t() + (b if b is not None else 0.0)
    out = token_logprobs_ref(logits, labels, **kw)
    loss = sum((coeffs[name].double() * out[name]).sum() for name in coeffs)
    grads = torch.autograd.grad(loss, [t for t in leaves if t is not None and t.requires_grad])
    it = iter(grads)
    return out, [next(it) if t is not None and t.requires_grad else None for t in leaves]


def run(hidden, weight, bias, labels, coeffs, extras, **kw):
    out = linear_token_logprobs(hidden, weight, labels, bias=bias, extras=extras, **kw)
    values = out._asdict() if isinstance(out, TokenLogprobs) else {"logps": out}
    loss = sum((coeffs[name].to(values[name].dtype) * values[name]).sum() for name in coeffs)
    loss.backward()
    return out, values, [None if t is None else t.grad for t in (hidden, weight, bias)]


def check(values, grads, ref_values, ref_grads, tol, names):
    for name in names:
        assert values[name].shape == ref_values[name].shape
        err = max_rel_err(values[name], ref_values[name])
        assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"
    for arg, g, rg in zip(("hidden", "weight", "bias"), grads, ref_grads):
        if rg is None:
            assert g is None, f"{arg} should get no gradient"
            continue
        assert g is not None, f"{arg} should get a gradient"
        err = max_rel_err(g, rg)
        assert err <= tol, f"grad {arg}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize("backend,impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_shift_softcap_bias_extras(backend, impl, dtype):
    """shift + softcap + bias + ignored tokens, every extra and every extra's gradient."""
    hidden, weight, bias, labels = make_inputs(dtype)
    kw = dict(shift=True, softcap=4.0, temperature=0.8)
    coeffs = {n: torch.randn(labels.shape) for n in ("logps",) + DIFF_EXTRAS}
    ref_values, ref_grads = reference(hidden, weight, bias, labels, coeffs, **kw)
    out, values, grads = run(hidden, weight, bias, labels, coeffs, EXTRAS, backend=backend,
                             impl=impl, chunk_tokens=7, **kw)
    assert isinstance(out, TokenLogprobs)
    assert out.logps.dtype == torch.float32
    check(values, grads, ref_values, ref_grads, TOL[dtype], ("logps",) + EXTRAS)
    assert not out.is_top1.requires_grad
    # position 0 has no prediction under shift; ignored labels give exactly 0
    assert torch.all(out.logps[:, 0] == 0) and torch.all(out.logps[labels == -100] == 0)


@pytest.mark.parametrize("backend,impl", IMPLS, ids=IMPL_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_frozen_weight_no_bias(backend, impl, dtype):
    """Frozen LM head (LoRA): no grad_weight; no bias; scale and temperature; 3-D batch."""
    hidden, weight, bias, labels = make_inputs(dtype, lead=(2, 2), T=6, bias=False,
                                               frozen_weight=True)
    kw = dict(logit_scale=1.3, temperature=0.7)
    coeffs = {"logps": torch.randn(labels.shape)}
    ref_values, ref_grads = reference(hidden, weight, bias, labels, coeffs, **kw)
    out, values, grads = run(hidden, weight, bias, labels, coeffs, (), backend=backend, impl=impl,
                             chunk_tokens=5, **kw)
    assert isinstance(out, torch.Tensor) and out.shape == labels.shape
    check(values, grads, ref_values, ref_grads, TOL[dtype], ("logps",))
    assert weight.grad is None


@pytest.mark.parametrize("backend,impl", IMPLS, ids=IMPL_IDS)
def test_weight_and_bias_only(backend, impl):
    """Hidden frozen (no grad_hidden), 1-D labels, custom ignore_index, fp16 inputs."""
    hidden, weight, bias, labels = make_inputs(torch.float16, lead=(), T=9, D=21, V=77)
    hidden.requires_grad_(False)
    labels[labels == -100] = 7  # 7 is the ignore_index here, a valid vocabulary id otherwise
    labels[5] = 7
    kw = dict(ignore_index=7)
    coeffs = {"logps": torch.randn(labels.shape), "mean_logit": torch.randn(labels.shape)}
    ref_values, ref_grads = reference(hidden, weight, bias, labels, coeffs, **kw)
    out, values, grads = run(hidden, weight, bias, labels, coeffs, ("mean_logit",),
                             backend=backend, impl=impl, **kw)
    check(values, grads, ref_values, ref_grads, TOL[torch.float16], ("logps", "mean_logit"))
    assert hidden.grad is None
    assert torch.all(out.logps[labels == 7] == 0)


@pytest.mark.parametrize("backend,impl", IMPLS, ids=IMPL_IDS)
def test_all_ignored(backend, impl):
    """No labelled token: zeros, and zero (not missing) gradients."""
    hidden, weight, bias, labels = make_inputs(torch.float32, T=5, V=50, D=17)
    labels.fill_(-100)
    out = linear_token_logprobs(hidden, weight, labels, bias=bias, backend=backend, impl=impl)
    assert torch.all(out == 0)
    out.sum().backward()
    for t in (hidden, weight, bias):
        assert t.grad is not None and torch.all(t.grad == 0)


def test_float64_torch_backend_exact():
    """float64 stays float64 on the torch backend and matches to round-off."""
    hidden, weight, bias, labels = make_inputs(torch.float64, T=7, V=90, D=19)
    coeffs = {"logps": torch.randn(labels.shape), "entropy": torch.randn(labels.shape)}
    ref_values, ref_grads = reference(hidden, weight, bias, labels, coeffs, shift=True)
    out, values, grads = run(hidden, weight, bias, labels, coeffs, ("entropy",), shift=True)
    assert out.logps.dtype == torch.float64
    check(values, grads, ref_values, ref_grads, 1e-10, ("logps", "entropy"))


def test_chunk_size_does_not_change_values():
    """The chunked result does not depend on the chunk size (boundaries are exact)."""
    hidden, weight, bias, labels = make_inputs(torch.float32, T=8, V=60, D=17)
    a = linear_token_logprobs(hidden, weight, labels, bias=bias, backend="torch", chunk_tokens=1)
    b = linear_token_logprobs(hidden, weight, labels, bias=bias, backend="torch", chunk_tokens=1000)
    torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend,impl", IMPLS, ids=IMPL_IDS)
def test_strided_inputs(backend, impl):
    """hidden a strided slice, weight a transposed view (tied embeddings stored [D, V])."""
    base = torch.randn(2, 6, 2 * 19)
    hidden = base[..., ::2].requires_grad_()  # non-leaf view: grads land on base
    w_t = (torch.randn(19, 45) * 0.4).requires_grad_()
    weight = w_t.t()
    labels = torch.randint(0, 45, (2, 6))
    labels[1, :2] = -100
    assert not hidden.is_contiguous() and not weight.is_contiguous()
    coeffs = {"logps": torch.randn(labels.shape)}
    h_leaf = hidden.detach().clone().requires_grad_()
    ref_values, ref_grads = reference(h_leaf, w_t.detach().t().requires_grad_(), None, labels,
                                      coeffs, shift=True)
    base.requires_grad_()
    hidden = base[..., ::2]
    out = linear_token_logprobs(hidden, weight, labels, shift=True, backend=backend, impl=impl,
                                chunk_tokens=4)
    (coeffs["logps"] * out).sum().backward()
    assert max_rel_err(out, ref_values["logps"]) <= 1e-5
    assert max_rel_err(base.grad[..., ::2], ref_grads[0]) <= 1e-5
    assert torch.all(base.grad[..., 1::2] == 0)
    assert max_rel_err(w_t.grad.t(), ref_grads[1]) <= 1e-5
