"""Gradient filtering of the fused-linear backward (``grad_filter=``, ``impl="fused"``).

The reference is written from the definition, in float64: the exact logits gradient
``dz = g·(onehot − p)`` of the labelled tokens, tiled as the kernel tiles them (the
compacted labelled tokens in row-major order, ``BLOCK_M`` at a time; the vocabulary in
order of decreasing mean logit over those tokens, ``BLOCK_V`` ids at a time), with exactly
the tiles whose every ``|dz| / |g|`` is below the threshold removed from dH and dW.
fp32 on the CPU (the interpreter's bf16 dot is wrong); bf16 on a GPU (``gpu`` mark).
"""
import pytest
import torch

from pyfused_po.token.grad_filter import resolve_grad_filter
from pyfused_po.kernels.linear_launch import linear_config
from pyfused_po.token.linear_token_logprobs import linear_token_logprobs

B, T, D, V = 3, 17, 19, 150


def make_inputs(B=B, T=T, D=D, V=V, dtype=torch.float32, device="cpu"):
    """A bias spread over 14 nats in shuffled id order and targets among the 40 likeliest
    ids, so that most ids are unlikely (as in a real head) but not in id order; a ragged
    last token block and vocabulary tile, some ignored labels, per-token upstream gradients
    of both signs."""
    hidden = torch.randn(B, T, D) * (8.0 / D) ** 0.5
    weight = torch.randn(V, D)
    bias = torch.randn(V) - 14.0 * torch.rand(V)
    labels = torch.argsort(bias, descending=True)[torch.randint(0, 40, (B, T))]
    labels[0, :4] = -100
    labels[-1, 9] = -100
    g = torch.rand(B, T) * 1.5 + 0.5
    g = g * torch.where(torch.rand(B, T) < 0.5, -1.0, 1.0)
    leaf = lambda t: t.to(device=device, dtype=dtype).requires_grad_()  # noqa: E731
    return leaf(hidden), leaf(weight), leaf(bias), labels.to(device), g.to(device)


def fused_grads(hidden, weight, bias, labels, g, **kw):
    for t in (hidden, weight, bias):
        t.grad = None
    logp = linear_token_logprobs(hidden, weight, labels, bias=bias, impl="fused", backend="triton", **kw)
    (logp * g).sum().backward()
    return tuple(t.grad.detach().cpu().double() for t in (hidden, weight, bias))


def reference_parts(hidden, weight, bias, labels, g, bv, sort_vocab=True):
    """float64 ``(rows, h, dz, ratio, order)`` of the labelled tokens in the kernel's order;
    ``dz``/``ratio`` columns in ``order`` (ids by decreasing mean logit, or id order)."""
    D, V = hidden.shape[-1], weight.shape[0]
    h2 = hidden.detach().cpu().double().reshape(-1, D)
    y = labels.cpu().reshape(-1)
    rows = (y != -100).nonzero().squeeze(1)
    h, y, gm = h2[rows], y[rows], g.cpu().reshape(-1)[rows].double()
    z = h @ weight.detach().cpu().double().T + bias.detach().cpu().double()
    onehot = torch.zeros_like(z)
    onehot[torch.arange(len(rows)), y] = 1.0
    dz = gm[:, None] * (onehot - torch.softmax(z, dim=1))
    mean_z = z.mean(0)
    order = torch.argsort(mean_z, descending=True) if sort_vocab else torch.arange(V)
    # The launcher sorts in fp32: it must put the same ids in each tile, so no two mean
    # logits on either side of a tile boundary may be closer than fp32 noise.
    ranked = mean_z[order]
    edges = torch.arange(bv, V, bv)
    assert not sort_vocab or (ranked[edges - 1] - ranked[edges]).min() > 1e-5
    dz = dz[:, order]
    return rows, h, dz, dz.abs() / gm.abs()[:, None], order


def tile_max(ratio, bm, bv):
    M, V = ratio.shape
    padded = torch.nn.functional.pad(ratio, (0, (-V) % bv, 0, (-M) % bm))
    return padded.view(padded.shape[0] // bm, bm, padded.shape[1] // bv, bv).amax(dim=(1, 3))


def reference_grads(hidden, weight, bias, labels, g, thr, bm, bv, sort_vocab=True):
    """float64 gradients with exactly the tiles of max ``|dz|/|g|`` < ``thr`` dropped from dH/dW."""
    rows, h, dz, ratio, order = reference_parts(hidden, weight, bias, labels, g, bv, sort_vocab)
    V = weight.shape[0]
    skip = tile_max(ratio, bm, bv) < thr
    keep = (~skip).repeat_interleave(bm, 0).repeat_interleave(bv, 1)[:dz.shape[0], :V]
    kept = torch.zeros_like(dz)
    kept[:, order] = dz * keep                 # back to id order
    dh = torch.zeros(labels.numel(), hidden.shape[-1], dtype=torch.float64)
    dh[rows] = kept @ weight.detach().cpu().double()
    db = torch.zeros(V, dtype=torch.float64)
    db[order] = dz.sum(0)
    return dh.view(hidden.shape), kept.T @ h, db, skip


def separated_threshold(ratios):
    """A threshold between two tile maxima at least 20% apart (the kernel's fp32 test then
    classifies every tile as the float64 reference does) that skips some tiles, not all;
    the gap nearest the middle."""
    r = ratios.flatten().sort().values
    n = r.numel()
    for i in sorted(range(1, n), key=lambda i: abs(i - n / 2)):
        if r[i] > 1.2 * r[i - 1] > 0:
            return float((r[i] * r[i - 1]).sqrt())
    raise AssertionError(f"no separated tile maxima in {r.tolist()}")


def test_threshold_zero_is_exactly_unfiltered():
    hidden, weight, bias, labels, g = make_inputs()
    exact = fused_grads(hidden, weight, bias, labels, g)
    zero = fused_grads(hidden, weight, bias, labels, g, grad_filter=0.0)
    for a, b in zip(exact, zero):
        assert torch.equal(a, b)


def test_filter_drops_exactly_the_small_tiles():
    hidden, weight, bias, labels, g = make_inputs()
    cfg = linear_config(V, D, torch.float32)
    bm, bv = cfg["BLOCK_M"], cfg["BLOCK_V"]
    _, _, _, ratio, _ = reference_parts(hidden, weight, bias, labels, g, cfg["BLOCK_V"])
    thr = separated_threshold(tile_max(ratio, bm, bv))
    ref_dh, ref_dw, ref_db, skip = reference_grads(hidden, weight, bias, labels, g, thr, bm, bv)
    assert 0 < skip.sum() < skip.numel()
    got = fused_grads(hidden, weight, bias, labels, g, grad_filter=thr)
    exact_dh, exact_dw, _, _ = reference_grads(hidden, weight, bias, labels, g, 0.0, bm, bv)
    # The same threshold with the vocabulary tiled in id order drops other tiles.
    plain_dh, plain_dw, _, plain_skip = reference_grads(hidden, weight, bias, labels, g, thr, bm, bv, False)
    assert skip.sum() > plain_skip.sum()  # why the launcher sorts the ids
    for name, out, ref, exact, plain in (("dH", got[0], ref_dh, exact_dh, plain_dh),
                                         ("dW", got[1], ref_dw, exact_dw, plain_dw)):
        tol = 1e-5 * ref.abs().max().item()
        torch.testing.assert_close(out.double(), ref, rtol=1e-4, atol=tol, msg=name)
        # Far above the tolerance: an unfiltered kernel, or one tiling ids in order, fails here.
        assert (exact - ref).abs().max() > 100 * tol, name
        assert (plain - ref).abs().max() > 100 * tol, name
    torch.testing.assert_close(got[2].double(), ref_db, rtol=1e-4, atol=1e-5)  # db is never filtered


def test_filter_bound_on_dropped_gradient():
    """Each skipped entry is below ``thr·|g|``: the dropped dH row norms obey the bound."""
    hidden, weight, bias, labels, g = make_inputs()
    cfg = linear_config(V, D, torch.float32)
    _, _, _, ratio, _ = reference_parts(hidden, weight, bias, labels, g, cfg["BLOCK_V"])
    thr = separated_threshold(tile_max(ratio, cfg["BLOCK_M"], cfg["BLOCK_V"]))
    exact = fused_grads(hidden, weight, bias, labels, g)
    got = fused_grads(hidden, weight, bias, labels, g, grad_filter=thr)
    # |ΔdH_i| ≤ Σ_j |dz_ij|·|W_j| ≤ thr·|g_i|·Σ_j |W_j|  (j over dropped ids ⊂ all ids)
    bound = thr * g.abs()[..., None] * weight.detach().norm(dim=1).sum()
    drop = (exact[0] - got[0]).norm(dim=-1, keepdim=True)
    assert (drop <= bound * (1 + 1e-4) + 1e-6).all()
    assert drop.max() > 0


def test_mean_logit_gradient_disables_the_filter():
    hidden, weight, bias, labels, g = make_inputs()

    def grads(**kw):
        for t in (hidden, weight, bias):
            t.grad = None
        out = linear_token_logprobs(hidden, weight, labels, bias=bias, impl="fused", backend="triton",
                                    extras=("mean_logit",), **kw)
        ((out.logps + out.mean_logit) * g).sum().backward()
        return hidden.grad.clone(), weight.grad.clone()

    for a, b in zip(grads(), grads(grad_filter=0.5)):
        assert torch.equal(a, b)


def test_auto_is_eps_over_32_of_the_gemm_dtype():
    assert resolve_grad_filter("auto", torch.bfloat16) == 2.0 ** -12
    assert resolve_grad_filter("auto", torch.float16) == 2.0 ** -15
    assert resolve_grad_filter("auto", torch.float32) == 2.0 ** -28
    assert resolve_grad_filter(None, torch.float32) is None
    assert resolve_grad_filter(1e-3, torch.float32) == 1e-3


def test_auto_runs_and_is_close_in_fp32():
    hidden, weight, bias, labels, g = make_inputs()
    exact = fused_grads(hidden, weight, bias, labels, g)
    auto = fused_grads(hidden, weight, bias, labels, g, grad_filter="auto")
    for a, b in zip(exact, auto):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["auto", "chunked"])
def test_needs_fused(impl):
    hidden, weight, _, labels, _ = make_inputs()
    with pytest.raises(ValueError, match=f"grad_filter .* needs impl='fused', got impl='{impl}'"):
        linear_token_logprobs(hidden, weight, labels, impl=impl, grad_filter="auto")


@pytest.mark.parametrize("value, err, match", [
    (-1e-3, ValueError, "finite float >= 0"),
    (float("nan"), ValueError, "finite float >= 0"),
    (float("inf"), ValueError, "finite float >= 0"),
    ("eps", ValueError, "None, a non-negative float or 'auto', got 'eps'"),
    (True, TypeError, "got bool True"),
    ([1e-3], TypeError, "got list"),
])
def test_bad_values(value, err, match):
    hidden, weight, _, labels, _ = make_inputs()
    with pytest.raises(err, match=match):
        linear_token_logprobs(hidden, weight, labels, impl="fused", grad_filter=value)


def test_filter_under_torch_compile_matches_eager():
    """The threshold reaches the backward through the custom ops (fullgraph, aot_eager)."""
    hidden, weight, bias, labels, g = make_inputs()
    cfg = linear_config(V, D, torch.float32)
    _, _, _, ratio, _ = reference_parts(hidden, weight, bias, labels, g, cfg["BLOCK_V"])
    thr = separated_threshold(tile_max(ratio, cfg["BLOCK_M"], cfg["BLOCK_V"]))

    def loss(h, w, b):
        return (linear_token_logprobs(h, w, labels, bias=b, impl="fused", backend="triton", grad_filter=thr)
                * g).sum()

    torch._dynamo.reset()
    runs = []
    for fn in (loss, torch.compile(loss, fullgraph=True, backend="aot_eager")):
        leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, bias)]
        fn(*leaves).backward()
        runs.append([t.grad for t in leaves])
    exact = fused_grads(hidden, weight, bias, labels, g)
    for eager, compiled in zip(*runs):
        assert torch.equal(compiled, eager)
    assert not torch.allclose(runs[0][0].double(), exact[0], rtol=1e-4, atol=1e-5)  # the filter acted


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_filter_on_gpu_tiles(dtype):
    """The GPU's 128 × 128 tiles, compiled kernels (bf16 dots are only right here)."""
    shape = dict(B=2, T=200, D=64, V=1000)
    hidden, weight, bias, labels, g = make_inputs(**shape, dtype=dtype, device="cuda")
    cfg = linear_config(shape["V"], shape["D"], dtype)
    bm, bv = cfg["BLOCK_M"], cfg["BLOCK_V"]
    thr = separated_threshold(tile_max(reference_parts(hidden, weight, bias, labels, g, bv)[3], bm, bv))
    ref_dh, ref_dw, ref_db, skip = reference_grads(hidden, weight, bias, labels, g, thr, bm, bv)
    assert 0 < skip.sum() < skip.numel()
    got = fused_grads(hidden, weight, bias, labels, g, grad_filter=thr)
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    for name, out, ref in (("dH", got[0], ref_dh), ("dW", got[1], ref_dw), ("db", got[2], ref_db)):
        assert (out - ref).norm() <= rel * ref.norm(), name
