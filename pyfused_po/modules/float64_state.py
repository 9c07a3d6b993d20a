"""Module state that must stay float64 whatever dtype the module is cast to."""


def apply_keeping_float64(module, apply, fn, recurse, names):
    """``nn.Module._apply`` for ``module`` with the buffers ``names`` only moved, never cast.

    ``model.bfloat16()`` / ``.half()`` / ``.to(dtype)`` reach every buffer through
    ``_apply``; a running count in bfloat16 stops at 256–512 (1 + 512 rounds to 512), so
    those buffers take the device of ``fn``'s result and keep their float64 values.
    """
    kept = {n: module._buffers[n] for n in names if module._buffers.get(n) is not None}
    result = apply(fn, recurse)
    for name, old in kept.items():
        module._buffers[name] = old.to(device=module._buffers[name].device)
    return result
