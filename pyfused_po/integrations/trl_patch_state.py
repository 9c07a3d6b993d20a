"""The state of a forward that :func:`pyfused_po.integrations.trl.patch_model` installs, kept
with the module the forward runs on.

Two rules make a patched model behave like a plain one when it is patched again or copied:

* **The state belongs to the forward that is installed now.**  TRL's trainers patch a model
  again when a second trainer is built on it (``SFTTrainer`` then ``GRPOTrainer(temperature=0.7)``):
  TRL's new forward then wraps ours.  Our settings count only while our forward is the one the
  module runs (:func:`installed_patch`); otherwise TRL's closure is read again, so every
  :func:`~pyfused_po.integrations.trl.apply` takes the settings TRL gave last.
* **Nothing refers to the module it was installed on.**  The forward is a plain function bound
  to the module (``types.MethodType``); it reads its settings from ``self`` and calls the plain
  (non-fused) forward it replaced, stored as the class's forward bound to the same module.
  ``copy.deepcopy(model)`` copies the module's ``__dict__``, which re-binds both to the copy,
  so the copy computes with its own weights.  TRL's own fused forward (a closure over
  ``original_forward``, the module it patched) and forwards of ours left inside it are
  looked through when the plain forward is resolved (:func:`plain_forward`), so no closure
  over the original module stays on the call path.
"""
import copy
import dataclasses
import functools
import inspect
import types
from typing import Callable, Optional, Tuple

__all__ = ["PATCH_MARK", "PatchState", "innermost_patch", "install_patch", "installed_patch", "patch_state",
           "plain_forward", "trl_closure"]

# Attribute of the patched module holding its PatchState.
PATCH_MARK = "_pyfused_po_fused_forward"
# Code name of the function install_patch binds to a module (wrappers copy a function's __dict__,
# never its code, so the code identifies ours as TRL's is identified).
_OURS = "_pyfused_po_forward"


@dataclasses.dataclass(eq=False)
class PatchState:
    """Settings of one installed fused forward (TRL's ``add_fused_lm_head`` arguments plus ours)
    and the plain forward it replaced."""

    outputs: Tuple[str, ...]
    temperature: float
    cast_lm_head_to_fp32: bool
    backend: str
    linear_impl: str
    autocast: Optional[Callable]  # e.g. accelerator.autocast: shared by copies, like the accelerator
    previous: Callable  # the plain forward (no fused_lm_head), bound to the patched module
    previous_context: Optional[Callable] = None  # autocast of an accelerate wrapper looked through
    truncation: Optional[dict] = None  # a sampler's top_k / top_p / min_p / sampler_order (truncated_support)

    def settings(self):
        return dict(temperature=self.temperature, cast_lm_head_to_fp32=self.cast_lm_head_to_fp32,
                    outputs=self.outputs)

    def __deepcopy__(self, memo):
        # Called while the module holding this state is copied (already in memo): the bound plain
        # forward re-binds to the copy; the autocast callables are the trainer's and stay shared.
        return dataclasses.replace(self, previous=copy.deepcopy(self.previous, memo))


def _function(fn):
    return getattr(fn, "__func__", fn)


def _is_ours(fn):
    code = getattr(_function(fn), "__code__", None)
    return code is not None and code.co_name == _OURS and code.co_filename == __file__


def trl_closure(fn):
    """The closure cells of TRL's ``add_fused_lm_head`` forward ``fn`` (by name), else ``None``."""
    func = _function(fn)
    code = getattr(func, "__code__", None)
    if code is None or code.co_name != "_fused_forward" or func.__closure__ is None:
        return None
    return {name: cell.cell_contents for name, cell in zip(code.co_freevars, func.__closure__)}


def innermost_patch(fn):
    """``(function, looked_through)``: ``fn``'s function with wrappers (accelerate's autocast and
    fp32-output wrappers, which keep ``__wrapped__``) removed down to one of ours or TRL's; ``None``
    when there is neither inside."""
    start = _function(fn)
    if not callable(start):
        return None, False
    inner = inspect.unwrap(start, stop=lambda f: _is_ours(f) or trl_closure(f) is not None)
    if _is_ours(inner) or trl_closure(inner) is not None:
        return inner, inner is not start
    return None, False


def _current_forwards(module):
    """The forwards the module runs now: its own ``forward`` attribute, then the one accelerate's
    mixed-precision ``prepare`` kept as ``_original_forward``."""
    own = vars(module)
    return [f for f in (own.get("forward"), own.get("_original_forward")) if f is not None]


def installed_patch(module):
    """``module``'s :class:`PatchState` when our forward is the one it runs (possibly inside an
    accelerate wrapper); ``None`` when it runs another forward (e.g. TRL patched it again)."""
    for fn in _current_forwards(module):
        inner, _ = innermost_patch(fn)
        if inner is not None:
            return vars(module).get(PATCH_MARK) if _is_ours(inner) else None
    return None


def patch_state(module):
    state = vars(module).get(PATCH_MARK)
    if state is None:
        raise RuntimeError(f"{type(module).__name__} runs pyfused_po's fused forward but holds no patch state "
                           f"({PATCH_MARK}); patch it with pyfused_po.integrations.trl.patch_model")
    return state


def plain_forward(module):
    """``(forward, context)``: the forward ``module`` runs without ``fused_lm_head``, with TRL's
    fused forwards and ours looked through, bound to ``module``; ``context`` is True when an
    accelerate wrapper was looked through (its autocast is then the patch's ``autocast``)."""
    fn = vars(module).get("forward") or module.forward
    looked_through = False
    for _ in range(64):  # each step removes one patch layer; more means a cycle
        inner, wrapped = innermost_patch(fn)
        if inner is None:
            return fn, looked_through
        looked_through |= wrapped
        if _is_ours(inner):
            fn = patch_state(module).previous
            looked_through |= patch_state(module).previous_context is not None
        else:
            fn = trl_closure(inner)["original_forward"]
    raise RuntimeError(f"{type(module).__name__}.forward: the chain of fused-head patches does not end")


def install_patch(module, state, impl):
    """Install ``impl(self, *args, **kwargs)`` as ``module.forward`` with ``state``.  The installed
    function keeps the class forward's signature (``generate`` validates its kwargs against it)."""

    def _pyfused_po_forward(self, *args, **kwargs):
        return impl(self, *args, **kwargs)

    forward = functools.wraps(type(module).forward)(_pyfused_po_forward)
    module.forward = types.MethodType(forward, module)
    setattr(module, PATCH_MARK, state)
