"""Log-prob error and gradient row-sum vs a constant logit offset, both backends (fp32 logits).

Run: TRITON_INTERPRET=1 python bench/lse_offset_error.py (CPU; the numbers of docs/reliability.md).
"""
import torch

import pyfused_po

torch.manual_seed(0)
V = 300
base = torch.randn(2, 6, V) * 2
y = torch.randint(0, V, (2, 6))
for off in (0.0, 1e3, 1e4, 3e4, 1e5):
    x = (base.double() + off).float()  # the fp32 logits
    ref = torch.log_softmax(x.double(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)
    row = [f"offset {off:8.0e}"]
    for be in ("torch", "triton"):
        xx = x.clone().requires_grad_()
        out = pyfused_po.token_logprobs(xx, y, backend=be)
        out.sum().backward()
        x64 = x.double().requires_grad_()
        torch.log_softmax(x64, -1).gather(-1, y.unsqueeze(-1)).sum().backward()
        row.append(f"{be}: logp err {(out.double() - ref).abs().max().item():.1e}, "
                   f"|grad row sum| {xx.grad.double().sum(-1).abs().max().item():.1e}, "
                   f"grad err {(xx.grad.double() - x64.grad).abs().max().item():.1e}")
    print("; ".join(row))
