"""Every Triton kernel once, on small odd shapes, checked against the float64 PyTorch backend.

The case that ``bash bench/gpu/session.sh sanitizer`` runs under ``compute-sanitizer
--tool memcheck`` (small, so the instrumented run takes seconds): the token stage forward and
backward (with extras, shift, softcap, ignored tokens, and the in-place backward), the token KL
kernels, and the fused-linear kernels (``impl="fused"``, with and without ``grad_filter``) and
the chunked path's fold.  Shapes do not divide any block.  Exits 1 on a wrong value, so a run
that the sanitizer passes also computed the right numbers.  Without CUDA it runs under the
Triton interpreter (the session's dry run).
"""
import os
import sys

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pyfused_po  # noqa: E402

TOL = dict(float32=2e-4, bfloat16=2e-2)


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _grads(fn, *leaves):
    leaves = [t.detach().clone().requires_grad_(True) for t in leaves]
    out = fn(*leaves)
    # The same upstream gradient for the fast and the reference call (a fixed seed).
    g = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device=out.device, dtype=out.dtype)
    (out * g).sum().backward()
    return out.detach(), [t.grad for t in leaves]


def checks(device, dtype):
    gen = torch.Generator(device="cpu").manual_seed(0)
    # Interpreter (dry run): smaller, still ragged against its 16/64-wide blocks.
    B, T, V, D = (3, 37, 1031, 72) if device.type == "cuda" else (2, 11, 131, 24)
    labels = torch.randint(0, V, (B, T), generator=gen)
    labels[0, :5] = -100
    logits = (torch.randn(B, T, V, generator=gen) * 2).to(device=device, dtype=dtype)
    ref_logits = (torch.randn(B, T, V, generator=gen) * 2).to(device=device, dtype=dtype)
    hidden = torch.randn(B, T, D, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(V, D, generator=gen) * D ** -0.5).to(device=device, dtype=dtype)
    y = labels.to(device)
    results = []

    def compare(name, fast, slow, tol):
        (o1, g1), (o2, g2) = fast, slow
        errs = [_rel(o1, o2)] + [_rel(a, b) for a, b in zip(g1, g2)]
        results.append((name, max(errs), tol))

    kw = dict(shift=True, softcap=30.0)
    compare("token_logprobs", _grads(lambda x: pyfused_po.token_logprobs(x, y, backend="triton", **kw), logits),
            _grads(lambda x: pyfused_po.token_logprobs(x.double(), y, backend="torch", **kw), logits), TOL[str(dtype)[6:]])
    ent = lambda x, b: pyfused_po.token_logprobs(x, y, backend=b, extras=("entropy",)).entropy  # noqa: E731
    compare("token_logprobs entropy", _grads(lambda x: ent(x, "triton"), logits),
            _grads(lambda x: ent(x.double(), "torch"), logits), TOL[str(dtype)[6:]])
    compare("token_logprobs in-place bwd",
            _grads(lambda x: pyfused_po.token_logprobs(x * 1, y, backend="triton", inplace_backward=True), logits),
            _grads(lambda x: pyfused_po.token_logprobs(x.double(), y, backend="torch"), logits), TOL[str(dtype)[6:]])
    kl = lambda x, r, b: pyfused_po.token_kl(x, r, y, backend=b)  # noqa: E731
    compare("token_kl", _grads(lambda x: kl(x, ref_logits, "triton"), logits),
            _grads(lambda x: kl(x.double(), ref_logits.double(), "torch"), logits), TOL[str(dtype)[6:]])
    lin = lambda h, w, b, impl, **k: pyfused_po.linear_token_logprobs(h, w, y, backend=b, impl=impl, shift=True, **k)  # noqa: E731
    slow = _grads(lambda h, w: lin(h.double(), w.double(), "torch", "chunked"), hidden, weight)
    compare("linear fused", _grads(lambda h, w: lin(h, w, "triton", "fused"), hidden, weight), slow, TOL[str(dtype)[6:]])
    compare("linear fused grad_filter=0", _grads(lambda h, w: lin(h, w, "triton", "fused", grad_filter=0.0), hidden, weight),
            slow, TOL[str(dtype)[6:]])
    compare("linear chunked (Triton fold)", _grads(lambda h, w: lin(h, w, "triton", "chunked"), hidden, weight), slow,
            TOL[str(dtype)[6:]])
    return results


def main():
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtypes = [torch.float32] + ([torch.bfloat16] if device.type == "cuda" else [])  # interpreter bf16 dots are wrong
    bad = 0
    for dtype in dtypes:
        for name, err, tol in checks(device, dtype):
            ok = err <= tol
            bad += not ok
            print(f"{'ok ' if ok else 'BAD'} {str(dtype)[6:]:9s} {name:32s} rel err {err:.2e} (tol {tol:.0e})")
    if device.type == "cuda":
        torch.cuda.synchronize()
    print(f"small_case: {bad} wrong of {len(dtypes) * 7} on {device}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
