"""Liger-Kernel's ``LigerFusedLinearDPOLoss`` (``liger_kernel.chunked_loss``).

API read from linkedin/Liger-Kernel ``src/liger_kernel/chunked_loss/dpo_loss.py``: the module
is built with ``ignore_index``, ``beta``, ``compute_nll_loss``, ``compiled`` and (in later
releases) ``use_ref_model``, ``average_log_prob``, ``loss_type``, ``chunk_size``, and called
as ``forward(lin_weight, _input, target, bias=None, ref_input=None, ...)`` with
``_input [2B, T, H]`` and ``target [2B, T]`` laid out ``[chosen; rejected]``; it returns the
loss (some releases a tuple whose first item is the loss).  Only the constructor keywords
the installed release accepts are passed.  Checked against liger-kernel 0.8.5 on the CPU.

The module takes no precomputed reference log-probs, so it runs with
``use_ref_model=False`` (reference = 0) and its loss is checked against
``softplus(−β·(c − r))`` instead; the reference term changes no per-token work.  Releases
without ``average_log_prob`` average the per-token log-probs: there the check shows ✗.

The module's own ``compiled=True`` (``torch.compile`` of each chunk's forward + backward)
is kept on CUDA; on the CPU it runs eagerly (``compiled=False``): Inductor's CPU compile
would dwarf the CPU sizes, and the chunking, hence the memory, is the same.
"""
import inspect

from ..reference import BETA
from .base import Method, installed


def _build(case, device):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    wanted = dict(ignore_index=-100, beta=BETA, compute_nll_loss=False, use_ref_model=False,
                  average_log_prob=False, loss_type="sigmoid", compiled=device.type == "cuda")
    accepted = inspect.signature(LigerFusedLinearDPOLoss.__init__).parameters
    module = LigerFusedLinearDPOLoss(**{k: v for k, v in wanted.items() if k in accepted})

    def loss_fn(inp):
        out = module(inp.weight, inp.hidden, inp.labels)
        return out[0] if isinstance(out, (tuple, list)) else out
    return loss_fn


METHODS = [
    Method("liger", "Liger LigerFusedLinearDPOLoss", "linear", _build,
           probe=lambda: installed("liger_kernel"), reference_free=True,
           note="no reference log-probs accepted: checked as DPO with reference 0"),
]
