"""Log-prob error and gradient row-sum vs a constant logit offset, both backends (fp32 logits).

Run: TRITON_INTERPRET=1 python bench/lse_offset_error.py (CPU; the numbers of docs/reliability.md).
Temperature 1 and 0.7: with 0.7 the fp32 logits z = x / T are not exact, so the torch backend
(which rounds z first) sees z's own rounding; the kernels reduce the exact x / T.
"""
import torch

import pyfused_po

torch.manual_seed(0)
V = 300
base = torch.randn(2, 6, V) * 2
y = torch.randint(0, V, (2, 6))
for temperature in (1.0, 0.7):
    for off in (0.0, 1e3, 1e4, 3e4, 1e5):
        x = (base.double() + off).float()  # the fp32 logits
        x64 = x.double().requires_grad_()
        logq = torch.log_softmax(x64 / temperature, -1)
        ref = logq.gather(-1, y.unsqueeze(-1)).squeeze(-1)
        ref.sum().backward()
        row = [f"T {temperature} offset {off:8.0e}"]
        for be in ("torch", "triton"):
            xx = x.clone().requires_grad_()
            out = pyfused_po.token_logprobs(xx, y, temperature=temperature, backend=be)
            out.sum().backward()
            row.append(f"{be}: logp err {(out.double() - ref).abs().max().item():.1e}, "
                       f"|grad row sum| {xx.grad.double().sum(-1).abs().max().item():.1e}, "
                       f"grad err {(xx.grad.double() - x64.grad).abs().max().item():.1e}")
        print("; ".join(row))
