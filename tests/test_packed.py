"""Packed (padding-free) batches equal padded ones: token stage, sequence stage, every loss.

The packed stream is built by gathering the padded batch's real tokens (tests/_packed_data.py),
so the padded float64 result on the torch backend is the reference; the token stage is also
checked against the independent formulas of reference.py.  Lengths are random with a
length-1 sequence, a prompt-only sequence (empty response) and a zero-token sequence.
"""
import pytest
import torch

import pyfused_po
from pyfused_po import FusedKTOLoss, FusedPreferenceLoss
from pyfused_po.objectives import get_objective
from _packed_data import Batch, position_ids_of
from reference import token_logprobs_ref

EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")


def assert_close(a, b, tol=1e-10, what=""):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = ((a - b).abs().max() / b.abs().max().clamp(min=1.0)).item() if b.numel() else 0.0
    assert err <= tol, f"{what}: relative error {err:.3g} > {tol}"


# ----------------------------------------------------------------------------- token stage

@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("shift", [False, True])
def test_token_logprobs_packed_equals_per_sequence_reference(backend, shift):
    b = Batch(S=5, V=13, seed=1)
    dtype = torch.float64 if backend == "torch" else torch.float32
    rows, cu = b.pack(torch.arange(b.S))
    x = b.take(b.logits, rows).to(dtype).requires_grad_()
    y = b.take(b.labels, rows)
    kw = dict(shift=shift, temperature=0.9, softcap=7.0)
    out = pyfused_po.token_logprobs(x, y, extras=EXTRAS, backend=backend, cu_seqlens=cu, **kw)
    full = b.logits.clone().requires_grad_()
    ref = token_logprobs_ref(full, b.labels, **kw)  # each padded row is one sequence
    tol = 1e-10 if backend == "torch" else 2e-5
    for name in ("logps",) + EXTRAS:
        assert_close(getattr(out, name)[0], ref[name].reshape(-1)[rows], tol, name)
    c = torch.randn(3, b.S, b.T, dtype=torch.float64)
    (sum((c[i].reshape(-1)[rows] * getattr(out, n)[0]).sum() for i, n in enumerate(("logps", "entropy",
                                                                                   "log_sum_sq_probs")))).backward()
    sum((c[i] * ref[n]).sum() for i, n in enumerate(("logps", "entropy", "log_sum_sq_probs"))).backward()
    assert_close(x.grad[0], full.grad.reshape(-1, b.V)[rows], 1e-10 if backend == "torch" else 1e-4, "grad")


def test_position_ids_equal_cu_seqlens_and_flat_stream():
    b = Batch(S=4, V=11, seed=2, allow_empty=False)
    rows, cu = b.pack(torch.arange(b.S))
    x, y = b.take(b.logits, rows), b.take(b.labels, rows)
    a = pyfused_po.token_logprobs(x, y, shift=True, cu_seqlens=cu)
    p = pyfused_po.token_logprobs(x, y, shift=True, position_ids=position_ids_of(cu))
    flat = pyfused_po.token_logprobs(x[0], y[0], shift=True, cu_seqlens=cu.to(torch.int32))
    assert torch.equal(a, p) and torch.equal(a[0], flat)
    # Without the layout the shift would cross boundaries: the first token of a sequence
    # would be scored by the previous sequence's last logits.
    crossing = pyfused_po.token_logprobs(x, y, shift=True)
    assert not torch.equal(a, crossing)


@pytest.mark.parametrize("backend, impl", [("torch", "auto"), ("triton", "chunked"), ("triton", "fused")])
def test_linear_token_logprobs_packed(backend, impl):
    b = Batch(S=5, V=13, D=6, seed=3)
    dtype = torch.float64 if backend == "torch" else torch.float32
    rows, cu = b.pack(torch.arange(b.S))
    h = b.take(b.hidden, rows).to(dtype).requires_grad_()
    w, bias = b.weight.to(dtype).clone().requires_grad_(), b.bias.to(dtype).clone().requires_grad_()
    y = b.take(b.labels, rows)
    out = pyfused_po.linear_token_logprobs(h, w, y, bias=bias, shift=True, extras=("entropy",), backend=backend,
                                           impl=impl, cu_seqlens=cu)
    fh, fw, fb = (t.clone().requires_grad_() for t in (b.hidden, b.weight, b.bias))
    ref = token_logprobs_ref(fh @ fw.t() + fb, b.labels, shift=True)
    tol = 1e-10 if backend == "torch" else 2e-5
    assert_close(out.logps[0], ref["logps"].reshape(-1)[rows], tol, "logps")
    assert_close(out.entropy[0], ref["entropy"].reshape(-1)[rows], tol, "entropy")
    (out.logps.sum() + out.entropy.sum()).backward()
    (ref["logps"].sum() + ref["entropy"].sum()).backward()
    gtol = 1e-10 if backend == "torch" else 1e-4
    assert_close(h.grad[0], fh.grad.reshape(-1, fh.shape[-1])[rows], gtol, "grad hidden")
    assert_close(w.grad, fw.grad, gtol, "grad weight")
    assert_close(bias.grad, fb.grad, gtol, "grad bias")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_token_kl_packed(backend):
    b = Batch(S=5, V=13, seed=4)
    dtype = torch.float64 if backend == "torch" else torch.float32
    rows, cu = b.pack(torch.arange(b.S))
    x = b.take(b.logits, rows).to(dtype).requires_grad_()
    out = pyfused_po.token_kl(x, b.take(b.ref_logits, rows).to(dtype), b.take(b.labels, rows), shift=True,
                              backend=backend, with_logps=True, cu_seqlens=cu)
    full = b.logits.clone().requires_grad_()
    pad = pyfused_po.token_kl(full, b.ref_logits, b.labels, shift=True, backend="torch", with_logps=True)
    tol = 1e-10 if backend == "torch" else 2e-5
    assert_close(out.kl[0], pad.kl.reshape(-1)[rows], tol, "kl")
    assert_close(out.logps[0], pad.logps.reshape(-1)[rows], tol, "logps")
    (out.kl.sum() + out.logps.sum()).backward()
    (pad.kl.sum() + pad.logps.sum()).backward()
    assert_close(x.grad[0], full.grad.reshape(-1, b.V)[rows], 1e-10 if backend == "torch" else 1e-4, "grad")


@pytest.mark.parametrize("shift", [False, True])
def test_sequence_sums_are_segment_sums(shift):
    b = Batch(S=6, V=9, seed=5)
    rows, cu = b.pack(torch.arange(b.S))
    values = torch.randn(b.S, b.T, dtype=torch.float64)
    out = pyfused_po.sequence_sums(b.take(values, rows), b.take(b.labels, rows), shift=shift, cu_seqlens=cu,
                                   token_weights=b.take(b.token_weights, rows))
    for s in range(b.S):  # a plain loop over each sequence's own tokens
        n = int(b.lengths[s])
        keep = b.labels[s, :n] != -100
        if shift and n:
            keep[0] = False
        expect = (values[s, :n] * b.token_weights[s, :n])[keep].sum()
        assert abs(float(out.logps[s]) - float(expect)) < 1e-12, s
        assert float(out.lengths[s]) == float(keep.sum()), s


# ----------------------------------------------------------------------------- losses

def _pair_inputs(b, layout):
    """Packed twin of ``b`` in ``layout``: (rows, cu, layout keywords)."""
    perm = b.order(layout)
    rows, cu = b.pack(perm)
    P = b.S // 2
    if layout in ("halves", "interleaved"):
        return rows, cu, dict(pair_layout=layout)
    where = torch.argsort(perm)  # packed position of each padded row
    return rows, cu, dict(chosen_index=where[:P], rejected_index=where[P:])


def _run_pair(b, cfg, layout, *, inputs=(), source="logits", backend="torch", positions=False, refs=None):
    """(padded output, grads) and (packed output, grads mapped back to padded rows)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    rows, cu, pair_kw = _pair_inputs(b, layout)
    P = b.S // 2
    needs_ref = any(get_objective(t).needs_reference for t in
                    ([cfg["loss_type"]] if isinstance(cfg["loss_type"], str) else cfg["loss_type"]))
    if refs is None:
        refs = dict(ref_chosen_logps=-torch.rand(P, dtype=torch.float64) * 8,
                    ref_rejected_logps=-torch.rand(P, dtype=torch.float64) * 8) if needs_ref else {}
    results = []
    for packed in (False, True):
        tokens = {}
        for name in inputs:
            value = getattr(b, name)
            tokens[name] = (b.take(value, rows) if packed else value.clone())
            if tokens[name].is_floating_point():
                tokens[name] = tokens[name].to(dtype if packed else torch.float64)
        leaves = {}
        if source == "logits":
            x = (b.take(b.logits, rows).to(dtype) if packed else b.logits.clone()).requires_grad_()
            leaves["logits"] = x
            src = dict(logits=x)
        else:
            h = (b.take(b.hidden, rows).to(dtype) if packed else b.hidden.clone()).requires_grad_()
            w = (b.weight.to(dtype) if packed else b.weight).clone().requires_grad_()
            leaves.update(hidden=h, weight=w)
            src = dict(hidden=h, weight=w)
        labels = b.take(b.labels, rows) if packed else b.labels
        kw = dict(cu_seqlens=cu, **pair_kw) if packed else {}
        if packed and positions:
            kw = dict(position_ids=position_ids_of(cu), **pair_kw)
        module = FusedPreferenceLoss(**cfg, backend=backend if packed else "torch")
        out = module(labels=labels, **src, **tokens, **refs, **kw)
        out.loss.backward()
        grads = {}
        for name, leaf in leaves.items():
            g = leaf.grad
            if packed and name in ("logits", "hidden"):
                full = torch.zeros(b.S * b.T, g.shape[-1], dtype=torch.float64)
                full[rows] = g[0].double()
                g = full.view(b.S, b.T, -1)
            grads[name] = g
        results.append((out, grads))
    return results


def _compare(results, tol=1e-10, gtol=1e-10, what=""):
    (pad, pad_grads), (pk, pk_grads) = results
    assert_close(pk.loss, pad.loss, tol, f"{what} loss")
    assert_close(pk.losses, pad.losses, tol, f"{what} losses")
    assert set(pk.metrics) == set(pad.metrics), (sorted(pk.metrics), sorted(pad.metrics))
    for k in pad.metrics:
        assert_close(pk.metrics[k], pad.metrics[k], tol, f"{what} metric {k}")
    for k in pad_grads:
        assert_close(pk_grads[k], pad_grads[k], gtol, f"{what} grad {k}")


@pytest.mark.parametrize("loss_type", sorted(set(pyfused_po.loss_types()) - {"expo"}))
@pytest.mark.parametrize("shift", [True, False])
def test_every_loss_packed_equals_padded(loss_type, shift):
    b = Batch(S=6, V=11, seed=10)
    cfg = dict(loss_type=loss_type, beta=0.3, shift=shift)
    _compare(_run_pair(b, cfg, "halves"), what=loss_type)


@pytest.mark.parametrize("layout", ["halves", "interleaved", "explicit"])
def test_pair_layouts(layout):
    b = Batch(S=6, V=11, seed=11)
    cfg = dict(loss_type=["sigmoid", "sft"], beta=0.2, shift=True)
    _compare(_run_pair(b, cfg, layout, inputs=("nll_labels",)), what=layout)


def test_explicit_indices_skip_unused_sequences():
    """Sequences in neither index list are ignored (and get no gradient)."""
    b = Batch(S=6, V=11, seed=12)
    rows, cu = b.pack(torch.arange(b.S))
    x = b.take(b.logits, rows).requires_grad_()
    y = b.take(b.labels, rows)
    module = FusedPreferenceLoss("simpo", beta=2.0, shift=True, backend="torch")
    out = module(x, y, cu_seqlens=cu, chosen_index=torch.tensor([3, 0]), rejected_index=torch.tensor([5, 1]))
    sub = b.logits[[3, 0, 5, 1]].clone().requires_grad_()
    ref = module(sub, b.labels[[3, 0, 5, 1]])
    assert_close(out.losses, ref.losses, 1e-12, "losses")
    out.loss.backward()
    ref.loss.backward()
    unused = torch.cat([torch.arange(int(cu[s]), int(cu[s + 1])) for s in (2, 4)])
    assert x.grad[0, unused].abs().max() == 0


@pytest.mark.parametrize("feature", ["ld_alpha", "wpo", "token_weights", "ref_logits", "ref_token_logps",
                                     "nll_labels", "bco_running_mean"])
def test_features_packed_equal_padded(feature):
    b = Batch(S=6, V=11, seed=13, D=5)
    cfg = dict(loss_type="sigmoid", beta=0.4, shift=True)
    inputs, refs = (), None
    if feature == "ld_alpha":
        cfg["ld_alpha"] = 0.4
        inputs = ("ref_token_logps",)
        refs = {}
    elif feature == "wpo":
        cfg["use_weighting"] = True
    elif feature in ("token_weights",):
        inputs = ("token_weights", "ref_token_logps")
        refs = {}
    elif feature == "ref_logits":
        inputs, refs = ("ref_logits",), {}
    elif feature == "ref_token_logps":
        inputs, refs = ("ref_token_logps",), {}
    elif feature == "nll_labels":
        cfg = dict(loss_type="cpo", beta=0.4, shift=True, cpo_alpha=0.7)
        inputs = ("nll_labels",)
    else:
        cfg = dict(loss_type="bco_pair", beta=0.4, shift=True, bco_running_mean=True)
    _compare(_run_pair(b, cfg, "interleaved", inputs=inputs, refs=refs), what=feature)


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_hidden_path_packed_equals_padded(loss_type):
    b = Batch(S=6, V=11, seed=14, D=5)
    cfg = dict(loss_type=loss_type, beta=0.4, shift=True, ld_alpha=0.5)
    _compare(_run_pair(b, cfg, "explicit", source="hidden"), what=loss_type)


def test_ref_hidden_packed_equals_padded():
    b = Batch(S=6, V=11, seed=15, D=5)
    rows, cu = b.pack(torch.arange(b.S))
    module = FusedPreferenceLoss("sigmoid", beta=0.3, shift=True, backend="torch")
    kw = dict(weight=b.weight, bias=b.bias)
    pad = module(labels=b.labels, hidden=b.hidden, ref_hidden=b.ref_hidden, **kw)
    pk = module(labels=b.take(b.labels, rows), hidden=b.take(b.hidden, rows), ref_hidden=b.take(b.ref_hidden, rows),
                cu_seqlens=cu, **kw)
    assert_close(pk.losses, pad.losses, 1e-12, "losses")


def test_expo_packed_equals_padded():
    b = Batch(S=6, V=11, seed=16)
    cfg = dict(loss_type="expo", beta=0.3, shift=True)
    _compare(_run_pair(b, cfg, "interleaved", inputs=("ref_logits",)), what="expo")


def test_position_ids_in_the_module():
    b = Batch(S=6, V=11, seed=17, allow_empty=False)
    _compare(_run_pair(b, dict(loss_type="ipo", beta=0.3, shift=True), "halves", positions=True), what="ipo")


def test_padded_batch_with_a_pair_layout():
    """A padded batch whose rows are interleaved (c0, r0, c1, r1, ...) equals the
    [chosen; rejected] batch."""
    b = Batch(S=6, V=11, seed=18)
    perm = b.order("interleaved")
    module = FusedPreferenceLoss("sigmoid", beta=0.3, shift=True, backend="torch")
    ref = dict(ref_chosen_logps=-torch.rand(3, dtype=torch.float64), ref_rejected_logps=-torch.rand(3, dtype=torch.float64))
    pad = module(b.logits, b.labels, **ref)
    inter = module(b.logits[perm], b.labels[perm], **ref, pair_layout="interleaved")
    assert_close(inter.losses, pad.losses, 1e-12, "losses")


@pytest.mark.parametrize("loss_type", ["sigmoid", "simpo"])
def test_triton_packed_module(loss_type):
    b = Batch(S=6, V=11, seed=19, D=5)
    cfg = dict(loss_type=loss_type, beta=0.4, shift=True, use_weighting=loss_type == "sigmoid")
    _compare(_run_pair(b, cfg, "interleaved", backend="triton"), tol=2e-5, gtol=1e-4, what="triton logits")
    _compare(_run_pair(b, cfg, "halves", backend="triton", source="hidden"), tol=2e-5, gtol=1e-4,
             what="triton hidden")


# ----------------------------------------------------------------------------- KTO

@pytest.mark.parametrize("loss_type", ["kto", "apo_zero_unpaired"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_kto_packed_equals_padded(loss_type, backend):
    b = Batch(S=6, V=11, seed=20, allow_empty=False)
    dtype = torch.float64 if backend == "torch" else torch.float32
    perm = torch.randperm(b.S, generator=b.g)
    rows, cu = b.pack(perm)
    desirable = torch.tensor([True, False, True, True, False, False])
    kl = dict(policy_kl_logps=-torch.rand(3, dtype=torch.float64) + 0.3, ref_kl_logps=-torch.rand(3, dtype=torch.float64))
    module = FusedKTOLoss(beta=0.2, loss_type=loss_type, shift=True, backend=backend)
    x = b.take(b.logits, rows).to(dtype).requires_grad_()
    out = module(x, b.take(b.labels, rows), desirable[perm], ref_logits=b.take(b.ref_logits, rows).to(dtype),
                 position_ids=position_ids_of(cu), **kl)
    full = b.logits.clone().requires_grad_()
    ref = FusedKTOLoss(beta=0.2, loss_type=loss_type, shift=True, backend="torch")(
        full, b.labels, desirable, ref_logits=b.ref_logits, **kl)
    tol = 1e-10 if backend == "torch" else 2e-5
    assert_close(out.losses, ref.losses[perm], tol, "losses")
    for k in ref.metrics:
        assert_close(out.metrics[k], ref.metrics[k], tol, k)
    out.loss.backward()
    ref.loss.backward()
    assert_close(x.grad[0], full.grad.reshape(-1, b.V)[rows], 1e-10 if backend == "torch" else 1e-4, "grad")


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_inplace_backward_on_a_packed_stream(backend):
    """The in-place backward writes the gradient into the packed logits' own storage."""
    b = Batch(S=6, V=11, seed=21)
    rows, cu = b.pack(b.order("interleaved"))
    y = b.take(b.labels, rows)
    grads = []
    for inplace in (False, True):
        leaf = b.take(b.logits, rows).float().requires_grad_()
        x = leaf * 1.0  # a non-leaf whose storage the backward may overwrite
        module = FusedPreferenceLoss("simpo", beta=2.0, shift=True, backend=backend, inplace_backward=inplace)
        module(x, y, cu_seqlens=cu, pair_layout="interleaved").loss.backward()
        grads.append((leaf.grad, x.detach()))
    (plain, _), (inplace_grad, overwritten) = grads
    assert_close(inplace_grad, plain, 1e-6, "grad")
    assert_close(overwritten, plain, 1e-6, "the logits' storage holds the gradient")
