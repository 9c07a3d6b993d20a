"""Token stage, fused-linear path: log-probs of ``hidden @ weight.T (+ bias)`` without logits.

``linear_token_logprobs`` has the semantics, extras and result type of
:func:`pyfused_po.token_logprobs` applied to ``logits = hidden @ weight.T + bias``, but
the ``[tokens, vocab]`` logits never exist.  Two implementations share one contract
(``linear_forward`` / ``linear_backward`` over the compacted labelled tokens):

* ``impl="chunked"`` (:mod:`pyfused_po.token.torch_backend.linear`): cuBLAS GEMMs over chunks
  of tokens, each chunk folded by the token kernels (Triton) or by the PyTorch token
  backend (``backend="torch"``, which is the CPU path and the float64 reference).
  Peak extra memory: one ``[C, V]`` chunk.  It is the default because cuBLAS reaches
  the GEMM peak on every shape and the fold reads each chunk once; the extra cost is
  writing and re-reading ``C·V`` logits per pass.
* ``impl="fused"`` (:mod:`pyfused_po.kernels.linear_launch`): Triton kernels that tile
  ``H·Wᵀ`` on-chip with an online log-sum-exp (Cut-Cross-Entropy style); the backward
  recomputes each tile and accumulates ``dH`` and ``dW`` with fp32 atomics.  No
  ``[C, V]`` buffer at all.  Gradients are not bitwise deterministic (atomic order).

Which of the two is faster on a GPU depends on the shape; the benchmark decides the
default (``impl="auto"`` is "chunked" until it does).

The backward is hand-written: ``grad_hidden`` (input dtype; each row's reduction over
the vocabulary runs in fp32 inside the GEMM or kernel), ``grad_weight`` and ``grad_bias``
accumulated in fp32 across chunks / tiles and cast to the parameter dtype at the end.
``grad_weight`` is skipped entirely when ``weight`` does not require grad (frozen LM
head under LoRA), and on the chunked implementation the forward then also forms
``∂ log p/∂h = (W[y] − softmax·W)·dz/dx`` per token (one GEMM while the chunk is in memory)
so the backward is an elementwise scale: two GEMMs per step instead of three
(:func:`frozen_head_plan`; three again when an extra such as entropy receives a gradient).
"""
import torch

from .. import _dispatch
from .._backend import triton_kernels
from .autograd_guard import first_derivative_only
from .grad_filter import resolve_grad_filter, validate_grad_filter
from .mixed_precision import autocast_off, cast_operands, head_matmul_dtype
from .packed_layout import run_packed
from .token_logprobs import (
    TokenConfig,
    check_batch_invariant,
    make_token_config,
    pack_results,
    resolve_backend,
    validate_token_config,
)
from .torch_backend import linear as _chunked
from .torch_backend import token as _torch_fold
from ..validation import as_number, check_label_range, check_same_device, check_tensor, checked_labels

IMPLS = ("auto", "chunked", "fused")


class _Chunked:
    """The chunked algorithm with a given token-stage fold (Triton kernels or PyTorch)."""

    def __init__(self, fold, chunk_tokens):
        self.fold, self.chunk_tokens = fold, chunk_tokens

    def linear_forward(self, *args, **kw):
        return _chunked.linear_forward(*args, fold=self.fold, chunk_tokens=self.chunk_tokens, **kw)

    def linear_backward(self, *args, **kw):
        return _chunked.linear_backward(*args, fold=self.fold, chunk_tokens=self.chunk_tokens, **kw)


def _ops(backend, impl, chunk_tokens):
    """The object providing ``linear_forward`` / ``linear_backward`` for a resolved choice."""
    if backend == "torch":
        return _Chunked(_torch_fold, chunk_tokens)
    kernels = triton_kernels()  # names what is missing (triton, or numpy for the interpreter)
    if impl == "fused":
        from ..kernels import linear_launch

        return linear_launch
    return _Chunked(kernels, chunk_tokens)


_SAVED = ("entropy", "log_sum_sq_probs")


def linear_forward(hidden, weight, bias, labels, config: TokenConfig, backend, impl, chunk_tokens, mm_dtype=None,
                   input_grad_rows=False):
    """The forward on whole tensors: ``(results, lse, index)`` (and ``J [M, D]`` last with
    ``input_grad_rows``: the frozen-head plan of :func:`pyfused_po.token.torch_backend.linear.linear_forward`).

    ``results`` = ``[logp, *extras]`` (``config.extras`` order) are shaped like ``labels`` and
    ``lse`` (the LSE pairs of the token-stage contract) like ``labels.shape + (2,)`` (0 where ignored); ``index`` = ``(rows, pos, targets)`` of the labelled tokens.
    ``mm_dtype``: the GEMMs' operand dtype under autocast (:mod:`pyfused_po.token.mixed_precision`).
    Shared by :class:`LinearTokenLogprobsFunction` (eager) and ``pyfused_po.token.ops`` (compiled).
    """
    ops = _ops(backend, impl, chunk_tokens)
    T = labels.shape[-1]
    index = _chunked.labelled_tokens(_chunked.labels_2d(labels), config.ignore_index, config.shift)
    rows, pos, targets = index
    hidden, weight, bias = cast_operands(mm_dtype, hidden, weight, bias)
    grad_rows = dict(input_grad_rows=True) if input_grad_rows else {}
    with autocast_off(hidden.device.type):
        logp_m, lse_m, outs_m, *J = ops.linear_forward(hidden.reshape(-1, hidden.shape[-1]), weight, bias, rows,
                                                       targets, extras=config.extras, **_kernel_kwargs(config),
                                                       **grad_rows)

    def scatter(v):  # [M] (or [M, 2]: LSE pairs) per labelled token → zeros shaped like labels
        full = torch.zeros(labels.numel(), *v.shape[1:], device=labels.device, dtype=lse_m.dtype)
        full[pos] = v
        return full.view(*labels.shape, *v.shape[1:])

    results = [scatter(logp_m)] + [scatter(outs_m[name]) for name in config.extras]
    if input_grad_rows:
        return results, scatter(lse_m), index, J[0]
    return results, scatter(lse_m), index


def linear_backward(hidden, weight, bias, labels, lse, saved, grads, config: TokenConfig, backend, impl,
                    chunk_tokens, needs, index=None, mm_dtype=None, grad_filter=None):
    """``(grad_hidden, grad_weight, grad_bias)`` (``None`` where not needed) from upstream
    gradients shaped like ``labels``: ``grads`` maps ``logps`` and extras names to tensors
    or ``None``; ``saved`` maps ``entropy`` / ``log_sum_sq_probs`` to the forward's outputs;
    ``needs`` = which of hidden, weight, bias want a gradient; ``index`` as returned by
    :func:`linear_forward` (recomputed from ``labels`` when not given); ``mm_dtype`` as there;
    ``grad_filter``: a resolved threshold (float) for ``impl="fused"``, or ``None``.
    Each gradient comes back in its input's dtype."""
    need_h, need_w, need_b = needs
    if index is None:
        index = _chunked.labelled_tokens(_chunked.labels_2d(labels), config.ignore_index, config.shift)
    rows, pos, targets = index

    def gather(g):  # values at the labelled positions, [M] ([M, 2] for the LSE pairs), compute dtype
        if g is None:
            return None
        return g.reshape(labels.numel(), *g.shape[labels.dim():]).index_select(0, pos).to(lse.dtype).contiguous()

    upstream = dict(grad_logp=gather(grads.get("logps")), grad_entropy=gather(grads.get("entropy")),
                    grad_log_sum_sq_probs=gather(grads.get("log_sum_sq_probs")),
                    grad_mean_logit=gather(grads.get("mean_logit")))
    if not (need_h or need_w or need_b) or all(g is None for g in upstream.values()):
        return None, None, None
    h, w, b = cast_operands(mm_dtype, hidden, weight, bias)
    with autocast_off(hidden.device.type):
        gh, gw, gb = _ops(backend, impl, chunk_tokens).linear_backward(
            h.reshape(-1, h.shape[-1]), w, b, rows, targets, gather(lse),
            entropy=gather(saved.get("entropy")), log_sum_sq_probs=gather(saved.get("log_sum_sq_probs")),
            need_hidden=need_h, need_weight=need_w, need_bias=need_b, **upstream, **_kernel_kwargs(config),
            grad_hidden_dtype=None if mm_dtype is None else hidden.dtype,
            **({} if grad_filter is None else dict(grad_filter=grad_filter)),
        )
    gh = None if gh is None else gh.to(hidden.dtype).view(hidden.shape)
    gw = None if gw is None else gw.to(weight.dtype)
    gb = None if gb is None else gb.to(bias.dtype)
    return gh, gw, gb


def _kernel_kwargs(config: TokenConfig):
    kw = dict(ignore_index=config.ignore_index, temperature=config.temperature,
              logit_scale=config.logit_scale, softcap=config.softcap)
    if config.batch_invariant:
        kw["batch_invariant"] = True
    return kw


def frozen_head_plan(hidden, weight, bias, config: TokenConfig, backend, impl):
    """Whether the two-GEMM frozen-head plan applies: autograd will want ``dH`` only (the head
    and bias frozen, as under LoRA), on the chunked algorithm (the fused Triton kernels keep
    their own backward).  Extras may be requested: when one of them does receive a gradient
    (entropy as a loss term, not only a metric) the backward runs the exact three-GEMM path
    instead, as its gradient rows would need GEMMs of their own."""
    return (torch.is_grad_enabled() and hidden.requires_grad and not weight.requires_grad
            and (bias is None or not bias.requires_grad) and impl == "chunked")


class LinearTokenLogprobsFunction(torch.autograd.Function):
    """``forward(hidden, weight, bias, labels, config, backend, impl, chunk_tokens, mm_dtype, frozen_head,
    grad_filter)`` returns ``(logps, *extras)`` shaped like ``labels``, extras in ``config.extras`` order.

    ``frozen_head`` (:func:`frozen_head_plan`): the forward also stores ``J = ∂ log p/∂h`` per
    labelled token and the backward scales it (no GEMM).  ``grad_filter``: a resolved
    threshold for the fused backward (:mod:`pyfused_po.token.grad_filter`), or ``None``."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, labels, config: TokenConfig, backend, impl, chunk_tokens, mm_dtype,
                frozen_head=False, grad_filter=None):
        out = linear_forward(hidden, weight, bias, labels, config, backend, impl, chunk_tokens, mm_dtype,
                             input_grad_rows=frozen_head)
        results, lse, index = out[:3]
        named = dict(zip(config.extras, results[1:]))
        ctx.args, ctx.mm_dtype, ctx.frozen_head = (config, backend, impl, chunk_tokens), mm_dtype, frozen_head
        ctx.grad_filter = grad_filter
        if "is_top1" in config.extras:
            ctx.mark_non_differentiable(named["is_top1"])
        ctx.set_materialize_grads(False)
        ctx.saved_names = [n for n in _SAVED if n in named]
        J = (out[3],) if frozen_head else ()
        ctx.save_for_backward(hidden, weight, bias, labels, lse, *index, *[named[n] for n in ctx.saved_names], *J)
        return tuple(results)

    @staticmethod
    @first_derivative_only("linear_token_logprobs")
    def backward(ctx, grad_logp, *grad_extras):
        hidden, weight, bias, labels, lse, rows, pos, targets, *saved = ctx.saved_tensors
        if ctx.frozen_head:
            *saved, J = saved
            if all(g is None for g in grad_extras):  # only log p has a gradient: scale the stored rows
                return (_frozen_head_grad(J, rows, pos, grad_logp, hidden, ctx.needs_input_grad[0]),) + (None,) * 10
        config = ctx.args[0]
        grads = {"logps": grad_logp, **dict(zip(config.extras, grad_extras))}
        gh, gw, gb = linear_backward(hidden, weight, bias, labels, lse, dict(zip(ctx.saved_names, saved)), grads,
                                     *ctx.args, needs=ctx.needs_input_grad[:3], index=(rows, pos, targets),
                                     mm_dtype=ctx.mm_dtype, grad_filter=ctx.grad_filter)
        return gh, gw, gb, None, None, None, None, None, None, None, None


def _frozen_head_grad(J, rows, pos, grad_logp, hidden, need_hidden):
    """``dH[rows_t] = g_t · J_t``: an elementwise scale of the stored rows."""
    if grad_logp is None or not need_hidden:
        return None
    shape, dtype = hidden.shape, hidden.dtype
    g = grad_logp.reshape(-1).index_select(0, pos).to(J.dtype)
    gh = torch.zeros(shape[:-1].numel(), shape[-1], device=J.device, dtype=dtype)
    gh.index_copy_(0, rows, (J * g.unsqueeze(1)).to(dtype))
    return gh.view(shape)


def validate_linear_inputs(hidden, weight, bias, labels, config: TokenConfig, backend, impl,
                           chunk_tokens):
    """Checks before any kernel launches; returns ``(resolved_backend, resolved_impl, mm_dtype)``
    (``mm_dtype``: the GEMMs' dtype under autocast, else ``None``)."""
    check_tensor("hidden", hidden, floating=True, min_dim=2)
    check_tensor("weight", weight, floating=True)
    check_tensor("labels", labels, floating=False, min_dim=1)
    if bias is not None:
        check_tensor("bias", bias, floating=True)
    check_same_device(hidden=hidden, weight=weight, bias=bias, labels=labels)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [vocab, hidden_dim] (2-D), got shape {tuple(weight.shape)}")
    V, D = weight.shape
    if hidden.shape[-1] != D:
        raise ValueError(
            f"hidden's last dimension must equal weight.shape[1] (hidden_dim): got hidden "
            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}"
        )
    if V == 0:
        raise ValueError("weight must have a vocabulary dimension of size >= 1, "
                         f"got shape {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (V,):
        raise ValueError(f"bias must have shape ({V},) (weight.shape[0]), got {tuple(bias.shape)}")
    if tuple(hidden.shape[:-1]) != tuple(labels.shape):
        raise ValueError(
            f"hidden must have shape labels.shape + (hidden_dim,) = {tuple(labels.shape)} + ({D},), "
            f"got hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)}"
        )
    mm_dtype = head_matmul_dtype(hidden, weight, bias)
    for name, t in (("weight", weight), ("bias", bias)):
        if mm_dtype is None and t is not None and t.dtype != hidden.dtype:
            raise TypeError(f"{name} must have the dtype of hidden ({hidden.dtype}) outside torch.autocast, "
                            f"got {t.dtype}")
    validate_token_config(config)
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if chunk_tokens is not None and (isinstance(chunk_tokens, bool) or not isinstance(chunk_tokens, int)
                                     or chunk_tokens < 1):
        raise ValueError(f"chunk_tokens must be None or an int >= 1, got {chunk_tokens!r}")
    resolved = resolve_backend(backend, hidden, "hidden states")
    if resolved == "torch" and impl == "fused":
        raise ValueError("impl='fused' runs Triton kernels; it needs backend='triton' or 'auto' "
                         f"on CUDA (or TRITON_INTERPRET=1), got backend={backend!r} resolving to 'torch'")
    check_label_range(labels, V, config.ignore_index)
    return resolved, ("chunked" if impl == "auto" else impl), mm_dtype


def linear_token_logprobs(hidden, weight, labels, *, bias=None, ignore_index=-100, shift=False,
                          temperature=1.0, logit_scale=1.0, softcap=None, extras=(),
                          backend="auto", impl="auto", chunk_tokens=None, vocab_parallel_group=None,
                          vocab_start=None, reduce_grad_hidden=True, cu_seqlens=None, position_ids=None,
                          grad_filter=None, batch_invariant=False):
    """Per-token log-probs of ``logits = hidden @ weight.T (+ bias)``, logits never materialized.

    Same results as ``token_logprobs(hidden @ weight.T + bias, labels, ...)``: the logit
    transform ``z = softcap(x · logit_scale) / temperature``, ``ignore_index``, ``shift``
    (hidden row ``t`` predicts label ``t + 1``, results aligned with ``labels``) and the
    extras are the same.

    Args:
        hidden: ``[..., T, D]`` float16/bfloat16/float32 (float64 on the torch backend).
        weight: ``[V, D]`` LM head, same dtype and device.  Under ``torch.autocast`` the
            dtypes may differ (as for ``F.linear``): the GEMMs run in the autocast dtype and
            each gradient comes back in its input's dtype, ``grad_weight`` never rounded
            below it (:mod:`pyfused_po.token.mixed_precision`).  A weight with
            ``requires_grad=False`` gets no gradient; the step then costs two GEMMs (``frozen_head_plan``).
        labels: ``[..., T]`` integer token ids, ``hidden.shape[:-1] == labels.shape``.
        bias: optional ``[V]`` LM-head bias.
        extras: names from ``("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")``.
        backend: ``"auto"``, ``"triton"`` or ``"torch"`` as in ``token_logprobs``.
        impl: ``"chunked"`` (cuBLAS GEMM per chunk of tokens + token fold), ``"fused"``
            (Triton tiles, Triton backend only) or ``"auto"`` (currently "chunked").
        vocab_parallel_group, vocab_start, reduce_grad_hidden: ``weight`` (and ``bias``) are
            this rank's rows ``[vocab_start, vocab_start + V_r)`` of an LM head sharded over
            the process group (:func:`pyfused_po.distributed.vocab_parallel_linear_token_logprobs`).
        chunk_tokens: tokens per chunk for ``"chunked"`` (default: a ``[C, V]`` chunk of
            about 128M elements on CUDA, 4M on the CPU).
        cu_seqlens, position_ids: a packed stream (``hidden`` ``[1, N, D]`` or ``[N, D]``), as in
            :func:`pyfused_po.token_logprobs`: ``shift`` stays inside each sequence.
        grad_filter: ``None`` (default, exact), a float in ``[0, 1)`` or ``"auto"`` (``eps / 32`` of
            the GEMM dtype), ``impl="fused"`` only: the backward skips the dH/dW dots of
            ``128 × 128`` (token, id) tiles whose every logits gradient is below the threshold
            relative to its token's upstream gradient (Cut Cross-Entropy's gradient filtering).
            Lossy: on SmolLM2-135M, ``"auto"`` in bf16 (2⁻¹²) skips 25% of the tiles at a
            relative L2 error of 1.8e-3 in dH and 2.3e-4 in dW (:mod:`pyfused_po.token.grad_filter`
            has the measured numbers).
        batch_invariant: a token's log-prob, extras, ``dH`` row (and the logits-gradient row it
            feeds into ``dW``) are bitwise the same whatever else is in the batch, wherever the
            token sits and whatever ``chunk_tokens`` is.  ``"chunked"``: GEMMs and folds on tiles of
            exactly 128 tokens (:mod:`pyfused_po.token.torch_backend.invariant_tiles`), never the
            vocabulary-outer backward.  ``"fused"``: vocabulary splits fixed for every ``M`` with an
            ordered combine, and ``dH`` accumulated one vocabulary tile per launch
            (:func:`pyfused_po.kernels.linear_launch.linear_backward`).  ``dW`` / ``db`` are sums
            over the batch: run-to-run deterministic on ``"chunked"`` for one batch, never equal
            across batches, and not deterministic on ``"fused"`` (fp32 atomics over token blocks).
            Not with ``vocab_parallel_group``, ``grad_filter`` (a tile's skip depends on its other
            rows) or under ``torch.compile`` (``ValueError``).

    Returns:
        float32 log-probs shaped like ``labels`` (float64 for float64 inputs on the torch
        backend); with ``extras``, a :class:`TokenLogprobs` holding them too.
    """
    # NumPy scalars / 0-d tensors as numbers, as for every hyper-parameter (validation.as_number).
    chunk_tokens, grad_filter = as_number("chunk_tokens", chunk_tokens), as_number("grad_filter", grad_filter)
    validate_grad_filter(grad_filter, impl)
    if cu_seqlens is not None or position_ids is not None:
        return run_packed(lambda y, s: linear_token_logprobs(
            hidden, weight, y, bias=bias, ignore_index=ignore_index, shift=s, temperature=temperature,
            logit_scale=logit_scale, softcap=softcap, extras=extras, backend=backend, impl=impl,
            chunk_tokens=chunk_tokens, vocab_parallel_group=vocab_parallel_group, vocab_start=vocab_start,
            reduce_grad_hidden=reduce_grad_hidden, grad_filter=grad_filter, batch_invariant=batch_invariant),
            labels, cu_seqlens=cu_seqlens, position_ids=position_ids, shift=shift, ignore_index=ignore_index)
    check_batch_invariant("linear_token_logprobs", batch_invariant,
                          vocab_parallel=vocab_parallel_group is not None or vocab_start is not None)
    if batch_invariant and grad_filter is not None:
        raise ValueError("linear_token_logprobs: batch_invariant=True cannot take grad_filter (whether a "
                         "128 x 128 tile's dots are skipped depends on every row of the tile)")
    if vocab_parallel_group is not None or vocab_start is not None:
        vocab_parallel_linear_token_logprobs = _dispatch.entry("vocab_parallel_linear_token_logprobs")
        if impl == "fused":
            raise ValueError("vocab_parallel_group runs the chunked implementation; got impl='fused'")
        return vocab_parallel_linear_token_logprobs(
            hidden, weight, labels, group=vocab_parallel_group, vocab_start=vocab_start, bias_shard=bias,
            ignore_index=ignore_index, shift=shift, temperature=temperature, logit_scale=logit_scale,
            softcap=softcap, extras=extras, backend=backend, chunk_tokens=chunk_tokens,
            reduce_grad_hidden=reduce_grad_hidden)
    config = make_token_config(ignore_index, shift, temperature, logit_scale, softcap, extras, batch_invariant)
    labels = checked_labels("labels", labels, config.ignore_index)
    resolved, impl, mm_dtype = validate_linear_inputs(hidden, weight, bias, labels, config, backend, impl,
                                                      chunk_tokens)
    grad_filter = resolve_grad_filter(grad_filter, mm_dtype or hidden.dtype)
    if torch.compiler.is_compiling():
        # Under torch.compile the fused-linear stage is an opaque custom op pair (no graph break).
        compiled_linear_token_logprobs = _dispatch.entry("compiled_linear_token_logprobs")  # pyfused_po.token.ops
        results = compiled_linear_token_logprobs(hidden, weight, bias, labels, config, resolved, impl, chunk_tokens,
                                                 mm_dtype, grad_filter)
    else:
        results = LinearTokenLogprobsFunction.apply(hidden, weight, bias, labels, config, resolved,
                                                    impl, chunk_tokens, mm_dtype,
                                                    frozen_head_plan(hidden, weight, bias, config, resolved, impl),
                                                    grad_filter)
    return pack_results(results, config.extras)
