"""``batch_invariant=True``: a sequence's log-probs, extras and gradient rows are bitwise the same
alone, inside batches of other sizes and contents, at another position (across a tile or token-block
boundary) and with another ``chunk_tokens``: ``rl_token_logprobs`` (with and without truncation),
``token_logprobs``, ``linear_token_logprobs`` (chunked and fused) and the loss modules' token stage,
on both backends.  The CPU tests run everywhere; the ``gpu`` ones are what a CUDA run must confirm
(cuBLAS promises run-to-run determinism for one shape, not independence of the other rows).

Under the interpreter the fused kernels' ``tl.dot`` is NumPy's ``matmul``, which rounds a row
differently by its slot in the ``[16, ·]`` block: there the target moves by whole token blocks (16),
the CUDA test by any offset."""
from dataclasses import dataclass, replace
from typing import Optional

import pytest
import torch

from pyfused_po import FusedKTOLoss, FusedPreferenceLoss, linear_token_logprobs, token_logprobs
from pyfused_po.plans.fused_gradient import INVARIANT_PLAN_REASON
from pyfused_po.integrations import rl
from pyfused_po.token.torch_backend import invariant_tiles
from pyfused_po.token.truncated_logprobs import truncated_token_logprobs

TILE = invariant_tiles.INVARIANT_TILE_ROWS


@dataclass(frozen=True)
class Case:
    """One entry point on one path: ``entry`` ``"rl"`` (``rl_token_logprobs``, truncated when
    ``spec`` truncates) or ``"token"`` (``token_logprobs`` / ``linear_token_logprobs``)."""

    entry: str
    path: str  # "logits" | "hidden"
    backend: str
    spec: Optional[dict] = None
    impl: str = "auto"
    frozen: bool = False  # hidden path: a head without gradient (the two-GEMM frozen-head plan)
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    invariant: bool = True

    def run(self, labels, src, chunk_tokens):
        """``(logp, entropy or None)`` shaped like ``labels``."""
        if self.entry == "rl":
            if chunk_tokens is None:
                return rl.rl_token_logprobs(labels, temperature=0.9, with_entropy=True, backend=self.backend,
                                            batch_invariant=self.invariant, **self.spec, **src)
            # the entry point the truncated call routes to, which takes chunk_tokens
            out = truncated_token_logprobs(labels, temperature=0.9, with_entropy=True, backend=self.backend,
                                           batch_invariant=self.invariant, chunk_tokens=chunk_tokens, **self.spec,
                                           **src)
            return out.logps, out.entropy
        extras = () if self.frozen else ("entropy",)
        kw = dict(temperature=0.9, extras=extras, backend=self.backend, batch_invariant=self.invariant)
        if self.path == "logits":
            out = token_logprobs(src["logits"], labels, **kw)
        else:
            out = linear_token_logprobs(src["hidden"], src["weight"], labels, impl=self.impl,
                                        chunk_tokens=chunk_tokens, **kw)
        return (out, None) if not extras else (out.logps, out.entropy)


def _sequence_results(case, target, others, before, chunk_tokens=None):
    """(logp, entropy, grad rows) of the ``target`` sequence's tokens inside a batch of
    ``others[:before]`` + target + ``others[before:]`` (each a (hidden, labels) pair)."""
    weight, (h_t, y_t) = target
    parts = others[:before] + [(h_t, y_t)] + others[before:]
    start = sum(len(h) for h, _ in others[:before])
    hidden = torch.cat([h for h, _ in parts]).to(case.device, case.dtype)
    labels = torch.cat([y for _, y in parts]).to(case.device)
    w = weight.to(case.device, case.dtype).clone()  # a fresh leaf per batch (requires_grad set below)
    if case.path == "logits":
        # Each sequence's logits by its own GEMM: the target's inputs are the same in every batch.
        leaf = torch.cat([h.to(case.device, case.dtype) @ w.T for h, _ in parts]).requires_grad_(True)
        src = dict(logits=leaf)
    else:
        leaf = hidden.detach().requires_grad_(True)
        src = dict(hidden=leaf, weight=w.requires_grad_(not case.frozen))
    logp, entropy = case.run(labels, src, chunk_tokens)
    loss = torch.where(torch.isfinite(logp), logp, 0).sum()
    (loss if entropy is None else loss + 0.1 * entropy.sum()).backward()
    rows = slice(start, start + len(h_t))
    return logp[rows], None if entropy is None else entropy[rows], leaf.grad[rows]


def _layouts(tile):
    """(others' lengths, how many go before the target, chunk_tokens) per batch."""
    return [
        ([tile - 1], 1, None),                # the target straddles the first tile boundary
        ([3, 2 * tile - 6, 5], 2, None),      # other sizes and contents, past two tiles
        ([tile - 1], 1, 5),                   # another chunk_tokens
    ]


def _check(case, v=301, d=32, n=40, layouts=None):
    g = torch.Generator().manual_seed(0)

    def seq(length):
        return torch.randn(length, d, generator=g), torch.randint(0, v, (length,), generator=g)

    weight = torch.randn(v, d, generator=g) / d ** 0.5 * 3
    target = (weight, seq(n))
    alone = _sequence_results(case, target, [], 0)
    for lengths, before, chunk_tokens in layouts or _layouts(TILE):
        got = _sequence_results(case, target, [seq(k) for k in lengths], before, chunk_tokens)
        for name, a, b in zip(("logp", "entropy", "grad"), alone, got):
            assert (a is None) == (b is None)
            assert a is None or torch.equal(a, b), f"{name} differs ({case}, others {lengths}, chunk {chunk_tokens})"


SPECS = [dict(), dict(top_k=50, top_p=0.9), dict(top_p=0.8, min_p=0.02)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_rl_bitwise_identical_in_any_batch_cpu(path, spec):
    """A one-token sequence (a [1, D] GEMM when computed alone without the option: MKL's M = 1
    path rounds differently from its M ≥ 2 one) and a 40-token one."""
    for n in (1, 40):
        _check(Case("rl", path, "torch", spec), n=n)


@pytest.mark.parametrize("path,frozen", [("logits", False), ("hidden", False), ("hidden", True)])
def test_token_stage_bitwise_identical_in_any_batch_cpu(path, frozen):
    """token_logprobs / linear_token_logprobs on the PyTorch backend (fixed 128-row tiles): values,
    entropy and gradient rows; the hidden path with a trainable head (token-outer backward, never
    vocabulary-outer) and a frozen one (the forward's ∂ log p/∂h rows)."""
    for n in (1, 40):
        _check(Case("token", path, "torch", frozen=frozen), n=n)


def test_default_mode_is_not_invariant_cpu():
    """A control: without the option a lone token's hidden-path results differ from the same
    token's inside a batch (MKL's M = 1 GEMM rounds differently on the machines this ran on; a BLAS
    whose M = 1 path agrees would make the control say nothing, hence a skip there)."""
    try:
        _check(Case("token", "hidden", "torch", invariant=False), n=1)
    except AssertionError as err:
        assert "differs" in str(err)
    else:
        pytest.skip("this BLAS gives a one-row GEMM the bits of a many-row one: the control shows nothing here")


@pytest.mark.slow  # ~15 s each under the interpreter
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_rl_bitwise_identical_in_any_batch_triton_backend(path, monkeypatch):
    """The Triton fold (one program per row) under the interpreter: 4-row tiles and a small
    vocabulary, as each radix pass costs ~20 ms per block there."""
    monkeypatch.setattr(invariant_tiles, "INVARIANT_TILE_ROWS", 4)
    _check(Case("rl", path, "triton", dict(top_k=10, min_p=0.05)), v=61, n=3, layouts=_layouts(4))


@pytest.mark.slow  # ~7 s each under the interpreter
@pytest.mark.parametrize("path,impl", [("logits", "auto"), ("hidden", "chunked")])
def test_token_stage_bitwise_identical_triton_backend(path, impl, monkeypatch):
    """The token kernels (logits; the chunked path's fold) under the interpreter.  V = 150 fp32 rows
    (more than one 128-wide block) start at offsets that are not all multiples of 4 elements, so the
    default aligned split of a row depends on its position (checked below); 4-row tiles keep the
    chunked path quick."""
    monkeypatch.setattr(invariant_tiles, "INVARIANT_TILE_ROWS", 4)
    _check(Case("token", path, "triton", impl=impl), v=150, n=3, layouts=_layouts(4))
    if path == "logits":
        with pytest.raises(AssertionError, match="differs"):
            _check(Case("token", path, "triton", invariant=False), v=150, n=3, layouts=_layouts(4)[:1])


@pytest.mark.slow  # ~10 s under the interpreter
def test_fused_linear_bitwise_identical_triton_backend():
    """impl="fused" under the interpreter: fixed splits, an ordered combine and one backward launch
    per vocabulary tile; the target moves by whole 16-token blocks (module docstring)."""
    block = 16
    layouts = [([block], 1, None), ([3, 2 * block - 3, 5], 2, None), ([block], 1, 5)]
    _check(Case("token", "hidden", "triton", impl="fused"), v=150, d=32, n=5, layouts=layouts)


def _padded_batch_results(backend, path, rows_before, seed_others):
    """(logp row, grad row) of one padded sequence (prompt ignored, shift=True) as row
    ``rows_before`` of a ``[B, T]`` batch whose other rows are random."""
    g = torch.Generator().manual_seed(1)
    T, V, D = 8, 37, 8
    w = torch.randn(V, D, generator=g)
    h_t = torch.randn(T, D, generator=g)
    y_t = torch.randint(0, V, (T,), generator=g)
    y_t[:4] = -100  # the prompt
    go = torch.Generator().manual_seed(seed_others)
    n_other = 2
    h = torch.randn(n_other, T, D, generator=go)
    y = torch.randint(0, V, (n_other, T), generator=go)
    y[:, : 1 + seed_others % 4] = -100
    h = torch.cat([h[:rows_before], h_t[None], h[rows_before:]])
    y = torch.cat([y[:rows_before], y_t[None], y[rows_before:]])
    if path == "logits":
        leaf = (h @ w.T).requires_grad_(True)
        out = token_logprobs(leaf, y, shift=True, backend=backend, batch_invariant=True)
    else:
        leaf = h.requires_grad_(True)
        out = linear_token_logprobs(leaf, w, y, shift=True, backend=backend, batch_invariant=True)
    out.sum().backward()
    return out[rows_before], leaf.grad[rows_before]


@pytest.mark.parametrize("backend,path", [("torch", "logits"), ("torch", "hidden"),
                                          pytest.param("triton", "logits", marks=pytest.mark.slow)])  # ~6 s
def test_padded_batch_with_shift(backend, path):
    """[B, T] batches with ignore_index and shift=True: the sequence as row 0 of one batch and row
    2 of another with other rows and prompt lengths (8-row tiles, so the sequence's tokens fall in
    tiles of different rows' tokens)."""
    invariant_tiles_rows = 8
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(invariant_tiles, "INVARIANT_TILE_ROWS", invariant_tiles_rows)
        a = _padded_batch_results(backend, path, 0, 5)
        b = _padded_batch_results(backend, path, 2, 6)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def _all_extras_loss(out):
    return (out.logps.sum() + 0.3 * out.entropy.sum() - 0.2 * out.log_sum_sq_probs.sum()
            + 0.1 * out.mean_logit.sum())


EXTRAS = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")


def _values_and_grads(fn, leaves):
    out = fn()
    grads = torch.autograd.grad(_all_extras_loss(out), leaves)
    return [out.logps, out.entropy, out.log_sum_sq_probs, out.mean_logit, out.is_top1, *grads]


def test_invariant_mode_computes_the_same_function_float64(monkeypatch):
    """float64 on the PyTorch backend: the invariant mode's values and gradients (every extra)
    equal the default mode's to rounding, on logits and hidden (+ bias) inputs with ignored tokens
    (16-row tiles: several tiles and a padded one)."""
    monkeypatch.setattr(invariant_tiles, "INVARIANT_TILE_ROWS", 16)
    g = torch.Generator().manual_seed(2)
    N, V, D = 45, 53, 12
    h = torch.randn(N, D, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(V, D, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(V, generator=g, dtype=torch.float64, requires_grad=True)
    x = torch.randn(N, V, generator=g, dtype=torch.float64, requires_grad=True)
    y = torch.randint(0, V, (N,), generator=g)
    y[::7] = -100
    kw = dict(extras=EXTRAS, temperature=0.8, backend="torch")
    for fn, leaves in (
        (lambda inv: token_logprobs(x, y, batch_invariant=inv, **kw), (x,)),
        (lambda inv: linear_token_logprobs(h, w, y, bias=b, batch_invariant=inv, **kw), (h, w, b)),
    ):
        for a, c in zip(_values_and_grads(lambda: fn(True), leaves), _values_and_grads(lambda: fn(False), leaves)):
            torch.testing.assert_close(a, c, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("path,impl", [("logits", "auto"), ("hidden", "chunked"), ("hidden", "fused")])
def test_invariant_triton_matches_float64_reference(path, impl, monkeypatch):
    """The Triton invariant paths (row split, fixed splits with an ordered combine, per-tile backward
    launches with the mean-logit gradient rescaled per tile) against the float64 PyTorch reference,
    every extra's value and gradient (8-row tiles: padding costs a program per row here)."""
    monkeypatch.setattr(invariant_tiles, "INVARIANT_TILE_ROWS", 8)
    g = torch.Generator().manual_seed(3)
    N, V, D = 13, 150, 16
    h = torch.randn(N, D, generator=g)
    w = torch.randn(V, D, generator=g) / 2
    b = torch.randn(V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[3] = -100
    kw = dict(extras=EXTRAS, temperature=0.8)

    def results(dtype, backend, inv):
        leaves = [t.to(dtype).requires_grad_(True) for t in ((h @ w.T + b,) if path == "logits" else (h, w, b))]
        if path == "logits":
            return _values_and_grads(lambda: token_logprobs(leaves[0], y, backend=backend, batch_invariant=inv,
                                                            **kw), leaves)
        return _values_and_grads(lambda: linear_token_logprobs(
            *leaves[:2], y, bias=leaves[2], impl=impl if inv else "chunked", backend=backend, batch_invariant=inv,
            **kw), leaves)

    for got, ref in zip(results(torch.float32, "triton", True), results(torch.float64, "torch", False)):
        torch.testing.assert_close(got.double(), ref, rtol=2e-5, atol=2e-5)


def _pair_batch(g, P, T, V, D):
    h = torch.randn(2 * P, T, D, generator=g)
    y = torch.randint(0, V, (2 * P, T), generator=g)
    y[:, :3] = -100
    ref = torch.randn(2 * P, generator=g)
    return h, y, ref


@pytest.mark.parametrize("module", ["preference", "kto"])
def test_module_option_runs_staged_plan_and_is_invariant(module):
    """``batch_invariant=True`` as a module option: the staged plan (named reason), and with
    ``reduction="sum"`` (each sequence's ∂L/∂ log p_t then depends on its own sums only) the target
    pair's (sequence's) hidden-state gradient rows are bitwise the same alone and in a batch."""
    V, D, T = 41, 8, 9
    g = torch.Generator().manual_seed(4)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    target = _pair_batch(g, 1, T, V, D)
    others = _pair_batch(g, 2, T, V, D)

    def grad_rows(with_others):
        h, y, ref = target
        if with_others:  # the target pair as pair 1 of 3 ([chosen; rejected] halves)
            ho, yo, ro = others
            h = torch.cat([ho[:1], h[:1], ho[1:2], ho[2:3], h[1:], ho[3:]])
            y = torch.cat([yo[:1], y[:1], yo[1:2], yo[2:3], y[1:], yo[3:]])
            ref = torch.cat([ro[:1], ref[:1], ro[1:2], ro[2:3], ref[1:], ro[3:]])
        h = h.clone().requires_grad_(True)
        if module == "preference":
            loss_fn = FusedPreferenceLoss(beta=0.2, reduction="sum", backend="torch", batch_invariant=True)
            P = h.shape[0] // 2
            out = loss_fn(hidden=h, weight=w, labels=y, ref_chosen_logps=ref[:P], ref_rejected_logps=ref[P:])
        else:
            loss_fn = FusedKTOLoss(beta=0.2, reduction="sum", backend="torch", batch_invariant=True)
            # the target's two sequences desirable / undesirable in both batches
            desirable = torch.tensor([True, False] if not with_others else [False, True, True, False, False, True])
            out = loss_fn(hidden=h, weight=w, labels=y, is_desirable=desirable, ref_logps=ref, kl=0.0)
        out.loss.backward()
        assert loss_fn.fallback_reason == INVARIANT_PLAN_REASON
        P = h.shape[0] // 2
        return (h.grad[0], h.grad[1]) if not with_others else (h.grad[1], h.grad[P + 1])

    for a, b in zip(grad_rows(False), grad_rows(True)):
        assert torch.equal(a, b)


def test_options_that_cannot_be_invariant_are_refused():
    x = torch.randn(4, 7)
    y = torch.randint(0, 7, (4,))
    h, w = torch.randn(4, 3), torch.randn(7, 3)
    with pytest.raises(ValueError, match="batch_invariant=True is not available with vocab_parallel_group"):
        token_logprobs(x, y, vocab_parallel_group=object(), vocab_start=0, batch_invariant=True)
    with pytest.raises(ValueError, match="batch_invariant=True is not available with vocab_parallel_group"):
        linear_token_logprobs(h, w, y, vocab_parallel_group=object(), vocab_start=0, batch_invariant=True)
    with pytest.raises(ValueError, match="cannot take grad_filter"):
        linear_token_logprobs(h, w, y, impl="fused", grad_filter=0.01, batch_invariant=True)
    for entry in (lambda: token_logprobs(x, y, batch_invariant="yes"),
                  lambda: linear_token_logprobs(h, w, y, batch_invariant="yes"),
                  lambda: rl.rl_token_logprobs(y, logits=x, top_k=3, batch_invariant="no"),
                  lambda: FusedPreferenceLoss(batch_invariant=1)):
        with pytest.raises(TypeError, match="batch_invariant must be True or False"):
            entry()
    with pytest.raises(ValueError, match="loss_type 'expo'"):
        FusedPreferenceLoss(loss_type="expo", batch_invariant=True)
    with pytest.raises(ValueError, match="vocab_parallel_group"):
        FusedKTOLoss(vocab_parallel_group=object(), vocab_start=0, batch_invariant=True)


CUDA_PATHS = [("rl", "logits", "auto"), ("rl", "hidden", "auto"), ("token", "logits", "auto"),
              ("token", "hidden", "chunked"), ("token", "hidden", "fused")]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("entry,path,impl", CUDA_PATHS)
def test_bitwise_identical_in_any_batch_cuda(entry, path, impl, dtype):
    """Any offset, other sizes past several 128-row tiles / token blocks; the rl entry with and
    without truncation.  V = 32003 is odd (every row offset misaligned in turn)."""
    base = Case(entry, path, "triton", impl=impl, device="cuda", dtype=dtype)
    for spec in (SPECS if entry == "rl" else [None]):
        _check(replace(base, spec=spec), v=32003, d=1024, n=300)
