"""importance_ratio: per-token ratio, capped weight and mismatch metrics, checked on hand values."""
import math

import pytest
import torch

from pyfused_po.integrations.rl_ratio import importance_ratio


def test_hand_computed_ratio_weight_and_metrics():
    s = torch.tensor([[math.log(0.5), math.log(0.2), math.log(0.4), math.log(0.1)]])
    t = torch.tensor([[math.log(0.25), math.log(0.6), -math.inf, math.log(0.3)]])
    mask = torch.tensor([[True, True, True, False]])
    out = importance_ratio(t, s, mask=mask, cap=2.0)
    torch.testing.assert_close(out.ratio, torch.tensor([[0.5, 3.0, 0.0, 0.0]]))
    torch.testing.assert_close(out.weight, torch.tensor([[0.5, 2.0, 0.0, 0.0]]))
    m = out.metrics
    l1, l2 = math.log(0.5), math.log(3.0)  # the two masked tokens inside the trainer's support
    torch.testing.assert_close(m["kl_k1"], torch.tensor(-(l1 + l2) / 2))
    torch.testing.assert_close(m["kl_k3"], torch.tensor(((0.5 - 1 - l1) + (3.0 - 1 - l2)) / 2))
    torch.testing.assert_close(m["max_ratio"], torch.tensor(3.0))
    torch.testing.assert_close(m["min_ratio"], torch.tensor(0.5))
    torch.testing.assert_close(m["mean_abs_log_ratio"], torch.tensor((abs(l1) + abs(l2)) / 2))
    torch.testing.assert_close(m["frac_outside"], torch.tensor(1 / 3))
    torch.testing.assert_close(m["frac_capped"], torch.tensor(1 / 3))


def test_weight_is_detached_and_errors_are_named():
    t = torch.zeros(3, requires_grad=True)
    out = importance_ratio(t, torch.full((3,), -0.5), cap=None)
    assert not out.weight.requires_grad
    torch.testing.assert_close(out.weight, torch.full((3,), math.exp(0.5)))
    with pytest.raises(ValueError, match="sampler_logps must be finite"):
        importance_ratio(torch.zeros(2), torch.tensor([0.0, -math.inf]))
    with pytest.raises(ValueError, match="one shape"):
        importance_ratio(torch.zeros(2), torch.zeros(3))
    with pytest.raises(ValueError, match="cap must be None or a number > 0"):
        importance_ratio(torch.zeros(2), torch.zeros(2), cap=0)
