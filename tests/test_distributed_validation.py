"""Bad inputs to the distributed entry points raise clear errors before any kernel or
collective runs (single process, no process group needed for these)."""
import pytest
import torch

from pyfused_po import FusedKTOLoss, FusedPreferenceLoss
from pyfused_po.distributed import vocab_parallel_token_logprobs
from pyfused_po.distributed.vocab_stats import SLICE_IGNORE, combine_stats, slice_labels


def test_vocab_start_goes_with_group():
    with pytest.raises(ValueError, match="vocab_parallel_group and vocab_start"):
        FusedPreferenceLoss(vocab_start=3)
    with pytest.raises(ValueError, match="vocab_parallel_group and vocab_start"):
        FusedKTOLoss(vocab_parallel_group=object())


@pytest.mark.parametrize("option", [dict(shift=True), dict(ld_alpha=0.5), dict(use_weighting=True)])
def test_sequence_parallel_rejects_order_dependent_options(option):
    with pytest.raises(ValueError, match=next(iter(option))):
        FusedPreferenceLoss(sequence_parallel_group=object(), **option)


def test_needs_initialized_group():
    logits, labels = torch.randn(2, 3, 5), torch.zeros(2, 3, dtype=torch.long)
    with pytest.raises(ValueError, match="initialized torch.distributed"):
        vocab_parallel_token_logprobs(logits, labels, group=object(), vocab_start=0, backend="torch")


def test_shape_mismatch_named():
    with pytest.raises(ValueError, match="logits_shard must have shape"):
        vocab_parallel_token_logprobs(torch.randn(2, 4, 5), torch.zeros(2, 3, dtype=torch.long),
                                      group=object(), vocab_start=0, backend="torch")


def test_slice_labels_never_collide_with_ignore_index():
    # The slice kernels run with ignore_index=SLICE_IGNORE: an owned label (relative, >= 0) and
    # another rank's label must never take that value, whatever the caller's ignore_index (0 too).
    labels = torch.tensor([0, 4, 5, 9, -100, -1, -2])
    for ignore in (-100, -1, -2, 0, 5):
        local = slice_labels(labels, 5, 5, ignore)
        owned = (labels >= 5) & (labels < 10) & (labels != ignore)
        assert torch.equal(local[owned], labels[owned] - 5)
        assert bool((local[labels == ignore] == SLICE_IGNORE).all())
        others = ~owned & (labels != ignore)
        assert bool(((local[others] < 0) & (local[others] != SLICE_IGNORE)).all())


def test_combine_stats_formula():
    """Two slices of a known row combine into the full row's lse, entropy, log Σp², mean, top-1."""
    z = torch.tensor([0.3, -1.2, 2.5, 0.0, 1.1, -0.4, 3.0], dtype=torch.float64)
    y = 6
    parts, stats = (z[:3], z[3:]), []
    for r, part in enumerate(parts):
        lse_r = torch.logsumexp(part, 0)
        p = torch.softmax(part, 0)
        zero = torch.tensor(0.0, dtype=z.dtype)
        # Rows: the LSE pair (hi, lo = 0 here), z_y, then the extras (vocab_stats.pack_stats).
        stats.append(torch.stack([lse_r, zero, part[y - 3] if r == 1 else zero,
                                  -(p * p.log()).sum(), torch.log((p * p).sum()), part.sum(), part.max()]))
    meta = [torch.tensor([[3.0], [0.0], [0], [0], [0], [0], [0]]),
            torch.tensor([[4.0], [3.0], [0], [0], [0], [0], [0]])]
    gathered = torch.stack([torch.cat([s.unsqueeze(1), m.double()], 1) for s, m in zip(stats, meta)])
    logp, lse, out = combine_stats(gathered, ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1"),
                                torch.tensor([y]))
    p = torch.softmax(z, 0)
    assert lse.shape == (1, 2)  # the (hi, lo) pair
    assert torch.allclose(lse.sum(-1), torch.logsumexp(z, 0).reshape(1), atol=1e-12)
    assert torch.allclose(logp, torch.log_softmax(z, 0)[y].reshape(1), atol=1e-12)
    assert torch.allclose(out["entropy"], -(p * p.log()).sum().reshape(1), atol=1e-12)
    assert torch.allclose(out["log_sum_sq_probs"], torch.log((p * p).sum()).reshape(1), atol=1e-12)
    assert torch.allclose(out["mean_logit"], z.mean().reshape(1), atol=1e-12)
    assert out["is_top1"].item() == 1.0
