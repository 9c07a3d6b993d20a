"""Gradient filtering for the fused-linear backward (``impl="fused"``, opt-in).

With ``grad_filter=thr`` the fused backward skips the ``dH``/``dW`` dots of every
``[128 tokens, 128 ids]`` tile (the GPU tiles) whose logits gradient is small everywhere:
``|dz_ij| < thr · s_i`` with ``s_i = |g_i| + |g_H,i| + |g_Q,i|`` the token's upstream
gradient scale (log-prob, entropy, log Σp²).  For log-probs alone that reads
``|onehot(y_i) − p_ij| < thr``: the tile holds no target the model is unsure of and no
probability above ``thr``, whatever the loss's reduction multiplies ``g`` by.  The idea is
Cut Cross-Entropy's (Wijmans et al., 2024), which uses ``eps / 32`` of the input dtype;
``grad_filter="auto"`` does the same with the GEMM operands' dtype (bf16: 2⁻¹²,
fp16: 2⁻¹⁵, fp32: 2⁻²⁸).  ``grad_filter=0`` skips nothing (the gradients are exactly the
unfiltered ones).  ``grad_bias`` is never filtered, and no tile is skipped when the
``mean_logit`` output has a gradient (``g_M / V`` on every id, below any threshold above
``1/V``).

It is lossy.  Measured on SmolLM2-135M's final hidden states for the shipped preference
pairs (``bench/grad_filter_measure.py`` → ``bench/results/grad-filter/``; float64,
independent of the kernels), 128 × 128 tiles:

MEASURED_TABLE

Off by default.
"""
import torch

AUTO = "auto"


def validate_grad_filter(grad_filter, impl):
    """Checks ``grad_filter`` (``None``, a float ``≥ 0`` or ``"auto"``) against the requested ``impl``."""
    if grad_filter is None:
        return
    if isinstance(grad_filter, str):
        if grad_filter != AUTO:
            raise ValueError(f"grad_filter must be None, a non-negative float or 'auto', got {grad_filter!r}")
    elif isinstance(grad_filter, bool) or not isinstance(grad_filter, (int, float)):
        raise TypeError(f"grad_filter must be None, a non-negative float or 'auto', "
                        f"got {type(grad_filter).__name__} {grad_filter!r}")
    elif not grad_filter >= 0.0 or grad_filter == float("inf"):  # rejects NaN too
        raise ValueError(f"grad_filter must be a finite float >= 0 (or 'auto'), got {grad_filter!r}")
    if impl != "fused":
        raise ValueError(f"grad_filter filters the fused kernels' backward tiles; it needs impl='fused', "
                         f"got impl={impl!r}")


def resolve_grad_filter(grad_filter, dtype):
    """The threshold as a float (``"auto"``: ``eps(dtype) / 32``), or ``None`` when off."""
    if grad_filter is None:
        return None
    if grad_filter == AUTO:
        return torch.finfo(dtype).eps / 32
    return float(grad_filter)
