"""How a fused loss module is split over ``torch.distributed`` process groups.

The modules (:class:`pyfused_po.FusedPreferenceLoss`, :class:`pyfused_po.FusedKTOLoss`)
hold one :class:`ParallelOptions` and call it at the two places where parallelism
changes anything:

* the token stage — under ``vocab_parallel_group`` the logits (or the LM head's rows) are
  this rank's vocabulary slice: :func:`.vocab_parallel_token_logprobs` /
  :func:`.vocab_parallel_linear_token_logprobs` (one all-gather per forward, none in the
  backward);
* the per-sequence sums — under ``sequence_parallel_group`` each rank holds a slice of
  every sequence's tokens, so its sums are partial: :meth:`ParallelOptions.reduce_columns`
  sums them over the group in **one** all-reduce whose backward is the identity, and every
  rank evaluates the same objective on the full sums (batch-coupled objectives — AOT's
  sort, KTO's KL estimate, the batch NLL mean — see the whole batch).

Both may be set at once (a 2-D tensor × context-parallel mesh).  Without either, both
calls are the single-process code path.
"""
from .sequence_parallel import all_reduce_columns
from .vocab_parallel import vocab_parallel_linear_token_logprobs, vocab_parallel_token_logprobs


class ParallelOptions:
    """``vocab_parallel_group`` with ``vocab_start`` (the first vocabulary id of this rank's
    slice), ``sequence_parallel_group``, and ``reduce_grad_hidden`` (see
    :func:`.vocab_parallel_linear_token_logprobs`)."""

    def __init__(self, vocab_parallel_group=None, vocab_start=None, sequence_parallel_group=None,
                 reduce_grad_hidden=True):
        if (vocab_parallel_group is None) != (vocab_start is None):
            raise ValueError("vocab_parallel_group and vocab_start go together (vocab_start = first vocabulary "
                             f"id of this rank's slice); got vocab_parallel_group={vocab_parallel_group!r}, "
                             f"vocab_start={vocab_start!r}")
        self.vocab_parallel_group, self.vocab_start = vocab_parallel_group, vocab_start
        self.sequence_parallel_group = sequence_parallel_group
        self.reduce_grad_hidden = bool(reduce_grad_hidden)

    @property
    def vocab_parallel(self):
        return self.vocab_parallel_group is not None

    @property
    def sequence_parallel(self):
        return self.sequence_parallel_group is not None

    def check_sequence_parallel(self, *, shift, **unsupported):
        """Raises for options that need each sequence's token order on one rank."""
        if not self.sequence_parallel:
            return
        if shift:
            raise ValueError("sequence_parallel_group needs shift=False: shift the labels before splitting the "
                             "sequences across ranks (a shift inside a slice drops each boundary token)")
        for name, value in unsupported.items():
            if value:
                raise ValueError(f"{name} is not supported with sequence_parallel_group (it needs each "
                                 f"sequence's token order across ranks); got {name}={value!r}")

    def token_stage(self, source, labels, *, extras, inplace, token_kwargs):
        """The vocabulary-parallel token stage; ``source`` is this rank's logits slice or
        ``(hidden, weight_shard, bias_shard)``."""
        kw = dict(group=self.vocab_parallel_group, vocab_start=self.vocab_start, extras=tuple(extras),
                  **token_kwargs)
        if isinstance(source, tuple):
            hidden, weight, bias = source
            return vocab_parallel_linear_token_logprobs(hidden, weight, labels, bias_shard=bias,
                                                        reduce_grad_hidden=self.reduce_grad_hidden, **kw)
        return vocab_parallel_token_logprobs(source, labels, inplace_backward=inplace, **kw)

    def reduce_columns(self, columns):
        """``{name: per-sequence tensor}`` summed over the sequence-parallel group (one
        all-reduce, identity backward); unchanged without one."""
        if not self.sequence_parallel or not columns:
            return columns
        names = list(columns)
        return dict(zip(names, all_reduce_columns([columns[n] for n in names], self.sequence_parallel_group)))
