"""The three-GEMM plan's default chunk (torch_backend.linear.gradient_chunk_size): sized in tokens
(min(M, 4096, D), or the staged chunk when larger), so its fp32 dW is re-read as rarely as TRL's."""
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyfused_po import FusedPreferenceLoss
from pyfused_po.token.torch_backend import linear as chunked

MM = {"mm", "addmm", "addmm_"}


class _MatmulShapes(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.__name__.split(".")[0]
        if name in MM:
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.calls.append((tuple(a.shape), tuple(b.shape)))
        return func(*args, **(kwargs or {}))


def test_rule():
    # min(M, 4096, D) tokens when that beats the staged chunk; D rounded down to the GEMM tile.
    assert chunked.gradient_chunk_size(M=10_000, D=4096, staged=1024) == 4096
    assert chunked.gradient_chunk_size(M=10_000, D=8192, staged=1024) == 4096
    assert chunked.gradient_chunk_size(M=10_000, D=2100, staged=1024) == 2048
    assert chunked.gradient_chunk_size(M=700, D=4096, staged=256) == 700
    assert chunked.gradient_chunk_size(M=10_000, D=576, staged=2560) == 2560  # the staged chunk is larger
    assert chunked.gradient_chunk_size(M=10_000, D=100, staged=300) == 300


def _batch(P, T, V, D, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * P, T, D, generator=g, dtype=dtype)
    weight = torch.randn(V, D, generator=g, dtype=dtype) / D ** 0.5
    labels = torch.randint(0, V, (2 * P, T), generator=g)
    labels[:, :3] = -100
    ref = dict(ref_chosen_logps=torch.randn(P, generator=g, dtype=dtype) - 30,
               ref_rejected_logps=torch.randn(P, generator=g, dtype=dtype) - 30)
    return hidden, weight, labels, ref


def test_default_chunk_is_wider_than_the_staged_budget_and_exact():
    # CPU budget 2^22 logits at V = 16,384: the staged chunk is 256 tokens; M = 2·2·(80 − 3) = 308
    # tokens ≤ D = 512, so the three-GEMM plan runs ONE chunk: one logits GEMM, one dH, one dW.
    P, T, V, D = 2, 80, 16384, 512
    hidden, weight, labels, ref = _batch(P, T, V, D, torch.float64)
    M = int((labels != -100).sum())
    assert chunked.chunk_size(M, V, hidden.device) == 256 < M
    results = {}
    for fused in (True, False):
        module = FusedPreferenceLoss("sigmoid", beta=0.2, backend="torch")
        module.fused_gradient = fused
        h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        with _MatmulShapes() as shapes:
            out = module(hidden=h, weight=w, labels=labels, **ref)
            out.loss.backward()
        results[fused] = (out.loss.detach(), h.grad, w.grad, shapes.calls)
    loss, gh, gw, calls = results[True]
    logits_gemms = [c for c in calls if c[0][1] == D and c[1] == (D, V)]
    assert [c[0][0] for c in logits_gemms] == [M], calls  # one chunk of all M tokens
    assert len(calls) == 3, calls
    s_loss, s_gh, s_gw, _ = results[False]
    torch.testing.assert_close(loss, s_loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gh, s_gh, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gw, s_gw, rtol=1e-10, atol=1e-12)


def test_explicit_chunk_tokens_still_wins():
    P, T, V, D = 2, 20, 64, 32
    hidden, weight, labels, ref = _batch(P, T, V, D)
    module = FusedPreferenceLoss("sigmoid", beta=0.2, backend="torch")
    module.chunk_tokens = 17  # one pair (34 tokens) does not fit: the staged path runs
    h = hidden.clone().requires_grad_(True)
    out = module(hidden=h, weight=weight.clone().requires_grad_(True), labels=labels, **ref)
    assert "StoredGradient" not in type(out.loss.grad_fn).__name__
    module.chunk_tokens = 34  # exactly one pair per chunk: two chunks
    with _MatmulShapes() as shapes:
        out = module(hidden=h, weight=weight.clone().requires_grad_(True), labels=labels, **ref)
    assert "StoredGradient" in type(out.loss.grad_fn).__name__
    assert sorted(c[0][0] for c in shapes.calls if c[1] == (D, V)) == [34, 34]
