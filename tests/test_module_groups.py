"""Groups of K responses in FusedPreferenceLoss (issue 25 items 1 and 3): logits and hidden + head,
padded and packed, the three-GEMM plan (chunks of whole groups), the frozen head and the long-group
rule, against float64 formulas written from the definitions (tests/_listwise_reference.py), against
the staged listwise path, and for K = 2 against today's pair module."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pyfused_po import BatchLayout, FusedPreferenceLoss
from pyfused_po.plans.listwise_stages import listwise_loss_from_hidden

from _listwise_reference import log_sigmoid, ref_pairwise, ref_plackett_luce, reference

S, T, V, D, K = 6, 5, 16, 8, 3
IGNORE = -100
LENGTHS = [5, 3, 4, 5, 3, 4]  # tokens of each sequence; the rest of its row is padding
SCORES = [0.5, 2.0, 1.0, 7.0, 3.0, 5.0]


def _data(seed):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(S, T, D, generator=g, dtype=torch.float64)
    weight = torch.randn(V, D, generator=g, dtype=torch.float64) / 2
    bias = torch.randn(V, generator=g, dtype=torch.float64) / 4
    labels = torch.randint(0, V, (S, T), generator=g)
    for s, n in enumerate(LENGTHS):
        labels[s, n:] = IGNORE
    labels[:, 1] = IGNORE  # a prompt token inside every sequence
    ref = torch.randn(S, generator=g, dtype=torch.float64) - 8
    return hidden, weight, bias, labels, ref, torch.tensor(SCORES, dtype=torch.float64)


def _pack(x):
    """The rows' first LENGTHS tokens as one stream [1, N, ...], and its cu_seqlens."""
    stream = torch.cat([x[s, :n] for s, n in enumerate(LENGTHS)]).unsqueeze(0)
    return stream, torch.tensor([0] + list(torch.tensor(LENGTHS).cumsum(0)), dtype=torch.int32)


def _sums64(hidden, weight, bias, labels):
    """Per-row Σ log softmax(H·Wᵀ + b)_t[y_{t+1}] over labelled tokens (shift), float64, and the counts."""
    logp = torch.log_softmax(hidden[:, :-1] @ weight.T + bias, dim=-1)
    y = labels[:, 1:]
    keep = y != IGNORE
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return torch.where(keep, picked, torch.zeros_like(picked)).sum(-1), keep.sum(-1).to(torch.float64)


def _formula(loss_type, sums, ref, scores, beta, group_ids):
    """[G] losses from the definitions: Plackett-Luce, or the mean over each group's ordered pairs
    of −log σ(u_i − u_j) (all-pairs DPO sigmoid)."""
    if loss_type == "plackett_luce":
        return reference(ref_plackett_luce, sums, ref, scores, group_ids, beta)
    return reference(lambda u, psi: ref_pairwise(lambda i, j: -log_sigmoid(u[i] - u[j]))(u, psi),
                     sums, ref, scores, group_ids, beta)


def _module_run(module, path, layout, hidden, weight, bias, labels, **kw):
    """One call on fresh leaves, upstream gradient 1.7: (output, [dH, dW, db]) in the padded shape."""
    h, w, b = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    h_in, y = h, labels
    if layout == "packed":
        (h_in, cu), (y, _) = _pack(h), _pack(labels)
        kw = dict(kw, cu_seqlens=cu)
    if path == "logits":
        out = module(h_in @ w.T + b, y, **kw)
    else:
        out = module(hidden=h_in, weight=w, bias=b, labels=y, **kw)
    (out.loss * 1.7).backward()
    return out, [h.grad, w.grad, b.grad]


@pytest.mark.parametrize("loss_type", ["plackett_luce", "sigmoid"])
@pytest.mark.parametrize("path", ["logits", "hidden"])
@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_groups_match_a_float64_formula(loss_type, path, layout):
    hidden, weight, bias, labels, ref, scores = _data(seed=len(loss_type) + len(path) + len(layout))
    beta = 0.4
    h, w, b = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    sums, _ = _sums64(h, w, b, labels)
    expected = _formula(loss_type, sums, ref, scores, beta, [s // K for s in range(S)])
    (expected.mean() * 1.7).backward()

    module = FusedPreferenceLoss(loss_type, beta=beta, group_size=K, shift=True, backend="torch")
    module.chunk_tokens = 8  # at most two groups' labelled tokens: several chunks of whole groups
    out, grads = _module_run(module, path, layout, hidden, weight, bias, labels, scores=scores, ref_logps=ref)
    if path == "hidden":
        assert "StoredGradient" in type(out.loss.grad_fn).__name__  # the three-GEMM plan ran
    torch.testing.assert_close(out.losses, expected.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out.loss, expected.mean().detach(), rtol=1e-12, atol=1e-12)
    for got, want in zip(grads, (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


LOSSES = [("plackett_luce", {"top_m": 2}), ("softmax_dpo", {}), ("lipo_lambda", {}), ("adpo", {"adpo_tau": 0.7}),
          ("ipo", {}), ("hinge", {}), (["plackett_luce", "sigmoid"], {"loss_weights": [0.3, 1.0]})]


@pytest.mark.parametrize("loss_type, hyper", LOSSES, ids=lambda x: str(x))
def test_three_gemm_plan_equals_the_staged_listwise_path(loss_type, hyper):
    """Every listwise type and some all-pairs types, packed, groups given by group_index in any
    order, an NLL term on a named member, the reference from ref_hidden: the module's three-GEMM
    plan equals listwise_loss_from_hidden (the staged path) in value and gradients."""
    hidden, weight, bias, labels, _, scores = _data(seed=7)
    ref_hidden = hidden + 0.2
    (h_pk, cu), (y_pk, _), (ref_pk, _) = _pack(hidden), _pack(labels), _pack(ref_hidden)
    group_index = torch.tensor([1, 0, 1, 0, 1, 0])
    nll_index = torch.tensor([3, 2])
    kw = dict(loss_type=loss_type, beta=0.3, nll_alpha=0.5, **hyper)

    h, w, b = (x.clone().requires_grad_(True) for x in (h_pk, weight, bias))
    staged = listwise_loss_from_hidden(h, w, y_pk, scores, bias=b, ref_hidden=ref_pk, shift=True, backend="torch",
                                       cu_seqlens=cu, group_index=group_index, nll_index=nll_index, **kw)
    (staged.loss * 1.7).backward()

    module = FusedPreferenceLoss(shift=True, backend="torch", **kw)
    module.chunk_tokens = 9
    h2, w2, b2 = (x.clone().requires_grad_(True) for x in (h_pk, weight, bias))
    out = module(hidden=h2, weight=w2, bias=b2, labels=y_pk, ref_hidden=ref_pk, scores=scores, nll_index=nll_index,
                 layout=BatchLayout(cu_seqlens=cu, group_index=group_index))
    assert "StoredGradient" in type(out.loss.grad_fn).__name__
    (out.loss * 1.7).backward()
    torch.testing.assert_close(out.losses, staged.losses.detach(), rtol=1e-12, atol=1e-12)
    assert out.metrics.keys() == staged.metrics.keys()
    for k in staged.metrics:
        torch.testing.assert_close(out.metrics[k], staged.metrics[k], rtol=1e-12, atol=1e-12, msg=k)
    for got, want in zip((h2.grad, w2.grad, b2.grad), (h.grad, w.grad, b.grad)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.slow  # the Triton interpreter on both paths (~5 s on an idle 2-core machine)
def test_triton_backend_on_logits_and_hidden():
    """The Triton token stage (interpreted on the CPU, float32) against the float64 formula."""
    hidden, weight, bias, labels, ref, scores = _data(seed=11)
    h, w, b = (x.clone().requires_grad_(True) for x in (hidden, weight, bias))
    sums, _ = _sums64(h, w, b, labels)
    expected = _formula("plackett_luce", sums, ref, scores, 0.5, [s // K for s in range(S)])
    (expected.mean() * 1.7).backward()
    module = FusedPreferenceLoss("plackett_luce", beta=0.5, group_size=K, shift=True, backend="triton")
    f32 = [x.to(torch.float32) for x in (hidden, weight, bias)]
    for path, layout in (("logits", "padded"), ("hidden", "packed")):
        out, grads = _module_run(module, path, layout, *f32, labels, scores=scores.float(), ref_logps=ref.float())
        torch.testing.assert_close(out.losses.double(), expected.detach(), rtol=2e-5, atol=2e-5)
        for got, want in zip(grads, (h.grad, w.grad, b.grad)):
            torch.testing.assert_close(got.double(), want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("loss_type", ["sigmoid", "ipo", "plackett_luce", "simpo"])
@pytest.mark.parametrize("path", ["logits", "hidden"])
def test_groups_of_two_equal_the_pair_module(loss_type, path):
    """K = 2, scores (1, 0) in each group: today's pair module on the same rows (interleaved
    pairs), the same loss, per-pair losses and gradients."""
    hidden, weight, bias, labels, ref, _ = _data(seed=3)
    scores = torch.tensor([1.0, 0.0] * (S // 2), dtype=torch.float64)
    groups = FusedPreferenceLoss(loss_type, beta=0.2, group_size=2, shift=True, backend="torch")
    pairs = FusedPreferenceLoss(loss_type, beta=0.2, shift=True, backend="torch")
    g_out, g_grads = _module_run(groups, path, "padded", hidden, weight, bias, labels, scores=scores, ref_logps=ref)
    p_out, p_grads = _module_run(pairs, path, "padded", hidden, weight, bias, labels, pair_layout="interleaved",
                                 ref_chosen_logps=ref[0::2], ref_rejected_logps=ref[1::2])
    torch.testing.assert_close(g_out.loss, p_out.loss, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(g_out.losses, p_out.losses.detach(), rtol=1e-12, atol=1e-12)
    for a, b in zip(g_grads, p_grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


class _GemmFlops(TorchDispatchMode):
    """Matmul FLOPs (2·m·n·k) of the ops run under it."""

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in ("mm", "addmm", "addmm_"):
            a, b = (args[0], args[1]) if name == "mm" else (args[1], args[2])
            self.flops += 2 * a.shape[0] * a.shape[1] * b.shape[1]
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("trainable, fused, expected",
                         [(True, True, 3), (False, True, 2), (True, False, 4), (False, False, 2)])
def test_lm_head_gemms_per_labelled_token(trainable, fused, expected):
    """GEMM units (2·M·D·V FLOPs over the M labelled tokens): 3 with a trainable head, 2 with a
    frozen one; the staged plan: 4, and 2 with a frozen head (its forward forms ∂log p/∂h)."""
    hidden, weight, bias, labels, ref, scores = _data(seed=5)
    M = int((labels[:, 1:] != IGNORE).sum())
    module = FusedPreferenceLoss("plackett_luce", group_size=K, shift=True, backend="torch", linear_impl="chunked")
    module.fused_gradient = fused
    h, w = hidden.clone().requires_grad_(True), weight.clone().requires_grad_(trainable)
    counter = _GemmFlops()
    with counter:
        out = module(hidden=h, weight=w, labels=labels, scores=scores, ref_logps=ref)
        out.loss.backward()
    assert counter.flops == expected * 2 * M * D * V


def test_a_group_longer_than_the_chunk_falls_back_by_name_or_keeps_three_gemms():
    hidden, weight, bias, labels, ref, scores = _data(seed=6)
    module = FusedPreferenceLoss("plackett_luce", group_size=K, shift=True, backend="torch")
    module.chunk_tokens = 5  # every group has more labelled tokens
    out, grads = _module_run(module, "hidden", "packed", hidden, weight, bias, labels, scores=scores, ref_logps=ref)
    assert "StoredGradient" not in type(out.loss.grad_fn).__name__
    assert "longer than the three-GEMM chunk" in module.fallback_reason
    assert "the staged plan (4 GEMMs) runs" in module.fallback_reason
    h = hidden.clone().requires_grad_(True)
    module(hidden=h, weight=weight, labels=labels, scores=scores, ref_logps=ref)  # a frozen head
    assert "the staged plan (2 GEMMs with this frozen head) runs" in module.fallback_reason
    module.long_group_plan = "three_gemm"
    out2, grads2 = _module_run(module, "hidden", "packed", hidden, weight, bias, labels, scores=scores, ref_logps=ref)
    assert "StoredGradient" in type(out2.loss.grad_fn).__name__ and module.fallback_reason is None
    torch.testing.assert_close(out2.loss, out.loss, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads2, grads):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_reference_from_tokens_and_a_frozen_head_through_the_plan():
    """ref_token_logps and token_weights on a padded batch of groups given by group_index, frozen
    head (2 GEMMs): the plan equals the staged run of the same module."""
    hidden, weight, bias, labels, _, scores = _data(seed=8)
    ref_tokens = -torch.rand(S, T, dtype=torch.float64)
    module = FusedPreferenceLoss("softmax_dpo", beta=0.6, shift=True, backend="torch")
    kw = dict(scores=scores, ref_token_logps=ref_tokens, group_index=torch.tensor([0, 1, 1, 0, 1, 0]),
              token_weights=torch.rand(S, T, dtype=torch.float64) + 0.5)
    outs = []
    for fused in (True, False):
        module.fused_gradient = fused
        h = hidden.clone().requires_grad_(True)
        out = module(hidden=h, weight=weight, labels=labels, **kw)
        out.loss.backward()
        outs.append((out, h.grad))
    assert "StoredGradient" in type(outs[0][0].loss.grad_fn).__name__
    torch.testing.assert_close(outs[0][0].losses, outs[1][0].losses.detach(), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=1e-10, atol=1e-12)


def _call(module=None, labels=None, **kw):
    module = module or FusedPreferenceLoss("plackett_luce", backend="torch")
    logits = torch.randn(S, T, V)
    return module(logits, torch.zeros(S, T, dtype=torch.long) if labels is None else labels, **kw)


SCORES6 = torch.tensor(SCORES)
REF6 = torch.zeros(S)
BAD_CALLS = [
    (dict(layout=BatchLayout(group_size=4), scores=SCORES6, ref_logps=REF6), "group_size=4 does not divide the 6"),
    (dict(group_index=torch.tensor([0, 0, 1, 1, 3, 3]), scores=SCORES6, ref_logps=REF6), "group 2 is empty"),
    (dict(group_index=torch.tensor([0, 0, 1, 1, -1, 2]), scores=SCORES6, ref_logps=REF6), "group ids >= 0"),
    (dict(group_index=torch.tensor([0, 0, 1, 1, 2]), scores=SCORES6, ref_logps=REF6),
     r"group_index must have shape \(6,\)"),
    (dict(layout=BatchLayout(group_size=3), scores=torch.tensor([1.0, float("nan"), 0, 1, 2, 3]), ref_logps=REF6),
     "scores must be finite"),
    (dict(layout=BatchLayout(group_size=3), scores=torch.ones(4), ref_logps=REF6), r"scores must have shape \(6,\)"),
    (dict(layout=BatchLayout(group_size=3), ref_logps=REF6), "needs scores="),
    (dict(layout=BatchLayout(group_size=3), scores=SCORES6, ref_logps=torch.zeros(3)),
     r"ref_logps must have shape \(6,\)"),
    (dict(layout=BatchLayout(group_size=3), scores=SCORES6), "needs a reference"),
    (dict(layout=BatchLayout(group_size=3), scores=SCORES6, ref_chosen_logps=torch.zeros(3),
          ref_rejected_logps=torch.zeros(3)), "ref_chosen_logps is an argument of pair batches"),
    (dict(layout=BatchLayout(group_size=3, pair_layout="interleaved"), scores=SCORES6, ref_logps=REF6),
     "pair_layout is an argument of pair batches"),
    (dict(layout=BatchLayout(group_size=3), scores=SCORES6, ref_logps=REF6, weights=torch.ones(3)),
     "weights is an argument of pair batches"),
    (dict(scores=SCORES6, ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3)),
     "scores go with groups"),
    (dict(layout=BatchLayout(group_size=3), scores=SCORES6, ref_logps=REF6, nll_index=torch.tensor([0, 1])),
     r"nll_index\[1\] = 1 is a sequence of group 0"),
]


@pytest.mark.parametrize("kw, message", BAD_CALLS, ids=[m for _, m in BAD_CALLS])
def test_bad_groups_get_a_named_error_before_any_kernel(kw, message, monkeypatch):
    import pyfused_po.modules.preference as module_file

    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel ran before the check")
    monkeypatch.setattr(module_file, "run_token_stage", no_kernel)
    monkeypatch.setattr(module_file.FusedPreferenceLoss, "_token_stage", no_kernel)
    with pytest.raises((ValueError, TypeError), match=message):
        _call(**kw)


@pytest.mark.parametrize("options, message", [
    (dict(ld_alpha=0.5), "ld_alpha does not apply to groups"),
    (dict(use_weighting=True), "use_weighting does not apply to groups"),
    (dict(reduction="sum"), "reduction='sum' is not available on groups"),
    (dict(loss_type="aot"), "loss_type='aot' does not apply to groups"),
    (dict(group_size=1), "group_size must be an integer >= 2"),
])
def test_pair_only_options_are_refused_at_construction(options, message):
    options = dict(dict(loss_type="sigmoid", group_size=3), **options)
    with pytest.raises(ValueError, match=message):
        FusedPreferenceLoss(backend="torch", **options)


def test_nll_alpha_without_groups_is_refused():
    module = FusedPreferenceLoss("sigmoid", backend="torch", nll_alpha=0.5)
    with pytest.raises(ValueError, match="nll_alpha go with groups"):
        _call(module, ref_chosen_logps=torch.zeros(3), ref_rejected_logps=torch.zeros(3))


def test_module_group_size_and_layout_group_size_must_agree():
    module = FusedPreferenceLoss("plackett_luce", group_size=3, backend="torch")
    with pytest.raises(ValueError, match="layout's group_size=2 differs from the module's group_size=3"):
        _call(module, layout=BatchLayout(group_size=2), scores=SCORES6, ref_logps=REF6)
    out = _call(module, scores=SCORES6, ref_logps=REF6)  # the module's K fills an empty layout
    assert out.losses.shape == (2,)


@pytest.mark.slow  # builds two tiny Llama models (and imports transformers when run alone)
def test_hugging_face_helper_takes_groups():
    """integrations.hf.model_preference_loss with a module of groups (K = 3, a frozen reference
    model): loss and parameter gradients equal all-pairs sigmoid written on the model's own logits."""
    pytest.importorskip("transformers")
    from _hf_tiny import tiny_model
    from pyfused_po.integrations import hf

    model, ref_model = tiny_model(seed=0), tiny_model(seed=1)
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, model.config.vocab_size, (S, 7), generator=g)
    labels = ids.clone()
    labels[:, :2] = IGNORE
    labels[4, 5:] = IGNORE
    scores = torch.tensor(SCORES)
    loss_fn = FusedPreferenceLoss("sigmoid", beta=0.5, group_size=K, **hf.lm_head_transform(model))
    out = hf.model_preference_loss(model, loss_fn, ids, labels, ref_model=ref_model, scores=scores)
    out.loss.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    def sums(m):
        logp = torch.log_softmax(m(input_ids=ids).logits.double()[:, :-1], -1)
        y = labels[:, 1:]
        return (logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != IGNORE)).sum(-1)

    with torch.no_grad():
        ref = sums(ref_model)
    expected = _formula("sigmoid", sums(model), ref, scores.double(), 0.5, [s // K for s in range(S)]).mean()
    expected.backward()
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    want = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert got.keys() == want.keys() and got
    for name, w in want.items():
        torch.testing.assert_close(got[name].double(), w.double(), rtol=1e-3, atol=1e-6, msg=name)
    with pytest.raises(ValueError, match="ref_model and ref_logps"):
        hf.model_preference_loss(model, loss_fn, ids, labels, ref_model=ref_model, scores=scores,
                                 ref_logps=torch.zeros(S))


@pytest.mark.slow  # dynamo compiles the pieces between graph breaks (~15 s on 2 cores)
def test_torch_compile_matches_eager_and_the_formula():
    """torch.compile (aot_eager) over a step calling the module on groups of logits: the same loss
    and gradient as eager and as the float64 formula.  Not fullgraph: building the groups reads
    scores and ids on the host (the checks, the ordered pairs), which breaks the graph there."""
    torch._dynamo.reset()
    hidden, weight, bias, labels, ref, scores = _data(seed=12)
    logits = (hidden @ weight.T + bias).float()
    module = FusedPreferenceLoss("plackett_luce", beta=0.5, group_size=K, shift=True, backend="torch")

    def step(x):
        return module(x, labels, scores=scores.float(), ref_logps=ref.float()).loss

    x_eager, x_comp, x64 = logits.clone().requires_grad_(), logits.clone().requires_grad_(), \
        logits.double().requires_grad_()
    step(x_eager).backward()
    compiled = torch.compile(step, backend="aot_eager")
    loss_c = compiled(x_comp)
    loss_c.backward()
    logp = torch.log_softmax(x64[:, :-1], -1).gather(-1, labels[:, 1:].clamp(min=0)[..., None])[..., 0]
    sums = (logp * (labels[:, 1:] != IGNORE)).sum(-1)
    expected = _formula("plackett_luce", sums, ref, scores, 0.5, [s // K for s in range(S)]).mean()
    expected.backward()
    torch.testing.assert_close(loss_c.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(x_comp.grad, x_eager.grad, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(x_comp.grad.double(), x64.grad, rtol=1e-4, atol=1e-6)


def test_the_kto_module_refuses_a_layout_with_groups():
    """A BatchLayout's groups are not silently ignored by FusedKTOLoss (each sequence scored alone)."""
    from pyfused_po import FusedKTOLoss

    with pytest.raises(ValueError, match="takes no pair layout or groups"):
        FusedKTOLoss(backend="torch")(torch.randn(S, T, V), torch.zeros(S, T, dtype=torch.long),
                                      torch.ones(S, dtype=torch.bool), torch.zeros(S),
                                      layout=BatchLayout(group_size=3))
