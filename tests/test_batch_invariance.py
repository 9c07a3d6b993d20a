"""``rl_token_logprobs(batch_invariant=True)``: a sequence's log-probs, entropy and gradient rows are
bitwise the same alone, inside batches of other sizes and contents, at another position (across a
tile boundary) and with another ``chunk_tokens``; with and without truncation, on both backends
and both paths.  The CPU test runs everywhere; the ``gpu`` one is what a CUDA run must confirm
(cuBLAS promises run-to-run determinism for one shape, not independence of the other rows)."""
import pytest
import torch

from pyfused_po.integrations import rl
from pyfused_po import truncated_logprobs
from pyfused_po.truncated_logprobs import INVARIANT_TILE_ROWS, truncated_token_logprobs


def _sequence_results(path, backend, target, others, before, spec, device, dtype, chunk_tokens=None, invariant=True):
    """(logp, entropy, grad rows) of the ``target`` sequence's tokens inside a batch of
    ``others[:before]`` + target + ``others[before:]`` (each a (hidden, labels) pair)."""
    weight, (h_t, y_t) = target
    parts = others[:before] + [(h_t, y_t)] + others[before:]
    start = sum(len(h) for h, _ in others[:before])
    hidden = torch.cat([h for h, _ in parts]).to(device, dtype)
    labels = torch.cat([y for _, y in parts]).to(device)
    w = weight.to(device, dtype)
    if path == "logits":
        # Each sequence's logits by its own GEMM: the target's inputs are the same in every batch.
        leaf = torch.cat([h.to(device, dtype) @ w.T for h, _ in parts]).requires_grad_(True)
        src = dict(logits=leaf)
    else:
        leaf = hidden.detach().requires_grad_(True)
        src = dict(hidden=leaf, weight=w)
    if chunk_tokens is None:
        logp, entropy = rl.rl_token_logprobs(labels, temperature=0.9, with_entropy=True, backend=backend,
                                             batch_invariant=invariant, **spec, **src)
    else:  # the entry point rl_token_logprobs routes to, which takes chunk_tokens
        logp, entropy, _ = truncated_token_logprobs(labels, temperature=0.9, with_entropy=True, backend=backend,
                                                    batch_invariant=True, chunk_tokens=chunk_tokens, **spec, **src)
    (torch.where(torch.isfinite(logp), logp, 0).sum() + 0.1 * entropy.sum()).backward()
    rows = slice(start, start + len(h_t))
    return logp[rows], entropy[rows], leaf.grad[rows]


def _check(path, backend, spec, device="cpu", dtype=torch.float32, v=301, d=32, n=40, invariant=True,
           tile=INVARIANT_TILE_ROWS):
    g = torch.Generator().manual_seed(0)

    def seq(length):
        return torch.randn(length, d, generator=g), torch.randint(0, v, (length,), generator=g)

    weight = torch.randn(v, d, generator=g) / d ** 0.5 * 3
    target = (weight, seq(n))
    alone = _sequence_results(path, backend, target, [], 0, spec, device, dtype, invariant=invariant)
    batches = [
        ([seq(tile - 1)], 1, None),                   # target straddles the first tile boundary
        ([seq(3), seq(2 * tile - 6), seq(5)], 2, None),  # other sizes and contents, past two tiles
        ([seq(tile - 1)], 1, 5),                      # another chunk_tokens
    ]
    for others, before, chunk_tokens in batches:
        got = _sequence_results(path, backend, target, others, before, spec, device, dtype, chunk_tokens, invariant)
        for name, a, b in zip(("logp", "entropy", "grad"), alone, got):
            assert torch.equal(a, b), f"{name} differs ({path}, {backend}, {spec}, batch of {len(others)} others)"


SPECS = [dict(), dict(top_k=50, top_p=0.9), dict(top_p=0.8, min_p=0.02)]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_bitwise_identical_in_any_batch_cpu(path, spec):
    """A one-token sequence (a [1, D] GEMM when computed alone without the option: MKL's M = 1
    path rounds differently from its M ≥ 2 one) and a 40-token one."""
    for n in (1, 40):
        _check(path, "torch", spec, n=n)


@pytest.mark.slow  # ~15 s each under the interpreter
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_bitwise_identical_in_any_batch_triton_backend(path, monkeypatch):
    """The Triton fold (one program per row) under the interpreter: 4-row tiles and a small
    vocabulary, as each radix pass costs ~20 ms per block there."""
    monkeypatch.setattr(truncated_logprobs, "INVARIANT_TILE_ROWS", 4)
    _check(path, "triton", dict(top_k=10, min_p=0.05), v=61, n=3, tile=4)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_bitwise_identical_in_any_batch_cuda(path, spec, dtype):
    _check(path, "triton", spec, device="cuda", dtype=dtype, v=32003, d=1024, n=300)
