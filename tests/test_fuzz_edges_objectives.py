"""Differential fuzz of the objective and sequence stages' edges (issue 26, classes 5, 7, 8).

Three axes, each drawn by Hypothesis (derandomized, no example database: CI runs the same
examples every time; the runtime is printed at the end, budget < 30 s on 2 cores):

* **f-divergence scores** (class 5): every loss that takes ``f_divergence_type``, every
  divergence, α, β, response lengths (0, equal, far apart) and log-ratios; the per-pair losses
  and their gradients against float64 math written here from f'(t) = 1 − 1/t (forward KL),
  log(2t/(1 + t)) (JS) and (t^{α−1} − 1)/(α − 1) (α), t = π/π_ref.  A dropped constant shows
  wherever the two sides are not subtracted as they are (``ipo``, ``sigmoid_norm``, and the
  losses that read one side alone).
* **Reference sources** (class 7): every subset of the reference inputs of
  :class:`~pyfused_po.FusedPreferenceLoss` (``ref_logits``, ``ref_token_logps``, the precomputed
  sums), of ``hf.model_preference_loss`` (``ref_model``, the sums, ``ref_token_logps``; a tiny
  local Llama) and of :func:`~pyfused_po.kto_loss`'s KL estimate (``kl``, the mismatched-pair
  sums): more than one is refused naming each; exactly one gives the loss of that source.
* **Per-token shapes** (class 8): a per-token input of a public function (``sequence_sums``'
  values and weights, padded and packed; the module's ``token_weights`` / ``ref_token_logps``;
  ``merge_labels``' second labels) at the right shape or at a shape that broadcasts against the
  labels: the right one gives the float64 masked sums, a broadcasting one a ``ValueError``
  naming the input.
"""
import math
import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import pyfused_po
from _fuzz_report import print_uncaptured
from pyfused_po.sequence.sums import merge_labels



def fuzz(examples):
    """Hypothesis settings: ``examples`` per parameter set (each axis is parametrized over its
    cases, so every case is drawn, not left to the draw), reproducible."""
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])
F_LOSS_TYPES = ("sigmoid", "hinge", "ipo", "sigmoid_norm", "robust", "exo_pair", "nca_pair", "bco_pair",
                "sppo_hard", "apo_down", "discopop")
_DRAWN = {}


@pytest.fixture(scope="module", autouse=True)
def _report_runtime(request):
    start = time.perf_counter()
    yield
    line = (f"\nfuzz_edges_objectives: {time.perf_counter() - start:.1f} s; drawn: "
            + ", ".join(f"{k} {v}" for k, v in sorted(_DRAWN.items())))
    print_uncaptured(request, line)


def _count(key):
    _DRAWN[key] = _DRAWN.get(key, 0) + 1


def _logsig(x):
    """log σ(x), each branch fed only the values where it is exact."""
    return torch.where(x >= 0, -torch.log1p(torch.exp(-x.clamp(min=0))),
                       x.clamp(max=0) - torch.log1p(torch.exp(x.clamp(max=0))))


# ----------------------------------------------------------------------------- class 5


def _f_prime(t, kind, alpha):
    """f'(t) of the f-divergence, t = π/π_ref (float64, written from the definitions)."""
    if kind == "forward_kl":
        return (t - 1) / t
    if kind == "js_divergence":
        return torch.log(2 * t / (1 + t))
    return (t ** (alpha - 1) - 1) / (alpha - 1)


def _f_loss(loss_type, sw, sl, rw, nw, nl, beta):
    """Per-pair loss on the scores sw, sl (rw: the chosen log-ratio, read raw by apo_down)."""
    x = beta * (sw - sl)
    per_token = sw / nw.clamp(min=1) - sl / nl.clamp(min=1)
    return {
        "sigmoid": lambda: -_logsig(x),
        "hinge": lambda: torch.clamp(1 - x, min=0),
        "ipo": lambda: (per_token - 1 / (2 * beta)) ** 2,
        "sigmoid_norm": lambda: -_logsig(beta * per_token),
        "robust": lambda: -_logsig(x),
        "exo_pair": lambda: (torch.sigmoid(x) * (_logsig(x) - math.log1p(-1e-3))
                             + torch.sigmoid(-x) * (_logsig(-x) - math.log(1e-3))),
        "nca_pair": lambda: -_logsig(beta * sw) - 0.5 * _logsig(-beta * sw) - 0.5 * _logsig(-beta * sl),
        "bco_pair": lambda: -_logsig(beta * sw) - _logsig(-beta * sl),
        "sppo_hard": lambda: (sw - 0.5 / beta) ** 2 + (sl + 0.5 / beta) ** 2,
        "apo_down": lambda: torch.sigmoid(beta * rw) + 1 - torch.sigmoid(x),
        "discopop": lambda: (1 - torch.sigmoid(x / 0.05)) * -_logsig(x) + torch.sigmoid(x / 0.05) * torch.exp(-x),
    }[loss_type]()


@st.composite
def f_problems(draw):
    pairs = draw(st.integers(1, 4))
    lengths = st.integers(0, 16)
    return dict(
        kind=draw(st.sampled_from(("forward_kl", "js_divergence", "alpha_divergence"))),
        alpha=draw(st.sampled_from((0.25, 0.5, 1.5, 2.0))),
        beta=draw(st.sampled_from((0.05, 0.3, 1.0))),
        nw=[draw(lengths) for _ in range(pairs)], nl=[draw(lengths) for _ in range(pairs)],
        # log-ratios in [−3, 3]: e^{±3u} stays in range of every divergence drawn here
        u=[draw(st.floats(-3.0, 3.0)) for _ in range(2 * pairs)],
        seed=draw(st.integers(0, 2 ** 16)))


@pytest.mark.parametrize("loss_type", F_LOSS_TYPES)
@fuzz(8)
@given(p=f_problems())
def test_f_divergence_losses_keep_the_constant(loss_type, p):
    p = dict(p, loss_type=loss_type)
    _count(f"f:{p['kind']}")
    g = torch.Generator().manual_seed(p["seed"])
    pairs = len(p["nw"])
    nw, nl = torch.tensor(p["nw"], dtype=torch.float64), torch.tensor(p["nl"], dtype=torch.float64)
    u = torch.tensor(p["u"], dtype=torch.float64)
    ref = -torch.rand(2 * pairs, generator=g, dtype=torch.float64) * 10
    policy = (ref + u).requires_grad_()
    out = pyfused_po.preference_loss(
        policy[:pairs], policy[pairs:], ref[:pairs], ref[pairs:], loss_type=p["loss_type"], beta=p["beta"],
        chosen_lengths=nw, rejected_lengths=nl, f_divergence_type=p["kind"], f_alpha_divergence_coef=p["alpha"])
    leaf = policy.detach().clone().requires_grad_()
    t = torch.exp(leaf - ref)
    s = _f_prime(t, p["kind"], p["alpha"])
    expected = _f_loss(p["loss_type"], s[:pairs], s[pairs:], (leaf - ref)[:pairs], nw, nl, p["beta"])
    torch.testing.assert_close(out.losses, expected, rtol=1e-10, atol=1e-12)
    got_grad, = torch.autograd.grad(out.loss, policy)
    expected_grad, = torch.autograd.grad(expected.mean(), leaf)
    torch.testing.assert_close(got_grad, expected_grad, rtol=1e-9, atol=1e-12)


# ----------------------------------------------------------------------------- class 7


REF_SOURCES = ("ref_logits", "ref_token_logps", "ref_chosen_logps/ref_rejected_logps")


SOURCE_SUBSETS = [[name for bit, name in enumerate(REF_SOURCES) if mask >> bit & 1] for mask in range(8)]


@pytest.mark.parametrize("given_sources", SOURCE_SUBSETS, ids=["+".join(s) or "none" for s in SOURCE_SUBSETS])
@fuzz(3)
@given(seed=st.integers(0, 2 ** 16))
def test_one_reference_source(given_sources, seed):
    _count(f"refs:{len(given_sources)}")
    g = torch.Generator().manual_seed(seed)
    pairs, length, vocab = 2, 5, 7
    logits = torch.randn(2 * pairs, length, vocab, generator=g, dtype=torch.float64)
    ref_logits = torch.randn(2 * pairs, length, vocab, generator=g, dtype=torch.float64)
    labels = torch.randint(0, vocab, (2 * pairs, length), generator=g)
    labels[:, :2] = -100
    mask = labels != -100
    ref_tokens = torch.log_softmax(ref_logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask
    ref_sums = ref_tokens.sum(-1)
    candidates = {"ref_logits": dict(ref_logits=ref_logits), "ref_token_logps": dict(ref_token_logps=ref_tokens),
                  REF_SOURCES[2]: dict(ref_chosen_logps=ref_sums[:pairs], ref_rejected_logps=ref_sums[pairs:])}
    kwargs = {k: v for name in given_sources for k, v in candidates[name].items()}
    loss_fn = pyfused_po.FusedPreferenceLoss("sigmoid", beta=0.5, backend="torch")
    if len(given_sources) > 1:
        with pytest.raises(ValueError, match="one reference source") as info:
            loss_fn(logits=logits, labels=labels, **kwargs)
        for name in given_sources:
            assert name.split("/")[0] in str(info.value)
        return
    if not given_sources:
        with pytest.raises(ValueError, match="needs ref_chosen_logps and ref_rejected_logps"):
            loss_fn(logits=logits, labels=labels)
        return
    got = loss_fn(logits=logits, labels=labels, **kwargs).loss
    sums = (torch.log_softmax(logits, -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0] * mask).sum(-1)
    r = sums - ref_sums
    expected = -_logsig(0.5 * (r[:pairs] - r[pairs:])).mean()
    torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


HF_SOURCES = ("ref_model", "ref_chosen_logps/ref_rejected_logps", "ref_token_logps")
HF_SUBSETS = [[name for bit, name in enumerate(HF_SOURCES) if mask >> bit & 1] for mask in range(8)]


@pytest.fixture(scope="module")
def tiny_models():
    pytest.importorskip("transformers")
    from _hf_tiny import tiny_model

    return tiny_model(seed=0), tiny_model(seed=1)


def _model_token_logps(model, ids):
    """float64 log p(token t | tokens < t) for t ≥ 1 from the model's own logits, ``[B, T − 1]``."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()[:, :-1]
    return torch.log_softmax(logits, -1).gather(-1, ids[:, 1:, None])[..., 0]


@pytest.mark.parametrize("given_sources", HF_SUBSETS, ids=["+".join(s) or "none" for s in HF_SUBSETS])
@fuzz(1)
@given(seed=st.integers(0, 2 ** 16))
def test_hf_one_reference_source(tiny_models, given_sources, seed):
    """``hf.model_preference_loss``: its own ``ref_model`` / ``ref_*_logps`` and ``loss_fn``'s
    ``ref_token_logps`` (aligned with ``input_ids``) are one reference input; ref_model used to win."""
    from pyfused_po.integrations import hf

    _count(f"hf_refs:{len(given_sources)}")
    model, ref_model = tiny_models
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (4, 7), generator=g)
    labels = ids.clone()
    labels[:, :int(torch.randint(1, 4, (1,), generator=g))] = -100
    mask = (labels[:, 1:] != -100).double()
    ref_tokens = -torch.rand(4, 7, generator=g, dtype=torch.float64) * 3
    sums = -torch.rand(4, generator=g, dtype=torch.float64) * 20
    candidates = {"ref_model": dict(ref_model=ref_model),
                  HF_SOURCES[1]: dict(ref_chosen_logps=sums[:2], ref_rejected_logps=sums[2:]),
                  "ref_token_logps": dict(ref_token_logps=ref_tokens)}
    kwargs = {k: v for name in given_sources for k, v in candidates[name].items()}
    loss_fn = pyfused_po.FusedPreferenceLoss("sigmoid", beta=0.5, backend="torch", **hf.lm_head_transform(model))
    if len(given_sources) != 1:
        match = "needs ref_chosen_logps" if not given_sources else "one reference source"
        with pytest.raises(ValueError, match=match) as info:
            hf.model_preference_loss(model, loss_fn, ids, labels, **kwargs)
        assert all(name.split("/")[0] in str(info.value) for name in given_sources)
        return
    got = hf.model_preference_loss(model, loss_fn, ids, labels, **kwargs).loss
    ref_sums = {"ref_model": lambda: (_model_token_logps(ref_model, ids) * mask).sum(-1),
                HF_SOURCES[1]: lambda: sums,
                "ref_token_logps": lambda: (ref_tokens[:, 1:] * mask).sum(-1)}[given_sources[0]]()
    r = (_model_token_logps(model, ids) * mask).sum(-1) - ref_sums
    expected = -_logsig(0.5 * (r[:2] - r[2:])).mean()
    torch.testing.assert_close(got.double(), expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("use_kl", [False, True])
@pytest.mark.parametrize("use_policy", [False, True])
@pytest.mark.parametrize("use_ref", [False, True])
@fuzz(3)
@given(seed=st.integers(0, 2 ** 16))
def test_one_kto_kl_estimate(use_kl, use_policy, use_ref, seed):
    _count(f"kto_kl:{int(use_kl)}{int(use_policy)}{int(use_ref)}")
    g = torch.Generator().manual_seed(seed)
    policy, ref = -torch.rand(4, generator=g, dtype=torch.float64) * 5, -torch.rand(4, generator=g, dtype=torch.float64) * 5
    desirable = torch.tensor([True, False, True, False])
    kl_policy, kl_ref = -torch.rand(4, generator=g, dtype=torch.float64) * 5, -torch.rand(4, generator=g, dtype=torch.float64) * 5
    kwargs = dict(kl=0.25 if use_kl else None, policy_kl_logps=kl_policy if use_policy else None,
                  ref_kl_logps=kl_ref if use_ref else None)
    if use_kl and (use_policy or use_ref):
        with pytest.raises(ValueError, match="pass one KL estimate, not both: got kl and policy_kl_logps/ref_kl_logps"):
            pyfused_po.kto_loss(policy, ref, desirable, **kwargs)
    elif use_policy != use_ref:
        with pytest.raises(ValueError, match="together"):
            pyfused_po.kto_loss(policy, ref, desirable, **kwargs)
    else:
        out = pyfused_po.kto_loss(policy, ref, desirable, **kwargs)
        z0 = 0.25 if use_kl else (max(0.0, (kl_policy - kl_ref).mean().item()) if use_policy else 0.0)
        assert math.isclose(out.metrics["kl"].item(), z0, rel_tol=1e-12, abs_tol=1e-15)


# ----------------------------------------------------------------------------- class 8


PER_TOKEN = ("sequence_sums:token_values", "sequence_sums:token_weights", "packed:token_weights",
             "module:token_weights", "module:ref_token_logps", "merge_labels:nll_labels")


def _wrong_shape(shape, how):
    """A shape that broadcasts against ``shape`` (or holds the same count) but is not it."""
    rows, length = shape
    wrong = {"one_row": (1, length), "one_column": (rows, 1), "flat": (rows * length,),
             "lead": (1, rows, length)}[how]
    return wrong if wrong != shape else (1, 1)  # a packed [1, N] has one row already


@pytest.mark.parametrize("target", PER_TOKEN)
@fuzz(12)
@given(how=st.sampled_from((None, "one_row", "one_column", "flat", "lead")), rows=st.sampled_from((2, 4)),
       length=st.integers(2, 6), seed=st.integers(0, 2 ** 16))
def test_per_token_inputs_shaped_like_labels(target, how, rows, length, seed):
    _count(f"tok:{target.split(':')[0]}:{'ok' if how is None else 'bad'}")
    g = torch.Generator().manual_seed(seed)
    function, name = target.split(":")
    if function == "packed":
        rows, length = 1, rows * length
    shape = (rows, length)
    labels = torch.randint(0, 5, shape, generator=g)
    labels[torch.rand(shape, generator=g) < 0.3] = -100
    values = torch.randn(shape, generator=g, dtype=torch.float64)
    weights = torch.rand(shape, generator=g, dtype=torch.float64)
    bad_shape = None if how is None else _wrong_shape(shape, how)

    def make(x):  # the drawn input, at the right shape or at a broadcasting one
        return x if bad_shape is None else x.reshape(-1)[:math.prod(bad_shape)].reshape(bad_shape)

    if function == "sequence_sums":
        call = (lambda: pyfused_po.sequence_sums(make(values), labels)) if name == "token_values" else \
            (lambda: pyfused_po.sequence_sums(values, labels, token_weights=make(weights)))
        expected = lambda out: torch.testing.assert_close(  # noqa: E731
            out.logps, torch.where(labels != -100, values * (1 if name == "token_values" else weights), 0).sum(-1))
    elif function == "packed":
        cu = torch.tensor([0, length // 2, length])
        call = lambda: pyfused_po.sequence_sums(values, labels, cu_seqlens=cu, token_weights=make(weights))  # noqa: E731
        flat = torch.where(labels != -100, values * weights, 0).reshape(-1)
        expected = lambda out: torch.testing.assert_close(  # noqa: E731
            out.logps, torch.stack([flat[:length // 2].sum(), flat[length // 2:].sum()]))
    elif function == "module":
        logits = torch.randn(rows, length, 5, generator=g, dtype=torch.float64)
        labels[:, 0] = 1  # every sequence scores a token
        kwargs = dict(token_weights=make(weights), ref_token_logps=-weights) if name == "token_weights" else \
            dict(ref_token_logps=make(-weights))
        call = lambda: pyfused_po.FusedPreferenceLoss("sigmoid", backend="torch")(  # noqa: E731
            logits=logits, labels=labels, **kwargs)
        expected = lambda out: None if torch.isfinite(out.loss) else pytest.fail("non-finite loss")  # noqa: E731
    else:
        nll = torch.randint(0, 5, shape, generator=g)
        both = (labels != -100) & (nll != -100)
        nll = torch.where(both, labels, nll)  # where both are set they must agree
        call = lambda: merge_labels(labels, make(nll))  # noqa: E731
        expected = lambda out: torch.testing.assert_close(out, torch.where(labels != -100, labels, nll))  # noqa: E731
    if bad_shape is None:
        expected(call())
        return
    with pytest.raises(ValueError, match=rf"{name} must have shape|{name} must have the shape of labels"):
        call()
