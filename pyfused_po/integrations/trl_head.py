"""Where TRL put its fused LM head on a model, and with which settings.

``trl.trainer.utils.add_fused_lm_head(model, temperature, cast_lm_head_to_fp32, outputs)``
(TRL >= 1.15) replaces ``model.forward`` by a closure over those three settings; the
trainers call ``model(..., labels=labels, fused_lm_head=True)``.  To replace that forward
by pyfused_po's without changing what the trainer computes, the settings are read back
from the closure (TRL keeps no other record of them), and the forward is installed on the
same module TRL patched: the causal LM itself, never a distributed wrapper around it.
"""
import torch

from .trl_patch_state import PATCH_MARK, innermost_patch, installed_patch, trl_closure

__all__ = ["PATCH_MARK", "head_owner", "trl_head_settings"]
_SETTINGS = ("temperature", "cast_lm_head_to_fp32", "outputs")
# Wrappers that keep the causal LM as ``.module`` and call its forward from their own.
_WRAPPERS = ("FullyShardedDataParallel", "DistributedDataParallel", "DataParallel", "DeepSpeedEngine")


def head_owner(model):
    """The module whose ``forward`` TRL patched: ``model`` without FSDP1 / DDP / DeepSpeed wrappers,
    and the base model under a PEFT wrapper.

    FSDP1's ``FullyShardedDataParallel`` holds flattened shards outside its own forward: a fused
    forward installed on the wrapper would read a 1-D shard as the LM head.  Installed on the
    wrapped module, it runs inside the wrapper's forward, with the parameters unsharded.
    """
    seen = set()
    while type(model).__name__ in _WRAPPERS and isinstance(getattr(model, "module", None), torch.nn.Module):
        if id(model) in seen:
            break
        seen.add(id(model))
        model = model.module
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def require_causal_lm(model, who):
    """``TypeError`` unless ``model`` (unwrapped by :func:`head_owner`) is a Transformers-style causal
    LM: a ``config`` and an output embedding with a ``weight`` (the LM head the patch computes with; under
    ZeRO-3 it is a partitioned, empty tensor outside the forward, so its shape is not checked here)."""
    head = getattr(model, "get_output_embeddings", lambda: None)()
    weight = getattr(head, "weight", None)
    if getattr(model, "config", None) is None or not isinstance(weight, torch.Tensor):
        raise TypeError(
            f"{who} takes a Transformers causal LM (a config and get_output_embeddings() returning the LM "
            f"head), a PEFT model or an FSDP1 / DDP wrapper around one, or a TRL trainer; got "
            f"{type(model).__name__}, which has no such head")


def trl_head_settings(model):
    """``dict(temperature=, cast_lm_head_to_fp32=, outputs=)`` of the fused head on ``model``.

    Read from the forward the module runs now (also inside ``accelerate``'s autocast wrapper,
    which keeps the wrapped one as ``_original_forward``): TRL's ``add_fused_lm_head`` closure, or
    the state of a forward :func:`pyfused_po.integrations.trl.patch_model` installed.  When TRL
    patched the module again after pyfused_po did, TRL's new settings are the ones returned.
    ``None`` when neither patched it.
    Raises ``RuntimeError`` when TRL's forward is there but its settings cannot be read (a TRL
    release whose closure differs): switching it would silently change them.
    """
    target = head_owner(model)
    ours = installed_patch(target)
    if ours is not None:
        return ours.settings()
    for candidate in (vars(target).get("forward"), vars(target).get("_original_forward")):
        inner = innermost_patch(candidate)[0] if candidate is not None else None
        cells = trl_closure(inner) if inner is not None else None
        if cells is None:
            continue
        missing = [k for k in _SETTINGS if k not in cells]
        if missing:
            raise RuntimeError(f"{type(target).__name__}.forward is TRL's fused LM head, but its settings {missing} "
                               "cannot be read from it (a TRL release pyfused_po does not know); pass them to "
                               "pyfused_po.integrations.trl.patch_model explicitly")
        settings = {k: cells[k] for k in _SETTINGS}
        settings["temperature"] = float(settings["temperature"])
        settings["cast_lm_head_to_fp32"] = bool(settings["cast_lm_head_to_fp32"])
        settings["outputs"] = tuple(settings["outputs"])
        return settings
    return None
