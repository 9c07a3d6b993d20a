"""The benchmarked methods, one module per peer; ``all_methods()`` lists them in table order."""
from . import cce, flash_attn, liger, pyfused, torch_compile, torch_eager, trl
from .base import NEEDS_CUDA, NOT_INSTALLED, Method

_MODULES = (pyfused, torch_eager, torch_compile, trl, flash_attn, liger, cce)


def all_methods():
    return [m for module in _MODULES for m in module.METHODS]


def methods_for(path, names=None):
    """Methods of one path, optionally restricted to ``names`` (unknown names raise)."""
    methods = all_methods()
    if names is not None:
        known = {m.name for m in methods}
        unknown = sorted(set(names) - known)
        if unknown:
            raise ValueError(f"unknown methods {unknown}; known: {sorted(known)}")
        methods = [m for m in methods if m.name in names]
    return [m for m in methods if m.path == path]


__all__ = ["Method", "NEEDS_CUDA", "NOT_INSTALLED", "all_methods", "methods_for"]
