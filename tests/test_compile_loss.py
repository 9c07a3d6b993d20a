"""torch.compile(fullgraph=True) over a function calling FusedPreferenceLoss: no graph break,
same loss, metrics and gradient as eager, which are checked against a float64 formula."""
import pytest
import torch
import torch.nn.functional as F

from pyfused_po import FusedPreferenceLoss
from pyfused_po import _backend


def _inputs():
    torch.manual_seed(0)
    logits = torch.randn(4, 7, 37)
    labels = torch.randint(0, 37, (4, 7))
    labels[:, :2] = -100
    labels[3, 5:] = -100
    return logits, labels, torch.randn(2), torch.randn(2)


def _reference_loss(logits, labels, ref_chosen, ref_rejected, beta):
    """DPO sigmoid loss in float64 from the formula."""
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    sums = (logp * (labels != -100)).sum(-1)
    margin = (sums[:2] - ref_chosen.double()) - (sums[2:] - ref_rejected.double())
    return -F.logsigmoid(beta * margin).mean()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_fused_preference_loss_matches_eager(backend):
    if backend == "triton" and not (torch.cuda.is_available() or _backend.interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    torch._dynamo.reset()
    loss_fn = FusedPreferenceLoss("sigmoid", beta=0.1, backend=backend)

    def step(logits, labels, ref_chosen, ref_rejected):
        out = loss_fn(logits, labels, ref_chosen, ref_rejected)
        return out.loss, out.metrics

    logits, labels, rc, rr = _inputs()
    x_eager = logits.clone().requires_grad_()
    x_comp = logits.clone().requires_grad_()
    loss_e, metrics_e = step(x_eager, labels, rc, rr)
    loss_e.backward()
    # fullgraph=True raises on any graph break; aot_eager traces forward and backward graphs.
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss_c, metrics_c = compiled(x_comp, labels, rc, rr)
    loss_c.backward()

    x64 = logits.double().requires_grad_()
    ref = _reference_loss(x64, labels, rc, rr, 0.1)
    ref.backward()
    torch.testing.assert_close(loss_c.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(x_comp.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=1e-6, atol=1e-8)
    assert metrics_c.keys() == metrics_e.keys() and "logits/chosen" in metrics_c
    for key in metrics_e:
        torch.testing.assert_close(metrics_c[key], metrics_e[key], rtol=1e-5, atol=1e-6)


def test_token_custom_ops_pass_opcheck():
    """The registered ops' schemas, fake tensors and autograd agree with their real implementation."""
    from pyfused_po.token import ops

    logits, labels, _, _ = _inputs()
    args = (logits.requires_grad_(), labels, -100, False, 1.0, 1.0, None, "entropy,mean_logit", "torch")
    torch.library.opcheck(ops.token_forward, args, test_utils=("test_schema", "test_faketensor",
                                                              "test_autograd_registration"))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_compiled_hidden_path_matches_eager(backend):
    """hidden= / weight= under torch.compile(fullgraph=True): the fused-linear custom ops."""
    if backend == "triton" and not (torch.cuda.is_available() or _backend.interpreting()):
        pytest.skip("needs CUDA or TRITON_INTERPRET=1")
    torch._dynamo.reset()
    torch.manual_seed(0)
    hidden, weight, bias = torch.randn(4, 7, 12), torch.randn(37, 12) * 0.5, torch.randn(37) * 0.1
    labels = torch.randint(0, 37, (4, 7))
    labels[:, :2] = -100
    ref_hidden = torch.randn(4, 7, 12)
    loss_fn = FusedPreferenceLoss("sigmoid", beta=0.1, shift=True, backend=backend, use_weighting=True)

    def step(h, w, b):
        out = loss_fn(hidden=h, weight=w, bias=b, labels=labels, ref_hidden=ref_hidden)
        return out.loss, out.metrics

    results = []
    for run in (step, torch.compile(step, fullgraph=True, backend="aot_eager")):
        leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
        loss, metrics = run(*leaves)
        loss.backward()
        results.append((loss, metrics, [t.grad for t in leaves]))
    (le, me, ge), (lc, mc, gc) = results
    torch.testing.assert_close(lc, le, rtol=1e-6, atol=1e-7)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    for key in me:
        torch.testing.assert_close(mc[key], me[key], rtol=1e-5, atol=1e-6)


def test_compiled_token_logprobs_extras_gradients_match_eager():
    """Gradients of the differentiable extras flow through the compiled custom op."""
    import pyfused_po

    torch._dynamo.reset()
    logits, labels, _, _ = _inputs()
    weights = torch.randn(3, *labels.shape)

    def f(x):
        out = pyfused_po.token_logprobs(x, labels, extras=("entropy", "log_sum_sq_probs", "mean_logit"),
                                        backend="torch")
        return (weights[0] * out.entropy + weights[1] * out.log_sum_sq_probs + weights[2] * out.mean_logit
                + out.logps).sum()

    grads = []
    for run in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        x = logits.clone().requires_grad_()
        run(x).backward()
        grads.append(x.grad)
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-5, atol=1e-7)


def test_linear_custom_ops_pass_opcheck():
    from pyfused_po.token import ops

    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 5, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    labels = torch.randint(0, 11, (2, 5))
    for mm_dtype in (None, torch.bfloat16):
        args = (hidden, weight, None, labels, -100, True, 1.0, 1.0, None, "entropy", "torch", "chunked", None,
                mm_dtype, None)
        torch.library.opcheck(ops.linear_forward, args, test_utils=("test_schema", "test_faketensor",
                                                                   "test_autograd_registration"))


def test_linear_path_compiles_under_autocast():
    """torch.compile(fullgraph) of the hidden path inside bf16 autocast: the autocast dtype
    reaches the custom ops, so compiled and eager agree exactly (fp32 gradients)."""
    from pyfused_po import linear_token_logprobs

    torch.manual_seed(0)
    hidden, weight = torch.randn(2, 7, 16), torch.randn(37, 16)
    labels = torch.randint(0, 37, (2, 7))

    def f(h, w):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return linear_token_logprobs(h, w, labels, backend="torch", shift=True).sum()

    runs = []
    for fn in (f, torch.compile(f, fullgraph=True, backend="aot_eager")):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        loss = fn(h, w)
        loss.backward()
        runs.append((loss.detach(), h.grad, w.grad))
    for eager, compiled in zip(*runs):
        assert compiled.dtype == torch.float32
        torch.testing.assert_close(compiled, eager, rtol=0, atol=0)
