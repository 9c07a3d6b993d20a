"""Bench tests: ``gpu``-marked ones skip without CUDA (also when bench/ is collected alone);
without CUDA, Triton kernels (a peer's, when installed) run under the interpreter, which
must be chosen before any kernel is decorated."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


class _RunOnce:
    """Stands in for pytest-benchmark's fixture when the plugin is absent or disabled."""

    def pedantic(self, target, args=(), kwargs=None, rounds=1, iterations=1, warmup_rounds=0, **_):
        result = None
        for _ in range(max(1, rounds)):
            result = target(*args, **(kwargs or {}))
        return result


@pytest.fixture
def bench_timer(request):
    """pytest-benchmark's ``benchmark`` fixture when the plugin is active, else a runner that
    just calls the target: the tests' checks never depend on the plugin being there."""
    if request.config.pluginmanager.hasplugin("benchmark"):
        return request.getfixturevalue("benchmark")
    return _RunOnce()
