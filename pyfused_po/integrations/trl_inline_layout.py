"""Which trainers form their logits inline in ``_compute_loss``: TRL 1.9–1.14's ``DPOTrainer`` and
``KTOTrainer`` (:mod:`.trl_inline` switches them).

Between TRL 0.24 (``concatenated_forward``, :mod:`.trl_legacy`) and TRL 1.15 (the fused-LM-head
protocol, :mod:`.trl`), both trainers call ``model(**inputs).logits`` inside
``_compute_loss(self, model, inputs, return_outputs)`` and gather the log-probs there; the
reference passes run in ``compute_ref_log_probs(model, inputs)`` (precomputed reference sums) and,
for KTO, the KL completions in ``_compute_kl_logps(model, batch)``.  The layout is read from the
class: those methods are TRL's own (a subclass that redefines one computes something unknown here),
and the module defining ``_compute_loss`` does not know TRL's ``add_fused_lm_head`` (TRL 1.15+'s
trainers, which have the same methods, use it).  No version number decides.
"""
from .trl_legacy_head import method_layout

__all__ = ["INLINE_KINDS", "inline_layout", "is_inline_trainer"]

_LOSS = ("_compute_loss", ("model", "inputs", "return_outputs"))
# kind → (methods next to _compute_loss, with the parameters each has after self).
INLINE_KINDS = {
    "KTOTrainer": {"compute_ref_log_probs": ("model", "inputs"), "_compute_kl_logps": ("model", "batch")},
    "DPOTrainer": {"compute_ref_log_probs": ("model", "inputs")},
}


def _uses_fused_head(cls):
    """True when the module defining TRL's own ``_compute_loss`` of ``cls`` (the first in its MRO
    from a ``trl`` module) imports TRL's fused LM head (TRL >= 1.15)."""
    for klass in cls.__mro__:
        method = vars(klass).get(_LOSS[0])
        if method is not None and (klass.__module__ == "trl" or klass.__module__.startswith("trl.")):
            return "add_fused_lm_head" in getattr(method, "__globals__", {})
    return False


def inline_layout(trainer):
    """``(kind, how)`` for ``trainer`` (an instance or a class): ``kind`` ``"KTOTrainer"`` or
    ``"DPOTrainer"``, ``how`` ``"trl"`` (every method TRL's own) or ``"overridden"`` (a class outside
    TRL redefines one, named in the third element); ``None`` when it has neither layout."""
    cls = trainer if isinstance(trainer, type) else type(trainer)
    for kind, companions in INLINE_KINDS.items():
        names = {_LOSS[0]: _LOSS[1], **companions}
        found = {name: method_layout(cls, name, params, ()) for name, params in names.items()}
        if None in found.values() or _uses_fused_head(cls):
            continue
        if kind == "DPOTrainer" and callable(getattr(cls, "_compute_kl_logps", None)):
            continue  # KTO's layout, already refused above for another reason
        overridden = [name for name, how in found.items() if how == "overridden"]
        return (kind, "overridden", overridden) if overridden else (kind, "trl", [])
    return None


def is_inline_trainer(trainer):
    """True when ``trainer`` (an instance or a class) has TRL 1.9–1.14's inline layout with TRL's
    own methods (module docstring)."""
    found = inline_layout(trainer)
    return found is not None and found[1] == "trl"
