"""Fused-linear-path adapters: DPO loss and the gradients of hidden and weight against a
float64 formula, then timed by pytest-benchmark.  CPU form at toy sizes; the ``gpu``
test runs every installed peer at a real size."""
import pytest
import torch
import torch.nn.functional as F

from bench.cases import Case
from bench.inputs import make_inputs
from bench.measure import measure_case
from bench.methods import methods_for
from bench.reference import BETA, attach_reference
from bench.timing import run_step

CPU = torch.device("cpu")
CASE = Case(path="linear", pairs=1, seq_len=11, vocab=257, dtype="fp32", hidden=24)


def dpo_float64(hidden, weight, labels, ref_chosen, ref_rejected, pairs):
    z = hidden.double() @ weight.double().t()
    logp = torch.log_softmax(z, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(-1)
    h = BETA * ((logp[:pairs] - ref_chosen.double()) - (logp[pairs:] - ref_rejected.double()))
    return -F.logsigmoid(h).mean()


@pytest.mark.parametrize("name", ["pyfused_linear", "pyfused_module_linear", "pyfused_apply_dpo", "torch_eager_linear"])
@pytest.mark.parametrize("kind", ["random", "realistic"])
def test_linear_adapter_cpu(bench_timer, name, kind):
    case = Case(**{**CASE.__dict__, "kind": kind})
    method = {m.name: m for m in methods_for("linear")}[name]
    if method.unavailable(CPU):
        pytest.skip(method.unavailable(CPU))
    inp = make_inputs(case, CPU, seed=5)[0]
    h = inp.hidden.detach().double().requires_grad_(True)
    w = inp.weight.detach().double().requires_grad_(True)
    with torch.no_grad():
        sums = torch.log_softmax(h @ w.t(), -1).gather(-1, inp.labels.unsqueeze(-1)).squeeze(-1).sum(-1)
    attach_reference([inp], (sums[:case.pairs], sums[case.pairs:]))
    expected = dpo_float64(h, w, inp.labels, inp.ref_chosen, inp.ref_rejected, case.pairs)
    expected.backward()
    loss_fn = method.build(case, CPU)
    loss = run_step(loss_fn, inp)
    assert abs(loss.item() - expected.item()) <= 1e-5 * max(1.0, abs(expected.item()))
    for got, ref in ((inp.hidden.grad, h.grad), (inp.weight.grad, w.grad)):
        assert torch.allclose(got.double(), ref, rtol=1e-4, atol=1e-5 * ref.abs().max().item())
    bench_timer.pedantic(run_step, args=(loss_fn, inp), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.gpu
def test_linear_peers_gpu():
    """Every installed fused-linear method agrees with the reference (Liger: not compared)."""
    device = torch.device("cuda")
    case = Case(path="linear", pairs=2, seq_len=1024, vocab=32000, dtype="bf16", hidden=4096)
    records = measure_case(case, methods_for("linear"), device, {}, warmup=1, reps=3)
    assert any(r["method"] == "torch_eager_linear" and r["status"] == "ok" for r in records)
    for r in records:
        assert r["status"] != "error", r
        if r["status"] == "ok" and r["agrees"] is not None:
            assert r["agrees"], r
