"""Fixed-shape tiles of labelled tokens: how every token stage offers ``batch_invariant=True``.

A token's results are bitwise independent of the rest of the batch when every reduction that
produces them has a shape that does not depend on the batch and runs over that token's row
alone.  Row reductions (max, log-sum-exp, sums over the vocabulary) and GEMMs of a *fixed* shape
reduce each output element in the same order whatever the other rows hold and wherever the row
sits (the premise every batch-invariant kernel rests on; the tests check it bitwise).  What does
depend on the batch is the shape: a chunk of ``C`` tokens with ``C`` from the token count, a
one-row reduction (PyTorch splits a lone row over threads), a GEMM whose kernel is picked by
``M``.  So under ``batch_invariant=True`` the labelled tokens are cut into tiles of exactly
:data:`INVARIANT_TILE_ROWS` rows, the last one padded with copies of its last real row (their
results are dropped, their upstream gradients are 0 so their gradient rows are 0), and every
tile is computed by the same fixed-shape operations.

Used by the logits path's PyTorch fold (:mod:`pyfused_po.token.torch_backend.token`), the chunked
fused-linear path (:mod:`pyfused_po.token.torch_backend.linear`) and the truncated-support tile loop
(:mod:`pyfused_po.token.truncated_logprobs`).
"""
import torch

# Rows per tile: one GEMM / reduction shape for every token.  128 is a whole cuBLAS / Triton M
# tile on a GPU; on the CPU it is a few MKL micro-tiles.  Read at call time (tile_rows()), so a
# test may shrink it for the interpreter.
INVARIANT_TILE_ROWS = 128


def tile_rows():
    """The tile height in force (:data:`INVARIANT_TILE_ROWS`)."""
    return INVARIANT_TILE_ROWS


def tile_ranges(M, step):
    """``(c0, c1)`` of consecutive ranges of at most ``step`` over ``[0, M)``."""
    for c0 in range(0, M, step):
        yield c0, min(M, c0 + step)


def pad_rows(t, rows, fill="last"):
    """``t`` (``[n, ...]``, ``n ≥ 1``) grown to ``rows`` rows: copies of its last row
    (``fill="last"``: inputs, labels, LSE pairs — finite values for the padded rows' math) or zeros
    (``fill="zero"``: upstream gradients, so that a padded row's gradient is 0).  ``None`` stays ``None``."""
    if t is None or t.shape[0] == rows:
        return t
    tail = t[-1:] if fill == "last" else torch.zeros_like(t[:1])
    return torch.cat([t, tail.expand(rows - t.shape[0], *t.shape[1:])])


def tiles(rows, chunk, invariant):
    """``(c0, c1, idx)`` per tile of the index vector ``rows``: chunks of ``chunk`` entries, or
    under ``invariant`` exactly :func:`tile_rows` entries each (the tail padded with its last row)."""
    step = tile_rows() if invariant else chunk
    for c0, c1 in tile_ranges(rows.numel(), step):
        idx = rows[c0:c1]
        yield c0, c1, (pad_rows(idx, step) if invariant else idx)
