"""RL log-probs with temperature and entropy (``pyfused_po.integrations.rl``).

Checked against a float64 reference written here from the definition, and — when OpenRLHF's
source is available — against OpenRLHF's own ``log_probs_from_logits`` / ``compute_entropy``
(``openrlhf/models/utils.py``, loaded by path: the package's ``__init__`` pulls ray, vllm, ...;
CI installs the wheel with ``--no-deps`` and points ``PYFUSED_PO_OPENRLHF`` at it).  verl's
``verl/utils/torch_functional.py`` imports ``tensordict`` at module level, which is not installed
here (its wheels carry a compiled extension tied to a torch build), so verl is matched through
the float64 reference of the same formula: ``log_softmax(logits / T)[label]``.
"""
import importlib.util
import os

import pytest
import torch

from pyfused_po.integrations import rl

T = 0.7


def _data(seed=0, n=2, t=7, v=53, d=12):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, d, generator=g)
    weight = torch.randn(v, d, generator=g) * 0.5
    labels = torch.randint(0, v, (n, t), generator=g)
    return hidden, weight, labels


def _reference(logits, labels, temperature):
    logp = torch.log_softmax(logits.double() / temperature, -1)
    return logp.gather(-1, labels[..., None])[..., 0], -(logp.exp() * logp).sum(-1)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_logits_and_hidden_paths_match_the_definition(backend):
    hidden, weight, labels = _data()
    logits = hidden @ weight.T
    want_logp, want_entropy = _reference(logits, labels, T)
    for source in (dict(logits=logits), dict(hidden=hidden, weight=weight)):
        logp, entropy = rl.rl_token_logprobs(labels, temperature=T, with_entropy=True, backend=backend, **source)
        torch.testing.assert_close(logp.double(), want_logp, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(entropy.double(), want_entropy, rtol=1e-5, atol=1e-5)


def test_gradients_of_log_probs_and_entropy_bonus():
    hidden, weight, labels = _data(1)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    logp, entropy = rl.rl_token_logprobs(labels, hidden=hidden, weight=weight, temperature=T, with_entropy=True,
                                         backend="torch")
    (logp.sum() + 0.01 * entropy.sum()).backward()
    got = hidden.grad.clone(), weight.grad.clone()
    hidden.grad = weight.grad = None
    ref_logp, ref_entropy = _reference(hidden.double() @ weight.double().T, labels, T)
    (ref_logp.sum() + 0.01 * ref_entropy.sum()).backward()
    torch.testing.assert_close(got[0].double(), hidden.grad.double(), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(got[1].double(), weight.grad.double(), rtol=1e-4, atol=1e-6)


def test_shift_and_drop_ins():
    hidden, weight, labels = _data(2)
    logits = hidden @ weight.T
    # shift=True: row t predicts token t + 1 (labels = input_ids); results aligned with labels.
    shifted, _ = rl.rl_token_logprobs(labels, logits=logits, temperature=T, shift=True, backend="torch")
    aligned = rl.log_probs_from_logits(logits[:, :-1], labels[:, 1:], T)
    torch.testing.assert_close(shifted[:, 1:], aligned)
    assert torch.all(shifted[:, 0] == 0)
    before = logits.clone()
    torch.testing.assert_close(rl.logprobs_from_logits(logits / T, labels).double(), _reference(logits, labels, T)[0],
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rl.entropy_from_logits(logits).double(), _reference(logits, labels, 1.0)[1],
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(logits, before)  # unlike OpenRLHF's, nothing is divided in place
    with pytest.raises(ValueError, match="exactly one of logits= or hidden="):
        rl.rl_token_logprobs(labels)


def test_packed_stream_equals_padded_rows():
    """Two responses packed in one row (cu_seqlens), shift=True: the same log-probs and entropy
    as scoring each row alone; nothing predicted across the boundary."""
    hidden, weight, labels = _data(4, n=2, t=5)
    packed = dict(hidden=hidden.reshape(1, 10, -1), weight=weight)
    cu = torch.tensor([0, 5, 10], dtype=torch.int32)
    logp, entropy = rl.rl_token_logprobs(labels.reshape(1, 10), temperature=T, with_entropy=True, shift=True,
                                         cu_seqlens=cu, backend="torch", **packed)
    row_logp, row_entropy = rl.rl_token_logprobs(labels, hidden=hidden, weight=weight, temperature=T,
                                                 with_entropy=True, shift=True, backend="torch")
    torch.testing.assert_close(logp.reshape(2, 5), row_logp)
    torch.testing.assert_close(entropy.reshape(2, 5), row_entropy)


def _openrlhf_utils():
    roots = [os.environ.get("PYFUSED_PO_OPENRLHF")]
    spec = importlib.util.find_spec("openrlhf")
    roots += list(spec.submodule_search_locations or []) if spec else []
    for root in filter(None, roots):
        for path in (os.path.join(root, "openrlhf", "models", "utils.py"), os.path.join(root, "models", "utils.py")):
            if os.path.exists(path):
                pytest.importorskip("deepspeed")  # imported at the module's top
                module_spec = importlib.util.spec_from_file_location("_openrlhf_models_utils", path)
                module = importlib.util.module_from_spec(module_spec)
                module_spec.loader.exec_module(module)
                return module
    pytest.skip("OpenRLHF source not found (pip install --no-deps openrlhf; or set PYFUSED_PO_OPENRLHF)")


def test_matches_openrlhf_log_probs_from_logits():
    ours_mod = _openrlhf_utils()
    hidden, weight, labels = _data(3)
    logits = hidden @ weight.T
    theirs = ours_mod.log_probs_from_logits(logits.clone(), labels, temperature=T)
    ours, entropy = rl.rl_token_logprobs(labels, hidden=hidden, weight=weight, temperature=T, with_entropy=True,
                                         backend="torch")
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    # compute_entropy is wrapped in torch.compile; its eager function is the formula.
    compute_entropy = getattr(ours_mod.compute_entropy, "_torchdynamo_orig_callable", ours_mod.compute_entropy)
    torch.testing.assert_close(entropy, compute_entropy(logits / T), rtol=1e-5, atol=1e-5)
