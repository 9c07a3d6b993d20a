"""pyfused_po through its public API: the module's default fused-linear plan
(``FusedPreferenceLoss(hidden=, weight=)``), the head ``apply(DPOTrainer)`` patches in (DPO's
outputs), the logits path (``FusedPreferenceLoss``), its in-place-backward variant, and the staged
fused-linear path (``linear_token_logprobs`` + ``preference_loss``)."""
import inspect

from ..reference import BETA
from .base import Method


def _backend(device):
    # Triton on CUDA; the chunked PyTorch backend on the CPU (never the interpreter here).
    return "auto" if device.type == "cuda" else "torch"


def _logits_builder(inplace):
    def build(case, device):
        import pyfused_po

        module = pyfused_po.FusedPreferenceLoss(
            loss_type="sigmoid", beta=BETA, backend=_backend(device), inplace_backward=inplace,
            logit_metrics=False)

        def loss_fn(inp):
            return module(logits=inp.logits, labels=inp.labels, ref_chosen_logps=inp.ref_chosen,
                          ref_rejected_logps=inp.ref_rejected).loss
        return loss_fn
    return build


def _linear_fn():
    """``linear_token_logprobs`` from the package, or ``None`` when this version lacks it."""
    try:
        import pyfused_po
    except ImportError:
        return None
    fn = getattr(pyfused_po, "linear_token_logprobs", None)
    if not callable(fn):  # absent, or the submodule of the same name (not yet exported)
        try:
            from pyfused_po.token.linear_token_logprobs import linear_token_logprobs as fn
        except ImportError:
            return None
    return fn


def _linear_probe(impl):
    def probe():
        fn = _linear_fn()
        if fn is None:
            return "not in this pyfused_po version"
        if impl is not None and "impl" not in inspect.signature(fn).parameters:
            return f"no impl={impl!r} in this pyfused_po version"
        return None
    return probe


def _linear_builder(impl):
    def build(case, device):
        import pyfused_po

        fn = _linear_fn()
        kwargs = {"backend": _backend(device)}
        if impl is not None:
            kwargs["impl"] = impl

        def loss_fn(inp):
            logps = fn(inp.hidden, inp.weight, inp.labels, **kwargs)
            sums = logps.reshape(2 * case.pairs, -1).sum(-1)
            return pyfused_po.preference_loss(
                sums[:case.pairs], sums[case.pairs:], inp.ref_chosen, inp.ref_rejected,
                loss_type="sigmoid", beta=BETA).loss
        return loss_fn
    return build


# The outputs TRL's DPOTrainer asks of the fused LM head (trl/trainer/dpo_trainer.py, 1.16), as
# pyfused_po's extras: what apply(DPOTrainer)'s patched head computes in each step.
DPO_EXTRAS = ("entropy", "mean_logit", "is_top1")


def _module_linear_builder(case, device):
    """``FusedPreferenceLoss(hidden=, weight=)`` as constructed by default: its default plan
    (three GEMMs for a trainable head, two for a frozen one) and ``logit_metrics``."""
    import pyfused_po

    module = pyfused_po.FusedPreferenceLoss(loss_type="sigmoid", beta=BETA, backend=_backend(device))

    def loss_fn(inp):
        return module(hidden=inp.hidden, weight=inp.weight, labels=inp.labels, ref_chosen_logps=inp.ref_chosen,
                      ref_rejected_logps=inp.ref_rejected).loss
    return loss_fn


def _apply_dpo_builder(case, device):
    """What ``apply(DPOTrainer)`` runs per step without ``use_preference_loss``: the patched head
    (``linear_token_logprobs`` with DPO's outputs, default impl) and the DPO loss on its sums."""
    import pyfused_po

    def loss_fn(inp):
        out = pyfused_po.linear_token_logprobs(inp.hidden, inp.weight, inp.labels, extras=DPO_EXTRAS,
                                               backend=_backend(device))
        sums = out.logps.reshape(2 * case.pairs, -1).sum(-1)
        return pyfused_po.preference_loss(sums[:case.pairs], sums[case.pairs:], inp.ref_chosen,
                                          inp.ref_rejected, loss_type="sigmoid", beta=BETA).loss
    return loss_fn


def _pkg_probe():
    try:
        import pyfused_po  # noqa: F401
    except ImportError as err:
        return f"import failed: {err}"
    return None


METHODS = [
    Method("pyfused_module_linear", "pyfused_po FusedPreferenceLoss(hidden=, weight=) (default plan)", "linear",
           _module_linear_builder, probe=_pkg_probe),
    Method("pyfused_apply_dpo", "pyfused_po apply(DPOTrainer) head (DPO's outputs)", "linear",
           _apply_dpo_builder, probe=_linear_probe(None)),
    Method("pyfused", "pyfused_po", "logits", _logits_builder(False), probe=_pkg_probe),
    Method("pyfused_inplace", "pyfused_po (in-place bwd)", "logits", _logits_builder(True),
           probe=_pkg_probe, destroys_inputs=True,
           note="gradient written into the logits' storage; timed reps see the overwritten logits"),
    Method("pyfused_linear", "pyfused_po linear (chunked)", "linear", _linear_builder("chunked"),
           probe=_linear_probe("chunked")),
    Method("pyfused_linear_fused", "pyfused_po linear (fused)", "linear", _linear_builder("fused"),
           probe=_linear_probe("fused"), cuda_only=True),
]
