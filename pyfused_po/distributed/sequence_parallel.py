"""Sequence (context) parallelism: per-sequence sums all-reduced before the objective stage.

Every rank of the group holds the whole batch but only a slice of each sequence's
tokens.  The token and sequence stages run locally on the slice; the per-sequence
*partial* sums (log-probs, lengths, NLL terms, …) are then summed over the group in
one ``all_reduce`` and every rank evaluates the same objective on the full sums.

Gradient.  The training objective is the one loss ``L(s)`` of the full sums
``s = Σ_r s_r``, and ``∂L/∂s_r = ∂L/∂s``: the backward of the sum is the **identity**
on each rank's own contribution.  (``torch.distributed.nn.all_reduce`` would all-reduce
the gradient too, giving ``W·∂L/∂s``: that is the gradient of the *sum over ranks* of
W identical losses, not of the loss.)  Each rank then back-propagates ``∂L/∂s`` into its
own tokens, which is exactly its slice of the unsplit computation's gradient; the model
parameters' gradients must afterwards be **summed** (not averaged) over the group — see
``docs/distributed.md``.

Labels must be shifted *before* splitting (``shift=False`` here): a shift inside a
slice would drop the token at each slice boundary.
"""
import torch
import torch.distributed as dist

from ..sequence.sums import SequenceSums, sequence_sums


class _SumOverRanks(torch.autograd.Function):
    """Forward: all-reduce (sum) over ``group``.  Backward: identity (module docstring)."""

    @staticmethod
    def forward(ctx, x, group):
        total = x.clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM, group=group)
        return total

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sequence_parallel_all_reduce(x, group):
    """``Σ_r x_r`` over the sequence-parallel ``group`` with the gradient of the unsplit
    computation (identity backward; every rank must evaluate the same loss of the result)."""
    if not dist.is_available() or not dist.is_initialized():
        raise ValueError("sequence parallelism needs an initialized torch.distributed process group, got none")
    if group is None:
        raise ValueError("group must be the sequence-parallel process group, got None")
    return _SumOverRanks.apply(x, group)


def all_reduce_columns(columns, group):
    """Sums a list of ``[n_i]`` tensors over ``group`` in **one** all-reduce; returns them in
    order.  Gradients flow (identity backward) to those that require grad."""
    if not columns:
        return []
    dtype = columns[0].dtype
    sizes = [c.numel() for c in columns]
    flat = torch.cat([c.reshape(-1).to(dtype) for c in columns])
    total = sequence_parallel_all_reduce(flat, group)
    return [part.view(c.shape) for part, c in zip(torch.split(total, sizes), columns)]


def sequence_parallel_sums(token_values, labels, *, group, ignore_index=-100, token_weights=None):
    """:func:`pyfused_po.sequence.sums.sequence_sums` of sequences split across ``group``.

    ``token_values`` / ``labels``: ``[B, T_r]`` this rank's slice of every sequence (labels
    already shifted).  Returns the full-sequence sums and lengths (one all-reduce), equal on
    every rank; the gradient reaching ``token_values`` is the unsplit one.
    """
    local = sequence_sums(token_values, labels, ignore_index=ignore_index, shift=False,
                          token_weights=token_weights)
    logps, lengths = all_reduce_columns([local.logps, local.lengths.to(local.logps.dtype)], group)
    return SequenceSums(logps, lengths.to(torch.float32))
