"""How a token kernel walks one logits row: an aligned, unmasked body and a masked edge.

The row's elements ``[0, V)`` start at element offset ``off`` of a 16-byte-aligned
base.  With ``ALIGN`` elements per 16 bytes (8 for bf16/fp16, 4 for fp32; 1 when the
vocabulary axis is strided), the row splits into

    head  [0, head)                     head = (−off) mod ALIGN   (at most ALIGN − 1)
    body  [head, head + n_full·BLOCK_V)  whole blocks starting on a 16-byte boundary
    tail  [tail_start, V)               fewer than BLOCK_V elements

The body is read with unmasked 128-bit loads (its start ``off + head`` is a multiple
of ``ALIGN``, which the compiler is told), whatever the row stride: rows of odd
length (V = 50,257) keep vector loads.  Head and tail together form the *edge*,
``n_edge < BLOCK_V + ALIGN`` elements visited through :func:`edge_index` in at most two
masked blocks.  Any split is correct; on a base pointer that is not 16-byte aligned (a
view at an odd storage offset) only the vector width is lost, since Triton's launch
specialization then gives the pointer no divisibility hint.

Each block is held as ``[BLOCK_V // LANE, LANE]``: one thread owns whole ``LANE``-wide
rows (16 bytes), so per-lane running statistics need no cross-thread reduction until
the one final combine.
"""
import triton
import triton.language as tl


@triton.jit
def row_split(off, V, ALIGN: tl.constexpr, BLOCK_V: tl.constexpr):
    """``(body_off, head, n_full, tail_start, n_edge)`` of a row at element offset ``off``.

    ``body_off = off + head`` (int64, a multiple of ``ALIGN``) is where the body starts
    in the tensor's storage; ``head``, ``tail_start`` and ``n_edge`` are row indices and
    counts (int32)."""
    body_off = tl.multiple_of(((off + (ALIGN - 1)) // ALIGN) * ALIGN, ALIGN)
    head = tl.minimum(body_off - off, V).to(tl.int32)
    n_full = (V - head) // BLOCK_V
    tail_start = head + n_full * BLOCK_V
    n_edge = head + (V - tail_start)
    return body_off, head, n_full, tail_start, n_edge


@triton.jit
def edge_index(k, head, tail_start):
    """Row index of the ``k``-th edge element: the head first, then the tail."""
    return tl.where(k < head, k, tail_start + (k - head))


@triton.jit
def lane_offsets(BLOCK_V: tl.constexpr, LANE: tl.constexpr):
    """``[BLOCK_V // LANE, LANE]`` offsets ``0 … BLOCK_V − 1``, row-major (a lane row per 16 bytes)."""
    return tl.arange(0, BLOCK_V // LANE)[:, None] * LANE + tl.arange(0, LANE)[None, :]


@triton.jit
def vocab_offset(j, ALIGN: tl.constexpr):
    """Row index ``j`` ready to multiply by the vocabulary stride: int64 when the axis is
    strided (``ALIGN == 1``; ``j · stride`` can pass 2³¹), int32 when it is contiguous."""
    if ALIGN == 1:
        return j.to(tl.int64)
    else:
        return j


@triton.jit
def block_step(stride_v, BLOCK_V: tl.constexpr, ALIGN: tl.constexpr):
    """Storage distance between consecutive body blocks, ``BLOCK_V · stride_v`` (int64 when the
    vocabulary axis is strided, as :func:`vocab_offset`)."""
    return vocab_offset(tl.zeros([], tl.int32) + BLOCK_V, ALIGN) * stride_v


@triton.jit
def zero_row(dx_ptr, off_d, V, stride_dv, ALIGN: tl.constexpr, BLOCK_V: tl.constexpr, LANE: tl.constexpr):
    """Zeros one row's ``V`` gradient entries (a row with no label), split as the backward
    kernels' loops split a row: an aligned unmasked body, a masked head and tail."""
    k = lane_offsets(BLOCK_V, LANE)
    body_off, head, n_full, tail_start, n_edge = row_split(off_d, V, ALIGN, BLOCK_V)
    zeros = tl.zeros([BLOCK_V // LANE, LANE], dtype=dx_ptr.dtype.element_ty)
    dx_body = dx_ptr + body_off
    for i in range(0, n_full):
        tl.store(dx_body + vocab_offset(i * BLOCK_V + k, ALIGN) * stride_dv, zeros)
    for e0 in range(0, n_edge, BLOCK_V):
        idx = edge_index(e0 + k, head, tail_start)
        tl.store(dx_ptr + off_d + vocab_offset(idx, ALIGN) * stride_dv, zeros, mask=e0 + k < n_edge)
