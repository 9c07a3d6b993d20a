"""The three-GEMM plan on every batch layout (issue 24, item 1): packed streams (``cu_seqlens=``,
``position_ids=``), pair layouts (``interleaved``, explicit ``chosen_index``/``rejected_index``
with sequences in no pair) and the ``layout=`` object.  Float64: loss, metrics and gradients
equal the staged path, and one case is checked against a reference written from the formula."""
import pytest
import torch
import torch.nn.functional as F

import pyfused_po
from pyfused_po import BatchLayout, FusedPreferenceLoss

from _fused_plan import assert_same_plans as _assert_same, run_plan as _run

V, D = 40, 6
LENGTHS = [7, 5, 9, 4, 6, 8, 3]  # seven packed sequences; with explicit indices one is in no pair


def _stream(seed=0, n_seq=6, bias=True):
    g = torch.Generator().manual_seed(seed)
    lengths = LENGTHS[:n_seq]
    N = sum(lengths)
    hidden = torch.randn(1, N, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / D ** 0.5
    b = torch.randn(V, generator=g, dtype=torch.float64) * 0.1 if bias else None
    labels = torch.randint(0, V, (1, N), generator=g)
    cu = torch.tensor([0] + lengths).cumsum(0)
    for s in range(n_seq):  # a prompt of 1-2 tokens per sequence
        labels[0, cu[s]:cu[s] + 1 + s % 2] = -100
    P = 3
    ref = dict(ref_chosen_logps=torch.randn(P, generator=g, dtype=torch.float64) - 20,
               ref_rejected_logps=torch.randn(P, generator=g, dtype=torch.float64) - 20)
    return hidden, weight, b, labels, cu, ref


def _layouts(cu):
    position_ids = torch.cat([torch.arange(n) for n in LENGTHS[:cu.numel() - 1]]).unsqueeze(0)
    return {
        "cu_seqlens halves": dict(cu_seqlens=cu),
        "position_ids interleaved": dict(position_ids=position_ids, pair_layout="interleaved"),
        "explicit indices": dict(cu_seqlens=cu, chosen_index=torch.tensor([4, 0, 2]),
                                 rejected_index=torch.tensor([1, 5, 3])),
    }


SEPARABLE = [t for t in pyfused_po.loss_types() if t not in ("aot", "aot_unpaired", "expo")]


@pytest.mark.parametrize("loss_type", SEPARABLE)
def test_every_separable_loss_type_on_packed_layouts_equals_staged(loss_type):
    i = SEPARABLE.index(loss_type)
    hidden, weight, bias, labels, cu, ref = _stream(seed=i, n_seq=7 if i % 3 == 2 else 6)
    name, layout = list(_layouts(cu).items())[i % 3]
    module = FusedPreferenceLoss(loss_type, beta=0.3, backend="torch", shift=bool(i % 2))
    module.chunk_tokens = 18  # a few pairs per chunk: several chunks
    _assert_same(module, hidden, weight, bias, labels, **layout, **ref)


def test_padded_batch_with_interleaved_pairs_and_the_layout_object():
    hidden, weight, bias, labels, cu, ref = _stream(seed=3)
    # The same six sequences padded to [6, 9] rows, pairs interleaved.
    rows = torch.full((6, 9), -100)
    h = torch.zeros(6, 9, D, dtype=torch.float64)
    for s in range(6):
        n = LENGTHS[s]
        rows[s, :n] = labels[0, cu[s]:cu[s] + n]
        h[s, :n] = hidden[0, cu[s]:cu[s] + n]
    module = FusedPreferenceLoss("sigmoid", beta=0.2, backend="torch", shift=True, ld_alpha=0.5)
    module.chunk_tokens = 14
    padded, g_padded = _assert_same(module, h, weight, bias, rows, layout=BatchLayout(pair_layout="interleaved"),
                                    **ref)
    packed, g_packed = _assert_same(module, hidden, weight, bias, labels, cu_seqlens=cu, pair_layout="interleaved",
                                    **ref)
    torch.testing.assert_close(padded.loss, packed.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_padded[1], g_packed[1], rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="pass the layout once"):
        module(hidden=h, weight=weight, labels=rows, layout=BatchLayout(pair_layout="interleaved"),
               pair_layout="interleaved", **ref)


def test_packed_plan_against_a_float64_formula():
    """DPO sigmoid on a packed stream with shift and explicit pairs (sequence 6 in no pair),
    written from the definition: log-softmax of H·Wᵀ + b, each sequence's labels moved by one."""
    hidden, weight, bias, labels, cu, ref = _stream(seed=9, n_seq=7)
    layout = _layouts(cu)["explicit indices"]
    module = FusedPreferenceLoss("sigmoid", beta=0.4, backend="torch", shift=True, logit_metrics=False)
    module.chunk_tokens = 12
    out, grads = _run(module, True, hidden, weight, bias, labels, **layout, **ref)
    assert "StoredGradient" in type(out.loss.grad_fn).__name__

    h = hidden.clone().requires_grad_(True)
    w = weight.clone().requires_grad_(True)
    b = bias.clone().requires_grad_(True)
    logp = F.log_softmax(h[0] @ w.t() + b, -1)
    sums = []
    for s in range(7):
        lo, hi = int(cu[s]), int(cu[s + 1])
        total = h.new_zeros(())
        for t in range(lo, hi - 1):  # position t predicts label t + 1 of the same sequence
            y = int(labels[0, t + 1])
            if y != -100:
                total = total + logp[t, y]
        sums.append(total)
    chosen = torch.stack([sums[i] for i in (4, 0, 2)])
    rejected = torch.stack([sums[i] for i in (1, 5, 3)])
    margin = (chosen - ref["ref_chosen_logps"]) - (rejected - ref["ref_rejected_logps"])
    loss = -F.logsigmoid(0.4 * margin).mean()
    (loss * 1.7).backward()
    torch.testing.assert_close(out.loss, loss.detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


def test_a_long_pair_falls_back_by_name_or_keeps_three_gemms(caplog):
    """Issue 24 item 3: a pair longer than the chunk is no silent fallback.  Default ("staged"):
    the staged plan, the reason logged once and kept in ``fallback_reason``; ``long_group_plan =
    "three_gemm"``: one chunk as long as the longest pair, equal to the staged plan."""
    hidden, weight, bias, labels, cu, ref = _stream(seed=4)
    module = FusedPreferenceLoss("sigmoid", beta=0.3, backend="torch")
    module.chunk_tokens = 6  # every pair has more labelled tokens
    with caplog.at_level("WARNING", logger="pyfused_po"):
        _assert_same(module, hidden, weight, bias, labels, expect_fused=False, cu_seqlens=cu, **ref)
        _run(module, True, hidden, weight, bias, labels, cu_seqlens=cu, **ref)
    assert "longer than the three-GEMM chunk" in module.fallback_reason
    assert sum("longer than the three-GEMM chunk" in r.getMessage() for r in caplog.records) == 1
    module.long_group_plan = "three_gemm"
    _assert_same(module, hidden, weight, bias, labels, cu_seqlens=cu, **ref)
    assert module.fallback_reason is None
    module.long_group_plan = "always"
    with pytest.raises(ValueError, match="long_group_plan must be one of"):
        _run(module, True, hidden, weight, bias, labels, cu_seqlens=cu, **ref)


def test_options_on_a_packed_stream_through_the_plan():
    """Token weights, NLL labels covering the prompt, LD-DPO, WPO, a reference head, softcap and
    temperature on a packed stream with explicit pairs: the plan equals the staged path."""
    hidden, weight, bias, labels, cu, _ = _stream(seed=12, n_seq=7)
    g = torch.Generator().manual_seed(3)
    N = labels.shape[1]
    nll_labels = labels.clone()
    prompt = labels == -100
    nll_labels[prompt] = torch.randint(0, V, (int(prompt.sum()),), generator=g)
    common = dict(token_weights=torch.rand(1, N, generator=g, dtype=torch.float64) + 0.5,
                  ref_hidden=hidden + 0.05, **_layouts(cu)["explicit indices"])
    for loss_type, extra, kw in (("sigmoid", dict(use_weighting=True), {}),
                                 (["sigmoid", "sft"], dict(loss_weights=[1.0, 0.5]), dict(nll_labels=nll_labels)),
                                 ("ipo", dict(ld_alpha=0.6), {})):
        module = FusedPreferenceLoss(loss_type, beta=0.2, backend="torch", shift=True, softcap=5.0,
                                     temperature=0.8, **extra)
        module.chunk_tokens = 15
        _assert_same(module, hidden, weight, bias, labels, **common, **kw)
