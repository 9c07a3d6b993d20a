"""Plain PyTorch as TRL used to do it: ``log_softmax(logits.float())`` + ``gather``.

On the linear path the logits are materialized first (``hidden @ weight.T`` in the input
dtype), as a model's LM head does.  The tensor-only functions are shared with the
``torch.compile`` adapter.
"""
import torch

from .base import Method
from .common import dpo_loss, pair_sums


def token_logps(logits, labels):
    """Per-token ``log softmax(z)[y]`` with an fp32 copy of the whole ``[N, V]`` logits."""
    return torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)


def logits_dpo(logits, labels, ref_chosen, ref_rejected, pairs: int):
    chosen, rejected = pair_sums(token_logps(logits, labels), pairs)
    return dpo_loss(chosen, rejected, ref_chosen, ref_rejected)


def linear_dpo(hidden, weight, labels, ref_chosen, ref_rejected, pairs: int):
    return logits_dpo(hidden @ weight.t(), labels, ref_chosen, ref_rejected, pairs)


def logits_builder(fn):
    def build(case, device):
        return lambda inp: fn(inp.logits, inp.labels, inp.ref_chosen, inp.ref_rejected, case.pairs)
    return build


def linear_builder(fn):
    def build(case, device):
        return lambda inp: fn(inp.hidden, inp.weight, inp.labels, inp.ref_chosen, inp.ref_rejected,
                              case.pairs)
    return build


METHODS = [
    Method("torch_eager", "PyTorch eager", "logits", logits_builder(logits_dpo)),
    Method("torch_eager_linear", "PyTorch eager (matmul + log_softmax)", "linear",
           linear_builder(linear_dpo)),
]
