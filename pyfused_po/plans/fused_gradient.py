"""The three-GEMM engine: the exact LM-head gradient formed during the loss modules' forward.

The staged fused-linear path runs four ``[M, D] × [D, V]`` GEMMs per step: the forward's
logits, and in the backward the recomputed logits, ``dH`` and ``dW``.  The recompute exists
only because the per-token upstream gradient ``g_t = ∂L/∂ log p_t`` is unknown while the
forward holds the logits.  A loss module knows its objective: when ``g_t`` of a token depends
only on its own group's sums (a pair for :class:`~pyfused_po.FusedPreferenceLoss`, a sequence
for :class:`~pyfused_po.FusedKTOLoss`) and on batch constants, then per chunk of whole groups:

1. ``X = H_c·Wᵀ (+ b)`` (GEMM 1) and the token fold: ``log p``, lse and the extras;
2. ``g`` of the chunk's tokens: the module's own sequence stage and objective (``loss_of``) on
   the whole batch, the chunk's log-probs as autograd leaves and placeholders (−1 per token)
   for the other groups' tokens; exact because no group's gradient depends on another group's
   values (the placeholders never reach it).  A loss that also differentiates the entropy (an
   entropy bonus: ``grad_extras=("entropy",)``) gets the chunk's entropies as leaves too, and the
   fold adds ``−g_H·p·(log p + H)`` to the row's gradient;
3. the fold turns ``X`` in place into ``G = ∂L/∂X``; ``dH[rows] = G·W`` (GEMM 2) and
   ``dW += Gᵀ·H_c`` (GEMM 3, fp32, in place), ``db += Σ G``.

The caller then computes its loss once on the whole batch's per-token values (:meth:`FusedHead.tokens`)
and connects it to ``hidden``/``weight``/``bias`` with :meth:`FusedHead.attach`: the backward only
multiplies the stored gradients by the incoming (scalar) gradient.  A frozen head (no ``weight``
gradient) skips GEMM 3: two GEMMs.

Memory: ``dW`` (fp32 ``[V, D]``), ``db`` and ``dH`` (``[B·T, D]``) live from the forward to the
backward instead of only during the backward, all three in the fp32 accumulator dtype: the caller's
upstream gradient (``GradScaler``'s loss scale) is applied before they are rounded to the inputs'
dtype, and ``G`` itself is formed at a power-of-two scale fp16 can hold
(:func:`~pyfused_po.token.torch_backend.linear.operand_scale`).

The module-specific parts (which objectives separate, which inputs) live in
:mod:`pyfused_po.plans.fused_pairs` and :mod:`pyfused_po.plans.fused_kto`.
"""
import itertools
import logging
import math

import torch
from torch.autograd.function import once_differentiable

from .._backend import triton_kernels
from ..token.linear_token_logprobs import validate_linear_inputs
from ..token.mixed_precision import autocast_off, cast_operands
from ..token.token_logprobs import TokenLogprobs, make_token_config
from ..token.torch_backend import linear as _chunked
from ..token.torch_backend import token as _torch_fold

PLACEHOLDER_LOGP = -1.0
# Extras whose gradient the plan forms when the loss differentiates them (the fold's backward).
GRAD_EXTRAS = ("entropy",)
# On CUDA each chunk's dW GEMM reads and writes the fp32 [V, D] accumulator: with a reduction
# over C tokens it does 2·C·V·D FLOPs for 8·V·D bytes, C/4 FLOP/byte.  Under ~1024 tokens that is
# below an H100's bf16 balance (~200–300 FLOP/byte) and the accumulator traffic costs more than
# the saved GEMM: the staged path (vocabulary-outer, dW written once) is faster.  The default
# chunk (torch_backend.linear.gradient_chunk_size, min(4096, D) tokens or the staged chunk) is
# above it for D ≥ 1024; smaller heads at large vocabularies, or a ``module.chunk_tokens`` under
# it, fall back when the batch needs more than one chunk.  A prediction from the model in
# bench/work_counters.py, to be checked on a GPU.
MIN_CUDA_CHUNK_TOKENS = 1024


# What the plan does with a group (pair, sequence) longer than its chunk (issue 24, "long pairs"):
# "staged": the staged plan runs the call (4 GEMMs; its peak, below TRL's at the headline shape);
# "three_gemm": one chunk as long as the longest group (3 GEMMs; the [C, V] chunk grows with it).
# The default is the one whose peak stays under TRL's at the headline shape (bench/work_counters.py).
LONG_GROUP_PLANS = ("staged", "three_gemm")
_log = logging.getLogger("pyfused_po")


def note_fallback(module, reason):
    """Logs ``reason`` (why the staged plan runs instead of three GEMMs) once per module and reason,
    and keeps it in ``module.fallback_reason`` (None when the plan ran)."""
    module.fallback_reason = reason
    if reason is None:
        return
    seen = module.__dict__.setdefault("_fallbacks_logged", set())
    if reason not in seen:
        seen.add(reason)
        _log.warning("%s: %s", type(module).__name__, reason)


# Why a module built with batch_invariant=True runs the staged plan (a named choice, kept in
# module.fallback_reason): the three-GEMM plan sizes its chunks by whole groups (so a token's GEMM
# shape depends on its neighbours) and scales the half-precision gradient operand by the batch's
# largest upstream gradient; the staged plan's token stage has the fixed-tile invariant mode.
INVARIANT_PLAN_REASON = ("batch_invariant=True runs the staged plan (4 GEMMs): the three-GEMM plan's chunks "
                         "and operand scale depend on the batch")


def plan_may_run(module, source, others=()):
    """The conditions every fused plan shares: ``module.fused_gradient`` on, grad mode on, not
    under ``torch.compile`` tracing, some of ``source`` (``(hidden, weight, bias)``) requiring
    grad, the chunked implementation, no vocabulary or sequence parallelism, none of the
    ``others`` (inputs whose gradient the plan does not form) requiring grad, and not
    ``module.batch_invariant`` (:data:`INVARIANT_PLAN_REASON`, noted once)."""
    if getattr(module, "batch_invariant", False):
        note_fallback(module, INVARIANT_PLAN_REASON)
        return False
    return (getattr(module, "fused_gradient", True) and torch.is_grad_enabled()
            and not torch.compiler.is_compiling()
            and any(t is not None and t.requires_grad for t in source)
            and module.linear_impl in ("auto", "chunked")
            and not module.parallel.vocab_parallel and not module.parallel.sequence_parallel
            and not any(isinstance(t, torch.Tensor) and t.requires_grad for t in others))


def group_chunks(counts, budget_tokens):
    """Contiguous group ranges ``[(g0, g1)]`` whose labelled tokens fit ``budget_tokens`` each,
    or ``None`` when one group alone does not; ``counts``: each group's labelled tokens (a host list)."""
    groups = len(counts)
    if groups and max(counts) > budget_tokens:
        return None
    chunks, g0, used = [], 0, 0
    for g, n in enumerate(counts):
        if used + n > budget_tokens and g > g0:
            chunks.append((g0, g))
            g0, used = g, 0
        used += n
    if groups:
        chunks.append((g0, groups))
    return chunks


class TokenCapture:
    """Asks a loss module's fused plan for the policy's per-token values (``logps`` and ``extras``,
    shaped like the labels, detached, from the plan's own fold): set ``module.token_capture`` to
    one and the plan fills :attr:`tokens` (a :class:`~pyfused_po.TokenLogprobs`).  The staged plan
    does not fill it itself: a caller wrapping the module's ``_token_stage`` offers the first
    policy call's result while :attr:`waiting` (``integrations.trl_preference_loss`` does)."""

    def __init__(self, extras=()):
        self.extras = tuple(extras)
        self.tokens = None
        self._planned = False

    def planned(self):
        """The fused plan will deliver the policy's values: token-stage calls from now on (the
        reference's) are not the policy's."""
        self._planned = True

    @property
    def waiting(self):
        """True while a staged token-stage call would be the policy's."""
        return self.tokens is None and not self._planned

    def offer(self, tokens, *, from_plan=False):
        if self.tokens is None and (from_plan or not self._planned):
            self.tokens = tokens


class FusedHead:
    """One forward of the plan on a ``(hidden, weight, bias)`` source (see the module docstring).

    Build with :meth:`build`; ``group_of(pos)`` then maps the labelled tokens (their positions in
    the flattened labels, :attr:`pos`) to groups for :meth:`chunks`; :meth:`run` does the
    chunk loop."""

    def __init__(self, source, token_labels, token_kwargs, extras, upstream_extras, linear_impl, chunk_tokens,
                 grad_extras=()):
        hidden, weight, bias = source
        self.source, self.shape = source, tuple(token_labels.shape)
        self.grad_extras = tuple(grad_extras)  # the extras the objective differentiates
        unknown = [name for name in self.grad_extras if name not in GRAD_EXTRAS]
        if unknown:
            raise ValueError(f"grad_extras must be among {GRAD_EXTRAS}, got {unknown}")
        self.extras = tuple(extras) + tuple(n for n in self.grad_extras if n not in extras)
        # the extras the objective reads (their values), the differentiated ones included
        self.upstream_extras = tuple(upstream_extras) + tuple(n for n in self.grad_extras if n not in upstream_extras)
        config = make_token_config(token_kwargs["ignore_index"], token_kwargs["shift"], token_kwargs["temperature"],
                                   token_kwargs["logit_scale"], token_kwargs["softcap"], self.extras)
        backend, _, self.mm_dtype = validate_linear_inputs(hidden, weight, bias, token_labels, config,
                                                           token_kwargs["backend"], linear_impl, chunk_tokens)
        self.fold = _torch_fold if backend == "torch" else triton_kernels()
        T = self.shape[-1]
        self.rows, self.pos, self.targets = _chunked.labelled_tokens(token_labels.reshape(-1, T),
                                                                     config.ignore_index, config.shift)
        M = self.rows.numel()
        C = _chunked.chunk_size(M, weight.shape[0], hidden.device, chunk_tokens)
        if chunk_tokens is None and weight.requires_grad:  # only dW is re-read per chunk
            C = _chunked.gradient_chunk_size(M, weight.shape[1], C)
        self.chunk_tokens = C
        self.kw = dict(ignore_index=config.ignore_index, shift=False, temperature=config.temperature,
                       logit_scale=config.logit_scale, softcap=config.softcap)
        self.grads = None

    @classmethod
    def build(cls, source, token_labels, token_kwargs, *, extras=(), upstream_extras=(), linear_impl="auto",
              chunk_tokens=None, grad_extras=()):
        """The plan for this call, or ``None`` to fall back: no tokens, or on CUDA chunks under
        :data:`MIN_CUDA_CHUNK_TOKENS` tokens when the batch needs more than one.  Chunks hold at
        most ``chunk_tokens`` labelled tokens when given (a module's ``chunk_tokens`` attribute),
        else :func:`~pyfused_po.token.torch_backend.linear.gradient_chunk_size` (min(4096, D) tokens, or
        the staged chunk when that is larger; each chunk re-reads the fp32 dW).  Raises on bad
        inputs before any kernel."""
        if token_labels.numel() == 0:  # no tokens (T = 0): the staged path defines the empty-batch result
            return None
        plan = cls(source, token_labels, token_kwargs, extras, upstream_extras, linear_impl, chunk_tokens,
                   grad_extras)
        M = plan.rows.numel()
        if source[0].is_cuda and M > plan.chunk_tokens and plan.chunk_tokens < MIN_CUDA_CHUNK_TOKENS:
            return None  # a small head at a large vocabulary
        return plan

    def chunks(self, group, groups, long_groups="staged"):
        """Chunks of whole groups (``group``: each labelled token's group), or ``None`` when there
        is no labelled token, or when one group has more labelled tokens than a chunk holds and
        ``long_groups`` is ``"staged"`` (:data:`LONG_GROUP_PLANS`; the reason is then in
        :attr:`fallback_reason`).  With ``"three_gemm"`` the chunk grows to the longest group."""
        if long_groups not in LONG_GROUP_PLANS:
            raise ValueError(f"long_group_plan must be one of {LONG_GROUP_PLANS}, got {long_groups!r}")
        self.fallback_reason = None
        if not self.pos.numel():
            return None
        # the one host read of the plan's layout: each group's labelled tokens, for the chunk cuts (and,
        # in run, each chunk's slice of the tokens sorted by group)
        counts = torch.bincount(group, minlength=groups).tolist()
        self.group_starts = [0, *itertools.accumulate(counts)]
        longest = max(counts, default=0)
        if longest > self.chunk_tokens:
            if long_groups == "staged":
                # the staged plan's GEMMs: logits, recompute, dH, dW; with a frozen head its forward
                # forms ∂log p/∂h, so 2 (the same count as the plan, whose chunk only is longer)
                trainable = self.source[1].requires_grad
                staged = "4 GEMMs" if trainable else "2 GEMMs with this frozen head"
                self.fallback_reason = (f"a group of {longest} labelled tokens is longer than the three-GEMM chunk "
                                        f"({self.chunk_tokens} tokens): the staged plan ({staged}) runs; "
                                        f"long_group_plan='three_gemm' keeps the plan ({3 if trainable else 2} "
                                        "GEMMs) with a chunk of the longest group (more peak memory)")
                return None
            self.chunk_tokens = longest
        return group_chunks(counts, self.chunk_tokens)

    def run(self, chunks, group, loss_of):
        """The chunk loop.  ``loss_of(tokens)``: the module's scalar loss from per-token values
        (:class:`~pyfused_po.TokenLogprobs` shaped like the labels, ``upstream_extras`` filled),
        differentiable in ``tokens.logps`` (and in the ``grad_extras``).  Fills the per-token values
        and the stored gradients."""
        hidden, weight, bias = self.source
        need_h, need_w = hidden.requires_grad, weight.requires_grad
        need_b = bias is not None and bias.requires_grad
        h2, w, b = cast_operands(self.mm_dtype, hidden.detach().reshape(-1, hidden.shape[-1]), weight.detach(),
                                 None if bias is None else bias.detach())
        cdt = _chunked.compute_dtype(h2)
        n, dev, pos = h2.shape[0], h2.device, self.pos
        names = ("logps",) + self.extras
        # Per-token values, flattened like the labels: real ones filled chunk by chunk.
        self.real = {k: torch.zeros(n, device=dev, dtype=cdt) for k in names}
        placeholder = {k: torch.zeros(n, device=dev, dtype=cdt) for k in ("logps",) + self.upstream_extras}
        placeholder["logps"][pos] = PLACEHOLDER_LOGP
        if "log_sum_sq_probs" in placeholder:
            placeholder["log_sum_sq_probs"][pos] = PLACEHOLDER_LOGP  # WPO weight exp(0) = 1
        # Every stored gradient stays in the fp32 (fp64) accumulator dtype until the backward has
        # applied the upstream gradient (a loss scale): rounded to the inputs' dtype once, after.
        gh = torch.zeros(h2.shape, device=dev, dtype=cdt) if need_h else None
        # dW/db: written by the first chunk's GEMM, accumulated in place by the others.
        gw = torch.empty(weight.shape, device=dev, dtype=cdt) if need_w else None
        gb = torch.empty(weight.shape[0], device=dev, dtype=cdt) if need_b else None
        # The tokens sorted by group once (stable: position order within a group, no host read): a
        # chunk of groups [g0, g1) is then a slice, cut at the counts chunks() read.
        by_group = torch.argsort(group, stable=True)
        with autocast_off(hidden.device.type):
            for k, (g0, g1) in enumerate(chunks):
                sel = by_group[self.group_starts[g0]:self.group_starts[g1]]
                idx, y = self.rows.index_select(0, sel), self.targets.index_select(0, sel).unsqueeze(0)
                h_c, x = _chunked._chunk_logits(h2, w, b, idx)  # GEMM 1
                x3 = x.unsqueeze(0)
                lp, lse, outs = self.fold.token_forward(x3, y, extras=self.extras, **self.kw)
                where = pos.index_select(0, sel)
                for name in names:
                    self.real[name][where] = (lp if name == "logps" else outs[name])[0]
                g, g_extras = self._upstream(loss_of, lp[0], where, placeholder)
                # G is formed at a power-of-two scale s that fp16 can hold (one host sync per chunk);
                # the fp32 products are unscaled exactly.  s = 1 for fp32 / fp64 operands.
                s = _chunked.operand_scale(_largest_upstream(g, g_extras, x.shape[-1]), x.dtype,
                                           self.kw["temperature"], self.kw["logit_scale"])
                if s != 1.0:
                    g = g * s
                    g_extras = {k: v * s for k, v in g_extras.items()}
                entropy_grad = {}
                if "entropy" in g_extras:  # the fold adds −g_H·p·(log p + H) to the row
                    entropy_grad = dict(entropy=outs["entropy"], grad_entropy=g_extras["entropy"].unsqueeze(0))
                # X becomes G in place.  vocab_shard: p = exp(z − lse) from the forward's lse, as the
                # staged vocabulary-outer backward does, instead of the torch fold's second exact
                # log-softmax of the row (a max and a logsumexp over [C, V] more); every label is in
                # [0, V), so the one-hot term is unchanged (the Triton fold always uses the given lse).
                self.fold.token_backward(x3, y, lse, x3, grad_logp=g.unsqueeze(0), vocab_shard=True, **entropy_grad,
                                         **self.kw)
                if gh is not None:
                    rows = _chunked._mm(x, w, cdt)  # GEMM 2
                    gh.index_copy_(0, idx, rows if s == 1.0 else rows.mul_(1.0 / s))
                    del rows  # not held into the next chunk's GEMM 1
                if gw is not None:
                    _chunked.gemm_into(gw, x.t(), h_c, accumulate=k > 0, alpha=1.0 / s)  # GEMM 3
                if gb is not None:
                    col = x.sum(0, dtype=cdt)
                    if s != 1.0:
                        col.mul_(1.0 / s)
                    if k > 0:
                        gb += col
                    else:
                        gb.copy_(col)
            del h_c, x, x3
        self.grads = (None if gh is None else gh.view(hidden.shape), gw, gb)

    def _values(self, flat, names):
        return TokenLogprobs(flat["logps"].view(self.shape), **{k: flat[k].view(self.shape) for k in names})

    def tokens(self, names=None):
        """The per-token values after :meth:`run` (``logps`` and ``names``, default every extra
        computed), detached, shaped like the labels."""
        return self._values(self.real, self.extras if names is None else names)

    def _upstream(self, loss_of, lp, where, placeholder):
        """``(∂L/∂ log p, {extra: ∂L/∂extra})`` of the chunk's tokens (the second for
        ``grad_extras``): ``loss_of`` on the whole batch, the chunk's log-probs (and differentiated
        extras) as leaves, placeholders elsewhere (exact by separability)."""
        leaves = {"logps": lp.detach().requires_grad_(True)}
        for k in self.grad_extras:
            leaves[k] = self.real[k][where].detach().requires_grad_(True)
        with torch.enable_grad():
            tokens = {k: placeholder[k].clone() for k in placeholder}
            for k in self.upstream_extras:
                tokens[k][where] = self.real[k][where]
            for k, leaf in leaves.items():
                tokens[k] = tokens[k].index_put((where,), leaf)
            loss = loss_of(self._values(tokens, self.upstream_extras))
            grads = torch.autograd.grad(loss, list(leaves.values()), allow_unused=True)
        grads = {k: torch.zeros_like(lp) if g is None else g.to(lp.dtype) for k, g in zip(leaves, grads)}
        return grads.pop("logps"), grads

    def attach(self, loss):
        """``loss`` (computed without a graph) connected to ``hidden``/``weight``/``bias`` through
        the gradients :meth:`run` stored."""
        hidden, weight, bias = self.source
        return _StoredGradient.apply(loss, hidden, weight, bias, *self.grads)


def _largest_upstream(g, g_extras, vocab):
    """A bound on ``max |∂L/∂z|`` over the chunk's rows, before the logits' transform: ``|g|`` from
    the log-prob (``|onehot − p| ≤ 1``) plus, with an entropy gradient, ``|g_H|·(1/e + log V)``
    (``p·|log p| ≤ 1/e``, ``p·H ≤ H ≤ log V``)."""
    if not g.numel():
        return 0.0
    bound = g.abs().max()
    if "entropy" in g_extras:
        bound = bound + g_extras["entropy"].abs().max() * (math.exp(-1.0) + math.log(vocab))
    return bound


class _StoredGradient(torch.autograd.Function):
    """``loss`` connected to ``hidden``/``weight``/``bias`` through gradients computed in the
    forward, held in the fp32 (fp64) accumulator dtype: the backward scales them by the incoming
    (scalar) gradient and only then rounds each to its input's dtype, once."""

    @staticmethod
    def forward(ctx, loss, hidden, weight, bias, gh, gw, gb):
        ctx.grads = [gh, gw, gb]
        ctx.dtypes = [None if t is None else t.dtype for t in (hidden, weight, bias)]
        return loss.detach().clone()

    @staticmethod
    @once_differentiable  # the stored gradients are numbers, not a graph: no double backward
    def backward(ctx, grad):
        if ctx.grads is None:
            raise RuntimeError("a fused-gradient loss (FusedPreferenceLoss / FusedKTOLoss on hidden=) can be "
                               "backpropagated once (its gradients were formed in the forward); set "
                               "module.fused_gradient = False for retain_graph=True")
        grads, ctx.grads = ctx.grads, None  # hand the buffers over
        out = []
        for i, dtype in enumerate(ctx.dtypes):
            t, grads[i] = grads[i], None  # each fp32 buffer is freed once its rounded copy exists
            if t is not None:
                # The upstream gradient (e.g. GradScaler's 65536) scales before any rounding, always: testing
                # it for 1 would be a host read.  In the inputs' dtype the scale rides on the rounding pass
                # (one kernel: multiply in fp32, round on store); in the accumulator's dtype it is one
                # in-place pass over the buffer.
                g = grad.to(t.dtype)
                t = t.mul_(g) if t.dtype == dtype else torch.mul(t, g, out=torch.empty_like(t, dtype=dtype))
            out.append(t)
        return (None, *out, None, None, None)
