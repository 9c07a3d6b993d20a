"""token_logprobs on both backends against the float64 reference: values and gradients."""
import pytest
import torch

import pyfused_po
from pyfused_po.token.token_logprobs import TokenLogprobs
from reference import max_rel_err, token_logprobs_ref

EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
DIFFERENTIABLE = ("logps", "entropy", "log_sum_sq_probs", "mean_logit")
# Gradients are rounded to the logits' dtype, values are fp32.
GRAD_TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-10}
VALUE_TOL = {torch.float32: 1e-5, torch.float16: 1e-5, torch.bfloat16: 1e-5, torch.float64: 1e-10}


def make_batch(B=2, T=7, V=300, dtype=torch.float32, scale=3.0, ignore_frac=0.3):
    logits = (torch.randn(B, T, V) * scale).to(dtype)
    labels = torch.randint(0, V, (B, T))
    labels[torch.rand(B, T) < ignore_frac] = -100
    return logits, labels


def check_against_reference(logits, labels, *, backend, extras=EXTRAS, grad_names=DIFFERENTIABLE, **kw):
    """Compares every output and the gradient of a random linear functional of them."""
    x = logits.detach().clone().requires_grad_()
    out = pyfused_po.token_logprobs(x, labels, extras=extras, backend=backend, **kw)
    out = out if isinstance(out, TokenLogprobs) else TokenLogprobs(out)
    x_ref = logits.detach().double().requires_grad_()
    ref = token_logprobs_ref(x_ref, labels, **kw)
    for name in ("logps",) + tuple(extras):
        got = getattr(out, name)
        assert got.shape == labels.shape, name
        assert got.dtype == (torch.float64 if logits.dtype == torch.float64 else torch.float32)
        err = max_rel_err(got, ref[name])
        assert err <= VALUE_TOL[logits.dtype], f"{name}: rel err {err:.2e}"
    weights = {n: torch.randn(labels.shape, dtype=torch.float64) for n in grad_names}
    loss = sum((weights[n] * getattr(out, n).double()).sum() for n in grad_names)
    loss_ref = sum((weights[n] * ref[n]).sum() for n in grad_names)
    (grad,) = torch.autograd.grad(loss, x)
    (grad_ref,) = torch.autograd.grad(loss_ref, x_ref)
    assert grad.dtype == logits.dtype and grad.shape == logits.shape
    err = max_rel_err(grad, grad_ref)
    assert err <= GRAD_TOL[logits.dtype], f"grad: rel err {err:.2e}"
    return out, grad


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shift", [False, True])
@pytest.mark.parametrize("transform", ["plain", "temperature_scale_softcap"])
def test_values_and_gradients(backend, dtype, shift, transform):
    logits, labels = make_batch(dtype=dtype)
    kw = {} if transform == "plain" else dict(temperature=0.7, logit_scale=1.3, softcap=4.0)
    check_against_reference(logits, labels, backend=backend, shift=shift, **kw)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("grad_of", ["logps", "entropy", "log_sum_sq_probs", "mean_logit"])
def test_each_output_alone_carries_its_gradient(backend, grad_of):
    logits, labels = make_batch(T=5, V=130)
    check_against_reference(logits, labels, backend=backend, grad_names=(grad_of,), shift=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_without_extras_returns_a_tensor(backend):
    logits, labels = make_batch(T=4, V=50)
    out = pyfused_po.token_logprobs(logits, labels, backend=backend)
    assert isinstance(out, torch.Tensor) and out.shape == labels.shape
    ref = token_logprobs_ref(logits, labels)["logps"]
    assert max_rel_err(out, ref) <= 1e-5


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_ignored_rows_and_fully_ignored_sequence(backend):
    logits, labels = make_batch(B=3, T=6, V=200)
    labels[1] = -100  # the whole second sequence is padding
    labels[0, ::2] = 7
    labels[2, 1:4] = -100
    out, grad = check_against_reference(logits, labels, backend=backend)
    ignored = labels == -100
    for name in DIFFERENTIABLE + ("is_top1",):
        assert torch.all(getattr(out, name)[ignored] == 0), name
    assert torch.all(grad[ignored] == 0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_custom_ignore_index_and_int32_labels(backend):
    logits, labels = make_batch(T=5, V=90)
    labels = torch.where(labels == -100, torch.full_like(labels, 3), labels).to(torch.int32)
    x = logits.clone().requires_grad_()
    out = pyfused_po.token_logprobs(x, labels, ignore_index=3, backend=backend)
    ref = token_logprobs_ref(logits, labels.long(), ignore_index=3)["logps"]
    assert max_rel_err(out, ref) <= 1e-5
    out.sum().backward()
    assert torch.all(x.grad[labels == 3] == 0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("layout", ["seq_major", "strided_vocab", "sliced"])
def test_non_contiguous_inputs(backend, layout):
    B, T, V = 2, 6, 150
    if layout == "seq_major":  # [T, B, V] storage seen as [B, T, V]
        logits = (torch.randn(T, B, V) * 2).transpose(0, 1)
        labels = torch.randint(0, V, (T, B)).t()
    elif layout == "strided_vocab":  # every other vocabulary entry of a wider tensor
        logits = (torch.randn(B, T, 2 * V) * 2)[..., ::2]
        labels = torch.randint(0, V, (B, T))
    else:  # logits[:, :-1] next to labels[:, 1:], the usual causal-LM slicing
        logits = (torch.randn(B, T + 1, V) * 2)[:, :-1]
        labels = torch.randint(0, V, (B, T + 1))[:, 1:]
    assert not logits.is_contiguous()
    labels[0, 2] = -100
    check_against_reference(logits, labels, backend=backend, shift=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("V", [1, 5, 128, 129, 257])
def test_vocab_sizes_around_the_block(backend, V):
    logits, labels = make_batch(T=4, V=V)
    check_against_reference(logits, labels, backend=backend)


@pytest.mark.parametrize("V", [1, 2, 3, 9, 300])
def test_bf16_rows_of_any_width(V):
    """bf16 rows are read as 32-bit words in the aligned body (``fast_math.body_keys``) when their
    lane rows hold an even number of elements: tiny vocabularies have lane rows of 1, 2 or 4, and
    V = 300 with T = 7 puts rows at every offset mod 8 (heads of 0–7 elements)."""
    logits, labels = make_batch(T=7, V=V, dtype=torch.bfloat16)
    check_against_reference(logits, labels, backend="triton")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_more_leading_dims_and_single_sequence(backend):
    logits = torch.randn(2, 2, 5, 70)
    labels = torch.randint(0, 70, (2, 2, 5))
    check_against_reference(logits, labels, backend=backend, shift=True)
    check_against_reference(logits[0, 0], labels[0, 0], backend=backend, shift=True)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_writes_into_the_logits(backend, dtype):
    logits, labels = make_batch(dtype=dtype, V=170)
    expected = None
    for inplace in (False, True):
        leaf = logits.clone().requires_grad_()
        x = leaf * 1  # a non-leaf, as logits coming out of an lm_head are
        x.retain_grad()
        out = pyfused_po.token_logprobs(x, labels, shift=True, inplace_backward=inplace, backend=backend)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        if inplace:
            # The logits' own storage now holds the gradient.
            assert torch.equal(x.detach(), expected)
            assert torch.equal(x.grad, expected)
            assert torch.equal(leaf.grad, expected)
        else:
            expected = x.grad.clone()


def test_inplace_backward_refuses_a_logits_view_it_cannot_address():
    base = torch.randn(3, 4, 5, 20)
    logits = base.permute(1, 0, 2, 3)[:, :, :4]  # [4, 3, 4, 20]: (4, 3) cannot merge into one stride
    labels = torch.randint(0, 20, (4, 3, 4))
    with pytest.raises(ValueError, match="inplace_backward"):
        pyfused_po.token_logprobs(logits, labels, inplace_backward=True, backend="torch")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_padded_vocabulary_of_minus_inf(backend):
    logits, labels = make_batch(T=5, V=200)
    logits[..., 150:] = float("-inf")  # padded vocab entries never win probability mass
    labels = labels.clamp(max=149)
    labels[0, 0] = -100
    finite_extras = ("entropy", "log_sum_sq_probs", "is_top1")  # mean_logit is −inf here
    check_against_reference(logits, labels, backend=backend, extras=finite_extras,
                            grad_names=("logps", "entropy", "log_sum_sq_probs"))
    x = logits.clone().requires_grad_()
    out = pyfused_po.token_logprobs(x, labels, extras=finite_extras, backend=backend)
    (out.logps.sum() + out.entropy.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.all(x.grad[..., 150:] == 0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_in_a_row_propagates_to_that_token_only(backend):
    logits, labels = make_batch(B=1, T=4, V=60, ignore_frac=0.0)
    logits[0, 2, 17] = float("nan")
    out = pyfused_po.token_logprobs(logits, labels, backend=backend)
    assert torch.isnan(out[0, 2])
    assert torch.isfinite(out[0, [0, 1, 3]]).all()


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_large_logits_do_not_overflow(backend, dtype):
    logits, labels = make_batch(T=5, V=100, dtype=dtype, scale=1.0)
    logits = (logits.float() * 1e4 if dtype == torch.float16 else logits.float() * 1e30).to(dtype)
    out = pyfused_po.token_logprobs(logits, labels, backend=backend)
    ref = token_logprobs_ref(logits, labels)["logps"]
    assert torch.isfinite(out).all()
    assert max_rel_err(out, ref) <= 1e-5


def test_is_top1_is_not_differentiable_and_marks_the_argmax():
    logits, labels = make_batch(T=5, V=40, ignore_frac=0.0)
    labels[0, 0] = int(logits[0, 0].argmax())
    x = logits.clone().requires_grad_()
    out = pyfused_po.token_logprobs(x, labels, extras=("is_top1",), backend="triton")
    assert out.is_top1[0, 0] == 1.0
    assert not out.is_top1.requires_grad


def test_torch_backend_is_chunked(monkeypatch):
    """Tiny chunks give the same result: the chunk loop covers every row exactly once."""
    from pyfused_po.token.torch_backend import token as torch_token

    logits, labels = make_batch(B=3, T=9, V=100)
    monkeypatch.setattr(torch_token, "CHUNK_ELEMENTS", 250)  # 2 rows per chunk
    check_against_reference(logits, labels, backend="torch", shift=True)


def test_gradcheck_torch_backend_float64():
    logits, labels = make_batch(B=2, T=4, V=11, dtype=torch.float64)
    x = logits.clone().requires_grad_()

    def fn(z):
        out = pyfused_po.token_logprobs(z, labels, extras=("entropy", "log_sum_sq_probs", "mean_logit"),
                                        shift=True, softcap=3.0, temperature=0.9, backend="torch")
        return out.logps, out.entropy, out.log_sum_sq_probs, out.mean_logit

    assert torch.autograd.gradcheck(fn, (x,), eps=1e-6, atol=1e-7)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_block_size_does_not_change_the_result(backend):
    from pyfused_po import kernels

    logits, labels = make_batch(T=4, V=300)
    results = []
    for block in (16, 64, 512):
        logp, lse, _ = kernels.token_forward(
            logits, labels, ignore_index=-100, shift=False, temperature=1.0,
            logit_scale=1.0, softcap=None, block_v=block)
        results.append(logp)
    for r in results[1:]:
        assert torch.allclose(r, results[0], rtol=0, atol=1e-5)


def test_auto_backend_choice(monkeypatch):
    from pyfused_po import _backend

    cpu = torch.zeros(1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.resolve("auto", cpu) == "triton"
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert _backend.resolve("auto", cpu) == "torch"
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        _backend.resolve("triton", cpu)
    with pytest.raises(ValueError, match="backend must be one of"):
        _backend.resolve("cuda", cpu)


def test_float64_on_auto_uses_the_exact_torch_backend():
    logits, labels = make_batch(T=3, V=20, dtype=torch.float64)
    out = pyfused_po.token_logprobs(logits, labels)
    assert out.dtype == torch.float64
    with pytest.raises(TypeError, match="float64"):
        pyfused_po.token_logprobs(logits, labels, backend="triton")


@pytest.mark.parametrize(
    "make, error, match",
    [
        (lambda: (torch.randn(2, 3, 5), torch.randint(0, 5, (2, 4))), ValueError, "labels.shape"),
        (lambda: (torch.randn(2, 3, 5), torch.randn(2, 3)), TypeError, "integer"),
        (lambda: (torch.randint(0, 5, (2, 3, 5)), torch.randint(0, 5, (2, 3))), TypeError, "floating"),
        (lambda: (torch.randn(2, 3, 5), torch.full((2, 3), 5)), ValueError, r"\[0, 5\)"),
        (lambda: (torch.randn(2, 3, 5), torch.full((2, 3), -1)), ValueError, "out of range"),
        (lambda: (torch.randn(5), torch.tensor(1)), ValueError, "at least 2"),
    ],
)
def test_bad_inputs_raise_clear_errors(make, error, match):
    logits, labels = make()
    with pytest.raises(error, match=match):
        pyfused_po.token_logprobs(logits, labels)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(temperature=0.0), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(logit_scale=0.0), "logit_scale"),
        (dict(softcap=-1.0), "softcap"),
        (dict(extras=("entropy", "perplexity")), "perplexity"),
        (dict(backend="cuda"), "backend"),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, match):
    logits, labels = make_batch(T=3, V=10)
    with pytest.raises(ValueError, match=match):
        pyfused_po.token_logprobs(logits, labels, **kwargs)


# ---------------------------------------------------------------- GPU, realistic shapes


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shift, softcap", [(False, None), (True, 30.0)])
def test_gpu_realistic_shapes(dtype, shift, softcap):
    torch.manual_seed(0)
    B, T, V = 4, 512, 32_003
    logits = (torch.randn(B, T, V, device="cuda") * 4).to(dtype)
    labels = torch.randint(0, V, (B, T), device="cuda")
    labels[:, :100] = -100
    x = logits.clone().requires_grad_()
    out = pyfused_po.token_logprobs(x, labels, shift=shift, softcap=softcap, extras=EXTRAS)
    g = torch.randn(B, T, device="cuda", dtype=torch.float64)
    (g * out.logps.double()).sum().backward()
    for b in range(B):  # reference one sequence at a time to bound its memory
        xr = logits[b].double().requires_grad_()
        ref = token_logprobs_ref(xr, labels[b], shift=shift, softcap=softcap)
        for name in ("logps",) + EXTRAS:
            assert max_rel_err(getattr(out, name)[b], ref[name]) <= 1e-5, name
        (gr,) = torch.autograd.grad((g[b] * ref["logps"]).sum(), xr)
        assert max_rel_err(x.grad[b], gr) <= GRAD_TOL[dtype]


@pytest.mark.gpu
def test_gpu_int64_offsets_past_2_pow_31():
    """N·V > 2³¹ elements: rows past the 2³¹-th element must be read and written correctly."""
    N, V = 16_500, 131_072  # 2.16e9 elements, 4.3 GB in bf16
    if torch.cuda.get_device_properties(0).total_memory < 3 * N * V * 2:
        pytest.skip("needs ~13 GB of GPU memory")
    logits = torch.randn(1, N, V, device="cuda", dtype=torch.bfloat16)
    labels = torch.randint(0, V, (1, N), device="cuda")
    x = logits.requires_grad_()
    out = pyfused_po.token_logprobs(x, labels)
    out.sum().backward()
    for row in (0, N // 2, N - 1):  # the last row sits past element 2³¹
        xr = logits[0, row].detach().double().requires_grad_()
        ref = torch.log_softmax(xr, -1)[labels[0, row]]
        ref.backward()
        assert abs(out[0, row].item() - ref.item()) <= 1e-4
        assert max_rel_err(x.grad[0, row], xr.grad) <= 1e-2
