"""One process playing every rank of a vocabulary-parallel split (no process group needed)."""
import torch

from pyfused_po.distributed import vocab_parallel


class Recorded(Exception):
    """Raised by :class:`FakeGather` on a rank's first pass, once its statistics are recorded."""


class FakeGather:
    """Single-process stand-in for the vocabulary-parallel ``all_gather``: each rank's forward
    runs twice, first up to the collective (its statistics are recorded), then with all
    ranks' statistics gathered."""

    def __init__(self, world):
        self.recorded, self.rank = [None] * world, 0

    def __call__(self, stats, group):
        if any(s is None for s in self.recorded):
            self.recorded[self.rank] = stats.clone()
            raise Recorded
        return torch.stack(self.recorded)


def fake_ranks(monkeypatch, bounds):
    """A vocabulary split at ``bounds``: ``(gather, [(rank, (v0, v1))])`` with the collective and
    the group check patched out."""
    fake = FakeGather(len(bounds) - 1)
    monkeypatch.setattr(vocab_parallel, "all_gather_stats", fake)
    monkeypatch.setattr(vocab_parallel, "_check_group", lambda group, vocab_start: None)
    return fake, list(enumerate(zip(bounds[:-1], bounds[1:])))
