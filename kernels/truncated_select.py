"""Token stage under a sampler's truncation: the kept set's threshold by radix select, no sort.

One program handles one row ``x [V]`` of raw logits (a tile row: the caller gathers the labelled
rows).  With ``d = z − max z`` (``z`` the transformed logits, ``/ T`` included) the kept set of
top-k → top-p → min-p is ``{d ≥ τ}`` (see ``pyfused_po/token/truncated_support.py`` for the rules).
Each threshold is found by streaming over the row, never by sorting it:

* every ``d`` maps to an order-preserving integer key (:func:`_key`, 32 bits);
* an MSB-first radix select with 4-bit digits takes 8 passes: pass ``j`` builds the 16 bucket
  totals of digit ``j`` among the elements whose higher digits equal the prefix found so far, and
  picks the highest bucket at which the total from the top (elements above the prefix, carried,
  plus the buckets ≥ b) reaches the target.  After 8 passes the prefix is the key of the threshold
  element itself;
* top-k counts elements (target ``k``): the key of the k-th largest value;
* top-p sums ``e^d`` over the top-k survivors (target ``p · Σ e^d``, the total coming out of its
  first pass): the value at which the descending prefix's mass reaches ``p``;
* min-p is a per-element test, ``e^d ≥ min_p``; with ``MINP_FIRST`` (vLLM's order) it also
  filters what top-k counts and top-p sums.

Passes over the row: 1 (max) + 8 (top-k) + 8 (top-p) + 1 (final: Σ e^d, Σ e^d·d, min kept d, the
label) = 18 at most, each reading the row's V elements (2 or 4 bytes each); the backward reads it
twice (max, then the gradient) and writes ``V`` fp32.  The row is usually L2-resident across the
passes (one 128k-vocabulary bf16 row is 256 KB).  Boundary decisions use fp32 sums in block order,
so a top-p boundary within rounding of ``p`` may fall one element differently from a sorted
cumulative sum in float64.
"""
import triton
import triton.language as tl

from .tl_utils import transform, transform_grad

DIGIT_BITS = 4
BUCKETS = 16
PASSES = 8  # 32-bit keys / 4-bit digits


@triton.jit
def _key(d):
    """Order-preserving int64 key in [0, 2³²) of fp32 ``d`` (−0.0 folded into +0.0)."""
    i = (d + 0.0).to(tl.int32, bitcast=True)
    ordered = tl.where(i >= 0, i, i ^ 0x7FFFFFFF)  # negative floats: reverse their order
    return ordered.to(tl.int64) + 2147483648


@triton.jit
def _value(key):
    """Inverse of :func:`_key`: the fp32 value of a key."""
    ordered = (key - 2147483648).to(tl.int32)
    i = tl.where(ordered >= 0, ordered, ordered ^ 0x7FFFFFFF)
    return i.to(tl.float32, bitcast=True)


@triton.jit
def _row_d(x, ref, c, scale, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr, RAW_DIFF: tl.constexpr):
    """``d = z − max z`` as :func:`pyfused_po.token.torch_backend.token.row_stats` forms it: with
    ``RAW_DIFF`` (no softcap, scale/T ≠ 1) ``(x − x_ref)·c`` with ``x_ref`` the raw logit of the
    max, else ``transform(x) − m``."""
    if RAW_DIFF:
        d = (x.to(tl.float32) - ref) * c
    else:
        d = transform(x, scale, inv_temp, softcap, HAS_SOFTCAP) - ref
    return d


@triton.jit
def _row_ref(x_ptr, V, c, scale, inv_temp, softcap, HAS_SOFTCAP: tl.constexpr, RAW_DIFF: tl.constexpr,
             BLOCK: tl.constexpr):
    """The reference of :func:`_row_d`: the raw logit of the row's largest ``z`` (``RAW_DIFF``) or
    the largest ``z``; 0 for a row without a finite one."""
    best = tl.full([BLOCK], -float("inf"), tl.float32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs, mask=offs < V, other=0.0)
        if RAW_DIFF:
            k = tl.where(c > 0, x.to(tl.float32), -x.to(tl.float32))
        else:
            k = transform(x, scale, inv_temp, softcap, HAS_SOFTCAP)
        best = tl.maximum(best, tl.where(offs < V, k, -float("inf")))
    top = tl.max(best, 0)
    top = tl.where((top == float("inf")) | (top == -float("inf")), 0.0, top)
    if RAW_DIFF:
        top = tl.where(c > 0, top, -top)
    return top


@triton.jit
def _digit_totals(x_ptr, V, ref, c, scale, inv_temp, softcap, prefix, shift, floor, min_p,
                  MASS: tl.constexpr, MINP_FIRST: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
                  RAW_DIFF: tl.constexpr, BLOCK: tl.constexpr):
    """``[16]`` totals (count, or Σ e^d with ``MASS``) per value of the digit at ``shift`` among
    the row's elements with ``d ≥ floor`` (and ``e^d ≥ min_p`` under ``MINP_FIRST``) whose key
    agrees with ``prefix`` above that digit."""
    buckets = tl.arange(0, 16)
    acc = tl.zeros([16], tl.float32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        valid = offs < V
        d = _row_d(tl.load(x_ptr + offs, mask=valid, other=0.0), ref, c, scale, inv_temp, softcap,
                   HAS_SOFTCAP, RAW_DIFF)
        key = _key(d)
        e = tl.exp(d)
        alive = valid & (d >= floor) & ((key >> (shift + 4)) == (prefix >> (shift + 4)))
        if MINP_FIRST:
            alive = alive & (e >= min_p)
        if MASS:
            w = e
        else:
            w = tl.full([BLOCK], 1.0, tl.float32)
        hit = (((key >> shift) & 15)[:, None] == buckets[None, :]) & alive[:, None]
        acc += tl.sum(tl.where(hit, w[:, None], 0.0), axis=0)
    return acc


@triton.jit
def _walk(acc, carried, target):
    """The highest bucket ``b`` at which ``carried + Σ_{b' ≥ b} acc`` reaches ``target`` (the
    lowest non-empty one when none does: rounding at p ≈ 1), and the new ``carried``."""
    buckets = tl.arange(0, 16)
    above = tl.sum(acc, 0) - tl.cumsum(acc, 0)  # totals of the buckets strictly above b
    reach = carried + above + acc >= target
    lowest = tl.min(tl.where(acc > 0, buckets, 16), 0)
    b = tl.max(tl.where(reach, buckets, -1), 0)
    b = tl.where(b < 0, lowest, b)
    b = tl.minimum(b, 15)
    return b, carried + tl.sum(tl.where(buckets == b, above, 0.0), 0)


@triton.jit
def _select(x_ptr, V, ref, c, scale, inv_temp, softcap, floor, min_p, goal,
            MASS: tl.constexpr, MINP_FIRST: tl.constexpr, HAS_SOFTCAP: tl.constexpr, RAW_DIFF: tl.constexpr,
            BLOCK: tl.constexpr):
    """The threshold value of one radix select: count target ``goal`` (top-k), or with ``MASS``
    the fraction ``goal`` of the surviving mass (top-p)."""
    prefix = tl.zeros([], tl.int64)
    carried = tl.zeros([], tl.float32)
    target = tl.zeros([], tl.float32) + goal
    for j in tl.static_range(8):
        shift = 28 - 4 * j
        acc = _digit_totals(x_ptr, V, ref, c, scale, inv_temp, softcap, prefix, shift, floor, min_p,
                            MASS, MINP_FIRST, HAS_SOFTCAP, RAW_DIFF, BLOCK)
        if MASS and j == 0:
            target = goal * tl.sum(acc, 0)  # the first pass sees every survivor: Σ e^d
        b, carried = _walk(acc, carried, target)
        prefix = prefix + (b.to(tl.int64) << shift)
    return _value(prefix)


@triton.jit
def truncated_forward_kernel(
    x_ptr, stride_xc, y_ptr, logp_ptr, stats_ptr, ent_ptr,
    V, top_k, top_p, min_p, scale, inv_temp, softcap, c,
    TOP_K: tl.constexpr, TOP_P: tl.constexpr, MIN_P: tl.constexpr, MINP_FIRST: tl.constexpr,
    HAS_SOFTCAP: tl.constexpr, RAW_DIFF: tl.constexpr, WANT_ENTROPY: tl.constexpr, BLOCK: tl.constexpr,
):
    """Per row: ``logp = d_y − log s̃`` (−inf when the label is outside the kept set),
    ``stats = (log s̃, τ)``, ``entropy = log s̃ − Σ_K e^d·d / s̃``."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xc
    ref = _row_ref(x_row, V, c, scale, inv_temp, softcap, HAS_SOFTCAP, RAW_DIFF, BLOCK)
    floor = tl.zeros([], tl.float32) - float("inf")
    if TOP_K:
        floor = _select(x_row, V, ref, c, scale, inv_temp, softcap, floor, min_p, top_k + 0.0,
                        False, MINP_FIRST, HAS_SOFTCAP, RAW_DIFF, BLOCK)
    if TOP_P:
        floor = tl.maximum(floor, _select(x_row, V, ref, c, scale, inv_temp, softcap, floor, min_p, top_p,
                                          True, MINP_FIRST, HAS_SOFTCAP, RAW_DIFF, BLOCK))
    s = tl.zeros([BLOCK], tl.float32)
    a = tl.zeros([BLOCK], tl.float32)
    low = tl.full([BLOCK], float("inf"), tl.float32)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        valid = offs < V
        d = _row_d(tl.load(x_row + offs, mask=valid, other=0.0), ref, c, scale, inv_temp, softcap,
                   HAS_SOFTCAP, RAW_DIFF)
        e = tl.exp(d)
        kept = valid & (d >= floor)
        if MIN_P:
            kept = kept & (e >= min_p)
        s += tl.where(kept, e, 0.0)
        a += tl.where(kept & (e > 0.0), e * d, 0.0)
        low = tl.minimum(low, tl.where(kept, d, float("inf")))
    tau = tl.min(low, 0)
    s_row = tl.sum(s, 0)
    log_s = tl.log(s_row)
    y = tl.load(y_ptr + row).to(tl.int64)
    d_y = _row_d(tl.load(x_row + y), ref, c, scale, inv_temp, softcap, HAS_SOFTCAP, RAW_DIFF)
    tl.store(logp_ptr + row, tl.where(d_y >= tau, d_y - log_s, -float("inf")))
    tl.store(stats_ptr + 2 * row, log_s)
    tl.store(stats_ptr + 2 * row + 1, tau)
    if WANT_ENTROPY:
        tl.store(ent_ptr + row, log_s - tl.sum(a, 0) / s_row)


@triton.jit
def truncated_backward_kernel(
    x_ptr, stride_xc, y_ptr, stats_ptr, g_ptr, gh_ptr, ent_ptr, out_ptr, stride_oc,
    V, scale, inv_temp, softcap, c,
    HAS_G: tl.constexpr, HAS_GH: tl.constexpr, HAS_SOFTCAP: tl.constexpr, RAW_DIFF: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """``∂L/∂x = (g·(onehot − p̃) − g_H·p̃·(log p̃ + H))·dz/dx`` on the kept set ``d ≥ τ``, 0 elsewhere;
    ``g`` is dropped when the label is outside the kept set (its log p̃ is a constant −inf)."""
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xc
    ref = _row_ref(x_row, V, c, scale, inv_temp, softcap, HAS_SOFTCAP, RAW_DIFF, BLOCK)
    log_s = tl.load(stats_ptr + 2 * row)
    tau = tl.load(stats_ptr + 2 * row + 1)
    y = tl.load(y_ptr + row).to(tl.int64)
    g = tl.zeros([], tl.float32)
    if HAS_G:
        d_y = _row_d(tl.load(x_row + y), ref, c, scale, inv_temp, softcap, HAS_SOFTCAP, RAW_DIFF)
        g = tl.where(d_y >= tau, tl.load(g_ptr + row), 0.0)
    g_h = tl.zeros([], tl.float32)
    h = tl.zeros([], tl.float32)
    if HAS_GH:
        g_h = tl.load(gh_ptr + row)
        h = tl.load(ent_ptr + row)
    for v0 in range(0, V, BLOCK):
        offs = v0 + tl.arange(0, BLOCK)
        valid = offs < V
        x = tl.load(x_row + offs, mask=valid, other=0.0)
        d = _row_d(x, ref, c, scale, inv_temp, softcap, HAS_SOFTCAP, RAW_DIFF)
        logq = d - log_s
        q = tl.where(d >= tau, tl.exp(logq), 0.0)
        dz = tl.where(offs == y, g, 0.0) - g * q
        dz -= g_h * tl.where(q > 0.0, q * (logq + h), 0.0)
        dz = dz * transform_grad(x, scale, inv_temp, softcap, HAS_SOFTCAP)
        tl.store(out_ptr + row * stride_oc + offs, dz, mask=valid)
