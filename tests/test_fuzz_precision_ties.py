"""Differential fuzz of two precision edges (issue 26, item 3: classes 2 and 6).

Both axes are derandomized: each case is a fixed seed (``pytest.mark.parametrize``) from which the
shapes and options are drawn, so CI runs the same problems every time.  The runtime is printed at
the end of the module (budget: < 60 s on 2 cores under ``TRITON_INTERPRET``).

* **fp16 with loss scaling** (class 2): ``FusedPreferenceLoss(hidden=, weight=)`` (the three-GEMM
  plan) and ``FusedKTOLoss(hidden=, weight=)`` on fp16 inputs, either backend, odd small shapes, padded or packed
  (``cu_seqlens``), trainable or frozen head, loss scale 2^0 … 2^16, the gradients taken as
  ``GradScaler`` does: ``(loss · s).backward()``, then ``grad / s``.  The reference is float64
  math written here from the formulas (logits = H·Wᵀ, log-softmax, masked sums per sequence, the
  loss), differentiated by autograd in float64.  Checked: (a) no row of dW or dH whose scaled
  float64 gradient fp16 can hold (|s·g| > 2⁻²³ somewhere in the row) comes out exactly 0;
  (b) the relative error of dH and dW is at most twice the staged plan's in fp16
  (``fused_gradient = False``, autograd through fp16 logits) plus fp16's half-ulp 2⁻¹¹.
* **ties** (class 6): integer-valued logits (exact ties in every precision) and LM heads with
  duplicated rows; labels on the first maximal id, on a later one, and elsewhere; every producer
  of ``is_top1``: ``token_logprobs`` with its extras and ``linear_token_logprobs`` (chunked and
  fused) on both backends, with ``shift`` and ``temperature``.  The reference is ``argmax`` of the
  float64 logits (the first maximal id wins, as Hugging Face and TRL count accuracy).
"""
import time

import pytest
import torch
import torch.nn.functional as F

import pyfused_po
from pyfused_po import FusedKTOLoss, FusedPreferenceLoss
from _fuzz_report import print_uncaptured

PREFERENCE_TYPES = ("sigmoid", "hinge", "ipo", "sigmoid_norm")
EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
FP16_TINY = 2.0 ** -23  # a scaled gradient above this survives rounding to fp16 (smallest subnormal 2^-24)
TOKEN_SEEDS = range(200, 210)
LINEAR_SEEDS = range(300, 308)
_ELAPSED, _DRAWN = {}, {}


@pytest.fixture(scope="module", autouse=True)
def _report_runtime(request):
    start = time.perf_counter()
    yield
    line = (f"\nfuzz_precision_ties: {time.perf_counter() - start:.1f} s in all; "
            + ", ".join(f"{k} {v:.1f} s" for k, v in _ELAPSED.items())
            + "; drawn: " + ", ".join(f"{k} {v}" for k, v in sorted(_DRAWN.items())))
    print_uncaptured(request, line)


def _count(*keys):
    for key in keys:
        _DRAWN[key] = _DRAWN.get(key, 0) + 1


def _pick(g, options):
    return options[int(torch.randint(0, len(options), (), generator=g))]


# ------------------------------------------------------------------ fp16 with loss scaling


def _fp16_problem(seed, kto):
    """Sequences of odd lengths with a 1-2 token prompt; logits spread over ~25 nats, so many
    LM-head rows belong to tokens with p between 1e-12 and 1e-5 (their gradients are fp16
    subnormals or smaller until scaled)."""
    g = torch.Generator().manual_seed(seed)
    P = _pick(g, (1, 2, 3))
    S = 2 * P if not kto else _pick(g, (3, 4, 5))
    D, V = _pick(g, (3, 5, 7)), _pick(g, (37, 61, 97))
    lengths = [_pick(g, (3, 5, 7)) for _ in range(S)]
    hidden = [torch.randn(n, D, generator=g, dtype=torch.float64).half().double() for n in lengths]
    labels = [torch.randint(0, V, (n,), generator=g) for n in lengths]
    for s, lab in enumerate(labels):
        lab[: 1 + s % 2] = -100
    weight = (torch.randn(V, D, generator=g, dtype=torch.float64) * 6.4 / D ** 0.5).half().double()  # logit std 6.4
    ref = (torch.randn(S, generator=g, dtype=torch.float64) - 20).half().double()
    loss_type = _pick(g, PREFERENCE_TYPES)  # ipo's margin 1/(2β) needs a β of order 1 to stay in fp16's range
    return dict(lengths=lengths, hidden=hidden, labels=labels, weight=weight, ref=ref, P=P,
                packed=bool(torch.randint(0, 2, (), generator=g)), trainable=bool(torch.randint(0, 2, (), generator=g)),
                log2_scale=int(torch.randint(0, 17, (), generator=g)),
                loss_type=loss_type, beta=_pick(g, (0.1, 0.5) if loss_type == "ipo" else (1e-5, 1e-3, 0.1)),
                desirable=torch.rand(S, generator=g) < 0.5, backend=_pick(g, ("torch", "triton")),
                kl=float(torch.rand((), generator=g)))


def _batch(p):
    """The module's inputs: padded ``[S, T, D]`` (labels −100 past each length) or one packed stream."""
    if p["packed"]:
        cu = torch.tensor([0] + p["lengths"]).cumsum(0)
        return torch.cat(p["hidden"]).unsqueeze(0), torch.cat(p["labels"]).unsqueeze(0), dict(cu_seqlens=cu)
    T = max(p["lengths"])
    hidden = torch.zeros(len(p["lengths"]), T, p["weight"].shape[1], dtype=torch.float64)
    labels = torch.full((len(p["lengths"]), T), -100)
    for s, (h, lab) in enumerate(zip(p["hidden"], p["labels"])):
        hidden[s, : h.shape[0]], labels[s, : lab.shape[0]] = h, lab
    return hidden, labels, {}


def _sums64(hidden, weight, labels):
    """Per-sequence sums of log p(label) and label counts, float64, from a list of sequences."""
    sums, counts = [], []
    for h, lab in zip(hidden, labels):
        logp = F.log_softmax(h @ weight.t(), -1)
        mask = lab != -100
        tok = logp.gather(-1, lab.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        sums.append(torch.where(mask, tok, torch.zeros_like(tok)).sum())
        counts.append(mask.sum().double())
    return torch.stack(sums), torch.stack(counts)


def _preference64(loss_type, s, n, ref, beta):
    """Mean per-pair loss (TRL's formulas); rows ``[chosen…, rejected…]``."""
    P = s.shape[0] // 2
    rc, rr = s[:P] - ref[:P], s[P:] - ref[P:]
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * (rc - rr))
    elif loss_type == "hinge":
        losses = torch.relu(1 - beta * (rc - rr))
    elif loss_type == "ipo":
        losses = (rc / n[:P] - rr / n[P:] - 1 / (2 * beta)) ** 2
    else:  # sigmoid_norm
        losses = -F.logsigmoid(beta * (rc / n[:P] - rr / n[P:]))
    return losses.mean()


def _kto64(s, ref, beta, desirable, kl):
    r = s - ref
    return torch.where(desirable, 1 - torch.sigmoid(beta * (r - kl)), 1 - torch.sigmoid(beta * (kl - r))).mean()


def _reference(p, kto):
    """float64 loss and its gradients w.r.t. each sequence's hidden rows and the head."""
    hidden = [h.clone().requires_grad_() for h in p["hidden"]]
    weight = p["weight"].clone().requires_grad_()
    s, n = _sums64(hidden, weight, p["labels"])
    if kto:
        loss = _kto64(s, p["ref"], p["beta"], p["desirable"], p["kl"])
    else:
        loss = _preference64(p["loss_type"], s, n, p["ref"], p["beta"])
    loss.backward()
    return torch.cat([h.grad for h in hidden]), weight.grad


def _run_fp16(p, kto, fused, scale):
    """One step as GradScaler takes it; the gradients unscaled in float64, hidden's as token rows."""
    hidden, labels, layout = _batch(p)
    h = hidden.half().requires_grad_()
    w = p["weight"].half().requires_grad_(p["trainable"])
    if kto:
        module = FusedKTOLoss(beta=p["beta"], backend=p["backend"])
        kw = dict(is_desirable=p["desirable"], ref_logps=p["ref"].half(), kl=p["kl"])
    else:
        module = FusedPreferenceLoss(p["loss_type"], beta=p["beta"], backend=p["backend"], logit_metrics=False)
        kw = dict(ref_chosen_logps=p["ref"][: p["P"]].half(), ref_rejected_logps=p["ref"][p["P"]:].half())
    module.fused_gradient = fused
    out = module(hidden=h, weight=w, labels=labels, **layout, **kw)
    if fused and p["trainable"]:
        assert "StoredGradient" in type(out.loss.grad_fn).__name__, type(out.loss.grad_fn).__name__
    (out.loss * scale).backward()
    gh = h.grad.double() / scale
    rows = torch.cat([gh[0]] if p["packed"] else [gh[s, :n] for s, n in enumerate(p["lengths"])])
    return rows, None if w.grad is None else w.grad.double() / scale


def _check_gradient(name, got, staged, expected, scale):
    """(a) no exactly-zero row where the scaled float64 gradient is representable in fp16;
    (b) relative error within twice the staged plan's plus half an fp16 ulp."""
    assert torch.isfinite(got).all(), f"{name}: non-finite gradient"
    representable = (expected.abs() * scale > FP16_TINY).any(-1)
    zero = (got == 0).all(-1)
    lost = (representable & zero).nonzero().flatten().tolist()
    assert not lost, f"{name}: rows {lost} exactly 0, float64 gradient {expected[lost].abs().amax(-1).tolist()}"
    err = float((got - expected).norm() / expected.norm())
    err_staged = float((staged - expected).norm() / expected.norm())
    assert err <= 2 * err_staged + 2.0 ** -11, f"{name}: relative error {err:.3g}, staged plan {err_staged:.3g}"
    return err, err_staged


def _fp16_case(seed, kto):
    p = _fp16_problem(seed, kto)
    expected_h, expected_w = _reference(p, kto)
    # GradScaler lowers the scale until the scaled gradients are finite: the largest gradient
    # (here of the logits, bounded by that of the sums) must stay below fp16's range.
    scale = 2.0 ** p["log2_scale"]
    peak = max(expected_h.abs().max().item(), expected_w.abs().max().item())
    while scale > 1 and scale * peak > 2.0 ** 14:
        scale /= 2
    _count("kto" if kto else p["loss_type"], p["backend"], "packed" if p["packed"] else "padded",
           "trainable" if p["trainable"] else "frozen", f"scale 2^{int(scale).bit_length() - 1}")
    fused_h, fused_w = _run_fp16(p, kto, True, scale)
    staged_h, staged_w = _run_fp16(p, kto, False, scale)
    _check_gradient("dH", fused_h, staged_h, expected_h, scale)
    if p["trainable"]:
        _check_gradient("dW", fused_w, staged_w, expected_w, scale)


def _timed(key, fn, *args):
    start = time.perf_counter()
    try:
        fn(*args)
    finally:
        _ELAPSED[key] = _ELAPSED.get(key, 0.0) + time.perf_counter() - start


@pytest.mark.parametrize("seed", range(16))
def test_fp16_loss_scaled_preference_plan(seed):
    _timed("fp16", _fp16_case, seed, False)


@pytest.mark.parametrize("seed", range(8))
def test_fp16_loss_scaled_kto_plan(seed):
    _timed("fp16", _fp16_case, 100 + seed, True)


# ------------------------------------------------------------------ ties and is_top1


def _labels_on_ties(x, g):
    """Per row: the first maximal id, a later maximal id (where the max is shared) or any id,
    in about equal parts."""
    at_max = x == x.max(-1, keepdim=True).values
    first = at_max.double().argmax(-1)
    later = (at_max * torch.rand(x.shape, generator=g, dtype=torch.float64)).argmax(-1)  # a random maximizer
    shared = at_max.sum(-1) > 1
    later = torch.where(shared & (later == first), (at_max.cumsum(-1) == 2).double().argmax(-1), later)
    anywhere = torch.randint(0, x.shape[-1], first.shape, generator=g)
    choice = torch.randint(0, 3, first.shape, generator=g)
    return torch.where(choice == 0, first, torch.where(choice == 1, later, anywhere))


def _argmax_reference(x, labels, shift, ignore_index=-100):
    """1.0 where the float64 ``argmax`` (first maximal id) of the logits that predict a label is
    that label; 0 at ignored positions and, under ``shift``, at position 0."""
    x, keep = _predicting(x, labels, shift, ignore_index)
    top1 = (x.argmax(-1) == labels).double()
    return torch.where(keep, top1, torch.zeros_like(top1))


def _predicting(x, labels, shift, ignore_index=-100):
    """The logits row that predicts each label (under ``shift`` row t − 1) and which labels count."""
    keep = labels != ignore_index
    if shift:
        keep[..., 0] = False
    return _aligned(x, shift), keep


def _aligned(x, shift):
    return torch.cat([x[..., :1, :], x[..., :-1, :]], dim=-2) if shift else x


def _ties_options(g):
    return dict(shift=bool(torch.randint(0, 2, (), generator=g)), temperature=_pick(g, (1.0, 0.7)))


def _masked(labels, g):
    labels = labels.clone()
    labels[torch.rand(labels.shape, generator=g) < 0.15] = -100
    return labels


def _token_ties_problem(seed):
    g = torch.Generator().manual_seed(seed)
    B, T, V = _pick(g, (1, 2, 3)), _pick(g, (1, 3, 5, 7)), _pick(g, (3, 37, 131, 151, 263))
    dtype = _pick(g, (torch.float32, torch.bfloat16))
    x = torch.randint(0, max(2, V // 3), (B, T, V), generator=g).double()  # integers: exact in bf16 too
    opts = _ties_options(g)
    labels = _masked(_labels_on_ties(_aligned(x, opts["shift"]), g), g)
    extras = tuple(e for e in EXTRAS[:-1] if torch.rand((), generator=g) < 0.5) + ("is_top1",)
    return x, labels, opts, dict(dtype=dtype, extras=extras)


def _token_ties_case(seed, backend):
    x, labels, opts, p = _token_ties_problem(seed)
    out = pyfused_po.token_logprobs(x.to(p["dtype"]), labels, extras=p["extras"], backend=backend, **opts)
    _count(f"token {backend}", str(p["dtype"]).replace("torch.", ""))
    ref = _argmax_reference(x, labels, opts["shift"])
    assert torch.equal(out.is_top1.double() * (labels != -100), ref), (seed, opts, p)


def _linear_ties_problem(seed):
    """Integer hidden states and LM head, some head rows duplicated (among them the max of some
    tokens), so ties are exact in fp32 and fall across the fused kernel's vocabulary splits."""
    g = torch.Generator().manual_seed(seed)
    N, D, V = _pick(g, (3, 7, 13)), _pick(g, (3, 5)), _pick(g, (37, 131, 263))
    h = torch.randint(-2, 3, (1, N, D), generator=g).double()
    w = torch.randint(-2, 3, (V, D), generator=g).double()
    best = (h[0] @ w.t()).argmax(-1)
    for v in best[: N // 2].tolist():  # copy a token's best row to a random later / earlier id
        w[int(torch.randint(0, V, (), generator=g))] = w[v]
    x, opts = h @ w.t(), _ties_options(g)
    return x, _masked(_labels_on_ties(_aligned(x, opts["shift"]), g), g), opts, dict(h=h, w=w)


def _linear_ties_case(seed, backend, impl):
    x, labels, opts, p = _linear_ties_problem(seed)
    out = pyfused_po.linear_token_logprobs(p["h"].float(), p["w"].float(), labels, extras=("entropy", "is_top1"),
                                           backend=backend, impl=impl, **opts)
    _count(f"linear {backend} {impl}")
    ref = _argmax_reference(x, labels, opts["shift"])
    assert torch.equal(out.is_top1.double() * (labels != -100), ref), (seed, opts)


@pytest.mark.parametrize("backend", ("torch", "triton"))
@pytest.mark.parametrize("seed", range(len(TOKEN_SEEDS)))
def test_ties_token_logprobs(seed, backend):
    _timed("ties", _token_ties_case, TOKEN_SEEDS[seed], backend)


@pytest.mark.parametrize("backend,impl", [("torch", "chunked"), ("triton", "chunked"), ("triton", "fused")])
@pytest.mark.parametrize("seed", range(len(LINEAR_SEEDS)))
def test_ties_linear_token_logprobs(seed, backend, impl):
    _timed("ties", _linear_ties_case, LINEAR_SEEDS[seed], backend, impl)


def test_ties_axis_draws_both_outcomes():
    """The ties axis is worth its time only if, in the problems drawn above, labels land on the
    first and on a later tied id (counted from the float64 logits alone, no library call)."""
    first = later = 0
    for seeds, problem in ((TOKEN_SEEDS, _token_ties_problem), (LINEAR_SEEDS, _linear_ties_problem)):
        for seed in seeds:
            x, labels, opts, _ = problem(seed)
            x, keep = _predicting(x, labels, opts["shift"])
            at_max = x == x.max(-1, keepdim=True).values
            on_tie = at_max.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1) & (at_max.sum(-1) > 1)
            on_tie &= keep
            is_first = labels == x.argmax(-1)
            first, later = first + int((on_tie & is_first).sum()), later + int((on_tie & ~is_first).sum())
    _DRAWN.update({"label on first tied id": first, "label on later tied id": later})
    assert first >= 10 and later >= 10, (first, later)
