"""Peer adapters' glue (argument order, reshapes, signs, tuple outputs) on the CPU.

The peers are not installed here, so each is replaced by a stand-in module that follows
the API read from the peer's source (see the adapters' docstrings) and computes the
documented result with plain torch.  The adapter's DPO loss and gradients are then
checked against a float64 formula: a wrong sign, a swapped argument or a bad reshape
fails.  Real peers are exercised by the ``gpu`` tests and the runner.
"""
import importlib.machinery
import sys
import textwrap
import types

import pytest
import torch
import torch.nn.functional as F

from bench.cases import Case
from bench.inputs import make_inputs
from bench.methods import all_methods
from bench.reference import BETA, attach_reference
from bench.timing import run_step

CPU = torch.device("cpu")
LOGITS = Case(path="logits", pairs=2, seq_len=7, vocab=53, dtype="fp32")
LINEAR = Case(path="linear", pairs=2, seq_len=7, vocab=53, dtype="fp32", hidden=12)


def _logps(z, y):
    return torch.log_softmax(z.float(), -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)


def _module(monkeypatch, name, **attrs):
    mod = types.ModuleType(name)
    mod.__spec__ = importlib.machinery.ModuleSpec(name, None, is_package=True)
    mod.__dict__.update(attrs)
    monkeypatch.setitem(sys.modules, name, mod)
    return mod


class _Chunked:
    """Stand-in with the forward signature of a TRL release that takes ``chunk_size``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None,
                logit_scale=1.0, outputs=("entropy",), sampling_mask=None):
        raise AssertionError("not called")

    @staticmethod
    def apply(hidden, weight, bias, targets, temperature, chunk_size, softcap, scale, outputs, mask):
        assert hidden.dim() == 2 and weight.shape[1] == hidden.shape[1] and outputs == ()
        return _logps(hidden @ weight.t() / temperature, targets), None, None, None, None


class _Liger(torch.nn.Module):
    def __init__(self, ignore_index=-100, beta=0.1, compute_nll_loss=False, compiled=True,
                 use_ref_model=True, average_log_prob=True, chunk_size=1, loss_type="sigmoid"):
        super().__init__()
        assert use_ref_model is False and compute_nll_loss is False and average_log_prob is False
        self.beta = beta

    def forward(self, lin_weight, _input, target, bias=None):
        assert _input.dim() == 3 and lin_weight.shape[1] == _input.shape[-1]
        sums = _logps(_input @ lin_weight.t(), target).sum(-1)
        half = sums.shape[0] // 2
        return -F.logsigmoid(self.beta * (sums[:half] - sums[half:])).mean(), ("aux",)


@pytest.fixture
def fake_peers(monkeypatch, tmp_path):
    def selective_log_softmax(logits, index):
        return _logps(logits, index)

    def selective_log_softmax_and_entropy(logits, index, temperature=1.0, row_mask=None):
        return _logps(logits, index), torch.zeros_like(index, dtype=torch.float32)

    def linear_cross_entropy(e, c, targets, bias=None, ignore_index=-100, softcap=None, reduction="mean", **kw):
        assert reduction == "none"
        return -_logps(e @ c.t(), targets)

    _module(monkeypatch, "trl")
    _module(monkeypatch, "trl.trainer")
    _module(monkeypatch, "trl.trainer.utils", selective_log_softmax=selective_log_softmax)
    _module(monkeypatch, "trl.kernels", selective_log_softmax_and_entropy=selective_log_softmax_and_entropy)
    _module(monkeypatch, "trl.kernels.chunked_logprob", ChunkedLogProbFunction=_Chunked, VOCAB_CHUNK_SIZE=16)
    _module(monkeypatch, "cut_cross_entropy", linear_cross_entropy=linear_cross_entropy)
    _module(monkeypatch, "liger_kernel")
    _module(monkeypatch, "liger_kernel.chunked_loss", LigerFusedLinearDPOLoss=_Liger)
    kernel = tmp_path / "flash_attn" / "ops" / "triton"
    kernel.mkdir(parents=True)
    (tmp_path / "flash_attn" / "__init__.py").write_text("raise ImportError('CUDA extension not built')\n")
    (kernel / "cross_entropy.py").write_text(textwrap.dedent("""
        import torch
        def cross_entropy_loss(logits, labels, precomputed_lse=None, label_smoothing=0.0, logit_scale=1.0,
                               lse_square_scale=0.0, ignore_index=-100, inplace_backward=False, process_group=None):
            assert logits.dim() == 2 and labels.dim() == 1
            lp = torch.log_softmax(logits.float(), -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
            return -lp, torch.zeros_like(lp)
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "flash_attn", raising=False)


def _expected(case, inp, reference_free=False):
    """float64 DPO loss and the float64 leaves it was computed from."""
    if case.path == "logits":
        leaves = [inp.logits.detach().double().requires_grad_(True)]
        z = leaves[0]
    else:
        leaves = [inp.hidden.detach().double().requires_grad_(True), inp.weight.detach().double().requires_grad_(True)]
        z = leaves[0] @ leaves[1].t()
    sums = torch.log_softmax(z, -1).gather(-1, inp.labels.unsqueeze(-1)).squeeze(-1).sum(-1)
    attach_reference([inp], (sums[:case.pairs].detach(), sums[case.pairs:].detach()))
    ref_c, ref_r = (0.0, 0.0) if reference_free else (inp.ref_chosen.double(), inp.ref_rejected.double())
    h = BETA * ((sums[:case.pairs] - ref_c) - (sums[case.pairs:] - ref_r))
    loss = -F.logsigmoid(h).mean()
    loss.backward()
    return loss.item(), leaves


@pytest.mark.parametrize("name", ["trl_selective", "trl_kernel", "trl_chunked", "cce", "flash_attn", "liger"])
def test_peer_adapter_glue(fake_peers, name):
    method = next(m for m in all_methods() if m.name == name)
    assert method.probe() is None
    case = LOGITS if method.path == "logits" else LINEAR
    inp = make_inputs(case, CPU, seed=11)[0]
    expected, leaves = _expected(case, inp, reference_free=method.reference_free)
    loss = run_step(method.build(case, CPU), inp).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    grads = [inp.logits_grad] if case.path == "logits" else [inp.hidden.grad, inp.weight.grad]
    for got, ref in zip(grads, leaves):
        assert torch.allclose(got.double(), ref.grad, rtol=1e-4, atol=1e-6)


def test_missing_peers_report_not_installed(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name, *a: None)
    reasons = {m.name: m.unavailable(torch.device("cuda")) for m in all_methods()
               if m.name in ("trl_selective", "trl_chunked", "liger", "cce", "flash_attn")}
    assert set(reasons.values()) == {"not installed"}


@pytest.mark.parametrize("name", ["trl_selective", "trl_kernel", "trl_chunked"])
def test_real_trl_adapters_cpu(name, monkeypatch):
    """The installed TRL itself (Triton kernels under the interpreter) through the adapters."""
    pytest.importorskip("trl")
    method = next(m for m in all_methods() if m.name == name)
    if method.probe() is not None:
        pytest.skip(method.probe())
    case = (Case(path="logits", pairs=1, seq_len=5, vocab=301, dtype="fp32") if method.path == "logits"
            else Case(path="linear", pairs=1, seq_len=5, vocab=301, dtype="fp32", hidden=16))
    inp = make_inputs(case, CPU, seed=4)[0]
    expected, leaves = _expected(case, inp)
    loss = run_step(method.build(case, CPU), inp).item()
    assert loss == pytest.approx(expected, rel=1e-5)
    grads = [inp.logits_grad] if case.path == "logits" else [inp.hidden.grad, inp.weight.grad]
    for got, ref in zip(grads, leaves):
        assert torch.allclose(got.double(), ref.grad, rtol=1e-4, atol=1e-6)


def test_trl_chunked_on_cpu_needs_the_torch_fold(fake_peers, monkeypatch):
    """TRL 1.16 folds its tiles in torch off CUDA (``_use_triton``); a release without it
    would run the Triton interpreter on the CPU, so the CPU run marks it GPU only."""
    method = next(m for m in all_methods() if m.name == "trl_chunked")
    assert method.unavailable(CPU) == "GPU only"
    monkeypatch.setattr(sys.modules["trl.kernels.chunked_logprob"], "_use_triton", lambda device: False,
                        raising=False)
    assert method.unavailable(CPU) is None
