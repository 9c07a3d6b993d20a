"""The token stage's input in the loss modules: a logits tensor, or the LM head's
``(hidden, weight, bias)`` triple whose logits are never materialized.

Shared by :class:`~pyfused_po.FusedPreferenceLoss`, :class:`~pyfused_po.FusedKTOLoss`
and their packed paths (:mod:`pyfused_po.sequence.packed_columns`), so that the keyword rules of
``forward`` (exactly one of ``logits=`` / ``hidden=``; ``ref_hidden=`` shares the policy's
head unless ``ref_weight=`` is given) and the token-stage dispatch are written once.
"""
import torch

from ..token.linear_token_logprobs import linear_token_logprobs
from ..token.token_logprobs import TokenLogprobs, check_batch_invariant, token_logprobs
from ..validation import check_flag, check_tensor


def resolve_sources(owner, logits, hidden, weight, bias, ref_logits, ref_hidden, ref_weight, ref_bias):
    """``(policy source, reference source or None)`` from a ``forward``'s keyword arguments.

    A source is a logits tensor or ``(hidden, weight, bias)``.  The reference triple is
    detached (forward only); without ``ref_weight`` it uses the policy's head (frozen under
    LoRA).  ``owner`` names the module in the error messages.
    """
    if (logits is None) == (hidden is None):
        raise ValueError(f"{owner}.forward needs exactly one of logits= or hidden= "
                         f"(got {'both' if logits is not None else 'neither'})")
    if hidden is None and (weight is not None or bias is not None):
        raise ValueError("weight=/bias= go with hidden=, not with logits=")
    if hidden is not None and weight is None:
        raise ValueError("hidden= needs weight= (the LM head, [vocab, hidden_dim])")
    if ref_logits is not None and ref_hidden is not None:
        raise ValueError("pass one reference source, not both: got ref_logits and ref_hidden")
    if ref_hidden is None and (ref_weight is not None or ref_bias is not None):
        raise ValueError("ref_weight=/ref_bias= go with ref_hidden=")
    policy = logits if hidden is None else (hidden, weight, bias)
    reference = ref_logits
    if ref_hidden is not None:
        if ref_weight is None and weight is None:
            raise ValueError("ref_hidden= needs ref_weight= (or weight= to share the head)")
        if ref_weight is None and ref_bias is not None:
            # Without ref_weight the reference shares the policy's head and bias: a lone ref_bias would be ignored.
            raise ValueError("ref_bias= goes with ref_weight= (without ref_weight the reference uses the "
                             "policy's weight and bias)")
        head, head_bias = (weight, bias) if ref_weight is None else (ref_weight, ref_bias)
        reference = (ref_hidden.detach() if isinstance(ref_hidden, torch.Tensor) else ref_hidden,
                     head.detach() if isinstance(head, torch.Tensor) else head,
                     head_bias.detach() if isinstance(head_bias, torch.Tensor) else head_bias)
    return policy, reference


def check_invariant_options(owner, batch_invariant, parallel, *, expo=False):
    """A loss module's ``batch_invariant`` as a bool, refused (``ValueError``, at construction) with
    vocabulary parallelism and with ``expo`` (the KL kernel has no invariant mode)."""
    flag = check_flag("batch_invariant", batch_invariant)
    check_batch_invariant(owner, flag, vocab_parallel=parallel.vocab_parallel)
    if flag and expo:
        raise ValueError(f"{owner}: batch_invariant=True is not available with loss_type 'expo' (its KL kernel "
                         "has no batch-invariant mode)")
    return flag


def check_head_shapes(source, labels, prefix=""):
    """Shape checks of a ``(hidden, weight, bias)`` source against ``labels`` before any kernel:
    ``hidden`` ``labels.shape + (D,)``, ``weight`` ``[V, D]``, ``bias`` ``[V]``.  ``prefix``
    (``"ref_"``) names the reference's arguments.  A logits source passes unchecked here."""
    if not isinstance(source, tuple):
        return
    hidden, weight, bias = source
    names = (prefix + "hidden", prefix + "weight", prefix + "bias")
    check_tensor(names[0], hidden, floating=True, min_dim=2)
    check_tensor(names[1], weight, floating=True)
    if weight.dim() != 2:
        raise ValueError(f"{names[1]} must be [vocab, hidden_dim] (2-D), got shape {tuple(weight.shape)}")
    if tuple(hidden.shape[:-1]) != tuple(labels.shape) or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"{names[0]} must have shape labels.shape + (hidden_dim,) = {tuple(labels.shape)} + "
                         f"({weight.shape[1]},) with {names[1]} {tuple(weight.shape)}, got {tuple(hidden.shape)}")
    if bias is not None:
        check_tensor(names[2], bias, floating=True)
        if tuple(bias.shape) != (weight.shape[0],):
            raise ValueError(f"{names[2]} must have shape ({weight.shape[0]},) ({names[1]}.shape[0]), "
                             f"got {tuple(bias.shape)}")


def run_token_stage(module, source, labels, *, extras=(), inplace=False, token_kwargs=None) -> TokenLogprobs:
    """The one call into the token stage for a loss ``module`` (its ``parallel`` options,
    ``linear_impl`` and ``token_kwargs``, the latter overridable): vocabulary-parallel,
    fused-linear for a ``(hidden, weight, bias)`` source, or on logits; ``module.batch_invariant``
    (when set) goes to the token stage."""
    token_kwargs = module.token_kwargs if token_kwargs is None else token_kwargs
    if getattr(module, "batch_invariant", False):
        token_kwargs = dict(token_kwargs, batch_invariant=True)
    if module.parallel.vocab_parallel:
        out = module.parallel.token_stage(source, labels, extras=extras, inplace=inplace, token_kwargs=token_kwargs)
    elif isinstance(source, tuple):
        hidden, weight, bias = source
        out = linear_token_logprobs(hidden, weight, labels, bias=bias, impl=getattr(module, "linear_impl", "auto"),
                                    extras=tuple(extras), **token_kwargs)
    else:
        out = token_logprobs(source, labels, inplace_backward=inplace, extras=tuple(extras), **token_kwargs)
    return out if extras else TokenLogprobs(out)
