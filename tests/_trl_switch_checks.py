"""Checks shared by the tests of the TRL switches (every TRL layout): the LM-head GEMM counter and
the comparison of two ``Trainer.train`` runs' logs."""
import pytest
import torch


class HeadFlops(torch.utils._python_dispatch.TorchDispatchMode):
    """2·m·k·n of every mm / addmm / addmm_ / bmm / baddbmm with an operand dimension equal to ``vocab``."""

    OPERANDS = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.flops = vocab, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = self.OPERANDS.get(func.overloadpacket.__name__)
        if where is not None:
            a, b = args[where[0]], args[where[1]]
            if self.vocab in tuple(a.shape) + tuple(b.shape):
                self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        return func(*args, **(kwargs or {}))


_TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos"}


def train_logs(trainer):
    """``trainer.train()``'s log history without the timing entries."""
    trainer.train()
    return [{k: v for k, v in row.items() if k not in _TIMING} for row in trainer.state.log_history]


def assert_logs_match(base, fused, rows, metric, rel=1e-4, abs=1e-5):
    """Two runs' logs: ``rows`` entries each (``metric`` logged in the first), the same keys, the same
    values (to ``rel`` / ``abs``)."""
    assert len(base) == len(fused) == rows and metric in base[0]
    for b, f in zip(base, fused):
        assert b.keys() == f.keys()
        for key in b:
            assert f[key] == pytest.approx(b[key], rel=rel, abs=abs), (key, b[key], f[key])
