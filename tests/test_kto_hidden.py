"""FusedKTOLoss on hidden states + LM head (fused-linear path, logits never materialized).

References: the module's logits form on ``hidden @ weight.T + bias`` (float64, torch backend)
and an independent float64 KTO formula written out here (log-softmax + σ), never the library's.
"""
import pytest
import torch

from pyfused_po import FusedKTOLoss
from _packed_data import Batch, position_ids_of

BETA, WD, WU, Z0 = 0.3, 1.0, 1.4, 0.2


def data(B=5, T=6, V=17, D=7, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    ref_hidden = hidden + 0.3 * torch.randn(B, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) * 0.8
    bias = torch.randn(V, generator=g, dtype=torch.float64) * 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :2] = -100          # prompt
    labels[1, 3:] = -100          # a one-token response
    labels[3, 5:] = -100          # padding
    desirable = torch.tensor([True, False, True, False, False])[:B]
    cast = (lambda t: t.to(dtype))
    return cast(hidden), cast(ref_hidden), cast(weight), cast(bias), labels, desirable


def kto_formula(hidden, weight, bias, ref_logps, labels, desirable, shift=False):
    """float64 KTO from scratch: summed log-softmax at the labels, then the TRL formula (mean)."""
    z = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    if shift:
        z, labels = z[:, :-1], labels[:, 1:]
    logq = z - torch.logsumexp(z, dim=-1, keepdim=True)
    valid = labels != -100
    picked = logq.gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
    s = (picked * valid).sum(-1)
    r = s - ref_logps
    d = WD * (1 - torch.sigmoid(BETA * (r - Z0)))
    u = WU * (1 - torch.sigmoid(BETA * (Z0 - r)))
    return torch.where(desirable, d, u)


def rel(a, b):
    a, b = a.detach().double(), b.detach().double()
    return ((a - b).abs().max() / b.abs().max().clamp(min=1e-30)).item()


def module(**kw):
    return FusedKTOLoss(beta=BETA, desirable_weight=WD, undesirable_weight=WU, backend=kw.pop("backend", "torch"),
                        **kw)


@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("shift", [False, True])
def test_hidden_equals_logits_form_and_formula(with_bias, shift):
    hidden, _, weight, bias, labels, desirable = data()
    bias = bias if with_bias else None
    ref_logps = -torch.rand(labels.shape[0], generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 9
    leaves = [t.clone().requires_grad_() for t in (hidden, weight) + ((bias,) if with_bias else ())]
    out = module(shift=shift)(hidden=leaves[0], weight=leaves[1], bias=leaves[2] if with_bias else None,
                              labels=labels, is_desirable=desirable, ref_logps=ref_logps, kl=Z0)
    grads = torch.autograd.grad(out.loss, leaves)

    # The logits form of the same module on materialized logits.
    lg = [t.clone().requires_grad_() for t in leaves]
    logits = lg[0] @ lg[1].T + (lg[2] if with_bias else 0)
    via_logits = module(shift=shift)(logits=logits, labels=labels, is_desirable=desirable, ref_logps=ref_logps, kl=Z0)
    g_logits = torch.autograd.grad(via_logits.loss, lg)

    # The independent formula.
    fr = [t.clone().requires_grad_() for t in leaves]
    ref = kto_formula(fr[0], fr[1], fr[2] if with_bias else None, ref_logps, labels, desirable, shift)
    g_ref = torch.autograd.grad(ref.mean(), fr)

    assert rel(out.losses, via_logits.losses) <= 1e-12
    assert rel(out.losses, ref) <= 1e-11
    for name, a, b, c in zip(("hidden", "weight", "bias"), grads, g_logits, g_ref):
        assert rel(a, b) <= 1e-11, name
        assert rel(a, c) <= 1e-10, name
    for k in via_logits.metrics:
        assert rel(out.metrics[k], via_logits.metrics[k]) <= 1e-12, k


def test_frozen_head_gets_no_gradient_and_hidden_grad_is_exact():
    hidden, _, weight, bias, labels, desirable = data(seed=1)
    ref_logps = torch.full((labels.shape[0],), -6.0, dtype=torch.float64)
    h = hidden.clone().requires_grad_()
    out = module()(hidden=h, weight=weight, bias=bias, labels=labels, is_desirable=desirable,
                   ref_logps=ref_logps, kl=Z0)
    out.loss.backward()
    assert weight.grad is None and bias.grad is None
    hr = hidden.clone().requires_grad_()
    ref = kto_formula(hr, weight, bias, ref_logps, labels, desirable)
    ref.mean().backward()
    assert rel(out.losses, ref) <= 1e-11
    assert rel(h.grad, hr.grad) <= 1e-10


@pytest.mark.parametrize("own_head", [False, True])
def test_ref_hidden_equals_ref_logits(own_head):
    hidden, ref_hidden, weight, bias, labels, desirable = data(seed=2)
    g = torch.Generator().manual_seed(9)
    ref_w = weight + 0.1 * torch.randn(weight.shape, generator=g, dtype=torch.float64) if own_head else weight
    ref_b = bias * 0.5 if own_head else bias
    kl = dict(policy_kl_logps=-torch.rand(3, dtype=torch.float64), ref_kl_logps=-torch.rand(3, dtype=torch.float64))
    w = weight.clone().requires_grad_()
    head = dict(ref_weight=ref_w, ref_bias=ref_b) if own_head else {}
    out = module()(hidden=hidden, weight=w, bias=bias, labels=labels, is_desirable=desirable,
                   ref_hidden=ref_hidden, **head, **kl)
    w2 = weight.clone().requires_grad_()
    via_logits = module()(hidden=hidden, weight=w2, bias=bias, labels=labels, is_desirable=desirable,
                          ref_logits=ref_hidden @ ref_w.T + ref_b, **kl)
    assert rel(out.losses, via_logits.losses) <= 1e-12
    assert rel(out.metrics["kl"], via_logits.metrics["kl"]) <= 1e-12
    gw, = torch.autograd.grad(out.loss, w)
    gw2, = torch.autograd.grad(via_logits.loss, w2)
    assert rel(gw, gw2) <= 1e-12  # the reference contributes no gradient to the shared head


@pytest.mark.parametrize("how", ["cu_seqlens", "position_ids"])
def test_packed_hidden_equals_padded_hidden(how):
    b = Batch(S=6, V=11, D=5, seed=20, allow_empty=False)
    perm = torch.randperm(b.S, generator=b.g)
    rows, cu = b.pack(perm)
    desirable = torch.tensor([True, False, True, True, False, False])
    kl = dict(policy_kl_logps=-torch.rand(3, dtype=torch.float64) + 0.3, ref_kl_logps=-torch.rand(3, dtype=torch.float64))
    layout = dict(cu_seqlens=cu) if how == "cu_seqlens" else dict(position_ids=position_ids_of(cu))
    x = b.take(b.hidden, rows).requires_grad_()
    w, bb = b.weight.clone().requires_grad_(), b.bias.clone().requires_grad_()
    out = module(shift=True)(hidden=x, weight=w, bias=bb, labels=b.take(b.labels, rows), is_desirable=desirable[perm],
                             ref_hidden=b.take(b.ref_hidden, rows), **layout, **kl)
    full = b.hidden.clone().requires_grad_()
    w2, bb2 = b.weight.clone().requires_grad_(), b.bias.clone().requires_grad_()
    ref = module(shift=True)(hidden=full, weight=w2, bias=bb2, labels=b.labels, is_desirable=desirable,
                             ref_hidden=b.ref_hidden, **kl)
    assert rel(out.losses, ref.losses[perm]) <= 1e-11
    for k in ref.metrics:
        assert abs(out.metrics[k].item() - ref.metrics[k].item()) <= 1e-11 * max(1.0, abs(ref.metrics[k].item())), k
    out.loss.backward()
    ref.loss.backward()
    assert rel(x.grad[0], full.grad.reshape(-1, full.shape[-1])[rows]) <= 1e-10
    assert rel(w.grad, w2.grad) <= 1e-10
    assert rel(bb.grad, bb2.grad) <= 1e-10


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_triton_hidden_matches_formula(impl):
    """Triton kernels under the interpreter (tests/conftest.py), fp32, tiny odd shapes."""
    hidden, ref_hidden, weight, bias, labels, desirable = data(B=5, T=5, V=13, D=6, seed=3, dtype=torch.float32)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    out = module(backend="triton", linear_impl=impl)(hidden=leaves[0], weight=leaves[1], bias=leaves[2],
                                                     labels=labels, is_desirable=desirable,
                                                     ref_hidden=ref_hidden, kl=Z0)
    grads = torch.autograd.grad(out.loss, leaves)
    with torch.no_grad():
        zr = ref_hidden.double() @ weight.double().T + bias.double()
        valid = labels != -100
        lq = torch.log_softmax(zr, -1).gather(-1, torch.where(valid, labels, 0).unsqueeze(-1)).squeeze(-1)
        ref_logps = (lq * valid).sum(-1)
    fr = [t.double().clone().requires_grad_() for t in (hidden, weight, bias)]
    ref = kto_formula(*fr, ref_logps, labels, desirable)
    g_ref = torch.autograd.grad(ref.mean(), fr)
    assert rel(out.losses, ref) <= 2e-5
    for name, a, c in zip(("hidden", "weight", "bias"), grads, g_ref):
        assert rel(a, c) <= 1e-4, name


def _bad_cases():
    hidden, ref_hidden, weight, bias, labels, desirable = data(seed=4)
    ok = dict(hidden=hidden, weight=weight, labels=labels, is_desirable=desirable, ref_hidden=ref_hidden)
    logits = hidden @ weight.T
    return [
        (dict(ok, logits=logits), "exactly one of logits= or hidden="),
        (dict(labels=labels, is_desirable=desirable, ref_logps=torch.zeros(5, dtype=torch.float64)),
         "exactly one of logits= or hidden="),
        (dict(ok, weight=None), "hidden= needs weight="),
        (dict(logits=logits, bias=bias, labels=labels, is_desirable=desirable, ref_logits=logits), "weight=/bias="),
        (dict(ok, ref_logps=torch.zeros(5, dtype=torch.float64)), "exactly one of ref_logps, ref_logits and ref_hidden"),
        (dict(ok, ref_hidden=None), "exactly one of ref_logps, ref_logits and ref_hidden"),
        (dict(ok, ref_logits=logits), "one reference source"),
        (dict(ok, hidden=hidden[:, :-1]), r"hidden must have shape labels.shape \+ \(hidden_dim,\)"),
        (dict(ok, weight=weight[:, :-1]), r"hidden must have shape .* with weight \(17, 6\)"),
        (dict(ok, weight=weight[0]), r"weight must be \[vocab, hidden_dim\]"),
        (dict(ok, bias=bias[:-1]), r"bias must have shape \(17,\)"),
        (dict(ok, ref_hidden=ref_hidden[:-1]), r"ref_hidden must have shape labels.shape"),
        (dict(ok, ref_hidden=ref_hidden, ref_weight=weight[:, :3]), r"ref_hidden must have shape .* ref_weight"),
        (dict(ok, ref_bias=bias), "ref_bias= goes with ref_weight="),
        (dict(ok, labels=labels[0]), r"labels must be \[batch, seq\]"),
        (dict(ok, ref_hidden=None, ref_logits=logits[:, :-1]), r"ref_logits must have shape labels.shape"),
    ]


@pytest.mark.parametrize("case", range(16))
def test_bad_inputs_are_named_before_any_kernel(case, monkeypatch):
    import pyfused_po.plans.head_source as hs

    kwargs, match = _bad_cases()[case]

    def no_kernel(*a, **k):
        raise AssertionError("a kernel ran before the input check")
    monkeypatch.setattr(hs, "linear_token_logprobs", no_kernel)
    monkeypatch.setattr(hs, "token_logprobs", no_kernel)
    with pytest.raises(ValueError, match=match):
        module()(**kwargs)


def test_bad_linear_impl_is_named():
    with pytest.raises(ValueError, match="linear_impl must be one of"):
        FusedKTOLoss(linear_impl="cublas")
