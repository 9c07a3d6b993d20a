"""Ablations that decide the fused-linear defaults: ``python bench/ablations.py --out DIR``.

Four questions, each answered by timing variants of the same step on the same inputs:

* ``impl``: one DPO step (sigmoid, β = 0.1) from hidden states and the LM head through
  ``linear_token_logprobs(impl="chunked")``, ``impl="fused"`` and the module
  ``FusedPreferenceLoss(hidden=, weight=)``: its three-GEMM plan (:mod:`pyfused_po.plans.fused_pairs`)
  and, forced with ``module.fused_gradient = False``, its staged four-GEMM path (chunked and
  fused).  Which plan actually ran is read off the loss's autograd node, not assumed.
* ``accumulate``: the chunked backward alone (fixed upstream gradients): the library as it
  dispatches (vocabulary-outer when labelled tokens < vocabulary), the library forced
  token-outer (a fold that is not a module disables the vocabulary-outer order), and the old
  algorithm with a ``[V, D]`` fp32 product per chunk added into ``dW``
  (:func:`backward_with_temporaries`, a reference implementation kept here; the library has
  no switch for it).
* ``atomics``: relaxed vs acq_rel atomics in the fused backward, if the kernels expose a
  switch; otherwise recorded as not ablatable (the kernels are not edited for it).
* ``grad_filter``: ``impl="fused"`` with ``grad_filter=None`` and ``"auto"`` on SmolLM2-135M's
  final hidden states for the shipped preference pairs: gradient error against a float64
  autograd reference, and time (on a GPU, on the rows replicated to about 16k tokens).

On a GPU the sizes are the headline's (16,384 tokens × 128,256 vocabulary, D = 4096, bf16);
without CUDA (or with ``--tiny``) every variant runs its real code path at toy sizes (Triton
kernels under the interpreter), which checks the script, not the speed.  Writes
``ablations.json`` (rewritten after each ablation, so a run cut short keeps what finished),
``ablations.md`` and ``ablations.png`` into ``--out``; exits 1 if an ablation failed.
"""
import argparse
import inspect
import json
import os
import re
import statistics
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if __package__ in (None, ""):
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT / "bench"]
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

if not torch.cuda.is_available():  # Triton kernels under the interpreter; set before any kernel is decorated
    os.environ.setdefault("TRITON_INTERPRET", "1")

from bench.cases import HEADLINE_HIDDEN, HEADLINE_PAIRS, HEADLINE_SEQ, HEADLINE_VOCAB, Case  # noqa: E402
from bench.env_info import environment  # noqa: E402
from bench.inputs import make_inputs  # noqa: E402
from bench.timing import _sync, time_calls_ms  # noqa: E402

BETA = 0.1
NAMES = ("impl", "accumulate", "atomics", "grad_filter")
TINY = dict(pairs=2, seq_len=9, vocab=131, hidden=24, dtype="fp32")
GPU = dict(pairs=HEADLINE_PAIRS, seq_len=HEADLINE_SEQ, vocab=HEADLINE_VOCAB, hidden=HEADLINE_HIDDEN, dtype="bf16")
GRAD_FILTER_TIME_TOKENS = 16_384  # GPU: real rows replicated to about this many labelled tokens


# ----------------------------------------------------------------------------------------------
# measurement


def time_ms(fn, device, warmup, reps):
    """Per-rep milliseconds of ``fn()`` after ``warmup`` calls (CUDA events on a GPU)."""
    return time_calls_ms(fn, device, warmup=warmup, reps=reps)


def peak_extra(fn, device):
    """Bytes allocated at the peak of ``fn()`` above those allocated before it (CUDA), else None."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    fn()
    _sync(device)
    return torch.cuda.max_memory_allocated(device) - base


def rel(a, b):
    """‖a − b‖ / ‖b‖ in float64 (None when either is missing)."""
    if a is None or b is None:
        return None
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def _measure(row, fn, device, warmup, reps):
    times = time_ms(fn, device, warmup, reps)
    row.update(median_ms=statistics.median(times), times_ms=times, peak_extra_bytes=peak_extra(fn, device))
    return row


# ----------------------------------------------------------------------------------------------
# ablation 1: chunked vs fused vs the module's three-GEMM plan


def _backend(device, impl):
    return "triton" if (device.type == "cuda" or impl == "fused") else "torch"


def _plan_of(loss):
    """Which path produced ``loss``: the module's three-GEMM plan stores its gradients in a
    ``_StoredGradient`` node; anything else is the staged path."""
    name = type(loss.grad_fn).__name__ if loss.grad_fn is not None else ""
    return "three-GEMM (fused_pairs)" if "StoredGradient" in name else "staged"


def _impl_variants(device, case):
    import pyfused_po
    from pyfused_po.token.linear_token_logprobs import linear_token_logprobs

    def direct(impl):
        backend = _backend(device, impl)

        def step(inp):
            logps = linear_token_logprobs(inp.hidden, inp.weight, inp.labels, backend=backend, impl=impl)
            sums = logps.reshape(2 * case.pairs, -1).sum(-1)
            return pyfused_po.preference_loss(sums[:case.pairs], sums[case.pairs:], inp.ref_chosen,
                                              inp.ref_rejected, loss_type="sigmoid", beta=BETA).loss
        return step

    def module(impl, fused_gradient, chunk_tokens=None):
        m = pyfused_po.FusedPreferenceLoss("sigmoid", beta=BETA, logit_metrics=False, linear_impl=impl,
                                           backend=_backend(device, impl))
        m.fused_gradient = fused_gradient  # False forces the staged path (the class attribute's switch)
        if chunk_tokens is not None:
            m.chunk_tokens = chunk_tokens

        def step(inp):
            return m(hidden=inp.hidden, weight=inp.weight, labels=inp.labels, ref_chosen_logps=inp.ref_chosen,
                     ref_rejected_logps=inp.ref_rejected).loss
        return step

    return [
        ("linear_token_logprobs impl=chunked", "4 GEMMs (recompute in bwd)", direct("chunked")),
        ("linear_token_logprobs impl=fused", "Triton tiles, recompute in bwd", direct("fused")),
        ("FusedPreferenceLoss(hidden=, weight=) default", "3 GEMMs expected", module("auto", True)),
        # The chunk rule (torch_backend.linear.gradient_chunk_size: min(4096, D) tokens at the
        # headline) against the staged budget's 1,024-token chunks: 4 against 16 dW re-reads.
        ("FusedPreferenceLoss three-GEMM, chunk_tokens=1024", "3 GEMMs, 16 dW passes", module("auto", True, 1024)),
        ("FusedPreferenceLoss staged (fused_gradient=False)", "4 GEMMs", module("chunked", False)),
        ("FusedPreferenceLoss linear_impl=fused", "staged, Triton tiles", module("fused", True)),
    ]


_SHORT = {"linear_token_logprobs impl=chunked": "chunked", "linear_token_logprobs impl=fused": "fused",
          "FusedPreferenceLoss(hidden=, weight=) default": "module default (3-GEMM)",
          "FusedPreferenceLoss three-GEMM, chunk_tokens=1024": "module 3-GEMM, 1k chunks",
          "FusedPreferenceLoss staged (fused_gradient=False)": "module staged chunked",
          "FusedPreferenceLoss linear_impl=fused": "module staged fused"}


def ablate_impl(device, sizes, warmup, reps):
    case = Case(path="linear", kind="realistic", **sizes)
    inp = make_inputs(case, device)[0]
    P = case.pairs
    inp.ref_chosen = torch.zeros(P, device=device)
    inp.ref_rejected = torch.zeros(P, device=device)
    rows, ref_grads = [], None
    for name, note, step in _impl_variants(device, case):
        row = dict(variant=name, note=note, short=_SHORT.get(name))
        try:
            inp.zero_grads()
            loss = step(inp)
            row["plan"] = _plan_of(loss)
            loss.backward()
            grads = (inp.hidden.grad.detach().clone(), inp.weight.grad.detach().clone())
            if ref_grads is None:
                ref_grads = grads
            row.update(loss=float(loss.detach()), dh_rel_vs_chunked=rel(grads[0], ref_grads[0]),
                       dw_rel_vs_chunked=rel(grads[1], ref_grads[1]))
            del grads

            def once(step=step):
                inp.zero_grads()
                step(inp).backward()
            _measure(row, once, device, warmup, reps)
            row["status"] = "ok"
        except Exception as err:  # one variant failing is a result, not the end of the ablation
            row.update(status="error", error=f"{type(err).__name__}: {str(err)[:300]}")
        inp.zero_grads()
        rows.append(row)
    return dict(case=case.key, tokens=case.tokens, vocab=case.vocab, hidden=case.hidden, dtype=case.dtype,
                flops_needed=6 * case.tokens * case.hidden * case.vocab, rows=rows)


# ----------------------------------------------------------------------------------------------
# ablation 2: gradient accumulation in place vs a temporary per chunk


def backward_with_temporaries(hidden2d, weight, rows, targets, lse, grad_logp, fold, kw, chunk):
    """The chunked backward as it was before in-place accumulation (reference implementation,
    kept here for this comparison only): token-outer, and per chunk ``dW += (Gᵀ·H_c)`` through a
    ``[V, D]`` fp32 product that is allocated, written, read and freed each chunk."""
    from pyfused_po.token.torch_backend import linear as chunked

    M = rows.numel()
    gh = torch.zeros(hidden2d.shape, device=hidden2d.device, dtype=hidden2d.dtype)
    gw = torch.zeros(weight.shape, device=weight.device, dtype=torch.float32)
    for c0 in range(0, M, chunk):
        c1 = min(M, c0 + chunk)
        idx = rows[c0:c1]
        h, x = chunked._chunk_logits(hidden2d, weight, None, idx)
        x3 = x.unsqueeze(0)
        fold.token_backward(x3, targets[c0:c1].unsqueeze(0), lse[c0:c1].unsqueeze(0), x3,
                            grad_logp=grad_logp[c0:c1].unsqueeze(0), **kw)
        gh.index_copy_(0, idx, chunked._mm(x, weight, gh.dtype))
        gw.add_(chunked._mm(x.t(), h, torch.float32))  # the temporary: a [V, D] fp32 product
    return gh, gw


def _fold(device):
    if device.type == "cuda":
        from pyfused_po import kernels

        return kernels
    from pyfused_po.token.torch_backend import token

    return token


def ablate_accumulate(device, sizes, warmup, reps, chunk_tokens=None):
    """``chunk_tokens``: the library's chunk option (tiny runs pass a small one so that the
    accumulation over several chunks is what runs); ``None``: the library's default."""
    from pyfused_po.token.torch_backend import linear as chunked

    case = Case(path="linear", kind="realistic", **sizes)
    inp = make_inputs(case, device)[0]
    h2 = inp.hidden.detach().reshape(-1, case.hidden)
    w = inp.weight.detach()
    rows, _, targets = chunked.labelled_tokens(inp.labels, -100, False)
    kw = dict(ignore_index=-100, shift=False, temperature=1.0, logit_scale=1.0, softcap=None)
    fold = _fold(device)
    bkw = {k: v for k, v in kw.items() if k != "shift"}
    _, lse, _ = chunked.linear_forward(h2, w, None, rows, targets, fold=fold, **bkw)
    M, V = rows.numel(), w.shape[0]
    g = torch.randn(M, device=device, generator=torch.Generator(device=device).manual_seed(1)) / M
    not_a_module = types.SimpleNamespace(token_forward=fold.token_forward, token_backward=fold.token_backward)
    C = chunked.chunk_size(M, V, device, chunk_tokens)
    width = chunked.vocab_slice_width(M, V, chunked.chunk_budget(V, device, chunk_tokens))
    order = "vocabulary-outer" if width and M < V else "token-outer"

    def library(f):
        return lambda: chunked.linear_backward(h2, w, None, rows, targets, lse, grad_logp=g, need_bias=False,
                                               fold=f, chunk_tokens=chunk_tokens, **bkw)[:2]

    variants = [
        (f"library, as dispatched ({order}), in place", f"in place, {order}", library(fold)),
        ("library forced token-outer, in place", "in place, token-outer", library(not_a_module)),
        ("token-outer with a [V, D] fp32 temporary per chunk (old algorithm, reference impl.)",
         "temporary per chunk (old)", lambda: backward_with_temporaries(h2, w, rows, targets, lse, g, fold, kw, C)),
    ]
    rows_out, ref = [], None
    for name, short, fn in variants:
        row = dict(variant=name, short=short)
        try:
            gh, gw = fn()
            ref = ref or (gh.clone(), gw.clone())
            row.update(dh_rel_vs_first=rel(gh, ref[0]), dw_rel_vs_first=rel(gw, ref[1]))
            del gh, gw
            _measure(row, fn, device, warmup, reps)
            row["status"] = "ok"
        except Exception as err:
            row.update(status="error", error=f"{type(err).__name__}: {str(err)[:300]}")
        rows_out.append(row)
    gemm = time_ms(lambda: h2[:min(M, C)] @ w.t(), device, 1, max(1, reps))
    return dict(case=case.key, tokens=M, vocab=V, hidden=case.hidden, dtype=case.dtype, chunk_tokens=C,
                chunks=-(-M // C), one_chunk_gemm_ms=statistics.median(gemm), rows=rows_out)


# ----------------------------------------------------------------------------------------------
# ablation 3: atomics


def atomics_switch():
    """The launcher keyword that selects the atomics' memory semantics, or ``None``."""
    from pyfused_po.kernels import linear_launch

    params = inspect.signature(linear_launch.linear_backward).parameters
    return next((n for n in params if "sem" in n.lower() or "atomic" in n.lower()), None)


def ablate_atomics(device, sizes, warmup, reps):
    switch = atomics_switch()
    src = (ROOT / "kernels" / "linear_backward.py").read_text()
    sems = sorted(set(re.findall(r'sem\s*=\s*"(\w+)"', src)))
    n_atomics = len(re.findall(r"tl\.atomic_add\(", src))
    if switch is None:
        return dict(status="not ablatable in this build",
                    reason=(f"kernels/linear_backward.py hard-codes sem={sems} on its {n_atomics} tl.atomic_add "
                            "calls and kernels.linear_launch.linear_backward takes no switch; acq_rel needs a "
                            "kernel change (not made for an ablation)"),
                    semantics_in_source=sems, atomic_adds=n_atomics)
    return dict(status="switch found, not timed by this script version", switch=switch,
                semantics_in_source=sems, atomic_adds=n_atomics)


# ----------------------------------------------------------------------------------------------
# ablation 4: gradient filtering on the real model's activations


def q8_0_weight(q, d):
    """The LM head from its GGUF Q8_0 blocks: ``w = d·q`` per block of 32 (exact in fp32)."""
    return (q.float() * d.float().unsqueeze(-1)).reshape(q.shape[0], -1)


def load_activations(path=None, pairs=None):
    """``(hidden [2P, T, D], weight [V, D], labels [2P, T], source)`` fp32, CPU: from ``path``
    (``bench/gpu/pack_activations.py``'s file), else ``smollm2.activations()``, else ``None``
    and the reason."""
    if path:
        pack = torch.load(path, weights_only=True)
        return pack["hidden"], q8_0_weight(pack["head_q"], pack["head_d"]), pack["labels"], f"file {path}"
    from pyfused_po.testing import smollm2

    reason = smollm2.unavailable_reason()
    if reason is not None:
        return None, reason
    model, tok = smollm2.load()
    a = smollm2.activations(model, tok, None if pairs is None else smollm2.preference_pairs()[:pairs])
    return a["hidden"], a["weight"], a["labels"], "smollm2.activations()"


def _dpo_from_logps(logps, labels, P):
    sums = (logps * (labels != -100)).sum(-1)
    ref = sums.detach()  # reference = policy: the first step of DPO (margin 0, every pair's g = −β/2/P)
    z = BETA * ((sums[:P] - ref[:P]) - (sums[P:] - ref[P:]))
    return torch.nn.functional.softplus(-z).mean()


def _reference_grads(h, w, labels):
    """float64 autograd reference of the same loss (shifted log-probs, DPO, ref = policy)."""
    h64 = h.detach().double().requires_grad_(True)
    w64 = w.detach().double().requires_grad_(True)
    logits = h64[:, :-1] @ w64.t()
    y = labels[:, 1:]
    lp = torch.log_softmax(logits, -1).gather(-1, y.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    lp = torch.nn.functional.pad(lp, (1, 0))
    _dpo_from_logps(lp, labels, labels.shape[0] // 2).backward()
    return h64.grad, w64.grad


def ablate_grad_filter(device, tiny, warmup, reps, activations=None):
    from pyfused_po.token.linear_token_logprobs import linear_token_logprobs

    loaded = load_activations(activations, pairs=2 if tiny else None)
    if loaded[0] is None:
        return dict(status="skipped", reason=loaded[1])
    hidden, weight, labels, source = loaded
    note = "real rows, full vocabulary"
    if tiny:  # dry run: a slice through the same code path
        P = hidden.shape[0] // 2
        keep = torch.tensor([0, 1, P, P + 1])
        vt, dt_ = 150, 40
        hidden, weight = hidden[keep, :, :dt_].contiguous(), weight[:vt, :dt_].contiguous()
        labels = labels[keep]
        labels = torch.where(labels == -100, labels, labels % vt)
        note = f"tiny slice (dry run): 2 pairs, first {vt} vocabulary rows, first {dt_} of D, labels mod {vt}"
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    h = hidden.to(device=device, dtype=dtype)
    w = weight.to(device=device, dtype=dtype)
    y = labels.to(device)
    P = h.shape[0] // 2
    ref_h, ref_w = _reference_grads(h, w, y)

    def grads(flt, hh, ww, yy):
        hh = hh.detach().requires_grad_(True)
        ww = ww.detach().requires_grad_(True)
        lp = linear_token_logprobs(hh, ww, yy, shift=True, impl="fused", backend="triton", grad_filter=flt)
        _dpo_from_logps(lp, yy, yy.shape[0] // 2).backward()
        return hh.grad, ww.grad

    reps_k = 1
    if device.type == "cuda":  # time at a realistic size: the real rows replicated
        labelled = int((y[:, 1:] != -100).sum())
        reps_k = max(1, GRAD_FILTER_TIME_TOKENS // max(labelled, 1))
    hk = torch.cat([h[:P]] * reps_k + [h[P:]] * reps_k)
    yk = torch.cat([y[:P]] * reps_k + [y[P:]] * reps_k)
    rows = []
    base = None
    for flt in (None, "auto"):
        row = dict(grad_filter=str(flt))
        try:
            gh, gw = grads(flt, h, w, y)
            base = base or (gh, gw)
            row.update(dh_rel_vs_fp64=rel(gh, ref_h), dw_rel_vs_fp64=rel(gw, ref_w),
                       dh_rel_vs_unfiltered=rel(gh, base[0]), dw_rel_vs_unfiltered=rel(gw, base[1]))
            _measure(row, lambda flt=flt: grads(flt, hk, w, yk), device, warmup, reps)
            row["status"] = "ok"
        except Exception as err:
            row.update(status="error", error=f"{type(err).__name__}: {str(err)[:300]}")
        rows.append(row)
    return dict(source=source, note=note, dtype=str(dtype).replace("torch.", ""), shape=list(h.shape),
                vocab=w.shape[0], labelled_tokens=int((y[:, 1:] != -100).sum()), time_replicas=reps_k,
                rows=rows)


# ----------------------------------------------------------------------------------------------
# reports


def _fmt(v, spec="{:.3g}"):
    return "—" if v is None else spec.format(v)


def render_md(doc):
    env = doc["environment"]
    lines = [f"# Ablations — {env['device']}", "",
             f"{env['date_utc']}, commit `{env.get('git_commit') or 'unknown'}`, "
             f"{'tiny CPU sizes (dry run: checks the script, not the speed)' if doc['tiny'] else 'headline sizes'}.",
             ""]
    res = doc["results"]
    if "impl" in res and "rows" in res["impl"]:
        r = res["impl"]
        lines += [f"## impl: one DPO step from hidden states ({r['case']})", "",
                  "| variant | plan that ran | median ms | peak extra GB | dH rel. vs chunked | dW rel. vs chunked |",
                  "|---|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['variant']} | {row.get('plan', row.get('error', ''))} | {_fmt(row.get('median_ms'))} "
                         f"| {_fmt(row.get('peak_extra_bytes') and row['peak_extra_bytes'] / 1e9)} "
                         f"| {_fmt(row.get('dh_rel_vs_chunked'))} | {_fmt(row.get('dw_rel_vs_chunked'))} |")
        lines.append("")
    if "accumulate" in res and "rows" in res["accumulate"]:
        r = res["accumulate"]
        lines += [f"## accumulate: chunked backward only ({r['tokens']} tokens, V = {r['vocab']}, D = {r['hidden']}, "
                  f"{r['dtype']}, {r['chunks']} chunks of {r['chunk_tokens']}; one chunk's forward GEMM "
                  f"{_fmt(r['one_chunk_gemm_ms'])} ms)", "",
                  "| variant | median ms | peak extra GB | dH rel. vs first | dW rel. vs first |", "|---|---|---|---|---|"]
        for row in r["rows"]:
            lines.append(f"| {row['variant']} | {_fmt(row.get('median_ms'))} "
                         f"| {_fmt(row.get('peak_extra_bytes') and row['peak_extra_bytes'] / 1e9)} "
                         f"| {_fmt(row.get('dh_rel_vs_first'))} | {_fmt(row.get('dw_rel_vs_first'))} |")
        lines.append("")
    if "atomics" in res:
        r = res["atomics"]
        lines += ["## atomics: relaxed vs acq_rel", "", f"**{r.get('status')}**: {r.get('reason', '')}", ""]
    if "grad_filter" in res:
        r = res["grad_filter"]
        if "rows" not in r:
            lines += ["## grad_filter", "", f"**{r.get('status')}**: {r.get('reason', r.get('error', ''))}", ""]
        else:
            lines += [f"## grad_filter on real activations ({r['source']}; {r['note']}; {r['dtype']}, "
                      f"{r['labelled_tokens']} labelled tokens, V = {r['vocab']}; time on {r['time_replicas']}× "
                      "the rows)", "",
                      "| grad_filter | median ms | dH rel. vs fp64 | dW rel. vs fp64 | dH rel. vs unfiltered "
                      "| dW rel. vs unfiltered |", "|---|---|---|---|---|---|"]
            for row in r["rows"]:
                lines.append(f"| {row['grad_filter']} | {_fmt(row.get('median_ms'))} | {_fmt(row.get('dh_rel_vs_fp64'))} "
                             f"| {_fmt(row.get('dw_rel_vs_fp64'))} | {_fmt(row.get('dh_rel_vs_unfiltered'))} "
                             f"| {_fmt(row.get('dw_rel_vs_unfiltered'))} |")
            lines.append("")
    errors = [f"- {k}: {v['error']}" for k, v in res.items() if isinstance(v, dict) and "error" in v]
    if errors:
        lines += ["## errors", ""] + errors + [""]
    return "\n".join(lines)


def write_png(doc, path):
    """One bar chart per timed ablation (median ms per variant); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    groups = [(k, v["rows"]) for k, v in doc["results"].items() if isinstance(v, dict) and "rows" in v]
    fig, axes = plt.subplots(1, max(1, len(groups)), figsize=(5.5 * max(1, len(groups)), 3.5), squeeze=False)
    for ax, (name, rows) in zip(axes[0], groups):
        ok = [r for r in rows if r.get("median_ms") is not None]
        labels = [str(r.get("short") or r.get("variant") or r.get("grad_filter"))[:32] for r in ok]
        ax.barh(range(len(ok)), [r["median_ms"] for r in ok])
        ax.set_yticks(range(len(ok)), labels, fontsize=7)
        ax.set_xlabel("median ms")
        ax.set_title(name)
    fig.suptitle(f"ablations — {doc['environment']['device']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def write(doc, out):
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablations.json").write_text(json.dumps(doc, indent=1))
    (out / "ablations.md").write_text(render_md(doc))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for ablations.json / .md / .png")
    p.add_argument("--only", default=",".join(NAMES), help=f"comma-separated subset of {NAMES}")
    p.add_argument("--tiny", action="store_true", help="toy sizes (the default without CUDA)")
    p.add_argument("--activations", default=None, help="bench/gpu/pack_activations.py's file (default: "
                   "smollm2.activations())")
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--reps", type=int, default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    only = [n for n in args.only.split(",") if n]
    unknown = sorted(set(only) - set(NAMES))
    if unknown:
        raise SystemExit(f"--only: unknown ablations {unknown}; known: {NAMES}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    tiny = args.tiny or device.type != "cuda"
    sizes = TINY if tiny else GPU
    warmup = args.warmup if args.warmup is not None else (2 if device.type == "cuda" else 0)
    reps = args.reps if args.reps is not None else (5 if device.type == "cuda" else 1)
    out = Path(args.out)
    doc = dict(environment=environment(device, ["python", "bench/ablations.py"] + list(argv or sys.argv[1:])),
               tiny=tiny, sizes=sizes, warmup=warmup, reps=reps, results={})
    runners = dict(impl=lambda: ablate_impl(device, sizes, warmup, reps),
                   accumulate=lambda: ablate_accumulate(device, sizes, warmup, reps, 16 if tiny else None),
                   atomics=lambda: ablate_atomics(device, sizes, warmup, reps),
                   grad_filter=lambda: ablate_grad_filter(device, tiny, warmup, reps, args.activations))
    failed = []
    for name in only:
        t0 = time.perf_counter()
        print(f"ablation {name} ...", flush=True)
        try:
            res = runners[name]()
        except Exception as err:
            res = dict(status="error", error=f"{type(err).__name__}: {str(err)[:300]}")
        res["wall_s"] = time.perf_counter() - t0
        bad = res.get("status") == "error" or any(r.get("status") == "error" for r in res.get("rows", []))
        if bad:
            failed.append(name)
        doc["results"][name] = res
        write(doc, out)  # after each ablation: a run cut short keeps what finished
        if device.type == "cuda":
            torch.cuda.empty_cache()
    png = write_png(doc, out / "ablations.png")
    print(render_md(doc))
    print(f"wrote {out / 'ablations.json'}, {out / 'ablations.md'}" + (f", {out / 'ablations.png'}" if png else ""))
    if failed:
        print(f"ablations with errors: {failed}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
