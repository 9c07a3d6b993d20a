"""FusedKTOLoss on hidden states with the gradient formed in the forward (three GEMMs,
:mod:`pyfused_po.plans.fused_kto`): loss, metrics and gradients equal the staged plan
(``fused_gradient=False``) and an independent float64 KTO written out here from the formula."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyfused_po import FusedKTOLoss

from _fused_plan import assert_plans_agree

B, T, V, D = 5, 8, 37, 6
BETA, WD, WU = 0.4, 1.3, 0.7
DESIRABLE = torch.tensor([True, False, True, False, False])


def _batch(seed=0, bias=True):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.2 if bias else None
    labels = torch.randint(0, V, (B, T), generator=g)
    for i, n in enumerate([2, 3, 1, 4, 2]):  # prompts of several lengths
        labels[i, :n] = -100
    labels[1, -3:] = -100  # right padding
    ref_logps = -torch.rand(B, generator=g, dtype=torch.float64) * 8 - 10
    kl = dict(policy_kl_logps=-torch.rand(4, generator=g, dtype=torch.float64) * 2 - 9,
              ref_kl_logps=-torch.rand(4, generator=g, dtype=torch.float64) * 2 - 10)
    return hidden, weight, b, labels, ref_logps, kl


def reference_sums(hidden, weight, bias, labels, shift):
    """Σ_t log softmax(h_t·Wᵀ + b)[y] over labelled tokens of each row (rows predict the next
    label when shifting), float64 from scratch."""
    z = hidden @ weight.T + (0 if bias is None else bias)
    if shift:
        z, labels = z[:, :-1], labels[:, 1:]
    logq = z - torch.logsumexp(z, -1, keepdim=True)
    valid = labels != -100
    picked = logq.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(valid, picked, torch.zeros((), dtype=z.dtype)).sum(-1)


def reference_loss(sums, ref_logps, desirable, loss_type, z0, reduction="mean"):
    """TRL's KTO: λ_D(1 − σ(β(r − z₀))) / λ_U(1 − σ(β(z₀ − r))), or APO-zero unpaired."""
    r = sums - ref_logps
    if loss_type == "kto":
        d, u = WD * (1 - torch.sigmoid(BETA * (r - z0))), WU * (1 - torch.sigmoid(BETA * (z0 - r)))
    else:
        d, u = WD * (1 - torch.sigmoid(BETA * r)), WU * torch.sigmoid(BETA * r)
    losses = torch.where(desirable, d, u)
    return losses.mean() if reduction == "mean" else losses.sum()


def _module(loss_type, **kw):
    chunk = kw.pop("chunk_tokens", None)
    m = FusedKTOLoss(beta=BETA, desirable_weight=WD, undesirable_weight=WU, loss_type=loss_type,
                     backend=kw.pop("backend", "torch"), **kw)
    if chunk is not None:
        m.chunk_tokens = chunk
    return m


def _run(module, fused, hidden, weight, bias, **kw):
    module.fused_gradient = fused
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight) + (() if bias is None else (bias,))]
    out = module(hidden=leaves[0], weight=leaves[1], bias=None if bias is None else leaves[2], **kw)
    (out.loss * 1.7).backward()  # an upstream gradient other than 1
    return out, [t.grad for t in leaves]


def _assert_fused_equals_staged(module, hidden, weight, bias, expect_fused=True, **kw):
    staged, g_staged = _run(module, False, hidden, weight, bias, **kw)
    fused, g_fused = _run(module, True, hidden, weight, bias, **kw)
    assert_plans_agree(fused, g_fused, staged, g_staged, expect_fused)
    return fused, g_fused


def _reference_grads(hidden, weight, bias, labels, ref_logps, loss_type, z0, shift, reduction="mean"):
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight) + (() if bias is None else (bias,))]
    sums = reference_sums(leaves[0], leaves[1], None if bias is None else leaves[2], labels, shift)
    loss = reference_loss(sums, ref_logps, DESIRABLE, loss_type, z0, reduction)
    return loss, torch.autograd.grad(loss * 1.7, leaves)


@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shift", [False, True])
def test_every_loss_type_equals_staged_and_formula(loss_type, with_bias, shift):
    hidden, weight, bias, labels, ref_logps, kl = _batch(seed=3 * shift + with_bias, bias=with_bias)
    module = _module(loss_type, shift=shift, chunk_tokens=9)  # at most two sequences: several chunks
    fused, grads = _assert_fused_equals_staged(module, hidden, weight, bias, labels=labels, is_desirable=DESIRABLE,
                                               ref_logps=ref_logps, **kl)
    z0 = (kl["policy_kl_logps"] - kl["ref_kl_logps"]).mean().clamp(min=0)
    assert z0 > 0  # the KL point is in play
    loss, expected = _reference_grads(hidden, weight, bias, labels, ref_logps, loss_type, z0, shift)
    torch.testing.assert_close(fused.loss, loss.detach(), rtol=1e-11, atol=1e-12)
    for a, b in zip(grads, expected):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_packed_cu_seqlens_shift_ref_hidden_and_sum_reduction():
    hidden, weight, bias, labels, _, _ = _batch(seed=8)
    ref_hidden = hidden + 0.2
    lengths = [8, 5, 8, 3, 6]  # each row's first n tokens form a packed sequence
    rows = torch.cat([torch.arange(i * T, i * T + n) for i, n in enumerate(lengths)])
    cu = torch.tensor([0] + lengths).cumsum(0)
    flat = lambda x: x.reshape(B * T, *x.shape[2:])[rows].unsqueeze(0)  # noqa: E731
    packed = dict(labels=flat(labels), is_desirable=DESIRABLE, ref_hidden=flat(ref_hidden), cu_seqlens=cu, kl=0.3)
    module = _module("kto", shift=True, reduction="sum", chunk_tokens=7)
    fused, grads = _assert_fused_equals_staged(module, flat(hidden), weight, bias, **packed)
    # The formula on each sequence alone (shift within a sequence), the reference head detached.
    trimmed = labels.clone()
    for i, n in enumerate(lengths):
        trimmed[i, n:] = -100
    ref_sums = reference_sums(ref_hidden, weight, bias, trimmed, True)
    leaves = [t.clone().requires_grad_(True) for t in (hidden, weight, bias)]
    loss = reference_loss(reference_sums(*leaves, trimmed, True), ref_sums, DESIRABLE, "kto", 0.3, "sum")
    expected = torch.autograd.grad(loss * 1.7, leaves)
    torch.testing.assert_close(fused.loss, loss.detach(), rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(grads[0][0], expected[0].reshape(B * T, D)[rows], rtol=1e-9, atol=1e-12)
    for a, b in zip(grads[1:], expected[1:]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


def test_kl_inputs_that_require_grad_are_detached_in_both_plans():
    hidden, weight, bias, labels, ref_logps, kl = _batch(seed=4)
    kl = {k: v.clone().requires_grad_(True) for k, v in kl.items()}
    module = _module("kto", chunk_tokens=12)
    _assert_fused_equals_staged(module, hidden, weight, bias, labels=labels, is_desirable=DESIRABLE,
                                ref_logps=ref_logps, **kl)
    assert all(v.grad is None for v in kl.values())  # z₀ is detached: neither plan gives them a gradient


def test_falls_back_for_a_vector_loss_a_long_sequence_and_no_grad():
    hidden, weight, bias, labels, ref_logps, _ = _batch(seed=5)
    kw = dict(labels=labels, is_desirable=DESIRABLE, ref_logps=ref_logps, kl=0.1)
    long = _module("kto", chunk_tokens=3)
    _assert_fused_equals_staged(long, hidden, weight, bias, expect_fused=False, **kw)
    assert "longer than the three-GEMM chunk" in long.fallback_reason  # named, not silent
    long.long_group_plan = "three_gemm"  # the chunk grows to the longest sequence: 3 GEMMs
    _assert_fused_equals_staged(long, hidden, weight, bias, **kw)
    module = _module("kto", reduction="none")
    out = module(hidden=hidden.requires_grad_(), weight=weight, bias=bias, **kw)
    assert out.loss.shape == (B,) and "StoredGradient" not in type(out.loss.grad_fn).__name__
    with torch.no_grad():
        assert _module("kto")(hidden=hidden, weight=weight, bias=bias, **kw).loss.grad_fn is None
    from pyfused_po.plans import fused_kto

    source = (hidden, weight, bias)
    assert fused_kto.applies(_module("kto"), source)
    assert not fused_kto.applies(_module("kto", linear_impl="fused"), source)  # the Triton kernel's own plan
    assert not fused_kto.applies(_module("kto"), source, token_offset=3)  # a sequence-parallel slice
    off = _module("kto")
    off.fused_gradient = False
    assert not fused_kto.applies(off, source)


def test_bad_flags_raise_before_any_gemm():
    hidden, weight, bias, labels, ref_logps, _ = _batch(seed=6)
    with _GemmCounter() as c, pytest.raises(ValueError, match="is_desirable"):
        _module("kto")(hidden=hidden.requires_grad_(), weight=weight, bias=bias, labels=labels,
                       is_desirable=DESIRABLE[:3], ref_logps=ref_logps)
    assert c.flops == 0


class _GemmCounter(TorchDispatchMode):
    """2·m·k·n of every matmul-family aten op (mm, addmm, their in-place and out= forms, bmm)."""

    MATMULS = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.MATMULS:
            i, j = self.MATMULS[name]
            a, b = args[i], args[j]
            self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("fused,trainable,gemms", [(True, True, 3), (False, True, 4), (True, False, 2)])
def test_the_fused_plan_does_three_gemms(fused, trainable, gemms):
    hidden, weight, bias, labels, ref_logps, _ = _batch(seed=7, bias=False)
    M = int((labels != -100).sum())
    module = _module("kto", chunk_tokens=10)
    module.fused_gradient = fused
    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(trainable)
    with _GemmCounter() as c:
        module(hidden=h, weight=w, labels=labels, is_desirable=DESIRABLE, ref_logps=ref_logps, kl=0.2).loss.backward()
    assert c.flops == gemms * 2 * M * D * V


def test_double_backward_is_refused_and_accumulation_adds():
    hidden, weight, bias, labels, ref_logps, _ = _batch(seed=9)
    kw = dict(labels=labels, is_desirable=DESIRABLE, ref_logps=ref_logps)
    module = _module("apo_zero_unpaired")
    w = weight.clone().requires_grad_(True)
    (gw,) = torch.autograd.grad(module(hidden=hidden, weight=w, bias=bias, **kw).loss, w, create_graph=True)
    with pytest.raises(RuntimeError):  # once_differentiable: the stored gradients have no graph
        gw.sum().backward()
    for _ in range(2):  # gradient accumulation over two micro-batches
        module(hidden=hidden, weight=w, bias=bias, **kw).loss.backward()
    torch.testing.assert_close(w.grad, 2 * gw.detach(), rtol=1e-12, atol=1e-14)


def test_triton_fold_matches_staged():
    """The Triton token fold (the interpreter on the CPU), fp32, several chunks."""
    pytest.importorskip("triton")
    hidden, weight, bias, labels, ref_logps, kl = _batch(seed=10)
    hidden, weight, bias, ref_logps = hidden.float(), weight.float(), bias.float(), ref_logps.float()
    kl = {k: v.float() for k, v in kl.items()}
    module = _module("kto", backend="triton", shift=True, chunk_tokens=12)
    staged, g_staged = _run(module, False, hidden, weight, bias, labels=labels, is_desirable=DESIRABLE,
                            ref_logps=ref_logps, **kl)
    fused, g_fused = _run(module, True, hidden, weight, bias, labels=labels, is_desirable=DESIRABLE,
                          ref_logps=ref_logps, **kl)
    assert "StoredGradient" in type(fused.loss.grad_fn).__name__
    torch.testing.assert_close(fused.loss, staged.loss, rtol=1e-6, atol=1e-6)
    for a, b in zip(g_fused, g_staged):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_reference_logits_and_position_ids_equal_staged():
    hidden, weight, bias, labels, _, kl = _batch(seed=11)
    ref_logits = (hidden * 0.7) @ weight.T + bias
    module = _module("kto", shift=True, chunk_tokens=10)
    _assert_fused_equals_staged(module, hidden, weight, bias, labels=labels, is_desirable=DESIRABLE,
                                ref_logits=ref_logits, **kl)
    lengths = [8, 4, 7, 8, 5]  # packed by position_ids (each sequence restarts at 0)
    position_ids = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    N = sum(lengths)
    g = torch.Generator().manual_seed(3)
    packed_labels = torch.randint(0, V, (1, N), generator=g)
    packed_labels[0, :2] = -100
    _assert_fused_equals_staged(module, torch.randn(1, N, D, generator=g, dtype=torch.float64), weight, bias,
                                labels=packed_labels, is_desirable=DESIRABLE, position_ids=position_ids,
                                ref_logps=-torch.rand(B, generator=g, dtype=torch.float64) * 5, kl=0.2)


def test_autocast_bf16_matches_staged():
    hidden, weight, bias, labels, ref_logps, kl = _batch(seed=13)
    hidden, weight, bias, ref_logps = hidden.float(), weight.float(), bias.float(), ref_logps.float()
    kl = {k: v.float() for k, v in kl.items()}
    module = _module("kto", chunk_tokens=12)
    kw = dict(labels=labels, is_desirable=DESIRABLE, ref_logps=ref_logps, **kl)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        staged, g_staged = _run(module, False, hidden, weight, bias, **kw)
        fused, g_fused = _run(module, True, hidden, weight, bias, **kw)
    assert "StoredGradient" in type(fused.loss.grad_fn).__name__
    assert [g.dtype for g in g_fused] == [torch.float32] * 3
    torch.testing.assert_close(fused.loss, staged.loss, rtol=1e-6, atol=1e-6)  # same bf16 GEMM, same fold
    for a, b in zip(g_fused, g_staged):  # G rounded to bf16 before the dH/dW GEMMs in both
        torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-3)


def test_layout_object_equals_the_keywords_and_refuses_a_pair_layout():
    from pyfused_po import BatchLayout

    hidden, weight, bias, labels, ref_logps, _ = _batch(seed=6)
    B, T = labels.shape
    cu = torch.arange(0, (B + 1) * T, T)  # the padded rows as a packed stream
    flat = dict(labels=labels.reshape(1, -1), is_desirable=DESIRABLE, ref_logps=ref_logps, kl=0.2)
    module = _module("kto", chunk_tokens=12)
    by_keyword, g_keyword = _run(module, True, hidden.reshape(1, B * T, -1), weight, bias, cu_seqlens=cu, **flat)
    by_object, g_object = _run(module, True, hidden.reshape(1, B * T, -1), weight, bias,
                               layout=BatchLayout(cu_seqlens=cu), **flat)
    torch.testing.assert_close(by_object.loss, by_keyword.loss, rtol=0, atol=0)
    for a, b in zip(g_object, g_keyword):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    with pytest.raises(ValueError, match="takes no pair layout"):
        module(hidden=hidden, weight=weight, layout=BatchLayout(pair_layout="interleaved"), labels=labels,
               is_desirable=DESIRABLE, ref_logps=ref_logps)
