"""Differential fuzz test: both backends against an independent float64 reference.

Hypothesis draws a problem — shape, memory layout of the logits (contiguous, expanded,
overlapping, flipped stride order, sliced, leading dims that cannot merge), label dtype,
``ignore_index`` and ignore pattern, token options (shift, temperature, logit scale,
softcap, extras, in-place backward) and a loss type — and the test checks, on the Triton
kernels (interpreter) and on the torch backend:

* values and gradients (w.r.t. the tensor the strided view was taken from) against
  float64 math written from the formulas in ``tests/reference.py`` and below; or
* a clear refusal (``TypeError`` / ``ValueError``) for the combinations the library
  refuses by design: in-place backward into memory shared by several elements or into
  leading dims that cannot be addressed as one stride, uint8 labels with a negative
  ``ignore_index``.

Reproducible: ``derandomize=True`` and no example database, so CI runs the same examples
every time.  The runtime is printed at the end of the module (budget: ≤ 2 minutes in CI).
"""
import time

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyfused_po
from _fuzz_report import print_uncaptured
from reference import token_logprobs_ref, transformed_logits

LAYOUTS = ("contiguous", "expanded", "overlapping", "flipped", "sliced", "non-mergeable")
LABEL_DTYPES = (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8)
LOSS_TYPES = (None, "sigmoid", "hinge", "ipo", "simpo", "sigmoid_norm")
EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
FUZZ = settings(max_examples=100, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow])
_ELAPSED = {}
_DRAWN = {}  # how often each layout / loss type / outcome was drawn, for the report


@pytest.fixture(scope="module", autouse=True)
def _report_runtime(request):
    start = time.perf_counter()
    yield
    total = time.perf_counter() - start
    line = (f"\nfuzz_differential: {total:.1f} s in all; " + ", ".join(f"{k} {v:.1f} s" for k, v in _ELAPSED.items())
            + "; drawn: " + ", ".join(f"{k} {v}" for k, v in sorted(_DRAWN.items())))
    print_uncaptured(request, line)


# ------------------------------------------------------------------ the strided logits


def strided_view(base, layout, B, T, V):
    """``[B, T, V]`` (``[2, B, T, V]`` for non-mergeable) view of the flat ``base`` with the
    drawn layout; only differentiable view ops, so gradients reach ``base``."""
    if layout == "contiguous":
        return base[: B * T * V].view(B, T, V)
    if layout == "expanded":  # one sequence broadcast over the batch: stride 0
        return base[: T * V].view(1, T, V).expand(B, T, V)
    if layout == "overlapping":  # consecutive rows share half their entries
        step = max(1, V // 2)
        return base.as_strided((B, T, V), (T * step, step, 1))
    if layout == "flipped":  # stored [V, T, B]: every stride order reversed, vocab stride ≠ 1
        return base[: B * T * V].view(V, T, B).permute(2, 1, 0)
    if layout == "sliced":  # inside a larger [B, T + 2, V + 3] buffer
        return base[: B * (T + 2) * (V + 3)].view(B, T + 2, V + 3)[:, 1:T + 1, 2:V + 2]
    # stored [B, 2, T, V], seen as [2, B, T, V]: (2, B) cannot merge into one stride
    return base[: 2 * B * T * V].view(B, 2, T, V).transpose(0, 1)


def base_numel(layout, B, T, V):
    if layout == "overlapping":
        return (B * T - 1) * max(1, V // 2) + V
    if layout == "sliced":
        return B * (T + 2) * (V + 3)
    return 2 * B * T * V


def _ignore_index(draw, dtype, V):
    if dtype == torch.uint8:
        return draw(st.sampled_from([255, -100]))  # −100 is refused (uint8 cannot hold it)
    return draw(st.sampled_from([-100, -1, V + 3]))


@st.composite
def problems(draw):
    layout = draw(st.sampled_from(LAYOUTS))
    # Half the examples check the token stage (values of every extra), half a loss.
    loss_type = None if layout == "non-mergeable" or draw(st.booleans()) else draw(st.sampled_from(LOSS_TYPES[1:]))
    B = 2 * draw(st.integers(1, 2)) if loss_type else draw(st.integers(1, 3))
    T = draw(st.integers(1, 5))
    V = draw(st.sampled_from([1, 2, 7, 33, 130, 150]))
    dtype = draw(st.sampled_from([torch.float32, torch.float32, torch.bfloat16]))
    label_dtype = draw(st.sampled_from(LABEL_DTYPES))
    ignore_index = _ignore_index(draw, label_dtype, V)
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    scale = draw(st.sampled_from([0.5, 3.0]))
    base = (torch.randn(base_numel(layout, B, T, V), generator=gen, dtype=torch.float64) * scale).to(dtype)
    shape = (2, B, T) if layout == "non-mergeable" else (B, T)
    top = min(V, 128 if label_dtype == torch.int8 else V)
    labels = torch.randint(0, top, shape, generator=gen)
    pattern = draw(st.sampled_from(["none", "random", "prompt", "all"]))
    if pattern == "random":
        labels[torch.rand(shape, generator=gen) < 0.4] = ignore_index
    elif pattern == "prompt":
        labels[..., : T // 2] = ignore_index
    elif pattern == "all":
        labels[...] = ignore_index
    options = dict(
        shift=draw(st.booleans()),
        temperature=draw(st.sampled_from([1.0, 0.7])),
        logit_scale=draw(st.sampled_from([1.0, 1.5])),
        softcap=draw(st.sampled_from([None, 4.0])),
        ignore_index=ignore_index,
    )
    extras = tuple(e for e in EXTRAS if draw(st.booleans()))
    inplace = draw(st.booleans())
    info = torch.iinfo(label_dtype)
    if not info.min <= ignore_index <= info.max:
        labels = labels.clamp(info.min, info.max)  # not representable: the call is refused anyway
    problem = dict(layout=layout, base=base, B=B, T=T, V=V, labels=labels.to(label_dtype), options=options,
                   extras=extras, inplace=inplace, loss_type=loss_type, dtype=dtype, path="logits")
    route = draw(st.integers(0, 3)) if loss_type is None else -1
    if route == 1:  # the full-vocabulary KL kernel against a contiguous reference model's logits
        problem.update(path="kl", inplace=False,
                       ref_logits=(torch.randn(*shape, V, generator=gen, dtype=torch.float64) * scale).to(dtype))
    if route == 0:
        # A quarter of the token-stage examples take the fused-linear path: the strided tensor
        # is then the hidden states [.., T, D] (fp32: CPU bf16 GEMMs round their output).
        D = draw(st.integers(1, 6))
        problem.update(path="hidden", D=D, dtype=torch.float32, inplace=False,
                       impl=draw(st.sampled_from(["chunked", "fused"])),
                       base=torch.randn(base_numel(layout, B, T, D), generator=gen, dtype=torch.float64).float(),
                       weight=(torch.randn(V, D, generator=gen, dtype=torch.float64) * scale).float())
    return problem


def _elements_share_memory(x):
    """True when two elements of ``x`` have the same offset (enumerated: tiny shapes only)."""
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(x.shape, x.stride()):
        offsets = offsets.unsqueeze(-1) + torch.arange(size) * stride
    return offsets.unique().numel() < offsets.numel()


def _rows_addressable(x):
    """Whether the leading dims merge into one stride (a ``[rows, T, V]`` view exists)."""
    try:
        x.view(-1, *x.shape[-2:])
        return True
    except RuntimeError:
        return False


def refusal(p, x):
    """The error the library must raise for this problem on logits ``x``, or None."""
    info = torch.iinfo(p["labels"].dtype)
    if not info.min <= p["options"]["ignore_index"] <= info.max:  # e.g. uint8 labels, ignore_index −100
        return TypeError
    if p["inplace"] and (_elements_share_memory(x) or not _rows_addressable(x)):
        return ValueError
    return None


# ------------------------------------------------------------------ float64 references


def token_reference(base, p):
    """float64 per-token results and the leaf they differentiate to."""
    leaf = base.detach().double().requires_grad_()
    x = strided_view(leaf, p["layout"], p["B"], p["T"], p["V"])
    return leaf, token_logprobs_ref(x, p["labels"].long(), **p["options"])


def clear_top1(x, p):
    """Positions whose label logit is not within 1e-3 of the best other logit (after the
    transform and the shift) in the float64 logits ``x``, where ``is_top1`` has one right
    answer in any precision."""
    o = p["options"]
    z = transformed_logits(x, temperature=o["temperature"], logit_scale=o["logit_scale"], softcap=o["softcap"])
    if o["shift"]:
        z = torch.cat([torch.zeros_like(z[..., :1, :]), z[..., :-1, :]], dim=-2)
    labels = p["labels"].long()
    safe = torch.where(labels == o["ignore_index"], torch.zeros_like(labels), labels).clamp(0, p["V"] - 1).unsqueeze(-1)
    z_y = z.gather(-1, safe).squeeze(-1)
    others = z.scatter(-1, safe, float("-inf")).max(-1).values
    return (z_y - others).abs() > 1e-3


def sequence_reference(logps, labels, ignore_index, shift):
    mask = labels.long() != ignore_index
    if shift:
        mask[:, 0] = False
    return (logps * mask).sum(-1), mask.sum(-1).double()


def loss_reference(loss_type, s, n, ref, beta):
    """Per-pair losses from the formulas (TRL v1): s, n summed log-probs and lengths [2P]."""
    P = s.shape[0] // 2
    (sc, sr), (nc, nr), (rc, rr) = (s[:P], s[P:]), (n[:P].clamp(min=1), n[P:].clamp(min=1)), (ref[:P], ref[P:])
    h = (sc - rc) - (sr - rr)
    if loss_type == "sigmoid":
        return -F.logsigmoid(beta * h)
    if loss_type == "hinge":
        return torch.relu(1 - beta * h)
    if loss_type == "ipo":
        return ((sc - rc) / nc - (sr - rr) / nr - 1 / (2 * beta)) ** 2
    if loss_type == "sigmoid_norm":
        return -F.logsigmoid(beta * ((sc - rc) / nc - (sr - rr) / nr))
    assert loss_type == "simpo"
    return -F.logsigmoid(beta * (sc / nc - sr / nr) - 0.5)


def _tolerances(p):
    magnitude = max(1.0, p["base"].double().abs().max().item())
    value_tol = 1e-5 * magnitude * p["options"]["logit_scale"] / p["options"]["temperature"]
    grad_tol = {torch.float32: 1e-5, torch.bfloat16: 1e-2}[p["dtype"]]
    return value_tol, grad_tol


def _assert_close(actual, expected, rel, floor, what):
    if expected.numel() == 0:
        return
    err = (actual.double() - expected).abs().max().item()
    bound = rel * max(1.0, expected.abs().max().item()) + floor
    assert err <= bound, f"{what}: error {err:.3g} > {bound:.3g}"


# ------------------------------------------------------------------ the checks


def check_token_stage(backend, p):
    leaf = p["base"].detach().clone().requires_grad_()
    src = leaf * 1 if p["inplace"] else leaf  # the in-place backward needs non-leaf memory
    x = strided_view(src, p["layout"], p["B"], p["T"], p["V"])
    expected = refusal(p, x)
    if expected is not None:
        _DRAWN["refused"] = _DRAWN.get("refused", 0) + 1
        with pytest.raises(expected):
            pyfused_po.token_logprobs(x, p["labels"], extras=p["extras"], inplace_backward=p["inplace"],
                                      backend=backend, **p["options"])
        return
    out = pyfused_po.token_logprobs(x, p["labels"], extras=p["extras"], inplace_backward=p["inplace"],
                                    backend=backend, **p["options"])
    out = out if p["extras"] else pyfused_po.TokenLogprobs(out)
    leaf_ref, ref = token_reference(p["base"], p)
    value_tol, grad_tol = _tolerances(p)
    for name in ("logps",) + tuple(e for e in p["extras"] if e != "is_top1"):
        _assert_close(getattr(out, name), ref[name].detach(), 1e-5, value_tol, name)
    if "is_top1" in p["extras"]:
        x64 = strided_view(leaf_ref.detach(), p["layout"], p["B"], p["T"], p["V"])
        clear = clear_top1(x64, p)  # fp32 and fp64 may order near-ties differently
        assert torch.equal(out.is_top1[clear].double(), ref["is_top1"][clear].detach())
    gen = torch.Generator().manual_seed(1)
    weights = {n: torch.randn(p["labels"].shape, generator=gen, dtype=torch.float64)
               for n in ("logps",) + tuple(e for e in p["extras"] if e != "is_top1")}
    loss = sum((w * getattr(out, n).double()).sum() for n, w in weights.items())
    loss_ref = sum((w * ref[n]).sum() for n, w in weights.items())
    loss.backward()
    loss_ref.backward()
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    dz_dx = p["options"]["logit_scale"] / p["options"]["temperature"]
    floor = 1e-6 * value_tol / 1e-5 * dz_dx * sum(w.abs().max().item() for w in weights.values() if w.numel())
    _assert_close(grad, leaf_ref.grad, grad_tol, floor, "gradient")


def check_linear(backend, p):
    """The fused-linear token stage: logits = hidden·Wᵀ never materialized."""
    hidden = p["base"].detach().clone().requires_grad_()
    weight = p["weight"].detach().clone().requires_grad_()
    h = strided_view(hidden, p["layout"], p["B"], p["T"], p["D"])
    impl = p["impl"] if backend == "triton" else "chunked"
    kwargs = dict(extras=p["extras"], backend=backend, impl=impl, **p["options"])
    expected = refusal(p, h)
    if expected is not None:
        _DRAWN["refused"] = _DRAWN.get("refused", 0) + 1
        with pytest.raises(expected):
            pyfused_po.linear_token_logprobs(h, weight, p["labels"], **kwargs)
        return
    out = pyfused_po.linear_token_logprobs(h, weight, p["labels"], **kwargs)
    out = out if p["extras"] else pyfused_po.TokenLogprobs(out)
    hidden64 = p["base"].double().requires_grad_()
    weight64 = p["weight"].double().requires_grad_()
    x64 = strided_view(hidden64, p["layout"], p["B"], p["T"], p["D"]) @ weight64.t()
    ref = token_logprobs_ref(x64, p["labels"].long(), **p["options"])
    magnitude = max(1.0, x64.detach().abs().max().item()) * p["options"]["logit_scale"] / p["options"]["temperature"]
    names = ("logps",) + tuple(e for e in p["extras"] if e != "is_top1")
    for name in names:
        _assert_close(getattr(out, name), ref[name].detach(), 1e-5, 1e-5 * magnitude, name)
    if "is_top1" in p["extras"]:
        clear = clear_top1(x64.detach(), p)
        assert torch.equal(out.is_top1[clear].double(), ref["is_top1"][clear].detach())
    gen = torch.Generator().manual_seed(2)
    weights = {n: torch.randn(p["labels"].shape, generator=gen, dtype=torch.float64) for n in names}
    sum((w * getattr(out, n).double()).sum() for n, w in weights.items()).backward()
    sum((w * ref[n]).sum() for n, w in weights.items()).backward()
    floor = 1e-6 * magnitude * sum(w.abs().max().item() for w in weights.values() if w.numel()) * max(
        1.0, p["weight"].abs().max().item(), p["base"].abs().max().item()) * p["T"] * p["B"]
    for name, leaf, leaf64 in (("grad_hidden", hidden, hidden64), ("grad_weight", weight, weight64)):
        grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
        _assert_close(grad, leaf64.grad, 1e-5, floor, name)


def _aligned(z, shift):
    """Row t of the result belongs to label t (a zero row at t = 0 under shift)."""
    return torch.cat([torch.zeros_like(z[..., :1, :]), z[..., :-1, :]], dim=-2) if shift else z


def check_kl(backend, p):
    """token_kl: Σ_v p_ref (log p_ref − log p_θ) per labelled token, and log p(label)."""
    leaf = p["base"].detach().clone().requires_grad_()
    x = strided_view(leaf, p["layout"], p["B"], p["T"], p["V"])
    o = p["options"]
    expected = refusal(p, x)
    if expected is not None:
        _DRAWN["refused"] = _DRAWN.get("refused", 0) + 1
        with pytest.raises(expected):
            pyfused_po.token_kl(x, p["ref_logits"], p["labels"], backend=backend, with_logps=True, **o)
        return
    out = pyfused_po.token_kl(x, p["ref_logits"], p["labels"], backend=backend, with_logps=True, **o)
    leaf64, ref = token_reference(p["base"], p)
    x64 = strided_view(leaf64, p["layout"], p["B"], p["T"], p["V"])
    transform = dict(temperature=o["temperature"], logit_scale=o["logit_scale"], softcap=o["softcap"])
    log_p = _aligned(torch.log_softmax(transformed_logits(x64, **transform), -1), o["shift"])
    log_q = _aligned(torch.log_softmax(transformed_logits(p["ref_logits"].double(), **transform), -1), o["shift"])
    kl = torch.where(log_q > -torch.inf, log_q.exp() * (log_q - log_p), torch.zeros_like(log_q)).sum(-1)
    mask = p["labels"].long() != o["ignore_index"]
    if o["shift"]:
        mask[..., 0] = False
    kl = torch.where(mask, kl, torch.zeros_like(kl))
    value_tol, grad_tol = _tolerances(p)
    _assert_close(out.kl, kl.detach(), 1e-5, value_tol, "kl")
    _assert_close(out.logps, ref["logps"].detach(), 1e-5, value_tol, "logps")
    gen = torch.Generator().manual_seed(3)
    w_kl, w_lp = (torch.randn(p["labels"].shape, generator=gen, dtype=torch.float64) for _ in range(2))
    ((w_kl * out.kl.double()).sum() + (w_lp * out.logps.double()).sum()).backward()
    ((w_kl * kl).sum() + (w_lp * ref["logps"]).sum()).backward()
    dz_dx = o["logit_scale"] / o["temperature"]
    floor = 1e-6 * value_tol / 1e-5 * dz_dx * (w_kl.abs().max().item() + w_lp.abs().max().item() if w_kl.numel() else 0)
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    _assert_close(grad, leaf64.grad, grad_tol, floor, "kl gradient")


def check_loss(backend, p):
    beta = 0.5
    leaf = p["base"].detach().clone().requires_grad_()
    src = leaf * 1 if p["inplace"] else leaf
    x = strided_view(src, p["layout"], p["B"], p["T"], p["V"])
    o = p["options"]
    module = pyfused_po.FusedPreferenceLoss(p["loss_type"], beta=beta, backend=backend, inplace_backward=p["inplace"],
                                            logit_metrics=False, **o)
    P = p["B"] // 2
    ref_logps = torch.linspace(-3.0, -1.0, 2 * P, dtype=torch.float64)
    kwargs = dict(ref_chosen_logps=ref_logps[:P].float(), ref_rejected_logps=ref_logps[P:].float())
    expected = refusal(p, x)
    if expected is not None:
        _DRAWN["refused"] = _DRAWN.get("refused", 0) + 1
        with pytest.raises(expected):
            module(logits=x, labels=p["labels"], **kwargs)
        return
    out = module(logits=x, labels=p["labels"], **kwargs)
    leaf_ref, ref = token_reference(p["base"], p)
    s, n = sequence_reference(ref["logps"], p["labels"], o["ignore_index"], o["shift"])
    losses_ref = loss_reference(p["loss_type"], s, n, ref_logps, beta)
    value_tol, grad_tol = _tolerances(p)
    _assert_close(out.losses, losses_ref.detach(), 1e-5, value_tol * p["T"], "losses")
    out.loss.backward()
    losses_ref.mean().backward()
    grad = leaf.grad if leaf.grad is not None else torch.zeros_like(leaf)
    _assert_close(grad, leaf_ref.grad, grad_tol, 1e-6 * value_tol / 1e-5 * p["T"], "loss gradient")


@pytest.mark.parametrize("backend", ["triton", "torch"])
@FUZZ
@given(p=problems())
def test_differential_fuzz(backend, p):
    start = time.perf_counter()
    for key in (p["layout"], p["loss_type"] or f"token-{p['path']}", str(p["labels"].dtype).replace("torch.", ""),
                "in-place" if p["inplace"] else "fresh-grad"):
        _DRAWN[key] = _DRAWN.get(key, 0) + 1
    try:
        if p["path"] == "hidden":
            check_linear(backend, p)
        elif p["path"] == "kl":
            check_kl(backend, p)
        elif p["loss_type"] is None:
            check_token_stage(backend, p)
        else:
            check_loss(backend, p)
    finally:
        _ELAPSED[backend] = _ELAPSED.get(backend, 0.0) + time.perf_counter() - start
