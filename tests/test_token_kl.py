"""token_kl (full-vocabulary KL(π_ref ‖ π_θ) per token) against a float64 reference."""
import pytest
import torch

from pyfused_po.token.token_kl import TokenKL, token_kl
from reference import max_rel_err, token_logprobs_ref, transformed_logits

GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}
VALUE_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-10}


def kl_ref(logits, ref_logits, labels, *, ignore_index=-100, shift=False, **transform):
    """float64 Σ_v p_ref (log p_ref − log p_θ) per token, aligned with labels, 0 where ignored."""
    z = transformed_logits(logits, **transform)
    zr = transformed_logits(ref_logits, **transform)
    if shift:  # logits at t belong to the label at t + 1
        z = torch.cat([torch.zeros_like(z[..., :1, :]), z[..., :-1, :]], dim=-2)
        zr = torch.cat([torch.zeros_like(zr[..., :1, :]), zr[..., :-1, :]], dim=-2)
    valid = labels != ignore_index
    if shift:
        valid[..., 0] = False
    log_p = torch.log_softmax(z, dim=-1)
    log_pr = torch.log_softmax(zr, dim=-1)
    p_ref = log_pr.exp()
    terms = torch.where(p_ref > 0, p_ref * (log_pr - log_p), torch.zeros_like(p_ref))
    return torch.where(valid, terms.sum(-1), torch.zeros((), dtype=torch.float64))


def make_pair(B=2, T=6, V=203, dtype=torch.float32, scale=3.0, ignore_frac=0.3):
    logits = (torch.randn(B, T, V) * scale).to(dtype)
    ref_logits = (torch.randn(B, T, V) * scale).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < ignore_frac] = -100
    return logits, ref_logits, labels


def check(logits, ref_logits, labels, *, backend, value_tol=None, **kw):
    """KL values and the gradient of a random linear functional of them vs float64."""
    x = logits.detach().clone().requires_grad_()
    kl = token_kl(x, ref_logits, labels, backend=backend, **kw)
    x_ref = logits.detach().double().requires_grad_()
    expected = kl_ref(x_ref, ref_logits.double(), labels, **kw)
    assert kl.shape == labels.shape
    assert kl.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
    err = max_rel_err(kl, expected)
    assert err <= (value_tol or VALUE_TOL[logits.dtype]), f"kl: rel err {err:.2e}"
    w = torch.randn(labels.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad((w * kl.double()).sum(), x)
    (grad_ref,) = torch.autograd.grad((w * expected).sum(), x_ref)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    err = max_rel_err(grad, grad_ref)
    assert err <= GRAD_TOL[logits.dtype], f"grad: rel err {err:.2e}"
    return kl, grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("transform", ["plain", "temperature_scale_softcap"])
def test_values_and_gradients(backend, dtype, shift, transform):
    logits, ref_logits, labels = make_pair(dtype=dtype)
    kw = {} if transform == "plain" else dict(temperature=0.7, logit_scale=1.3, softcap=4.0)
    check(logits, ref_logits, labels, backend=backend, shift=shift, **kw)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_float16_and_odd_tiny_vocab(backend):
    logits, ref_logits, labels = make_pair(T=5, V=3, dtype=torch.float16)
    check(logits, ref_logits, labels, backend=backend)


def test_float64_on_torch_backend():
    logits, ref_logits, labels = make_pair(dtype=torch.float64)
    check(logits, ref_logits, labels, backend="torch", shift=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ignored_rows_get_zero_kl_and_zero_gradient(backend):
    logits, ref_logits, labels = make_pair(B=3, T=5, V=150)
    labels[1] = -100  # a whole sequence of padding
    labels[2, 1:3] = -100
    labels[0] = 4
    kl, grad = check(logits, ref_logits, labels, backend=backend)
    ignored = labels == -100
    assert bool((kl[ignored] == 0).all())
    assert bool((grad[ignored] == 0).all())
    assert bool((kl[~ignored] > 0).all())  # independent random rows: KL well above 0


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_shift_leaves_last_row_without_gradient(backend):
    logits, ref_logits, labels = make_pair(B=2, T=5, V=140, ignore_frac=0.0)
    kl, grad = check(logits, ref_logits, labels, backend=backend, shift=True)
    assert bool((kl[:, 0] == 0).all())
    assert bool((grad[:, -1] == 0).all())  # the last position predicts nothing


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_non_contiguous_inputs(backend):
    B, T, V = 2, 5, 211
    # Policy with the vocabulary as the slowest axis; reference as a strided slice;
    # labels as a transposed view.
    logits = (torch.randn(B, V, T) * 2).transpose(1, 2)
    ref_logits = (torch.randn(B, T, 2 * V) * 2)[..., ::2]
    labels = torch.randint(0, V, (T, B)).t()
    labels[0, 2] = -100
    assert not logits.is_contiguous() and not ref_logits.is_contiguous() and not labels.is_contiguous()
    check(logits, ref_logits, labels, backend=backend, shift=True)


# numpy warns on the (masked-out) −inf − (−inf) of padded columns under the interpreter.
@pytest.mark.filterwarnings("ignore:invalid value encountered in subtract:RuntimeWarning")
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_padded_vocabulary_of_minus_inf(backend):
    B, T, V, real = 2, 4, 300, 190  # columns >= 190 are padding: -inf in both models
    logits, ref_logits, labels = make_pair(B=B, T=T, V=V)
    labels = labels.clamp(max=real - 1).where(labels >= 0, labels)
    logits[..., real:] = float("-inf")
    ref_logits[..., real:] = float("-inf")
    # The reference also gives zero mass to a few real tokens the policy keeps.
    ref_logits[..., 5:9] = float("-inf")
    kl, grad = check(logits, ref_logits, labels, backend=backend)
    assert bool(torch.isfinite(kl).all()) and bool(torch.isfinite(grad).all())
    assert bool((grad[..., real:] == 0).all())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_policy_minus_inf_where_reference_has_mass_gives_inf(backend):
    logits, ref_logits, labels = make_pair(B=1, T=3, V=40, ignore_frac=0.0)
    logits[0, 1, 7] = float("-inf")
    kl = token_kl(logits, ref_logits, labels, backend=backend)
    assert kl[0, 1].item() == float("inf")
    assert bool(torch.isfinite(kl[0, [0, 2]]).all())


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_close_distributions_keep_a_small_absolute_error(backend):
    """Policy = reference + small noise: KL ~ 1e-4, while both LSEs are ~36 (LM-like logits
    around 30).  KL assembled as lse − lse_r would lose ~eps·36 ≈ 4e-6 to rounding; the
    kernels' (m − m_r) + log(s/s_r) form keeps the error near eps."""
    logits, _, labels = make_pair(B=2, T=4, V=257, ignore_frac=0.0)
    logits = logits + 30.0
    ref_logits = logits + 0.02 * torch.randn_like(logits)
    kl = token_kl(logits, ref_logits, labels, backend=backend)
    expected = kl_ref(logits, ref_logits, labels)
    assert float(expected.min()) > 0 and float(expected.max()) < 1e-3
    assert float((kl.double() - expected).abs().max()) <= 5e-7


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_identical_models_give_zero(backend):
    logits, _, labels = make_pair(B=1, T=4, V=133)
    kl = token_kl(logits, logits.clone(), labels, backend=backend)
    assert float(kl.abs().max()) <= 1e-6


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_with_logps_matches_token_logprobs_reference(backend):
    logits, ref_logits, labels = make_pair(B=2, T=5, V=170)
    x = logits.clone().requires_grad_()
    out = token_kl(x, ref_logits, labels, backend=backend, with_logps=True, shift=True)
    assert isinstance(out, TokenKL)
    x_ref = logits.double().requires_grad_()
    exp_kl = kl_ref(x_ref, ref_logits.double(), labels, shift=True)
    exp_lp = token_logprobs_ref(x_ref, labels, shift=True)["logps"]
    assert max_rel_err(out.kl, exp_kl) <= 1e-5
    assert max_rel_err(out.logps, exp_lp) <= 1e-5
    w1, w2 = torch.randn(2, *labels.shape, dtype=torch.float64)
    (grad,) = torch.autograd.grad((w1 * out.kl).sum() + (w2 * out.logps).sum(), x)
    (grad_ref,) = torch.autograd.grad((w1 * exp_kl).sum() + (w2 * exp_lp).sum(), x_ref,
                                    retain_graph=True)
    assert max_rel_err(grad, grad_ref) <= 1e-5
    # The log-probs alone carry their gradient too.
    (grad_lp,) = torch.autograd.grad(token_kl(x, ref_logits, labels, backend=backend,
                                              with_logps=True, shift=True).logps.sum(), x)
    (grad_lp_ref,) = torch.autograd.grad(exp_lp.sum(), x_ref)
    assert max_rel_err(grad_lp, grad_lp_ref) <= 1e-5


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_reference_gets_no_gradient_and_extra_batch_dims(backend):
    logits = torch.randn(2, 2, 4, 90, requires_grad=True)
    ref_logits = torch.randn(2, 2, 4, 90, requires_grad=True)
    labels = torch.randint(0, 90, (2, 2, 4))
    kl = token_kl(logits, ref_logits, labels, backend=backend)
    assert kl.shape == labels.shape
    assert max_rel_err(kl, kl_ref(logits.detach(), ref_logits.detach(), labels)) <= 1e-5
    kl.sum().backward()
    assert ref_logits.grad is None and logits.grad is not None


def test_backends_agree_on_bfloat16():
    logits, ref_logits, labels = make_pair(dtype=torch.bfloat16, T=4, V=129)
    a = token_kl(logits, ref_logits, labels, backend="triton", softcap=5.0)
    b = token_kl(logits, ref_logits, labels, backend="torch", softcap=5.0)
    assert max_rel_err(a, b) <= 1e-5


def test_bad_inputs_raise_before_launch():
    logits, ref_logits, labels = make_pair(B=1, T=3, V=20)
    with pytest.raises(ValueError, match="ref_logits must have the shape"):
        token_kl(logits, ref_logits[..., :10], labels)
    with pytest.raises(TypeError, match="ref_logits must be a floating tensor"):
        token_kl(logits, ref_logits.long(), labels)
    with pytest.raises(TypeError, match="ref_logits must be a torch.Tensor"):
        token_kl(logits, ref_logits.tolist(), labels)
    with pytest.raises(TypeError, match="float64"):
        token_kl(logits, ref_logits.double(), labels, backend="triton")
    with pytest.raises(ValueError, match="temperature"):
        token_kl(logits, ref_logits, labels, temperature=0.0)
    with pytest.raises(ValueError, match="labels must be in"):
        token_kl(logits, ref_logits, labels + 100)
    with pytest.raises(ValueError, match="backend"):
        token_kl(logits, ref_logits, labels, backend="cuda")
