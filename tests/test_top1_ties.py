"""``is_top1`` resolves tied logits as ``argmax`` does: the lowest id wins (issue 26, class 6).

TRL's DPO metric ``mean_token_accuracy`` and Hugging Face compare ``logits.argmax(-1)`` with the
label; ``argmax`` returns the first of several maximal ids.  ``is_top1`` used to be ``z_y ≥ max z``,
so a label on the later of two tied ids counted as correct.  The reference here is
``torch.argmax`` of the float64 logits; the logits are small integers, so ties are exact and
common, in the body, the masked edge (head and tail) and across vocabulary slices.
"""
import pytest
import torch

import pyfused_po
from pyfused_po.distributed import vocab_parallel

from _fake_vocab_ranks import Recorded, fake_ranks

BACKENDS = ("torch", "triton")
EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")


def tied_logits(shape, seed):
    """Integer logits in [0, V/2): a row's max is shared by about two ids, often more, sometimes one."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, max(2, shape[-1] // 2), shape, generator=g).double()


def labels_on_maxima(x, seed):
    """Labels on a random maximal id of each row (first, later or only), so that both outcomes
    occur; about a fifth of the rows get a random id instead."""
    g = torch.Generator().manual_seed(seed)
    at_max = x == x.max(-1, keepdim=True).values
    pick = torch.rand(x.shape, generator=g, dtype=torch.float64) * at_max
    y = pick.argmax(-1)
    anywhere = torch.randint(0, x.shape[-1], y.shape, generator=g)
    return torch.where(torch.rand(y.shape, generator=g) < 0.2, anywhere, y)


def reference(x, y):
    """1.0 where ``argmax`` (first maximal id) is the label, float64."""
    return (x.argmax(-1) == y).double()


def test_two_tied_rows_label_on_the_later_id():
    """The issue's example: two equal logits, the label on the second is not the top-1."""
    x = torch.tensor([[[0.5, 3.0, 1.0, 3.0], [0.5, 3.0, 1.0, 3.0]]])
    y = torch.tensor([[3, 1]])
    for backend in BACKENDS:
        out = pyfused_po.token_logprobs(x, y, extras=("is_top1",), backend=backend)
        assert out.is_top1.tolist() == [[0.0, 1.0]], backend


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("V,dtype", [(150, torch.float32), (301, torch.bfloat16), (1031, torch.float32)])
def test_token_logprobs_ties(backend, V, dtype):
    """V = 150 / 301: one 128-wide body block and a masked tail (the interpreter's block);
    1031: several body trips.  Every extra requested together, as TRL's trainers do."""
    x = tied_logits((3, 5, V), seed=V)
    y = labels_on_maxima(x, seed=V + 1)
    ref = reference(x, y)
    assert 0 < ref.sum() < ref.numel()
    out = pyfused_po.token_logprobs(x.to(dtype), y, extras=EXTRAS, backend=backend)
    assert torch.equal(out.is_top1.double(), ref)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unaligned_rows_ties(backend):
    """Rows that start off a 16-byte boundary (an odd row stride, a view at an odd offset): the
    head before the aligned body holds the first maximum in some rows."""
    V = 261
    base = tied_logits((4 * 263 + 3,), seed=5)
    x = base[3:].view(4, 263)[:, :V].unsqueeze(0)
    x[0, 0, 0] = x[0, 0].max()  # the row's first id (in the head) ties the max
    y = labels_on_maxima(x, seed=6)
    out = pyfused_po.token_logprobs(x.float(), y, extras=("is_top1",), backend=backend)
    assert torch.equal(out.is_top1.double(), reference(x, y))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("impl", ("chunked", "fused"))
def test_linear_token_logprobs_ties(backend, impl):
    """Fused-linear path: two equal LM-head rows give every token exactly tied logits."""
    if backend == "torch" and impl == "fused":
        pytest.skip("the fused kernel is Triton-only")
    g = torch.Generator().manual_seed(8)
    N, D, V = 12, 8, 200
    h = torch.randint(-2, 3, (N, D), generator=g).double()
    w = torch.randint(-2, 3, (V, D), generator=g).double()
    # Two pairs of equal rows that hold the largest logit of tokens 0-3 (u·u = 32; every other
    # row, clamped to [-1, 1], gives at most 16): 17 / 150 lie in different vocabulary splits,
    # 59 / 60 in one tile.
    u, u2 = torch.full((D,), 2.0, dtype=torch.float64), torch.tensor([2.0, -2.0] * (D // 2))
    h[:2], h[2:4] = u, u2
    w[17], w[150] = u, u
    w[59], w[60] = u2, u2
    others = [v for v in range(V) if v not in (17, 150, 59, 60)]
    w[others] = w[others].clamp(-1, 1)
    x = h @ w.T      # exact in fp32: small integers
    y = labels_on_maxima(x, seed=9)
    y[:4] = torch.tensor([17, 150, 60, 59])
    assert reference(x, y)[:4].tolist() == [1.0, 0.0, 0.0, 1.0]
    out = pyfused_po.linear_token_logprobs(h.float(), w.float(), y, extras=("entropy", "is_top1"),
                                           backend=backend, impl=impl)
    assert torch.equal(out.is_top1.double(), reference(x, y))


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_ties(backend, monkeypatch):
    """Slices 53 / 50 / 47: a tie across slices goes to the lower rank, a tie inside the owner's
    slice to its lower id."""
    V = 150
    x = tied_logits((2, 6, V), seed=21)
    y = labels_on_maxima(x, seed=22)
    ref = reference(x, y)
    fake, slices = fake_ranks(monkeypatch, (0, 53, 103, V))

    def forward(rank, v0, v1):
        fake.rank = rank
        return vocab_parallel.vocab_parallel_token_logprobs(
            x[..., v0:v1].float(), y, group=object(), vocab_start=v0, extras=("is_top1",), backend=backend)

    for rank, (v0, v1) in slices:
        with pytest.raises(Recorded):
            forward(rank, v0, v1)
    for rank, (v0, v1) in slices:
        assert torch.equal(forward(rank, v0, v1).is_top1.double(), ref), rank


@pytest.mark.parametrize("backend", BACKENDS)
def test_vocab_parallel_linear_ties(backend, monkeypatch):
    """The fused-linear form: the combine reads each token's owner from its global label (the
    statistics are per labelled token there, not per position)."""
    g = torch.Generator().manual_seed(31)
    N, D, V = 10, 4, 60
    h = torch.randint(-1, 2, (1, N, D), generator=g).double()
    w = torch.randint(-1, 2, (V, D), generator=g).double()
    w[45] = w[12]    # tied rows on ranks 0 and 2
    w[25] = w[24]    # tied rows inside rank 1
    x = h[0] @ w.T
    y = labels_on_maxima(x, seed=32).unsqueeze(0)
    y[0, :2] = -100  # ignored tokens: the per-token statistics skip them
    ref = reference(x, y[0]).unsqueeze(0) * (y != -100)
    fake, slices = fake_ranks(monkeypatch, (0, 20, 40, V))

    def forward(rank, v0, v1):
        fake.rank = rank
        return vocab_parallel.vocab_parallel_linear_token_logprobs(
            h.float(), w[v0:v1].float(), y, group=object(), vocab_start=v0, extras=("is_top1",), backend=backend)

    for rank, (v0, v1) in slices:
        with pytest.raises(Recorded):
            forward(rank, v0, v1)
    for rank, (v0, v1) in slices:
        assert torch.equal(forward(rank, v0, v1).is_top1.double(), ref), rank
