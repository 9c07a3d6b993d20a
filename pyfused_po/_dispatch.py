"""Forms of the token stage that live in higher modules, looked up by name at call time.

``token_logprobs(..., vocab_parallel_group=)`` hands the call to :mod:`pyfused_po.distributed`,
and under ``torch.compile`` the token stage runs as :mod:`pyfused_po.token.ops`' custom ops.  Both
of those import the token stage's internals, so the token stage importing them back would be
an import cycle (and a lower stage importing a higher one).  Instead they register their
entry points here when they are imported; ``pyfused_po/__init__.py`` imports both, so the
entries exist whenever the package is imported.
"""
_ENTRIES = {}


def register(fn):
    """Decorator: make ``fn`` findable under its ``__name__``."""
    _ENTRIES[fn.__name__] = fn
    return fn


def entry(name):
    """The registered function ``name``; ``RuntimeError`` if its module was never imported."""
    try:
        return _ENTRIES[name]
    except KeyError:
        raise RuntimeError(f"pyfused_po: {name!r} is not registered; import pyfused_po (its __init__ imports "
                           "pyfused_po.distributed and pyfused_po.token.ops, which register it)") from None
