"""Scale-out of the fused losses on ``torch.distributed``: vocabulary parallelism (logits or
LM head sharded along the vocabulary) and sequence / context parallelism (each sequence's
tokens split across ranks).  The loss modules take ``vocab_parallel_group=`` /
``vocab_start=`` / ``sequence_parallel_group=`` directly (:mod:`.options`).  See
``docs/distributed.md``."""
from .options import ParallelOptions
from .sequence_parallel import all_reduce_columns, sequence_parallel_all_reduce, sequence_parallel_sums
from .vocab_parallel import vocab_parallel_linear_token_logprobs, vocab_parallel_token_logprobs

__all__ = ["ParallelOptions", "all_reduce_columns", "sequence_parallel_all_reduce", "sequence_parallel_sums",
           "vocab_parallel_linear_token_logprobs", "vocab_parallel_token_logprobs"]
