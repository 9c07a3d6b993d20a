"""Scale-out of the fused losses on ``torch.distributed``: vocabulary parallelism (logits or
LM head sharded along the vocabulary) and sequence / context parallelism (each sequence's
tokens split across ranks).  See ``docs/distributed.md``."""
from .loss import DistributedFusedKTOLoss, DistributedFusedPreferenceLoss
from .sequence_parallel import all_reduce_columns, sequence_parallel_all_reduce, sequence_parallel_sums
from .vocab_parallel import vocab_parallel_linear_token_logprobs, vocab_parallel_token_logprobs

__all__ = ["DistributedFusedKTOLoss", "DistributedFusedPreferenceLoss", "all_reduce_columns",
           "sequence_parallel_all_reduce", "sequence_parallel_sums", "vocab_parallel_linear_token_logprobs",
           "vocab_parallel_token_logprobs"]
