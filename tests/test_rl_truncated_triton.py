"""The Triton radix-select fold (``kernels/truncated_select.py``) against the float64 definition:
thresholds, log-probs, entropy and gradients under a softcap, a negative logit scale, float32 and
bfloat16 rows, every rule and both orders (TRITON_INTERPRET on the CPU)."""
import math

import pytest
import torch

from pyfused_po.integrations import rl
from test_rl_truncated import CASES, _entropy, _reference_kept


def _z(x, logit_scale, softcap, temperature):
    u = x.double() * logit_scale
    if softcap is not None:
        u = softcap * torch.tanh(u / softcap)
    return u / temperature


# (sampler spec, order, dtype, transform): every rule and both orders once, each transform once
# (the interpreter runs a radix pass in ~20 ms per block: shapes and rows stay small).
COMBOS = [
    (CASES[0], "hf", torch.float32, dict(logit_scale=1.0, softcap=None)),
    (CASES[1], "hf", torch.float32, dict(logit_scale=-0.7, softcap=None)),
    (CASES[2], "hf", torch.bfloat16, dict(logit_scale=1.3, softcap=4.0)),
    (CASES[4], "hf", torch.float32, dict(logit_scale=1.0, softcap=None)),
    (CASES[5], "vllm", torch.float32, dict(logit_scale=1.0, softcap=None)),
    (CASES[5], "hf", torch.bfloat16, dict(logit_scale=1.3, softcap=4.0)),
]


@pytest.mark.parametrize("spec, order, dtype, transform", COMBOS)
def test_triton_fold_matches_the_float64_definition(spec, order, dtype, transform):
    g = torch.Generator().manual_seed(7)
    x = (torch.randn(5, 60, generator=g) * 2.5).to(dtype).requires_grad_(True)
    T = 0.9
    z = _z(x.detach(), temperature=T, **transform)
    kept = torch.stack([_reference_kept(row, order=order, **spec) for row in z])
    labels = torch.stack([row.nonzero()[0, 0] if i % 4 else (~row).nonzero()[0, 0] if (~row).any()
                          else row.nonzero()[0, 0] for i, row in enumerate(kept)])
    outside = ~kept.gather(-1, labels[:, None])[:, 0]
    logp, entropy, out = rl.rl_token_logprobs(labels, logits=x, temperature=T, with_entropy=True,
                                              return_outside=True, sampler_order=order, backend="triton",
                                              **spec, **transform)
    assert torch.equal(out, outside)
    x64 = x.detach().double().requires_grad_(True)
    logq = torch.log_softmax(_z(x64, temperature=T, **transform).masked_fill(~kept, -math.inf), -1)
    want = logq.gather(-1, labels[:, None])[:, 0]
    want_h = _entropy(logq, kept)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(logp[~outside].double(), want[~outside], **tol)
    torch.testing.assert_close(entropy.double(), want_h, **tol)
    g_logp = torch.linspace(0.5, 1.0, len(labels))
    (torch.where(outside, 0.0, logp) * g_logp).sum().add(0.3 * entropy.sum()).backward()
    ((want.masked_fill(outside, 0) * g_logp.double()).sum() + 0.3 * want_h.sum()).backward()
    torch.testing.assert_close(x.grad.double(), x64.grad.to(x.dtype).double(), **tol)


@pytest.mark.gpu
@pytest.mark.parametrize("spec", CASES)
def test_triton_fold_matches_the_torch_fold_on_cuda(spec):
    """A realistic vocabulary on the GPU: the Triton radix select keeps the same sets as the
    PyTorch fold (top-k exactly; top-p up to a boundary within fp32 rounding on ≤ 2% of rows)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    x = (torch.randn(64, 128256, device="cuda", generator=g) * 3).to(torch.bfloat16)
    labels = torch.randint(0, 1000, (64,), device="cuda", generator=g)
    x[:, :1000] += 6  # the labels' ids lead the row: most labels inside the kept set
    kw = dict(temperature=0.8, with_entropy=True, return_outside=True, **spec)
    ours = rl.rl_token_logprobs(labels, logits=x, backend="triton", **kw)
    ref = rl.rl_token_logprobs(labels, logits=x, backend="torch", **kw)
    differ = ours[2] != ref[2]
    assert differ.float().mean() <= (0.0 if "top_p" not in spec else 0.02)
    same = ~differ & ~ref[2]
    torch.testing.assert_close(ours[0][same], ref[0][same], rtol=1e-4, atol=1e-4)
    # A top-p boundary element that falls the other way moves the entropy by about its own mass.
    tol = 1e-2 if "top_p" in spec else 1e-3
    torch.testing.assert_close(ours[1], ref[1], rtol=tol, atol=tol)
