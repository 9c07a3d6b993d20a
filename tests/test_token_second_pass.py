"""Rows the token forward's one-pass frame cannot take, and its second pass (Triton, interpreter).

The forward's body loop has no −inf guard and takes exponents in the frame ``fl(k_max·log2 e)``
(``kernels/row_frame.py``): a −inf logit inside the aligned body makes its entropy sum NaN, and a
row whose largest logit is below −FLT_MAX/log2 e (``finfo.min`` masking) has no finite frame.  Both
are re-summed by a second pass; these tests place such logits in the body (the interpreter's
128-wide blocks: ids 0–255 of a 300-entry fp32 row, 0–127 of bf16) and compare every output with
the float64 reference.
"""
import pytest
import torch

import pyfused_po
from reference import max_rel_err, token_logprobs_ref

FINITE_EXTRAS = ("entropy", "log_sum_sq_probs", "is_top1")


def _check(logits, labels, extras=FINITE_EXTRAS, tol=1e-5):
    out = pyfused_po.token_logprobs(logits, labels, extras=extras, backend="triton")
    ref = token_logprobs_ref(logits.double(), labels)
    for name in ("logps",) + extras:
        err = max_rel_err(getattr(out, name), ref[name])
        assert err <= tol, f"{name}: rel err {err:.2e}"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_minus_inf_logits_in_the_body(dtype):
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 300) * 3
    logits[0, :, 8:24] = float("-inf")       # whole lane rows of the first block
    logits[0, 1, [40, 97, 130, 201]] = float("-inf")  # scattered, in both blocks
    logits[1, 2, 100:] = float("-inf")       # half the body and the whole tail
    labels = torch.randint(0, 8, (2, 3))
    _check(logits.to(dtype), labels)


def test_rows_masked_with_finfo_min():
    torch.manual_seed(1)
    low = torch.finfo(torch.float32).min
    logits = torch.randn(2, 3, 300) * 3
    logits[0, 0] = low                        # every entry: uniform over the row
    logits[0, 1, :] = low                     # all but a few, the label among them
    logits[0, 1, [3, 150, 290]] = low / 2     # still below −FLT_MAX / log2 e
    logits[1, :, 10:200] = low                # a masked range next to ordinary logits
    labels = torch.tensor([[5, 150, 7], [3, 250, 299]])
    _check(logits, labels)
