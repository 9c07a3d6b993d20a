"""Token stage, logits path: ``token_logprobs`` and its autograd Function."""
import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .. import _backend, _dispatch
from .packed_layout import run_packed
from .autograd_guard import first_derivative_only
from ..validation import (
    as_number,
    check_finite_nonzero,
    check_flag,
    check_label_range,
    check_inplace_target,
    check_positive,
    check_same_device,
    check_tensor,
    checked_labels,
)

EXTRA_NAMES = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
_DIFFERENTIABLE_EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logit")


class TokenLogprobs(NamedTuple):
    """Per-token results shaped like ``labels``; extras not asked for are ``None``.

    * ``logps`` — log p(label) under the transformed logits (0 where ignored);
    * ``entropy`` — −Σ_v p_v log p_v;
    * ``log_sum_sq_probs`` — log Σ_v p_v² (WPO's weights);
    * ``mean_logit`` — mean over the vocabulary of the transformed logits;
    * ``is_top1`` — 1.0 where the label is the row's ``argmax`` (of tied largest logits the
      lowest id, as ``torch.argmax``, Hugging Face and TRL's accuracy resolve it), else 0.0.
    """

    logps: torch.Tensor
    entropy: Optional[torch.Tensor] = None
    log_sum_sq_probs: Optional[torch.Tensor] = None
    mean_logit: Optional[torch.Tensor] = None
    is_top1: Optional[torch.Tensor] = None


@dataclass(frozen=True)
class TokenConfig:
    """Everything about the token stage that is not a tensor."""

    ignore_index: int = -100
    shift: bool = False
    temperature: float = 1.0
    logit_scale: float = 1.0
    softcap: Optional[float] = None
    extras: tuple = ()
    block_v: Optional[int] = None
    batch_invariant: bool = False

    def kernel_kwargs(self):
        kw = dict(ignore_index=self.ignore_index, shift=self.shift, temperature=self.temperature,
                  logit_scale=self.logit_scale, softcap=self.softcap, block_v=self.block_v)
        if self.batch_invariant:  # only the token folds take it (not the KL kernels, which refuse it)
            kw["batch_invariant"] = True
        return kw


def _rows_view(labels):
    """(B, T) such that labels are ``[B, T]`` rows of sequences (last dim is the sequence)."""
    return math.prod(labels.shape[:-1]), labels.shape[-1]


def logits_view(logits, B, T, *, inplace=False):
    """``[B, T, V]`` view of ``logits`` without copying where strides allow it."""
    V = logits.shape[-1]
    try:
        return logits.view(B, T, V)
    except RuntimeError:
        if inplace:
            raise ValueError(
                "inplace_backward=True needs logits whose leading dimensions can be viewed as "
                f"[batch, seq] without a copy; got shape {tuple(logits.shape)} with strides "
                f"{logits.stride()}. Pass a contiguous tensor or inplace_backward=False."
            ) from None
        return logits.reshape(B, T, V)


def gradient_buffer(logits, B, T):
    """An uninitialized gradient for ``logits`` that views as ``[B, T, V]``: the logits' own
    layout where it can (``empty_like``), contiguous where their leading dimensions cannot
    merge into one stride (the forward then read a reshaped copy)."""
    grad = torch.empty_like(logits)
    try:
        grad.view(B, T, logits.shape[-1])
    except RuntimeError:
        grad = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    return grad


class TokenLogprobsFunction(torch.autograd.Function):
    """Per-token log-probs (and extras) with the hand-written backward of the token stage.

    ``forward(logits, labels, config, backend, inplace_backward)`` returns
    ``(logps, *extras)`` in the order of ``config.extras``.
    """

    @staticmethod
    def forward(ctx, logits, labels, config: TokenConfig, backend: str, inplace_backward: bool):
        ops = _backend.token_ops(backend)
        B, T = _rows_view(labels)
        x3 = logits_view(logits, B, T, inplace=inplace_backward)
        y2 = labels.reshape(B, T)
        logp, lse, outs = ops.token_forward(x3, y2, extras=config.extras, **config.kernel_kwargs())
        results = [logp] + [outs[name] for name in config.extras]
        results = [r.view(labels.shape) for r in results]
        ctx.config, ctx.backend, ctx.inplace = config, backend, inplace_backward
        ctx.rows = (B, T)
        saved = [outs.get(n) for n in ("entropy", "log_sum_sq_probs")]
        ctx.save_for_backward(logits, y2, lse, *[s for s in saved if s is not None])
        ctx.saved_names = [n for n, s in zip(("entropy", "log_sum_sq_probs"), saved) if s is not None]
        if "is_top1" in config.extras:
            ctx.mark_non_differentiable(results[1 + config.extras.index("is_top1")])
        ctx.set_materialize_grads(False)
        return tuple(results)

    @staticmethod
    @first_derivative_only("token_logprobs")
    def backward(ctx, grad_logp, *grad_extras):
        logits, y2, lse, *saved = ctx.saved_tensors
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        grad_logits = run_token_backward(logits, y2, lse, dict(zip(ctx.saved_names, saved)), grad_logp,
                                         grad_extras, ctx.config, ctx.backend, ctx.inplace, ctx.rows)
        return grad_logits, None, None, None, None


def run_token_backward(logits, y2, lse, saved, grad_logp, grad_extras, config: TokenConfig, backend, inplace,
                       rows, *, vocab_shard=False, mean_grad_scale=1.0):
    """The token stage's backward from the upstream gradients of ``(logps, *extras)``:
    the logits' gradient (written into ``logits`` itself when ``inplace``), or ``None``
    when no gradient flows.  ``saved`` holds the forward's ``entropy`` / ``log_sum_sq_probs``
    when those extras were computed.  ``vocab_shard`` / ``mean_grad_scale``: the
    vocabulary-parallel form (a slice of the vocabulary; the mean is over the full one)."""
    B, T = rows
    named = dict(zip(config.extras, grad_extras))

    def flat(g):  # upstream gradients as [B, T] contiguous in the compute dtype
        return None if g is None else g.reshape(B, T).to(lse.dtype).contiguous()

    grad_mean = flat(named.get("mean_logit"))
    grads = {
        "grad_logp": flat(grad_logp),
        "grad_entropy": flat(named.get("entropy")),
        "grad_log_sum_sq_probs": flat(named.get("log_sum_sq_probs")),
        "grad_mean_logit": None if grad_mean is None else grad_mean * mean_grad_scale,
    }
    if all(g is None for g in grads.values()):
        return None
    grad_logits = logits if inplace else gradient_buffer(logits, B, T)
    kw = dict(vocab_shard=True) if vocab_shard else {}
    _backend.token_ops(backend).token_backward(
        logits_view(logits, B, T), y2, lse, logits_view(grad_logits, B, T, inplace=True),
        entropy=saved.get("entropy"), log_sum_sq_probs=saved.get("log_sum_sq_probs"),
        **grads, **config.kernel_kwargs(), **kw,
    )
    if inplace:
        # The kernel wrote into the logits behind autograd's back: bump their version so that
        # any other op that saved them (e.g. a z-loss) fails its saved-tensor check instead of
        # silently reading the gradient as logits.
        torch.autograd.graph.increment_version(logits)
    return grad_logits


def make_token_config(ignore_index, shift, temperature, logit_scale, softcap, extras,
                      batch_invariant=False) -> TokenConfig:
    """The :class:`TokenConfig` of a public entry point's keywords (``extras`` may be one name)."""
    extras = tuple(extras) if not isinstance(extras, str) else (extras,)
    return TokenConfig(ignore_index=as_number("ignore_index", ignore_index), shift=bool(shift),
                       temperature=as_number("temperature", temperature),
                       logit_scale=as_number("logit_scale", logit_scale), softcap=as_number("softcap", softcap),
                       extras=extras, batch_invariant=check_flag("batch_invariant", batch_invariant))


def check_batch_invariant(entry, batch_invariant, *, vocab_parallel=False):
    """``batch_invariant=True`` where it cannot hold raises before any launch: a vocabulary-parallel
    row combines per-rank statistics through a collective, and under ``torch.compile`` the token
    stage is a custom op that does not carry the option."""
    if not batch_invariant:
        return
    if vocab_parallel:
        raise ValueError(f"{entry}: batch_invariant=True is not available with vocab_parallel_group / "
                         "vocab_start (the per-rank statistics are combined by a collective)")
    if torch.compiler.is_compiling():
        raise ValueError(f"{entry}: batch_invariant=True is not available under torch.compile (the compiled "
                         "token stage does not carry it); call it eagerly")


def pack_results(results, extras):
    """``(logps, *extras)`` → the public result: a tensor, or :class:`TokenLogprobs` with extras."""
    if not extras:
        return results[0]
    return TokenLogprobs(results[0], **dict(zip(extras, results[1:])))


def validate_token_config(config: TokenConfig):
    """Checks of the token stage's options, shared by the logits and fused-linear paths."""
    check_positive("temperature", config.temperature)
    check_finite_nonzero("logit_scale", config.logit_scale)
    check_positive("softcap", config.softcap, allow_none=True)
    unknown = [e for e in config.extras if e not in EXTRA_NAMES]
    if unknown:
        raise ValueError(f"unknown extras {unknown}; valid extras are {list(EXTRA_NAMES)}")
    if len(set(config.extras)) != len(config.extras):
        raise ValueError(f"extras must not repeat a name, got {list(config.extras)}")
    if isinstance(config.ignore_index, bool) or not isinstance(config.ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {config.ignore_index!r}")


def resolve_backend(backend: str, x: torch.Tensor, name: str) -> str:
    """``backend`` resolved for input ``x``; float64 inputs go to the exact torch backend."""
    resolved = _backend.resolve(backend, x)
    if backend == "auto" and x.dtype == torch.float64:
        resolved = "torch"  # the kernels compute in fp32; keep float64 inputs exact
    if resolved == "triton" and x.dtype == torch.float64:
        raise TypeError(f"backend='triton' computes in float32 and takes float16/bfloat16/float32 "
                        f"{name}, got float64; use backend='torch' for float64")
    return resolved


def validate_token_inputs(logits, labels, config: TokenConfig, backend: str):
    """Checks shared by every token-stage entry point; returns the resolved backend."""
    check_tensor("logits", logits, floating=True, min_dim=2)
    check_tensor("labels", labels, floating=False, min_dim=1)
    check_same_device(logits=logits, labels=labels)
    if tuple(logits.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"logits must have shape labels.shape + (vocab,) = {tuple(labels.shape)} + (V,), "
            f"got logits {tuple(logits.shape)} and labels {tuple(labels.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError("logits must have a vocabulary dimension of size >= 1, got 0")
    validate_token_config(config)
    resolved = resolve_backend(backend, logits, "logits")
    check_label_range(labels, logits.shape[-1], config.ignore_index)
    return resolved


def token_logprobs(logits, labels, *, ignore_index=-100, shift=False, temperature=1.0,
                   logit_scale=1.0, softcap=None, extras=(), inplace_backward=False,
                   backend="auto", vocab_parallel_group=None, vocab_start=None, cu_seqlens=None,
                   position_ids=None, batch_invariant=False):
    """Per-token ``log softmax(z)[label]`` of logits ``[..., V]``, fused, without an fp32 copy.

    ``z = softcap(logits · logit_scale) / temperature`` with ``softcap(u) = c·tanh(u/c)``
    (Gemma-style, off when ``softcap=None``).  Tokens whose label is ``ignore_index``
    give 0 and their logits are never read.  With ``shift=True`` the logits at
    position ``t`` predict the label at ``t + 1`` (Hugging Face causal-LM layout) and
    the result is aligned with ``labels``: position 0 has no prediction and gives 0.

    Args:
        logits: ``[..., T, V]`` float16/bfloat16/float32 (float64 on the torch backend),
            any strides.
        labels: ``[..., T]`` integer token ids.
        extras: names from ``("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")``
            computed in the same pass; each is differentiable except ``is_top1``.
        inplace_backward: write the logits' gradient into the logits' own storage
            (no ``[N, V]`` allocation in the backward).  Only safe when nothing else
            needs the logits' values after this call's backward starts.
        backend: ``"auto"`` (Triton for CUDA tensors or under ``TRITON_INTERPRET=1``),
            ``"triton"`` or ``"torch"`` (chunked PyTorch).
        vocab_parallel_group, vocab_start: ``logits`` is this rank's vocabulary slice
            ``[vocab_start, vocab_start + V_r)`` of a vocabulary sharded over the process
            group (labels are full-vocabulary ids): one all-gather per forward, none in the
            backward (:func:`pyfused_po.distributed.vocab_parallel_token_logprobs`).
        cu_seqlens, position_ids: a packed stream (``logits`` ``[1, N, V]`` or ``[N, V]``) of
            sequences delimited by ``cu_seqlens`` ``[S + 1]`` or by ``position_ids`` restarting
            at 0; ``shift`` then stays inside each sequence (:mod:`pyfused_po.token.packed_layout`).
        batch_invariant: a row's log-prob, extras and gradient row are bitwise the same whatever
            else is in the batch and wherever the row sits: the Triton kernels reduce each row alone
            with a split that does not depend on its position (``kernels.token_launch.invariant_layout``),
            the PyTorch backend in fixed 128-row tiles (:mod:`pyfused_po.token.torch_backend.invariant_tiles`).
            Not with ``vocab_parallel_group`` nor under ``torch.compile`` (``ValueError``).

    Returns:
        float32 log-probs shaped like ``labels`` (float64 for float64 logits on the torch
        backend); with ``extras``, a :class:`TokenLogprobs` holding them too.
    """
    if cu_seqlens is not None or position_ids is not None:
        return run_packed(lambda y, s: token_logprobs(
            logits, y, ignore_index=ignore_index, shift=s, temperature=temperature, logit_scale=logit_scale,
            softcap=softcap, extras=extras, inplace_backward=inplace_backward, backend=backend,
            vocab_parallel_group=vocab_parallel_group, vocab_start=vocab_start, batch_invariant=batch_invariant),
            labels, cu_seqlens=cu_seqlens, position_ids=position_ids, shift=shift, ignore_index=ignore_index)
    check_batch_invariant("token_logprobs", batch_invariant,
                          vocab_parallel=vocab_parallel_group is not None or vocab_start is not None)
    if vocab_parallel_group is not None or vocab_start is not None:
        vocab_parallel_token_logprobs = _dispatch.entry("vocab_parallel_token_logprobs")  # pyfused_po.distributed
        return vocab_parallel_token_logprobs(
            logits, labels, group=vocab_parallel_group, vocab_start=vocab_start, ignore_index=ignore_index,
            shift=shift, temperature=temperature, logit_scale=logit_scale, softcap=softcap, extras=extras,
            inplace_backward=inplace_backward, backend=backend)
    config = make_token_config(ignore_index, shift, temperature, logit_scale, softcap, extras, batch_invariant)
    labels = checked_labels("labels", labels, config.ignore_index)
    resolved = validate_token_inputs(logits, labels, config, backend)
    if inplace_backward:
        check_inplace_target("logits", logits)
    if torch.compiler.is_compiling():
        # Under torch.compile the token stage is an opaque custom op pair (no graph break);
        # the compiled graph owns its buffers, so the in-place backward does not apply.
        compiled_token_logprobs = _dispatch.entry("compiled_token_logprobs")  # pyfused_po.token.ops
        results = compiled_token_logprobs(logits, labels, config, resolved)
    else:
        results = TokenLogprobsFunction.apply(logits, labels, config, resolved, bool(inplace_backward))
    return pack_results(results, config.extras)
