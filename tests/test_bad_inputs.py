"""Every row of the README's "Bad inputs" table, run: the error type and the words it names.

The table lives in docs/reliability.md; ``test_every_documented_row_is_tested`` keeps
the two in step (each row's first cell is a case id below).
"""
import os
import re
import types

import pytest
import torch

import pyfused_po

V = 11


def logits(*shape, dtype=torch.float32):
    return torch.randn(*(shape or (4, 3, V)), dtype=dtype)


def labels(*shape):
    return torch.randint(0, V, shape or (4, 3))


z3 = torch.zeros(3)
pl = pyfused_po.preference_loss
tl = pyfused_po.token_logprobs
ltl = pyfused_po.linear_token_logprobs
FPL = pyfused_po.FusedPreferenceLoss
lw = pyfused_po.listwise_preference_loss
z6 = torch.zeros(6)


def _double_backward():
    x = torch.randn(4, 3, V, requires_grad=True)
    (g,) = torch.autograd.grad(tl(x, labels(), backend="torch").sum(), x, create_graph=True)
    g.pow(2).sum().backward()


def _inplace_unaddressable():
    x = torch.randn(3, 4, 5, V).permute(1, 0, 2, 3)[:, :, :4]
    tl(x, torch.randint(0, V, (4, 3, 4)), inplace_backward=True, backend="torch")


def _hf_two_references():
    # The check runs before the model is used: a stand-in with a config is enough.
    from pyfused_po.integrations import hf

    model = types.SimpleNamespace(config=types.SimpleNamespace())
    return hf.model_preference_loss(model, FPL(backend="torch"), labels(), labels(), ref_model=model,
                                    ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2))


CASES = {
    # token stage
    "label-out-of-range": (lambda: tl(logits(), torch.full((4, 3), V)), ValueError, r"labels must be in \[0, 11\)"),
    "label-negative": (lambda: tl(logits(), torch.full((4, 3), -5)), ValueError, "out of range"),
    "logits-labels-shape": (lambda: tl(logits(4, 3, V), labels(4, 2)), ValueError, "labels.shape"),
    "integer-logits": (lambda: tl(torch.ones(4, 3, V, dtype=torch.long), labels()), TypeError, "logits must be a floating"),
    "floating-labels": (lambda: tl(logits(), torch.zeros(4, 3)), TypeError, "labels must be an integer"),
    "devices-differ": (lambda: tl(logits(), labels().to("meta")), ValueError, "one device"),
    "temperature": (lambda: tl(logits(), labels(), temperature=0.0), ValueError, "temperature"),
    "logit-scale": (lambda: tl(logits(), labels(), logit_scale=float("inf")), ValueError, "logit_scale"),
    "softcap": (lambda: tl(logits(), labels(), softcap=0.0), ValueError, "softcap"),
    "unknown-extra": (lambda: tl(logits(), labels(), extras=("perplexity",)), ValueError, "valid extras"),
    "unknown-backend": (lambda: tl(logits(), labels(), backend="cuda"), ValueError, "backend must be one of"),
    "float64-on-triton": (lambda: tl(logits(dtype=torch.float64), labels(), backend="triton"), TypeError, "float64"),
    "inplace-unaddressable": (_inplace_unaddressable, ValueError, "inplace_backward"),
    # fused-linear token stage
    "hidden-weight-dim": (lambda: ltl(torch.randn(4, 3, 8), torch.randn(V, 9), labels()), ValueError, r"weight.shape\[1\]"),
    "weight-dtype": (lambda: ltl(torch.randn(4, 3, 8), torch.randn(V, 8, dtype=torch.float64), labels()), TypeError, "dtype of hidden"),
    "bias-shape": (lambda: ltl(torch.randn(4, 3, 8), torch.randn(V, 8), labels(), bias=torch.randn(V + 1)), ValueError, "bias must have shape"),
    # objective stage
    "beta": (lambda: pl(z3, z3, z3, z3, beta=0.0), ValueError, "beta"),
    "unknown-loss-type": (lambda: pl(z3, z3, z3, z3, loss_type="dpoo"), ValueError, "valid loss types"),
    "unknown-hyperparameter": (lambda: pl(z3, z3, z3, z3, gamma=1.0), TypeError, "unexpected hyper-parameters"),
    "robust-label-smoothing": (lambda: pl(z3, z3, z3, z3, loss_type="robust", label_smoothing=0.5), ValueError, "label_smoothing"),
    "exo-pair-zero-smoothing": (lambda: pl(z3, z3, z3, z3, loss_type="exo_pair", label_smoothing=0.0), ValueError, "label_smoothing"),
    "negative-lengths": (lambda: pl(z3, z3, z3, z3, chosen_lengths=-torch.ones(3), rejected_lengths=z3), ValueError, "chosen_lengths must be >= 0"),
    "pair-shape": (lambda: pl(z3, torch.zeros(4), z3, z3), ValueError, "rejected_logps must have shape"),
    "missing-reference": (lambda: pl(z3, z3), ValueError, "needs ref_chosen_logps"),
    "missing-lengths": (lambda: pl(z3, z3, loss_type="simpo"), ValueError, "needs chosen_lengths"),
    "loss-weights-count": (lambda: pl(z3, z3, z3, z3, loss_type=["sigmoid", "hinge"], loss_weights=[1.0]), ValueError, "loss_weights"),
    # the fused module
    "odd-batch": (lambda: FPL(backend="torch")(logits=logits(3, 3, V), labels=labels(3, 3)), ValueError, "even"),
    "labels-not-2d": (lambda: FPL(backend="torch")(logits=logits(4, 3, 2, V), labels=labels(4, 3, 2)), ValueError, r"\[batch, seq\]"),
    "two-reference-sources": (lambda: FPL(backend="torch")(logits=logits(), labels=labels(), ref_logits=logits(),
                                                          ref_chosen_logps=torch.zeros(2), ref_rejected_logps=torch.zeros(2)),
                              ValueError, "one reference source"),
    "token-weights-shape": (lambda: FPL(backend="torch")(logits=logits(), labels=labels(), ref_logits=logits(),
                                                        token_weights=torch.ones(4, 2)), ValueError, "token_weights must have shape"),
    "logits-and-hidden": (lambda: FPL(backend="torch")(logits=logits(), hidden=torch.randn(4, 3, 8), labels=labels()),
                          ValueError, "exactly one of logits= or hidden="),
    # reliability, second round (tests/test_reliability_round2.py has the per-class tests)
    "label-dtype-ignore-index": (lambda: tl(logits(), labels().to(torch.uint8)), TypeError, "cannot hold ignore_index"),
    "inplace-shared-memory": (lambda: tl((logits(1, 3, V).requires_grad_() * 1).expand(4, 3, V), labels(),
                                         inplace_backward=True), ValueError, "share memory"),
    "inplace-leaf": (lambda: tl(logits().requires_grad_(), labels(), inplace_backward=True), ValueError, "leaf"),
    "double-backward": (_double_backward, RuntimeError, "first derivative only"),
    "aot-per-pair-options": (lambda: pl(z3, z3, z3, z3, loss_type="aot", reduction="none"), ValueError, "reduction"),
    # third round (tests/test_breakit_round2.py has the per-class tests)
    "position-ids-jump": (lambda: tl(logits(1, 5, V), labels(1, 5), shift=True, position_ids=torch.tensor([[0, 1, 2, 5, 6]])),
                          ValueError, "position_ids must count"),
    "packed-layout-compiled": (lambda: torch.compile(lambda cu: tl(logits(1, 5, V), labels(1, 5), shift=True, cu_seqlens=cu),
                                                     backend="eager")(torch.tensor([0, 3, 2, 5])), ValueError, "non-decreasing"),
    "grad-filter-ge-1": (lambda: ltl(torch.randn(4, 3, 8), torch.randn(V, 8), labels(), impl="fused", grad_filter=1.0),
                         ValueError, "below 1"),
    # groups of K responses (tests/test_listwise.py has every group check)
    "group-size-divides": (lambda: lw(z6, z6, torch.arange(6.0), group_size=4), ValueError, "does not divide"),
    "group-empty": (lambda: lw(z6, z6, torch.arange(6.0), group_index=torch.tensor([0, 0, 0, 2, 2, 2])), ValueError,
                    "group 1 is empty"),
    "group-scores": (lambda: lw(z6, z6, torch.tensor([0.0, 1, float("nan"), 3, 4, 5]), group_size=3), ValueError,
                     "scores must be finite"),
    "group-all-tied": (lambda: lw(z6, z6, torch.ones(6), group_size=3), ValueError, "all its scores tie"),
    "group-module-arguments": (lambda: FPL("plackett_luce", group_size=3)(logits(6, 3, V), labels(6, 3), torch.zeros(3),
                                                                         torch.zeros(3), scores=torch.arange(6.0)),
                               ValueError, "ref_chosen_logps is an argument of pair batches"),
    # reliability, third round (tests/test_reference_sources_and_token_shapes.py has the per-class tests)
    "hf-two-reference-sources": (lambda: _hf_two_references(), ValueError,
                                 "pass one reference source, not both: got ref_model and ref_chosen_logps"),
    "per-token-shape": (lambda: pyfused_po.sequence_sums(torch.randn(1, 3), labels()), ValueError,
                        r"token_values must have the shape of labels \(4, 3\)"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_raises_a_clear_error(case):
    call, error, match = CASES[case]
    with pytest.raises(error, match=match):
        call()


def test_every_documented_row_is_tested():
    doc = os.path.join(os.path.dirname(__file__), "..", "docs", "reliability.md")
    with open(doc, encoding="utf-8") as f:
        ids = re.findall(r"^\| `([a-z0-9-]+)` \|", f.read(), flags=re.M)
    assert ids, "no rows found in docs/reliability.md"
    assert set(ids) == set(CASES), f"documented but untested: {set(ids) - set(CASES)}; " \
                                   f"tested but undocumented: {set(CASES) - set(ids)}"


# ------------------------------------------------------------ defined behaviour at the edges


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_all_ignored_sequence_gives_zero_logp_and_no_nan(backend):
    x = logits().requires_grad_()
    y = labels()
    y[1] = -100  # chosen #2 is all padding
    out = FPL("simpo", backend=backend)(logits=x, labels=y)
    out.loss.backward()
    assert torch.isfinite(out.losses).all() and torch.isfinite(x.grad).all()
    assert torch.all(x.grad[1] == 0)
    seq = pyfused_po.sequence_sums(tl(x.detach(), y, backend=backend), y)
    assert seq.logps[1] == 0 and seq.lengths[1] == 0


def test_empty_batch_gives_zero_loss():
    out = FPL(backend="torch")(logits=logits(0, 3, V), labels=labels(0, 3),
                               ref_chosen_logps=torch.zeros(0), ref_rejected_logps=torch.zeros(0))
    assert out.loss.item() == 0.0 and out.losses.shape == (0,)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_one_token_vocabulary_gives_logp_zero(backend):
    out = tl(torch.randn(2, 3, 1), torch.zeros(2, 3, dtype=torch.long), backend=backend)
    assert torch.all(out == 0)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_nan_and_inf_logits_propagate(backend):
    x = logits(1, 3, V)
    x[0, 0, 2] = float("nan")
    x[0, 1, 3] = float("inf")
    out = tl(x, torch.tensor([[1, 1, 1]]), backend=backend)
    # NaN stays NaN; a +inf elsewhere in the row leaves no mass for the label (−inf or NaN).
    assert torch.isnan(out[0, 0]) and not torch.isfinite(out[0, 1]) and torch.isfinite(out[0, 2])
