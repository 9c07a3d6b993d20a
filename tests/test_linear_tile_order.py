"""The grouped program order of the fused-linear kernels visits every tile exactly once."""
import pytest
import torch
import triton
import triton.language as tl

from pyfused_po.kernels.linear_tile import grouped_program


@triton.jit
def _record(out_ptr, n_m, n_v, GROUP_M: tl.constexpr):
    pid_m, pid_v = grouped_program(n_m, n_v, GROUP_M)
    pid = tl.program_id(0)
    tl.store(out_ptr + 2 * pid, pid_m)
    tl.store(out_ptr + 2 * pid + 1, pid_v)


@pytest.mark.parametrize("n_m, n_v, group", [(5, 3, 2), (8, 4, 8), (3, 7, 8), (1, 5, 2), (7, 1, 3)])
def test_grouped_order_is_a_bijection(n_m, n_v, group):
    out = torch.full((n_m * n_v, 2), -1, dtype=torch.int64)
    _record[(n_m * n_v,)](out, n_m, n_v, GROUP_M=group)
    seen = {tuple(r) for r in out.tolist()}
    assert seen == {(m, v) for m in range(n_m) for v in range(n_v)}
    # Consecutive programs stay inside one group of token blocks.
    per_group = group * n_v
    for pid, (m, _) in enumerate(out.tolist()):
        assert m // group == pid // per_group
