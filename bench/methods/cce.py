"""Cut Cross-Entropy (apple/ml-cross-entropy) feeding DPO.

API read from ``cut_cross_entropy/linear_cross_entropy.py``:
``linear_cross_entropy(e, c, targets, bias=None, ignore_index=-100, softcap=None,
reduction="mean", shift=0, filter_eps="auto", ...)``; with ``reduction="none"`` it returns
the per-token NLL shaped like ``targets``, so ``log p = −nll``.  Keywords are used for
everything after ``targets`` because the position of ``bias`` differs between releases.
Its default gradient filtering (``filter_eps="auto"``) is left on: that is what users get.
"""
from .base import Method, installed
from .common import token_dpo


def _build(case, device):
    from cut_cross_entropy import linear_cross_entropy

    def loss_fn(inp):
        nll = linear_cross_entropy(inp.hidden, inp.weight, inp.labels, reduction="none")
        return token_dpo(-nll, inp, case.pairs)
    return loss_fn


METHODS = [
    Method("cce", "Cut Cross-Entropy", "linear", _build,
           probe=lambda: installed("cut_cross_entropy"), cuda_only=True),
]
