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

With a threshold above 0 the backward also orders the vocabulary by decreasing mean
logit over the labelled tokens (``kernels.linear_launch.mean_logit_order``), so that the
likely ids share tiles and the others can be skipped.

It is lossy.  Measured on SmolLM2-135M's final hidden states for the 454 response tokens
of the 16 shipped preference pairs (``bench/grad_filter_measure.py`` →
``bench/results/grad-filter/``; float64, independent of the kernels), 128 × 128 tiles,
vocabulary sorted as the kernel sorts it; dW error for ``g = 1`` / ``g = ±1`` (chosen +,
rejected −), dropped L1 mass per token ``Σ_skipped |G| / Σ |G|`` as mean / p99 / max:

=====================  =============  ===========  =================  ======================
threshold              tiles skipped  rel. L2 dH   rel. L2 dW         dropped L1 per token
=====================  =============  ===========  =================  ======================
2⁻¹⁰                   46.5%          7.6e-3       1.0e-3 / 9.7e-4    0.33% / 4.9% / 13.6%
2⁻¹² (``auto``, bf16)  24.8%          1.8e-3       2.3e-4 / 2.5e-4    0.06% / 0.77% / 1.5%
2⁻¹⁵ (``auto``, fp16)  6.4%           1.3e-4       1.8e-5 / 2.3e-5    0.00% / 0.06% / 0.25%
=====================  =============  ===========  =================  ======================

In id order (no sorting) 2⁻¹² skips only 6.6% of the tiles; on all 1,646 positions
(prompt and chat template included) the sorted figure is 16.8% with a dH error of 2.8e-3
and a worst token losing 34% of its L1 mass.  A per-token filter would skip 92% of the
(token, 128-id) tiles at 2⁻¹²: a 128-token tile is skipped only when all of its tokens
agree, which is why the fraction is so much lower.  A skipped tile saves its dH and dW
dots (two thirds of its work), never the logits recompute, so 24.8% skipped is at most
a 1.2× faster backward.  Off by default.
"""
import torch

AUTO = "auto"


def validate_grad_filter(grad_filter, impl):
    """Checks ``grad_filter`` (``None``, a float in ``[0, 1)`` or ``"auto"``) against the requested ``impl``."""
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
    elif grad_filter >= 1.0:
        # |onehot(y) − p| < 1 on every entry a finite logit reaches, so a threshold of 1 or more
        # skips every tile: dH and dW would come back as zeros with a normal-looking loss.
        raise ValueError(f"grad_filter must be below 1 (a threshold relative to the token's upstream "
                         f"gradient; 1 or more skips every tile and the gradient is 0), got {grad_filter!r}")
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
