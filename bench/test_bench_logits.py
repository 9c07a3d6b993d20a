"""Logits-path adapters: each computes DPO's loss and gradient (checked against a float64
formula written here), then is timed by pytest-benchmark.  CPU form at toy sizes; the
``gpu`` test runs every installed peer at a real size."""
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


def dpo_float64(logits, labels, ref_chosen, ref_rejected, pairs):
    """−log σ(β·((c − c_ref) − (r − r_ref))), c/r = Σ_t log softmax(z_t)[y_t], in float64."""
    logp = torch.log_softmax(logits.double(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1).sum(-1)
    h = BETA * ((logp[:pairs] - ref_chosen.double()) - (logp[pairs:] - ref_rejected.double()))
    return -F.logsigmoid(h).mean()


def prepared(case):
    inp = make_inputs(case, CPU, seed=3)[0]
    with torch.no_grad():
        sums = torch.log_softmax(inp.logits.double(), -1).gather(
            -1, inp.labels.unsqueeze(-1)).squeeze(-1).sum(-1)
    attach_reference([inp], (sums[:case.pairs], sums[case.pairs:]))
    return inp


@pytest.mark.parametrize("name", ["pyfused", "pyfused_inplace", "torch_eager"])
@pytest.mark.parametrize("dtype,tol", [("fp32", 1e-5), ("bf16", 1e-2)])
def test_logits_adapter_cpu(bench_timer, name, dtype, tol):
    case = Case(path="logits", pairs=2, seq_len=13, vocab=301, dtype=dtype)
    method = {m.name: m for m in methods_for("logits")}[name]
    if method.unavailable(CPU):
        pytest.skip(method.unavailable(CPU))
    inp = prepared(case)
    x = inp.logits.detach().double().requires_grad_(True)  # before any in-place backward
    expected = dpo_float64(x, inp.labels, inp.ref_chosen, inp.ref_rejected, case.pairs)
    expected.backward()
    loss_fn = method.build(case, CPU)
    loss = run_step(loss_fn, inp)
    assert abs(loss.item() - expected.item()) <= tol * max(1.0, abs(expected.item()))
    assert inp.logits.grad is None  # the gradient is handed on, as to an LM head
    grad = inp.logits_grad.double()
    assert torch.allclose(grad, x.grad, rtol=tol, atol=tol * x.grad.abs().max().item())
    bench_timer.pedantic(run_step, args=(loss_fn, inp), rounds=3, iterations=1, warmup_rounds=1)


@pytest.mark.gpu
def test_logits_peers_gpu(bench_timer):
    """Every installed logits-path method agrees with the reference at 8k tokens × 32k vocab."""
    device = torch.device("cuda")
    case = Case(path="logits", pairs=2, seq_len=2048, vocab=32000, dtype="bf16")
    records = measure_case(case, methods_for("logits"), device, {}, warmup=1, reps=3)
    ran = [r for r in records if r["status"] == "ok"]
    assert any(r["method"] == "pyfused" for r in ran)
    for r in records:
        assert r["status"] in ("ok", "not installed", "not in this trl version"), r
        if r["status"] == "ok" and r["agrees"] is not None:
            assert r["agrees"], r
    pyfused = next(m for m in methods_for("logits") if m.name == "pyfused")
    inp = make_inputs(case, device)[0]
    inp.ref_chosen = torch.zeros(case.pairs, device=device)
    inp.ref_rejected = torch.zeros(case.pairs, device=device)
    loss_fn = pyfused.build(case, device)
    bench_timer.pedantic(lambda: (run_step(loss_fn, inp), torch.cuda.synchronize()), rounds=5,
                       iterations=1, warmup_rounds=1)
