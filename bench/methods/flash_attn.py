"""flash-attn's Triton cross-entropy kernel (``flash_attn/ops/triton/cross_entropy.py``).

API read from Dao-AILab/flash-attention: ``cross_entropy_loss(logits [N, V], labels [N],
precomputed_lse=None, label_smoothing=0.0, logit_scale=1.0, lse_square_scale=0.0,
ignore_index=-100, inplace_backward=False, process_group=None)`` → ``(losses, z_losses)``,
``losses = −log p`` per row.  ``precomputed_lse`` exists only in later releases, so only
``logits`` and ``labels`` are passed positionally.

The file needs only torch and triton, so it is loaded straight from the installed
package's directory: ``import flash_attn`` would fail where the CUDA extension is not built.
"""
import importlib.util
import os

from .base import NOT_INSTALLED, Method
from .common import token_dpo

_RELATIVE = os.path.join("ops", "triton", "cross_entropy.py")


def kernel_file():
    """Path of the Triton cross-entropy file in the installed flash_attn, or ``None``."""
    spec = importlib.util.find_spec("flash_attn")  # top level: locates, does not import
    if spec is None or not spec.submodule_search_locations:
        return None
    for root in spec.submodule_search_locations:
        path = os.path.join(root, _RELATIVE)
        if os.path.isfile(path):
            return path
    return None


def _load():
    spec = importlib.util.spec_from_file_location("_bench_flash_attn_cross_entropy", kernel_file())
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.cross_entropy_loss


def _probe():
    if importlib.util.find_spec("flash_attn") is None:
        return NOT_INSTALLED
    return None if kernel_file() else "no ops/triton/cross_entropy.py in this flash_attn"


def _build(case, device):
    cross_entropy_loss = _load()

    def loss_fn(inp):
        losses, _ = cross_entropy_loss(inp.logits.reshape(-1, case.vocab), inp.labels.reshape(-1))
        return token_dpo(-losses, inp, case.pairs)
    return loss_fn


METHODS = [
    Method("flash_attn", "flash-attn Triton CE", "logits", _build, probe=_probe, cuda_only=True),
]
