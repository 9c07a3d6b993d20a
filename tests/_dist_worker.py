"""One gloo rank of the distributed tests: ``python _dist_worker.py RANK WORLD PORT OUT_DIR``.

Every rank builds the same full tensors from fixed seeds, keeps its vocabulary or
sequence slice, runs the distributed code, and compares with the single-process
float64 result on the full tensors: token values and gradients against the formulas
of ``reference.py``, losses and metrics against ``FusedPreferenceLoss`` /
``FusedKTOLoss`` on the torch backend in float64.  Collectives are counted by
wrapping ``torch.distributed.all_gather`` / ``all_reduce``.
"""
import json
import os
import sys
import traceback
from datetime import timedelta

os.environ["TRITON_INTERPRET"] = "1"  # before anything imports triton

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

from reference import max_rel_err, token_logprobs_ref  # noqa: E402

VAL_TOL = 2e-5  # fp32 results vs float64 (relative to the largest value)
GRAD_TOL = 1e-4
BACKENDS = ("torch", "triton")
COUNTS = {"all_gather": 0, "all_reduce": 0}


def _count(name, fn):
    def wrapped(*args, **kwargs):
        COUNTS[name] += 1
        return fn(*args, **kwargs)
    return wrapped


def reset_counts():
    for k in COUNTS:
        COUNTS[k] = 0


def expect_counts(what, **expected):
    got = dict(COUNTS)
    want = {k: expected.get(k, 0) for k in COUNTS}
    assert got == want, f"{what}: collectives {got}, expected {want}"
    reset_counts()


def close(actual, expected, tol, what, floor=None):
    """max |a − e| < tol · max|e| (or tol · max(max|e|, floor): values that are differences
    of O(floor) fp32 sums, e.g. rewards β(ℓ − ℓʳ), carry O(floor) rounding)."""
    actual, expected = actual.detach().double(), expected.detach().double()
    if floor is None:
        err = max_rel_err(actual, expected)
    else:
        err = ((actual - expected).abs().max() / expected.abs().max().clamp(min=floor)).item()
    assert err < tol, f"{what}: relative error {err:.3g} >= {tol} ({actual.tolist()} vs {expected.tolist()})"


def my_range(n, world, rank):
    """This rank's ``[start, stop)`` of ``n`` items split as evenly as tensor_split does."""
    sizes = [len(c) for c in torch.arange(n).tensor_split(world)]
    start = sum(sizes[:rank])
    return start, start + sizes[rank]


# ----------------------------------------------------------------------------- data

def paired_batch(V=37, T=7, P=2, seed=3):
    """Logits [2P, T, V], labels with an ignored prompt and padding, reference values."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(2 * P, T, V, generator=g) * 2.0
    tokens = torch.randint(0, V, (2 * P, T), generator=g)
    labels = tokens.clone()
    labels[:, :2] = -100  # prompt
    labels[1, -2:] = -100  # padding
    labels[2, -1] = -100
    for b in range(2 * P):  # a few targets are the argmax, so top-1 and rewards vary
        logits[b, 3, labels[b, 3]] += 6.0
    ref_logits = logits + 0.5 * torch.randn(2 * P, T, V, generator=g)
    return logits, labels, tokens, ref_logits, g


# ----------------------------------------------------------------------------- vocabulary parallel

def check_vp_token(rank, world, backend):
    from pyfused_po.distributed import vocab_parallel_token_logprobs

    B, T, V = 3, 6, 37
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(B, T, V, generator=g) * 2.0
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    labels[2, -1] = -100
    logits[1, 2, labels[1, 3]] += 8.0  # with shift, row 2 predicts label 3: a top-1 hit
    logits[0, :, 5] = -float("inf")  # a masked vocabulary entry
    s0, s1 = my_range(V, world, rank)
    kw = dict(shift=True, temperature=0.8, logit_scale=1.3, softcap=6.0)
    extras = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
    x = logits[..., s0:s1].clone().requires_grad_()
    out = vocab_parallel_token_logprobs(x, labels, group=dist.group.WORLD, vocab_start=s0, extras=extras,
                                        backend=backend, **kw)
    expect_counts("vocab-parallel forward", all_gather=1)
    full = logits.double().requires_grad_()
    ref = token_logprobs_ref(full, labels, **kw)
    for name in ("logps", "entropy", "log_sum_sq_probs", "is_top1"):
        # (mean_logit is −inf with a −inf logit: checked below on finite logits)
        close(getattr(out, name), ref[name], VAL_TOL, name)
    c = torch.randn(4, B, T, generator=g, dtype=torch.float64)
    loss = (c[0] * out.logps + c[1] * out.entropy + c[2] * out.log_sum_sq_probs).sum()
    loss.backward()
    expect_counts("vocab-parallel backward")
    ref_loss = (c[0] * ref["logps"] + c[1] * ref["entropy"] + c[2] * ref["log_sum_sq_probs"]).sum()
    ref_loss.backward()
    close(x.grad, full.grad[..., s0:s1], GRAD_TOL, "grad logits (logps, entropy, log Σp²)")

    # mean_logit on finite logits, no shift, in-place backward.
    finite = torch.randn(B, T, V, generator=g)
    leaf = finite[..., s0:s1].clone().requires_grad_()
    out = vocab_parallel_token_logprobs(leaf * 1.0, labels, group=dist.group.WORLD, vocab_start=s0,
                                        extras=("mean_logit",), backend=backend, inplace_backward=True)
    expect_counts("vocab-parallel forward (mean_logit)", all_gather=1)
    full = finite.double().requires_grad_()
    ref = token_logprobs_ref(full, labels)
    close(out.logps, ref["logps"], VAL_TOL, "logps (no shift)")
    close(out.mean_logit, ref["mean_logit"], VAL_TOL, "mean_logit")
    (c[0] * out.logps + c[3] * out.mean_logit).sum().backward()
    (c[0] * ref["logps"] + c[3] * ref["mean_logit"]).sum().backward()
    expect_counts("vocab-parallel backward (in place)")
    close(leaf.grad, full.grad[..., s0:s1], GRAD_TOL, "grad logits (logps, mean_logit, in place)")

    # The public entry point takes the same keywords.
    import pyfused_po

    again = pyfused_po.token_logprobs(finite[..., s0:s1], labels, vocab_parallel_group=dist.group.WORLD,
                                      vocab_start=s0, backend=backend)
    expect_counts("token_logprobs(vocab_parallel_group=)", all_gather=1)
    close(again, ref["logps"], VAL_TOL, "token_logprobs(vocab_parallel_group=)")


def check_vp_linear(rank, world, backend):
    from pyfused_po.distributed import vocab_parallel_linear_token_logprobs

    B, T, D, V = 2, 5, 8, 37
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(B, T, D, generator=g)
    weight = torch.randn(V, D, generator=g) * 0.7
    bias = torch.randn(V, generator=g) * 0.3
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[1, 1] = -100
    s0, s1 = my_range(V, world, rank)
    h = hidden.clone().requires_grad_()
    w = weight[s0:s1].clone().requires_grad_()
    b = bias[s0:s1].clone().requires_grad_()
    extras = ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")
    out = vocab_parallel_linear_token_logprobs(h, w, labels, group=dist.group.WORLD, vocab_start=s0, bias_shard=b,
                                               shift=True, temperature=1.1, extras=extras, backend=backend,
                                               chunk_tokens=3)
    expect_counts("vocab-parallel linear forward", all_gather=1)
    fh, fw, fb = (t.double().requires_grad_() for t in (hidden, weight, bias))
    ref = token_logprobs_ref(fh @ fw.t() + fb, labels, shift=True, temperature=1.1)
    for name in ("logps",) + extras:
        close(getattr(out, name), ref[name], VAL_TOL, f"linear {name}")
    c = torch.randn(4, B, T, generator=g, dtype=torch.float64)
    names = ("logps", "entropy", "log_sum_sq_probs", "mean_logit")
    sum(((c[i] * getattr(out, n)).sum() for i, n in enumerate(names))).backward()
    expect_counts("vocab-parallel linear backward", all_reduce=1)  # grad_hidden = Σ_r G_r·W_r
    sum(((c[i] * ref[n]).sum() for i, n in enumerate(names))).backward()
    close(h.grad, fh.grad, GRAD_TOL, "linear grad hidden")
    close(w.grad, fw.grad[s0:s1], GRAD_TOL, "linear grad weight shard")
    close(b.grad, fb.grad[s0:s1], GRAD_TOL, "linear grad bias shard")

    # The public entry point takes the same keywords.
    import pyfused_po

    again = pyfused_po.linear_token_logprobs(hidden, weight[s0:s1], labels, bias=bias[s0:s1], shift=True,
                                             temperature=1.1, backend=backend, vocab_parallel_group=dist.group.WORLD,
                                             vocab_start=s0)
    expect_counts("linear_token_logprobs(vocab_parallel_group=)", all_gather=1)
    close(again, ref["logps"], VAL_TOL, "linear_token_logprobs(vocab_parallel_group=)")

    # bf16 autocast over an fp32 head: the numbers of one process under the same autocast,
    # each gradient in its input's dtype (the backward runs outside the autocast region).
    runs = []
    for part, (a, z) in (("shard", (s0, s1)), ("whole", (0, V))):
        ah, aw = hidden.clone().requires_grad_(), weight[a:z].clone().requires_grad_()
        parallel = dict(vocab_parallel_group=dist.group.WORLD, vocab_start=s0) if part == "shard" else {}
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = pyfused_po.linear_token_logprobs(ah, aw, labels, shift=True, backend=backend, **parallel)
        (out * c[0].float()).sum().backward()
        runs.append((out, ah.grad, aw.grad))
    (vp, vh, vw), (one, oh, ow) = runs
    assert vh.dtype == vw.dtype == torch.float32, (vh.dtype, vw.dtype)
    close(vp, one, 1e-5, "autocast vocab-parallel logps")
    close(vh, oh, 1e-2, "autocast vocab-parallel grad hidden")
    close(vw, ow[s0:s1], 1e-5, "autocast vocab-parallel grad weight shard")


PAIRED_LOSSES = {
    "dpo": dict(loss_type="sigmoid", beta=0.1),
    "simpo": dict(loss_type="simpo", beta=2.0, simpo_gamma=0.5, cpo_alpha=0.3),
    "aot_unpaired": dict(loss_type="aot_unpaired", beta=0.3),
}


def _compare_outputs(out, ref, what):
    close(out.loss, ref.loss, VAL_TOL, f"{what} loss", floor=1.0)
    assert set(out.metrics) == set(ref.metrics), f"{what} metrics {sorted(out.metrics)} vs {sorted(ref.metrics)}"
    for k in ref.metrics:
        close(out.metrics[k], ref.metrics[k], VAL_TOL, f"{what} metric {k}", floor=1.0)


def _kto_inputs(logits, g):
    B = logits.shape[0]
    desirable = torch.tensor([True, False, True, False])[:B]
    ref_logps = -torch.rand(B, generator=g, dtype=torch.float64) * 10 - 20
    kl_tokens = -torch.rand(2, 2, logits.shape[1], generator=g, dtype=torch.float64)  # [policy/ref, M, T]
    kl_tokens[0] += 0.2  # a positive KL estimate, so z₀ = max(0, ·) is active
    return desirable, ref_logps, kl_tokens


def check_vp_losses(rank, world, backend):
    from pyfused_po.modules.kto import FusedKTOLoss
    from pyfused_po.modules.preference import FusedPreferenceLoss

    logits, labels, _, _, g = paired_batch()
    V = logits.shape[-1]
    s0, s1 = my_range(V, world, rank)
    ref_c = -torch.rand(2, generator=g, dtype=torch.float64) * 10 - 15
    ref_r = -torch.rand(2, generator=g, dtype=torch.float64) * 10 - 15
    for name, cfg in PAIRED_LOSSES.items():
        module = FusedPreferenceLoss(**cfg, shift=True, backend=backend,
                                                vocab_parallel_group=dist.group.WORLD, vocab_start=s0)
        x = logits[..., s0:s1].clone().requires_grad_()
        refs = () if name == "simpo" else (ref_c, ref_r)
        out = module(x, labels, *refs)
        expect_counts(f"{name} vocab-parallel forward", all_gather=1)
        out.loss.backward()
        expect_counts(f"{name} vocab-parallel backward")
        full = logits.double().requires_grad_()
        ref = FusedPreferenceLoss(**cfg, shift=True, backend="torch")(full, labels, *refs)
        ref.loss.backward()
        _compare_outputs(out, ref, name)
        close(x.grad, full.grad[..., s0:s1], GRAD_TOL, f"{name} grad logits shard")

    # Fused-linear inputs: this rank's rows of the LM head (and bias), hidden replicated.
    hidden = torch.randn(4, 7, 6, generator=g)
    head, head_bias = torch.randn(V, 6, generator=g) * 0.6, torch.randn(V, generator=g) * 0.2
    h = hidden.clone().requires_grad_()
    w, b = head[s0:s1].clone().requires_grad_(), head_bias[s0:s1].clone().requires_grad_()
    cfg = PAIRED_LOSSES["simpo"]
    out = FusedPreferenceLoss(**cfg, shift=True, backend=backend, vocab_parallel_group=dist.group.WORLD,
                                         vocab_start=s0)(labels=labels, hidden=h, weight=w, bias=b)
    expect_counts("simpo fused-linear vocab-parallel forward", all_gather=1)
    out.loss.backward()
    expect_counts("simpo fused-linear vocab-parallel backward", all_reduce=1)
    fh, fw, fb = (t.double().requires_grad_() for t in (hidden, head, head_bias))
    ref = FusedPreferenceLoss(**cfg, shift=True, backend="torch")(labels=labels, hidden=fh, weight=fw, bias=fb)
    ref.loss.backward()
    _compare_outputs(out, ref, "simpo fused-linear")
    close(h.grad, fh.grad, GRAD_TOL, "simpo fused-linear grad hidden")
    close(w.grad, fw.grad[s0:s1], GRAD_TOL, "simpo fused-linear grad weight shard")
    close(b.grad, fb.grad[s0:s1], GRAD_TOL, "simpo fused-linear grad bias shard")

    desirable, ref_logps, kl = _kto_inputs(logits, g)
    kl_kw = dict(policy_kl_logps=kl[0].sum(-1), ref_kl_logps=kl[1].sum(-1))
    x = logits[..., s0:s1].clone().requires_grad_()
    out = FusedKTOLoss(beta=0.2, shift=True, backend=backend, vocab_parallel_group=dist.group.WORLD,
                                  vocab_start=s0)(x, labels, desirable, ref_logps, **kl_kw)
    expect_counts("kto vocab-parallel forward", all_gather=1)
    out.loss.backward()
    expect_counts("kto vocab-parallel backward")
    full = logits.double().requires_grad_()
    ref = FusedKTOLoss(beta=0.2, shift=True, backend="torch")(full, labels, desirable, ref_logps, **kl_kw)
    ref.loss.backward()
    _compare_outputs(out, ref, "kto")
    close(x.grad, full.grad[..., s0:s1], GRAD_TOL, "kto grad logits shard")


# ----------------------------------------------------------------------------- sequence parallel

def check_sp_losses(rank, world, backend):
    from pyfused_po.modules.kto import FusedKTOLoss
    from pyfused_po.modules.preference import FusedPreferenceLoss

    logits, labels, tokens, ref_logits, g = paired_batch()
    T = labels.shape[1]
    t0, t1 = my_range(T, world, rank)
    token_weights = torch.rand(labels.shape, generator=g, dtype=torch.float64) + 0.5
    ref_tokens = -torch.rand(labels.shape, generator=g, dtype=torch.float64) * 3
    nll_labels = tokens[:2].clone()  # the NLL term also covers the prompt
    nll_labels[1, -2:] = -100
    cases = [  # (name, config, full-tensor keyword inputs)
        ("dpo", PAIRED_LOSSES["dpo"], dict(ref_token_logps=ref_tokens, token_weights=token_weights)),
        ("simpo", PAIRED_LOSSES["simpo"], dict(nll_labels=nll_labels)),
        ("aot_unpaired", PAIRED_LOSSES["aot_unpaired"], dict(ref_logits=ref_logits)),
    ]
    for name, cfg, inputs in cases:
        module = FusedPreferenceLoss(**cfg, backend=backend, sequence_parallel_group=dist.group.WORLD)
        x = logits[:, t0:t1].clone().requires_grad_()
        local = {k: v[:, t0:t1].to(torch.float32) if v.is_floating_point() else v[:, t0:t1]
                 for k, v in inputs.items()}
        out = module(x, labels[:, t0:t1], **local)
        expect_counts(f"{name} sequence-parallel forward", all_reduce=1)
        out.loss.backward()
        expect_counts(f"{name} sequence-parallel backward")
        full = logits.double().requires_grad_()
        wide = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
        ref = FusedPreferenceLoss(**cfg, backend="torch")(full, labels, **wide)
        ref.loss.backward()
        _compare_outputs(out, ref, f"sp {name}")
        close(x.grad, full.grad[:, t0:t1], GRAD_TOL, f"sp {name} grad logits slice")

    desirable, _, kl = _kto_inputs(logits, g)
    x = logits[:, t0:t1].clone().requires_grad_()
    module = FusedKTOLoss(beta=0.2, backend=backend, sequence_parallel_group=dist.group.WORLD)
    out = module(x, labels[:, t0:t1], desirable, ref_logits=ref_logits[:, t0:t1],
                 policy_kl_logps=kl[0][:, t0:t1].sum(-1), ref_kl_logps=kl[1][:, t0:t1].sum(-1))
    expect_counts("kto sequence-parallel forward", all_reduce=1)
    out.loss.backward()
    expect_counts("kto sequence-parallel backward")
    full = logits.double().requires_grad_()
    ref = FusedKTOLoss(beta=0.2, backend="torch")(full, labels, desirable, ref_logits=ref_logits.double(),
                                                   policy_kl_logps=kl[0].sum(-1), ref_kl_logps=kl[1].sum(-1))
    ref.loss.backward()
    _compare_outputs(out, ref, "sp kto")
    assert float(ref.metrics["kl"]) > 0, "the KL estimate should be active in this check"
    close(x.grad, full.grad[:, t0:t1], GRAD_TOL, "sp kto grad logits slice")


def check_sp_sums(rank, world, backend):
    """``sequence_parallel_sums``: full sums, and the gradient of a nonlinear function of
    them equals the unsplit one (identity backward, not W× it)."""
    del backend
    from pyfused_po.distributed import sequence_parallel_sums

    g = torch.Generator().manual_seed(5)
    values = torch.randn(3, 8, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 9, (3, 8), generator=g)
    labels[0, :3] = -100
    t0, t1 = my_range(8, world, rank)
    v = values[:, t0:t1].clone().requires_grad_()
    sums = sequence_parallel_sums(v, labels[:, t0:t1], group=dist.group.WORLD)
    expect_counts("sequence_parallel_sums", all_reduce=1)
    full = values.clone().requires_grad_()
    mask = labels != -100
    ref = torch.where(mask, full, 0.0).sum(-1)
    close(sums.logps, ref, 1e-12, "sums")
    assert torch.equal(sums.lengths, mask.sum(-1).float()), f"lengths {sums.lengths} vs {mask.sum(-1)}"
    (sums.logps ** 2).sum().backward()
    (ref ** 2).sum().backward()
    close(v.grad, full.grad[:, t0:t1], 1e-12, "grad of a function of the sums")


# ----------------------------------------------------------------------------- vocabulary × sequence

def check_mesh_losses(rank, world, backend):
    """A 2 × 2 mesh: ranks {0, 1} and {2, 3} split the vocabulary, {0, 2} and {1, 3} the
    sequence.  Each rank holds a [tokens slice, vocabulary slice] block of the logits (or
    its hidden slice and head shard); loss, metrics and gradients equal the unsplit ones."""
    from pyfused_po.modules.preference import FusedPreferenceLoss

    assert world == 4, world
    # Every rank creates every group, in the same order.
    vocab_groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    seq_groups = [dist.new_group([0, 2]), dist.new_group([1, 3])]
    v_rank, s_rank = rank % 2, rank // 2
    groups = dict(vocab_parallel_group=vocab_groups[rank // 2], sequence_parallel_group=seq_groups[rank % 2])
    logits, labels, _, _, g = paired_batch()
    T, V = labels.shape[1], logits.shape[-1]
    (t0, t1), (s0, s1) = my_range(T, 2, s_rank), my_range(V, 2, v_rank)
    ref_c = -torch.rand(2, generator=g, dtype=torch.float64) * 10 - 15
    ref_r = -torch.rand(2, generator=g, dtype=torch.float64) * 10 - 15
    cfg = PAIRED_LOSSES["dpo"]
    x = logits[:, t0:t1, s0:s1].clone().requires_grad_()
    out = FusedPreferenceLoss(**cfg, backend=backend, vocab_start=s0, **groups)(x, labels[:, t0:t1], ref_c, ref_r)
    expect_counts("dpo 2-D forward", all_gather=1, all_reduce=1)
    out.loss.backward()
    expect_counts("dpo 2-D backward")
    full = logits.double().requires_grad_()
    ref = FusedPreferenceLoss(**cfg, backend="torch")(full, labels, ref_c, ref_r)
    ref.loss.backward()
    _compare_outputs(out, ref, "2-D dpo")
    close(x.grad, full.grad[:, t0:t1, s0:s1], GRAD_TOL, "2-D dpo grad logits block")

    hidden = torch.randn(4, T, 6, generator=g)
    head = torch.randn(V, 6, generator=g) * 0.6
    h, w = hidden[:, t0:t1].clone().requires_grad_(), head[s0:s1].clone().requires_grad_()
    cfg = PAIRED_LOSSES["simpo"]
    out = FusedPreferenceLoss(**cfg, backend=backend, vocab_start=s0, **groups)(
        labels=labels[:, t0:t1], hidden=h, weight=w)
    expect_counts("simpo fused-linear 2-D forward", all_gather=1, all_reduce=1)
    out.loss.backward()
    expect_counts("simpo fused-linear 2-D backward", all_reduce=1)  # grad_hidden over the vocabulary group
    fh, fw = hidden.double().requires_grad_(), head.double().requires_grad_()
    ref = FusedPreferenceLoss(**cfg, backend="torch")(labels=labels, hidden=fh, weight=fw)
    ref.loss.backward()
    _compare_outputs(out, ref, "2-D simpo fused-linear")
    close(h.grad, fh.grad[:, t0:t1], GRAD_TOL, "2-D simpo grad hidden slice")
    # Each rank's head gradient covers its tokens only; the sum over the sequence group is the true one.
    dist.all_reduce(w.grad, group=groups["sequence_parallel_group"])
    close(w.grad, fw.grad[s0:s1], GRAD_TOL, "2-D simpo grad weight shard (summed over the sequence group)")


# ----------------------------------------------------------------------------- packed streams

def _packed_twin(seed, D=None):
    """A padded [chosen; rejected] batch of random lengths and its packed stream."""
    from _packed_data import Batch

    b = Batch(S=4, V=37, D=D, seed=seed, dtype=torch.float64)
    rows, cu = b.pack(torch.arange(b.S))
    return b, rows, cu


def _packed_grad(full_grad, rows):
    return full_grad.reshape(-1, full_grad.shape[-1])[rows]


def check_packed_vp(rank, world, backend):
    """Vocabulary parallel on a packed stream: the same rows on every rank, this rank's
    vocabulary slice (logits, or the head's rows)."""
    from pyfused_po.modules.preference import FusedPreferenceLoss

    b, rows, cu = _packed_twin(seed=7, D=6)
    s0, s1 = my_range(b.V, world, rank)
    labels = b.take(b.labels, rows)
    cfg = dict(PAIRED_LOSSES["dpo"], shift=True)
    refs = dict(ref_logits=b.take(b.ref_logits, rows)[..., s0:s1].float())
    x = b.take(b.logits, rows)[..., s0:s1].float().requires_grad_()
    out = FusedPreferenceLoss(**cfg, backend=backend, vocab_parallel_group=dist.group.WORLD, vocab_start=s0)(
        x, labels, cu_seqlens=cu, pair_layout="halves", **refs)
    expect_counts("packed dpo vocab-parallel forward", all_gather=2)  # policy and reference
    out.loss.backward()
    expect_counts("packed dpo vocab-parallel backward")
    full = b.logits.clone().requires_grad_()
    ref = FusedPreferenceLoss(**cfg, backend="torch")(full, b.labels, ref_logits=b.ref_logits)
    ref.loss.backward()
    _compare_outputs(out, ref, "packed vp dpo")
    close(x.grad[0], _packed_grad(full.grad, rows)[:, s0:s1], GRAD_TOL, "packed vp dpo grad logits shard")

    h = b.take(b.hidden, rows).float().requires_grad_()
    w = b.weight[s0:s1].float().clone().requires_grad_()
    cfg = dict(PAIRED_LOSSES["simpo"], shift=True)
    out = FusedPreferenceLoss(**cfg, backend=backend, vocab_parallel_group=dist.group.WORLD, vocab_start=s0)(
        labels=labels, hidden=h, weight=w, position_ids=_position_ids(cu))
    expect_counts("packed simpo fused-linear vocab-parallel forward", all_gather=1)
    out.loss.backward()
    expect_counts("packed simpo fused-linear vocab-parallel backward", all_reduce=1)
    fh, fw = b.hidden.clone().requires_grad_(), b.weight.clone().requires_grad_()
    ref = FusedPreferenceLoss(**cfg, backend="torch")(labels=b.labels, hidden=fh, weight=fw)
    ref.loss.backward()
    _compare_outputs(out, ref, "packed vp simpo fused-linear")
    close(h.grad[0], _packed_grad(fh.grad, rows), GRAD_TOL, "packed vp simpo grad hidden")
    close(w.grad, fw.grad[s0:s1], GRAD_TOL, "packed vp simpo grad weight shard")


def _position_ids(cu):
    from pyfused_po.token.packed_layout import cu_seqlens_to_position_ids

    return cu_seqlens_to_position_ids(cu, int(cu[-1]))


def check_packed_sp(rank, world, backend):
    """Sequence parallel on a packed stream: each rank holds a contiguous slice of the N
    tokens (sequences cut anywhere), labels shifted per sequence before splitting; the
    segment sums are all-reduced once."""
    from pyfused_po.modules.kto import FusedKTOLoss
    from pyfused_po.modules.preference import FusedPreferenceLoss
    from pyfused_po.token.packed_layout import packed_shift

    b, rows, cu = _packed_twin(seed=8)
    n = rows.numel()
    n0, n1 = my_range(n, world, rank)
    shifted = {"labels": packed_shift(b.take(b.labels, rows), cu, -100),
               "token_weights": packed_shift(b.take(b.token_weights, rows), cu, 0.0),
               "ref_token_logps": packed_shift(b.take(b.ref_token_logps, rows), cu, 0.0),
               "nll_labels": packed_shift(b.take(b.nll_labels, rows), cu, -100)}
    local = {k: (v.float() if v.is_floating_point() else v)[:, n0:n1] for k, v in shifted.items()}
    ref_logits = b.take(b.ref_logits, rows).float()[:, n0:n1]
    cases = [("dpo", dict(ref_token_logps=local["ref_token_logps"], token_weights=local["token_weights"]),
              ("ref_token_logps", "token_weights")),
             ("simpo", dict(nll_labels=local["nll_labels"]), ("nll_labels",)),
             ("aot_unpaired", dict(ref_logits=ref_logits), ("ref_logits",))]
    for name, inputs, padded_names in cases:
        module = FusedPreferenceLoss(**PAIRED_LOSSES[name], backend=backend, sequence_parallel_group=dist.group.WORLD)
        x = b.take(b.logits, rows).float()[:, n0:n1].requires_grad_()
        out = module(x, local["labels"], cu_seqlens=cu, token_offset=n0, **inputs)
        expect_counts(f"packed {name} sequence-parallel forward", all_reduce=1)
        out.loss.backward()
        expect_counts(f"packed {name} sequence-parallel backward")
        full = b.logits.clone().requires_grad_()
        ref = FusedPreferenceLoss(**PAIRED_LOSSES[name], shift=True, backend="torch")(
            full, b.labels, **{k: getattr(b, k) for k in padded_names})
        ref.loss.backward()
        _compare_outputs(out, ref, f"packed sp {name}")
        close(x.grad[0], _packed_grad(full.grad, rows)[n0:n1], GRAD_TOL, f"packed sp {name} grad logits slice")

    desirable = torch.tensor([True, False, False, True])
    x = b.take(b.logits, rows).float()[:, n0:n1].requires_grad_()
    out = FusedKTOLoss(beta=0.2, backend=backend, sequence_parallel_group=dist.group.WORLD)(
        x, local["labels"], desirable, ref_logits=ref_logits, cu_seqlens=cu, token_offset=n0)
    expect_counts("packed kto sequence-parallel forward", all_reduce=1)
    out.loss.backward()
    full = b.logits.clone().requires_grad_()
    ref = FusedKTOLoss(beta=0.2, shift=True, backend="torch")(full, b.labels, desirable, ref_logits=b.ref_logits)
    ref.loss.backward()
    _compare_outputs(out, ref, "packed sp kto")
    close(x.grad[0], _packed_grad(full.grad, rows)[n0:n1], GRAD_TOL, "packed sp kto grad logits slice")


PACKED_CHECKS = {"packed_vp": check_packed_vp, "packed_sp": check_packed_sp}


# ----------------------------------------------------------------------------- groups of K responses

def check_groups(rank, world, backend):
    """Groups of K = 2 and 3 responses (issue 25): this rank's vocabulary slice of the logits, then
    this rank's token slice of every row (the per-sequence sums all-reduced once, as for pairs)."""
    from pyfused_po.modules.preference import FusedPreferenceLoss

    logits, labels, _, ref_logits, g = paired_batch(P=3)  # 6 sequences: groups (0, 1, 2), (3, 4, 5)
    scores = torch.tensor([0.0, 2.0, 1.0, 5.0, 3.0, 4.0])
    ref_logps = -torch.rand(6, generator=g, dtype=torch.float64) * 10 - 15
    V, T = logits.shape[-1], labels.shape[1]
    s0, s1 = my_range(V, world, rank)
    t0, t1 = my_range(T, world, rank)
    runs = [("vp plackett_luce", dict(loss_type="plackett_luce", shift=True, vocab_parallel_group=dist.group.WORLD,
                                      vocab_start=s0), (..., slice(s0, s1)), dict(ref_logps=ref_logps.float()),
             dict(ref_logps=ref_logps), "all_gather"),
            ("sp all-pairs sigmoid", dict(loss_type="sigmoid", sequence_parallel_group=dist.group.WORLD),
             (slice(None), slice(t0, t1)), dict(ref_logits=ref_logits[:, t0:t1]), dict(ref_logits=ref_logits.double()),
             "all_reduce")]
    for name, cfg, where, local_ref, full_ref, collective in runs:
        options = {k: v for k, v in cfg.items() if k in ("loss_type", "shift")}
        module = FusedPreferenceLoss(**cfg, beta=0.3, group_size=3, backend=backend)
        x = logits[where].clone().requires_grad_()
        y = labels if collective == "all_gather" else labels[:, t0:t1]
        out = module(x, y, scores=scores, **local_ref)
        expect_counts(f"groups {name} forward", **{collective: 1})  # sp: the reference's sums in the same one
        out.loss.backward()
        expect_counts(f"groups {name} backward")
        full = logits.double().requires_grad_()
        ref = FusedPreferenceLoss(**options, beta=0.3, group_size=3, backend="torch")(
            full, labels, scores=scores.double(), **full_ref)
        ref.loss.backward()
        _compare_outputs(out, ref, f"groups {name}")
        close(x.grad, full.grad[where], GRAD_TOL, f"groups {name} grad logits")


VP_CHECKS = {"vp_token": check_vp_token, "vp_linear": check_vp_linear, "vp_losses": check_vp_losses}
SP_CHECKS = {"sp_losses": check_sp_losses, "sp_sums": check_sp_sums, **PACKED_CHECKS}
MESH_CHECKS = {"mesh_losses": check_mesh_losses}
# Groups reach the token stage through the same calls as pairs (checked on both backends above):
# the torch backend alone keeps the spawned ranks inside their time limit.
GROUP_CHECKS = {"groups": check_groups}
GROUP_BACKENDS = ("torch",)
CHECK_NAMES = [f"{name}[{backend}]" for name in {**VP_CHECKS, **SP_CHECKS} for backend in BACKENDS]
CHECK_NAMES += [f"{name}[{backend}]" for name in GROUP_CHECKS for backend in GROUP_BACKENDS]
MESH_CHECK_NAMES = [f"{name}[{backend}]" for name in MESH_CHECKS for backend in BACKENDS]
MESH_WORLD = 4  # the 2 × 2 mesh runs alone in a world of 4; the 1-D checks in the other worlds


def main():
    rank, world, port, out_dir = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    dist.all_gather = _count("all_gather", dist.all_gather)
    dist.all_reduce = _count("all_reduce", dist.all_reduce)
    report = {}
    one_d = {**VP_CHECKS, **SP_CHECKS}
    checks = [(entry, BACKENDS) for entry in (MESH_CHECKS if world == MESH_WORLD else one_d).items()]
    if world != MESH_WORLD:
        checks += [(entry, GROUP_BACKENDS) for entry in GROUP_CHECKS.items()]
    for (name, fn), backends in checks:
        for backend in backends:
            reset_counts()
            try:
                fn(rank, world, backend)
                report[f"{name}[{backend}]"] = None
            except Exception:  # noqa: BLE001 - reported to the test process
                report[f"{name}[{backend}]"] = traceback.format_exc()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(report, f)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
