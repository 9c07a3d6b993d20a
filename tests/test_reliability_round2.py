"""Reliability, second round (issue 16): inputs that used to give silently wrong results.

Each test is a correct result against an independent float64 computation, or a clear
refusal before any kernel runs.  Sections follow the issue's classes 1–9.
"""
import math
import re

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import pyfused_po
from reference import token_logprobs_ref

BACKENDS = ["triton", "torch"]
tl = pyfused_po.token_logprobs


def _grad_ref(logits, labels, weights, **options):
    x = logits.detach().double().requires_grad_()
    ref = token_logprobs_ref(x, labels.long(), **options)["logps"]
    (grad,) = torch.autograd.grad((ref * weights).sum(), x)
    return ref, grad


def _run(logits, labels, weights, backend, **options):
    x = logits.detach().clone().requires_grad_()
    out = tl(x, labels, backend=backend, **options)
    (grad,) = torch.autograd.grad((out.double() * weights).sum(), x)
    return out, grad


def _close(actual, expected, tol=1e-5):
    scale = max(1.0, expected.abs().max().item()) if expected.numel() else 1.0
    assert (actual.double() - expected.double()).abs().max().item() <= tol * scale if expected.numel() else True


# ------------------------------------------------------------------ 1. small integer label dtypes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,ignore_index", [(torch.int8, -100), (torch.int16, -100), (torch.int32, -100),
                                                (torch.uint8, 255)])
def test_small_label_dtypes_give_the_int64_result(backend, dtype, ignore_index):
    # V = 150 > 127: an int8 comparison with V used to wrap (false "out of range"); under
    # shift the last row's masked label load used the labels' own dtype.
    V = 150
    logits = torch.randn(2, 5, V)
    labels = torch.randint(0, 127, (2, 5))
    labels[0, 2] = ignore_index
    labels[1, -1] = ignore_index
    w = torch.randn(2, 5, dtype=torch.float64)
    ref, grad_ref = _grad_ref(logits, labels, w, shift=True, ignore_index=ignore_index)
    out, grad = _run(logits, labels.to(dtype), w, backend, shift=True, ignore_index=ignore_index)
    _close(out, ref)
    _close(grad, grad_ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_uint8_label_156_is_a_token_not_ignore_index(backend):
    # uint8(−100) = 156: with ignore_index=255 the label 156 is an ordinary token.
    V = 200
    logits = torch.randn(1, 3, V)
    labels = torch.tensor([[156, 3, 255]])
    w = torch.ones(1, 3, dtype=torch.float64)
    ref, grad_ref = _grad_ref(logits, labels, w, ignore_index=255)
    out, grad = _run(logits, labels.to(torch.uint8), w, backend, ignore_index=255)
    assert out[0, 0] != 0
    _close(out, ref)
    _close(grad, grad_ref)


UINT8 = torch.tensor([[1, 2, 3], [3, 2, 1]], dtype=torch.uint8)


@pytest.mark.parametrize("call", [
    lambda: tl(torch.randn(2, 3, 7), UINT8, backend="torch"),
    lambda: tl(torch.randn(2, 3, 7), UINT8, backend="triton", shift=True),
    lambda: pyfused_po.linear_token_logprobs(torch.randn(2, 3, 4), torch.randn(7, 4), UINT8, backend="torch"),
    lambda: pyfused_po.token_kl(torch.randn(2, 3, 7), torch.randn(2, 3, 7), UINT8, backend="torch"),
    lambda: pyfused_po.sequence_sums(torch.zeros(2, 3), UINT8),
    lambda: pyfused_po.FusedPreferenceLoss("simpo", backend="torch")(logits=torch.randn(2, 3, 7), labels=UINT8),
], ids=["torch", "triton-shift", "linear", "kl", "sequence", "module"])
def test_uint8_labels_cannot_hold_a_negative_ignore_index(call):
    with pytest.raises(TypeError, match=r"labels of dtype torch.uint8 .* cannot hold ignore_index=-100"):
        call()


# ------------------------------------------------------------------ 2. double backward


def _token(backend, x):
    return tl(x, torch.tensor([[1, 3, -100]]), backend=backend, extras=("entropy",))


def _linear(backend, x):
    return pyfused_po.linear_token_logprobs(x, W, torch.tensor([[1, 3, -100]]), backend=backend)


def _kl(backend, x):
    return pyfused_po.token_kl(x, REF, torch.tensor([[1, 3, -100]]), backend=backend)


W = torch.randn(5, 5)
REF = torch.randn(1, 3, 5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", [_token, _linear, _kl], ids=["token", "linear", "kl"])
def test_double_backward_is_refused_and_first_derivative_kept(backend, op):
    x = torch.randn(1, 3, 5, requires_grad=True)
    out = op(backend, x)
    logps = out if isinstance(out, torch.Tensor) else out.logps + out.entropy
    (plain,) = torch.autograd.grad(logps.sum(), x, retain_graph=True)
    (g,) = torch.autograd.grad(logps.sum(), x, create_graph=True)
    assert torch.equal(g, plain) and g.requires_grad  # tied to the graph, never silently constant
    with pytest.raises(RuntimeError, match="first derivative only"):
        (g * g).sum().backward()


def test_double_backward_through_the_module_is_refused():
    x = torch.randn(2, 3, 7, requires_grad=True)
    out = pyfused_po.FusedPreferenceLoss("simpo", backend="torch")(logits=x, labels=torch.randint(0, 7, (2, 3)))
    (g,) = torch.autograd.grad(out.loss, x, create_graph=True)
    with pytest.raises(RuntimeError, match="first derivative only"):
        g.pow(2).sum().backward()


# ------------------------------------------------------------------ 3. in-place backward targets


def _nonleaf(*shape):
    return torch.randn(*shape).requires_grad_() * 1


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("make,match", [
    (lambda: (torch.randn(1, 3, 7, requires_grad=True) * 1).expand(2, 3, 7), "share memory"),
    (lambda: (torch.randn(40, requires_grad=True) * 1).as_strided((2, 3, 7), (9, 3, 1)), "share memory"),
    (lambda: torch.randn(2, 3, 7, requires_grad=True), "leaf"),
    (lambda: torch.randn(3, 2, 7, requires_grad=True).transpose(0, 1), "view of a leaf"),
], ids=["expanded", "overlapping", "leaf", "view-of-leaf"])
def test_inplace_backward_refuses_memory_it_must_not_overwrite(backend, make, match):
    with pytest.raises(ValueError, match=match):
        tl(make(), torch.randint(0, 7, (2, 3)), inplace_backward=True, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inplace_backward_trips_the_saved_tensor_check_of_another_op(backend):
    x = _nonleaf(2, 3, 7)
    z_loss = torch.logsumexp(x, -1).pow(2).sum()  # saves x; recorded first, so its backward runs after ours
    logps = tl(x, torch.randint(0, 7, (2, 3)), inplace_backward=True, backend=backend)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (logps.sum() + z_loss).backward()


# ------------------------------------------------------------------ 4. torch.compile value checks


@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_token_stage_still_checks_the_label_range(backend):
    """~3 s per backend (an aot_eager compile): the only way to check the compiled path."""
    torch._dynamo.reset()
    fn = torch.compile(lambda x, y: tl(x, y, backend=backend).sum(), fullgraph=True, backend="aot_eager")
    x = torch.randn(2, 3, 7)
    y = torch.randint(0, 7, (2, 3))
    fn(x, y)
    y[1, 2] = 7
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        fn(x, y)


def test_compiled_checks_lengths_and_fused_linear_labels():
    """~3 s (two aot_eager compiles)."""
    torch._dynamo.reset()
    z = torch.randn(3)

    def simpo(lengths):
        return pyfused_po.preference_loss(z, z - 1, loss_type="simpo", chosen_lengths=lengths,
                                          rejected_lengths=torch.ones(3)).loss

    fn = torch.compile(simpo, fullgraph=True, backend="aot_eager")
    fn(torch.ones(3))
    with pytest.raises(ValueError, match="chosen_lengths must be >= 0"):
        fn(torch.tensor([1.0, -2.0, 1.0]))
    linear = torch.compile(lambda h, w, y: pyfused_po.linear_token_logprobs(h, w, y, backend="torch").sum(),
                           fullgraph=True, backend="aot_eager")
    h, w = torch.randn(2, 3, 4), torch.randn(7, 4)
    linear(h, w, torch.randint(0, 7, (2, 3)))
    with pytest.raises(ValueError, match=r"labels must be in \[0, 7\)"):
        linear(h, w, torch.full((2, 3), 8))


# ------------------------------------------------------------------ 5. reference inputs are constants


def test_precomputed_reference_logps_get_no_gradient():
    pc, pr = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    rc, rr = torch.randn(3, requires_grad=True), torch.randn(3, requires_grad=True)
    pyfused_po.preference_loss(pc, pr, rc, rr).loss.backward()
    assert rc.grad is None and rr.grad is None and pc.grad is not None
    x = torch.randn(2, 3, 7, requires_grad=True)
    rc, rr = torch.randn(1, requires_grad=True), torch.randn(1, requires_grad=True)
    out = pyfused_po.FusedPreferenceLoss(backend="torch")(logits=x, labels=torch.randint(0, 7, (2, 3)),
                                                          ref_chosen_logps=rc, ref_rejected_logps=rr)
    out.loss.backward()
    assert rc.grad is None and rr.grad is None and x.grad is not None


# ------------------------------------------------------------------ 6. AOT and per-pair options


@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
@pytest.mark.parametrize("kwargs,named", [
    (dict(weights=torch.ones(4)), "weights="),
    (dict(reduction="none"), 'reduction="none"'),
    (dict(use_weighting=True, chosen_wpo_logps=torch.zeros(4), rejected_wpo_logps=torch.zeros(4)), "use_weighting"),
    (dict(label_smoothing=torch.full((4,), 0.1)), "per-pair label_smoothing"),
], ids=["weights", "none", "wpo", "soft-labels"])
def test_aot_refuses_per_pair_options(loss_type, kwargs, named):
    z = torch.randn(4)
    with pytest.raises(ValueError, match=rf"{loss_type}.*sorts.*{re.escape(named)}"):
        pyfused_po.preference_loss(z, z - 1, z, z, loss_type=loss_type, **kwargs)


@pytest.mark.parametrize("kwargs", [dict(reduction="none"), dict(use_weighting=True)])
def test_aot_module_refuses_per_pair_options_at_construction(kwargs):
    with pytest.raises(ValueError, match="sorts the margins"):
        pyfused_po.FusedPreferenceLoss("aot", **kwargs)


# ------------------------------------------------------------------ 7. numerics


@pytest.mark.parametrize("loss_type", ["sigmoid", "robust", "exo_pair", "aot", "aot_unpaired"])
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_infinite_margin_gives_the_limit_not_nan(loss_type, sign):
    c = torch.tensor([0.0, -1.0], dtype=torch.float64, requires_grad=True)
    r = torch.tensor([-sign * math.inf, -2.0], dtype=torch.float64, requires_grad=True)
    kwargs = {} if loss_type == "exo_pair" else dict(label_smoothing=0.0)
    out = pyfused_po.preference_loss(c, r, torch.zeros(2, dtype=torch.float64), torch.zeros(2, dtype=torch.float64),
                                     loss_type=loss_type, reduction="sum", **kwargs)
    out.loss.backward()
    assert not torch.isnan(out.loss) and torch.isfinite(c.grad).all() and torch.isfinite(r.grad).all()
    if sign > 0:  # the rejected response is impossible: the loss is its finite limit
        assert torch.isfinite(out.loss)


def test_minus_inf_vocabulary_entry_as_rejected_label_gives_no_nan():
    V = 7
    x = torch.randn(2, 3, V)
    x[1, :, 6] = -math.inf  # a masked vocabulary entry
    labels = torch.randint(0, 6, (2, 3))
    labels[1, 1] = 6
    x = x.requires_grad_()
    out = pyfused_po.FusedPreferenceLoss("sigmoid", backend="torch")(
        logits=x, labels=labels, ref_chosen_logps=torch.zeros(1), ref_rejected_logps=torch.zeros(1))
    out.loss.backward()
    assert out.loss.item() == 0.0 and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_large_softcap_keeps_fp32_accuracy(backend):
    # softcap 1e4 ≫ |x|: c·tanh(x/c) ≈ x; 1 − 2/(e^{2a}+1) used to lose ~c·1e-7 (1.6e-3 here).
    x = torch.randn(2, 5, 150) * 30
    y = torch.randint(0, 150, (2, 5))
    w = torch.ones(2, 5, dtype=torch.float64)
    ref, grad_ref = _grad_ref(x, y, w, softcap=1e4)
    out, grad = _run(x, y, w, backend, softcap=1e4)
    assert (out.double() - ref).abs().max().item() <= 5e-5  # fp32 at |z| ≈ 100: ~1e-5
    assert (grad.double() - grad_ref).abs().max().item() <= 1e-5


def _offset_errors(backend, offset):
    x = (torch.randn(2, 4, 130).double() * 2 + offset).float()
    y = torch.randint(0, 130, (2, 4))
    w = torch.ones(2, 4, dtype=torch.float64)
    ref, _ = _grad_ref(x, y, w)
    out, grad = _run(x, y, w, backend)
    return (out.double() - ref).abs().max().item(), grad.double().sum(-1).abs().max().item()


def test_torch_backend_is_exact_at_large_logit_offsets():
    err, row_sum = _offset_errors("torch", 3e4)
    assert err <= 2e-6 and row_sum <= 2e-6  # was 8.9e-4 and 8.9e-4


def test_triton_is_exact_at_large_logit_offsets():
    """The kernels keep the LSE as a (hi, lo) pair (kernels/lse_pair.py; tests/test_lse_offset.py)."""
    err, row_sum = _offset_errors("triton", 3e4)
    assert err <= 2e-6 and row_sum <= 2e-6  # was 1.6e-3 and 1.6e-3


# ------------------------------------------------------------------ 8. shapes


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", ["token", "kl"])
def test_leading_dims_that_cannot_merge(backend, op):
    base = torch.randn(3, 2, 4, 9)
    logits = base.transpose(0, 1)  # [2, 3, 4, 9]: (2, 3) cannot merge into one stride
    labels = torch.randint(0, 9, (2, 3, 4))
    x = logits.detach().clone().transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()  # same strides
    assert x.stride() == logits.stride()
    x64 = logits.double().requires_grad_()
    if op == "token":
        out = tl(x, labels, backend=backend)
        ref = token_logprobs_ref(x64, labels)["logps"]
    else:
        ref_logits = torch.randn(2, 3, 4, 9)
        out = pyfused_po.token_kl(x, ref_logits, labels, backend=backend)
        p_ref = torch.softmax(ref_logits.double(), -1)
        ref = (p_ref * (torch.log_softmax(ref_logits.double(), -1) - torch.log_softmax(x64, -1))).sum(-1)
    out.sum().backward()
    ref.sum().backward()
    _close(out, ref)
    _close(x.grad, x64.grad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_empty_sequences_under_shift(backend, path):
    labels = torch.zeros(2, 0, dtype=torch.long)
    module = pyfused_po.FusedPreferenceLoss("simpo", shift=True, backend=backend)
    if path == "logits":
        x = torch.randn(2, 0, 7, requires_grad=True)
        out = module(logits=x, labels=labels)
    else:
        x = torch.randn(2, 0, 4, requires_grad=True)
        out = module(hidden=x, weight=torch.randn(7, 4), labels=labels)
    out.loss.backward()
    # Both sequences are empty: SimPO's margin is −γ, so the loss is −log σ(−0.5).
    assert math.isclose(out.loss.item(), -F.logsigmoid(torch.tensor(-0.5)).item(), rel_tol=1e-6)
    assert x.grad.shape == x.shape


# ------------------------------------------------------------------ 9. state and metrics


def test_empty_batch_metrics_are_zero_not_nan():
    e = torch.zeros(0)
    out = pyfused_po.preference_loss(e, e, e, e)
    assert all(torch.isfinite(v) and v.item() == 0 for v in out.metrics.values()), out.metrics
    out = pyfused_po.preference_loss(e, e, loss_type="orpo", chosen_lengths=e, rejected_lengths=e)
    assert all(torch.isfinite(v) for v in out.metrics.values()), out.metrics


def test_orpo_with_an_empty_response_is_the_same_in_fp32_and_fp64():
    pc, pr = torch.tensor([-3.0, 0.0]), torch.tensor([0.0, -4.0])  # an empty response on each side
    n = torch.tensor([3.0, 0.0]), torch.tensor([0.0, 2.0])
    losses = {}
    for dtype in (torch.float32, torch.float64):
        out = pyfused_po.preference_loss(pc.to(dtype), pr.to(dtype), loss_type="orpo", beta=1.0,
                                         chosen_lengths=n[0], rejected_lengths=n[1])
        losses[dtype] = out.losses.double()
    nll = 3.0 / 3.0  # Σ −ℓ_w / Σ n_w over the chosen responses
    torch.testing.assert_close(losses[torch.float32], losses[torch.float64], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(losses[torch.float64], torch.tensor([nll, nll], dtype=torch.float64))


def test_bco_running_mean_stays_float64_under_dtype_casts():
    module = pyfused_po.FusedPreferenceLoss("bco_pair", bco_running_mean=True, backend="torch").bfloat16()
    assert module.bco_reward_count.dtype == torch.float64 and module.bco_reward_sum.dtype == torch.float64
    P = 257
    z = torch.zeros(P)
    labels = torch.randint(0, 5, (2 * P, 2))
    for _ in range(2):  # 514 then 1028 rewards: neither is a bfloat16 number (steps of 4, then 8)
        module(hidden=torch.randn(2 * P, 2, 3), weight=torch.randn(5, 3), labels=labels, ref_chosen_logps=z,
               ref_rejected_logps=z)  # the fused-linear path: no per-sequence loop on the CPU
    assert module.bco_reward_count.item() == 1028


@pytest.mark.parametrize("convert", [np.float32, np.float64, lambda v: torch.tensor(v), np.array],
                         ids=["np.float32", "np.float64", "0-d tensor", "0-d array"])
def test_numpy_and_0d_tensor_hyperparameters_are_numbers(convert):
    z = torch.randn(4)
    lengths = torch.full((4,), 3.0)
    plain = pyfused_po.preference_loss(z, z - 1, loss_type="simpo", beta=2.0, simpo_gamma=0.5,
                                       chosen_lengths=lengths, rejected_lengths=lengths).loss
    given = pyfused_po.preference_loss(z, z - 1, loss_type="simpo", beta=convert(2.0), simpo_gamma=convert(0.5),
                                       chosen_lengths=lengths, rejected_lengths=lengths).loss
    torch.testing.assert_close(given, plain)
    x = torch.randn(2, 3, 7)
    y = torch.randint(0, 7, (2, 3))
    torch.testing.assert_close(tl(x, y, temperature=convert(2.0), softcap=convert(3.0), backend="torch"),
                               tl(x, y, temperature=2.0, softcap=3.0, backend="torch"))
    module = pyfused_po.FusedPreferenceLoss("sigmoid", beta=convert(0.5), ld_alpha=convert(0.5), backend="torch")
    assert isinstance(module.beta, float)
    desirable = torch.tensor([True, False, True, False])
    kto = pyfused_po.kto_loss(z, z - 0.5, desirable, beta=convert(0.5), desirable_weight=convert(1.5),
                              kl=np.float32(0.25)).loss
    torch.testing.assert_close(kto, pyfused_po.kto_loss(z, z - 0.5, desirable, beta=0.5, desirable_weight=1.5,
                                                        kl=0.25).loss)
