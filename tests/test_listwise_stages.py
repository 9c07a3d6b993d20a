"""Groups end to end on the staged plan (issue 25, item 3 as far as it goes today): logits and
hidden + head, padded and packed, both backends, against float64 references (log-softmax
gathered in float64, the listwise formulas of tests/_listwise_reference.py) in value and
gradient."""
import pytest
import torch

from pyfused_po.plans.listwise_stages import listwise_loss_from_hidden, listwise_loss_from_logits

from _listwise_reference import groups, ref_pairwise, ref_plackett_luce, reference

S, T, V, D, K = 6, 5, 16, 8, 3
IGNORE = -100


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T, D, generator=g, dtype=torch.float64)
    ref_hidden = hidden + 0.3 * torch.randn(S, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / 2
    labels = torch.randint(0, V, (S, T), generator=g)
    lengths = [5, 3, 4, 5, 3, 4]  # tokens per sequence; the rest of each row is padding
    for s, n in enumerate(lengths):
        labels[s, n:] = IGNORE
    labels[:, 1] = IGNORE  # a prompt token inside every sequence
    scores = torch.tensor([0.5, 2.0, 1.0, 7.0, 3.0, 5.0], dtype=torch.float64)
    return hidden, ref_hidden, weight, labels, lengths, scores


def _sums64(logits, labels):
    """Per-row Σ log softmax(logits_t)[y_{t+1}] over labelled tokens (shift), float64."""
    logp = torch.log_softmax(logits[:, :-1].to(torch.float64), dim=-1)
    y = labels[:, 1:]
    keep = y != IGNORE
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros_like(picked)).sum(-1)


def _pack(x, lengths):
    """Rows' first n tokens, one stream [1, N, ...] with its cu_seqlens."""
    stream = torch.cat([x[s, :n] for s, n in enumerate(lengths)]).unsqueeze(0)
    cu = torch.tensor([0] + list(torch.tensor(lengths).cumsum(0)), dtype=torch.int32)
    return stream, cu


def _expected(loss_type, policy, ref, scores, n_tokens, beta, group_ids):
    if loss_type == "plackett_luce":
        return reference(ref_plackett_luce, policy, ref, scores, group_ids, beta)

    def group_ipo(u, psi, members):
        r = [policy[i] - ref[i] for i in members]
        n = [n_tokens[i] for i in members]
        return ref_pairwise(lambda i, j: (r[i] / n[i] - r[j] / n[j] - 1 / (2 * beta)) ** 2)(u, psi)

    out = []
    for members in groups(scores, group_ids):
        u = [beta * (policy[i] - ref[i]) for i in members]
        out.append(group_ipo(u, [float(scores[i]) for i in members], members))
    return torch.stack(out)


# Every path × layout × backend for a listwise loss; two crossings for an all-pairs loss that reads lengths.
CASES = [("plackett_luce", path, layout, backend) for path in ("logits", "hidden") for layout in ("padded", "packed")
         for backend in ("torch", "triton")]
CASES += [("ipo", "logits", "padded", "triton"), ("ipo", "hidden", "packed", "torch")]


@pytest.mark.parametrize("loss_type, path, layout, backend", CASES)
def test_groups_end_to_end(loss_type, path, layout, backend):
    hidden, ref_hidden, weight, labels, lengths, scores = _data(seed=len(loss_type) + len(path))
    dtype = torch.float64 if backend == "torch" else torch.float32
    beta = 0.4
    # Reference, float64: groups of consecutive rows (0, 1, 2) and (3, 4, 5).
    h64 = hidden.clone().requires_grad_()
    w64 = weight.clone().requires_grad_()
    policy = _sums64(h64 @ w64.T, labels)
    ref = _sums64(ref_hidden @ weight.T, labels)
    n_tokens = (labels[:, 1:] != IGNORE).sum(-1).to(torch.float64)
    expected = _expected(loss_type, policy, ref, scores, n_tokens, beta, [s // K for s in range(S)])
    expected.mean().backward()

    h = hidden.to(dtype).requires_grad_()
    w = weight.to(dtype).requires_grad_()
    y, ref_h, packed = labels, ref_hidden.to(dtype), {}
    if layout == "packed":
        (h_in, cu), (y, _), (ref_h, _) = _pack(h, lengths), _pack(labels, lengths), _pack(ref_h, lengths)
        packed = dict(cu_seqlens=cu)
    else:
        h_in = h
    kw = dict(loss_type=loss_type, beta=beta, group_size=K, shift=True, backend=backend,
              scores=scores.to(dtype), **packed)
    if path == "logits":
        out = listwise_loss_from_logits(h_in @ w.T, y, ref_logits=ref_h @ weight.to(dtype).T, **kw)
    else:
        out = listwise_loss_from_hidden(h_in, w, y, ref_hidden=ref_h, **kw)
    out.loss.backward()
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert torch.allclose(out.losses.to(torch.float64), expected.detach(), rtol=tol, atol=tol), \
        (out.losses, expected)
    assert torch.allclose(h.grad.to(torch.float64), h64.grad, rtol=tol, atol=tol)
    assert torch.allclose(w.grad.to(torch.float64), w64.grad, rtol=tol, atol=tol)


def test_packed_group_index_in_stream_order():
    """Packed sequences numbered in stream order: a shuffled stream with group_index gives the
    losses of the padded batch with group_size."""
    hidden, ref_hidden, weight, labels, lengths, scores = _data(seed=3)
    logits, ref_logits = hidden @ weight.T, ref_hidden @ weight.T
    padded = listwise_loss_from_logits(logits, labels, scores, ref_logits=ref_logits, group_size=K, shift=True,
                                       backend="torch", loss_type="softmax_dpo")
    perm = torch.tensor([4, 0, 3, 2, 5, 1])
    stream, cu = _pack(logits[perm], [lengths[i] for i in perm])
    ref_stream, _ = _pack(ref_logits[perm], [lengths[i] for i in perm])
    y, _ = _pack(labels[perm], [lengths[i] for i in perm])
    packed = listwise_loss_from_logits(stream, y, scores[perm], ref_logits=ref_stream, cu_seqlens=cu,
                                       group_index=perm // K, shift=True, backend="torch", loss_type="softmax_dpo")
    assert torch.allclose(packed.losses, padded.losses, rtol=1e-12)


def test_reference_inputs_agree_and_are_exclusive():
    hidden, ref_hidden, weight, labels, _, scores = _data(seed=4)
    logits, ref_logits = hidden @ weight.T, ref_hidden @ weight.T
    kw = dict(group_size=K, shift=True, backend="torch", loss_type="lipo_lambda")
    a = listwise_loss_from_logits(logits, labels, scores, ref_logits=ref_logits, **kw)
    ref_tokens = torch.log_softmax(ref_logits, -1)[:, :-1].gather(-1, labels[:, 1:].clamp(min=0).unsqueeze(-1))
    ref_tokens = torch.cat([torch.zeros(S, 1, dtype=torch.float64), ref_tokens.squeeze(-1)], dim=1)
    ref_tokens = torch.where(labels != IGNORE, ref_tokens, torch.zeros_like(ref_tokens))
    b = listwise_loss_from_logits(logits, labels, scores, ref_token_logps=ref_tokens, **kw)
    c = listwise_loss_from_logits(logits, labels, scores, ref_logps=_sums64(ref_logits, labels), **kw)
    assert torch.allclose(a.losses, b.losses, rtol=1e-12) and torch.allclose(a.losses, c.losses, rtol=1e-12)
    with pytest.raises(ValueError, match="pass one reference input, got ref_logps and ref_logits"):
        listwise_loss_from_logits(logits, labels, scores, ref_logits=ref_logits, ref_logps=c.rewards, **kw)


def test_frozen_head():
    """A head without gradient (LoRA): the hidden states' gradient is the reference's, the head gets none."""
    hidden, ref_hidden, weight, labels, _, scores = _data(seed=5)
    h64 = hidden.clone().requires_grad_()
    expected = reference(ref_plackett_luce, _sums64(h64 @ weight.T, labels), _sums64(ref_hidden @ weight.T, labels),
                         scores, [s // K for s in range(S)], 0.4)
    expected.mean().backward()
    h = hidden.clone().requires_grad_()
    out = listwise_loss_from_hidden(h, weight, labels, scores, ref_hidden=ref_hidden, group_size=K, shift=True,
                                    backend="torch", loss_type="plackett_luce", beta=0.4)
    out.loss.backward()
    assert weight.grad is None
    assert torch.allclose(out.losses, expected.detach(), rtol=1e-10)
    assert torch.allclose(h.grad, h64.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("change, match", [
    (dict(group_size=4), "group_size=4 does not divide the 6 sequences"),
    (dict(scores=torch.tensor([0.0, 1, 2, 3, 4, float("nan")])), "scores must be finite"),
    (dict(ref_logits=None), "needs a reference"),
    (dict(loss_type="aot"), "does not apply to groups"),
    (dict(nll_index=torch.tensor([0, 1])), "is a sequence of group 0"),
])
def test_group_errors_come_before_the_token_stage(change, match):
    """Integer logits would make the token stage raise a TypeError: the group checks answer first."""
    _, _, _, labels, _, scores = _data(seed=6)
    bad_logits = torch.ones(S, T, V, dtype=torch.long)
    kw = dict(scores=scores, ref_logits=bad_logits, group_size=K, loss_type="plackett_luce")
    kw.update(change)
    with pytest.raises(ValueError, match=match):
        listwise_loss_from_logits(bad_logits, labels, **kw)
    with pytest.raises(TypeError, match="logits must be a floating"):  # the same call with good groups
        listwise_loss_from_logits(bad_logits, labels, scores=scores, ref_logits=bad_logits, group_size=K)
