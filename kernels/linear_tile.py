"""The logits tile and the grouped program order shared by the fused-linear kernels."""
import triton
import triton.language as tl


@triton.jit
def logits_tile(h_ptr, stride_hn, stride_hd, w_ptr, stride_wv, stride_wd, b_ptr,
                rows, in_m, offs_v, in_v, D,
                HAS_BIAS: tl.constexpr, DOT_FP32: tl.constexpr, INPUT_PRECISION: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 ``[BLOCK_M, BLOCK_V]`` tile ``x = H[rows]·W[offs_v]ᵀ (+ b)``, ``tl.dot`` over ``D``.

    Rows of ``H`` are gathered through ``rows`` (the compacted labelled tokens) and the
    ``Wᵀ`` slice ``[BLOCK_D, BLOCK_V]`` is read straight from ``W [V, D]`` by strides.
    Out-of-range rows/columns are 0.  ``DOT_FP32`` upcasts the operands (the Triton 3.9
    interpreter's bf16 dot is wrong); ``INPUT_PRECISION`` is ``"ieee"`` for fp32 inputs.
    """
    offs_d = tl.arange(0, BLOCK_D).to(tl.int64)
    acc = tl.zeros([BLOCK_M, BLOCK_V], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + offs_d
        in_d = dd < D
        h = tl.load(h_ptr + rows[:, None] * stride_hn + dd[None, :] * stride_hd,
                    mask=in_m[:, None] & in_d[None, :], other=0.0)
        w = tl.load(w_ptr + offs_v[None, :] * stride_wv + dd[:, None] * stride_wd,
                    mask=in_v[None, :] & in_d[:, None], other=0.0)
        if DOT_FP32:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc += tl.dot(h, w, input_precision=INPUT_PRECISION)
    if HAS_BIAS:
        acc += tl.load(b_ptr + offs_v, mask=in_v, other=0.0).to(tl.float32)[None, :]
    return acc


@triton.jit
def grouped_program(n_m, n_v, GROUP_M: tl.constexpr):
    """``(pid_m, pid_v)`` of this program in a 1-D grid of ``n_m × n_v`` programs.

    Programs are ordered in groups of ``GROUP_M`` token blocks; inside a group the token
    block runs fastest, then the vocabulary index (a tile or a split).  The programs that
    run at the same time therefore share a few token blocks (their hidden rows and dH rows
    stay in L2 over the whole vocabulary sweep) and each vocabulary tile is touched by at
    most ``GROUP_M`` of them at once (shared W reads, few reducers per dW tile).  The last
    group may hold fewer than ``GROUP_M`` token blocks.  The index arithmetic is int32 (a
    grid never exceeds 2³¹ programs; int64 division costs ~10× the instructions); the
    results are widened to int64 for the offsets.
    """
    pid = tl.program_id(0)
    per_group = GROUP_M * n_v
    first_m = (pid // per_group) * GROUP_M
    rows_here = tl.minimum(n_m - first_m, GROUP_M)
    local = pid % per_group
    return (first_m + local % rows_here).to(tl.int64), (local // rows_here).to(tl.int64)
