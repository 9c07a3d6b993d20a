"""Triton kernels of pyfused_po (installed as ``pyfused_po.kernels``).

Only ``@triton.jit`` kernels and their launchers live here: no autograd and no
loss semantics.  Importing this package imports Triton.

Why the guard below: this folder sits at the repository root, so whenever the root
is on ``sys.path`` (``python -m pytest``, a script run from the root) Python finds it
first for a plain ``import kernels`` — ahead of Hugging Face's ``kernels`` package,
which transformers ≥ 5.25 imports.  This package only ever answers to the name
``pyfused_po.kernels``; imported under any other name it hands the import on to the
next ``kernels`` on the path (or raises ``ModuleNotFoundError`` when there is none),
so it can never shadow an installed package.  ``tests/test_no_shadowing.py`` keeps it so.
"""
if __name__ != "pyfused_po.kernels":
    import importlib.machinery as _machinery
    import importlib.util as _util
    import os as _os
    import sys as _sys

    def _defer_to_installed(name, here):
        """Load the ``name`` package found on ``sys.path`` outside ``here``'s parent folder,
        and make it the module this import returns."""
        root = _os.path.realpath(_os.path.dirname(here))
        others = [p for p in _sys.path if _os.path.realpath(p or _os.getcwd()) != root]
        spec = _machinery.PathFinder.find_spec(name, others)
        if spec is None:
            raise ModuleNotFoundError(
                f"No module named {name!r} outside {root} (the folder {here} is pyfused_po's "
                f"Triton kernels: import them as 'pyfused_po.kernels')", name=name)
        module = _util.module_from_spec(spec)
        _sys.modules[name] = module  # the import system returns sys.modules[name] after this file
        try:
            if spec.loader is not None:
                spec.loader.exec_module(module)
        except BaseException:
            _sys.modules.pop(name, None)
            raise

    _defer_to_installed(__name__, _os.path.dirname(_os.path.abspath(__file__)))
else:
    from .token_launch import EXTRA_NAMES, launch_config, token_backward, token_forward

    __all__ = ["EXTRA_NAMES", "launch_config", "token_backward", "token_forward"]
