"""Max-context search: the largest tokens per pair whose loss + backward fits in memory.

One pair (chosen and rejected of ``T/2`` tokens each), D = 4096, V = 128,256, bf16.  Every
method starts from the same place, the final hidden states and the LM head: the
fused-linear methods take them directly; for logits methods the probe materializes
``logits = hidden @ weightᵀ`` inside the step (as the model would), so "fits" means the
same thing for both kinds.
"""
import torch

from .cases import HEADLINE_HIDDEN, HEADLINE_VOCAB, Case
from .inputs import Inputs, make_inputs
from .timing import release, run_step

START = 1024
CAP = 1 << 20          # 1M tokens per pair; a capped result is reported as "≥ cap"
GRANULARITY = 1024


def search(fits, *, start=START, cap=CAP, granularity=GRANULARITY):
    """Largest ``t`` (a multiple of ``granularity``, ``≤ cap``) with ``fits(t)``, assuming
    ``fits`` is monotone.  Doubles from ``start``, then bisects.  Returns ``(t, capped)``;
    ``t = 0`` when even ``start`` does not fit."""
    if not fits(start):
        return 0, False
    lo, hi = start, None
    while hi is None:
        nxt = min(lo * 2, cap)
        if nxt == lo:
            return lo, True
        if fits(nxt):
            lo = nxt
        else:
            hi = nxt
    while hi - lo > granularity:
        mid = (lo + hi) // 2 // granularity * granularity
        if mid <= lo:
            break
        if fits(mid):
            lo = mid
        else:
            hi = mid
    return lo, False


def probe_case(tokens_per_pair, dtype="bf16"):
    return Case(path="linear", pairs=1, seq_len=max(1, tokens_per_pair // 2), vocab=HEADLINE_VOCAB,
                dtype=dtype, hidden=HEADLINE_HIDDEN)


def _logits_view(inp):
    """The probe's inputs for a logits method: logits computed from hidden and weight."""
    return Inputs(labels=inp.labels, logits=inp.hidden @ inp.weight.t(), hidden=inp.hidden,
                  weight=inp.weight, ref_chosen=inp.ref_chosen, ref_rejected=inp.ref_rejected)


def fits(method, tokens_per_pair, device, dtype="bf16"):
    """True when one step of ``method`` at ``tokens_per_pair`` runs without running out of
    memory.  Other errors propagate: they are not a memory limit."""
    case = probe_case(tokens_per_pair, dtype)
    inp = loss_fn = None
    try:
        inp = make_inputs(case, device)[0]
        zeros = torch.zeros(1, device=device)
        inp.ref_chosen, inp.ref_rejected = zeros, zeros.clone()
        step_case = case if method.path == "linear" else Case(
            path="logits", pairs=1, seq_len=case.seq_len, vocab=case.vocab, dtype=dtype)
        loss_fn = method.build(step_case, device)
        if method.path == "logits":
            inner = loss_fn
            loss_fn = lambda i: inner(_logits_view(i))  # noqa: E731
        run_step(loss_fn, inp)
        return True
    except torch.OutOfMemoryError:
        return False
    except RuntimeError as err:
        if "out of memory" in str(err).lower():
            return False
        raise
    finally:
        inp = loss_fn = None  # drop this probe's tensors before returning cached blocks
        release(device)


def max_context(method, device, *, cap=CAP, dtype="bf16"):
    """``{"method", "label", "max_tokens_per_pair", "capped", "status", "note"}``."""
    rec = {"method": method.name, "label": method.label, "path": method.path,
           "max_tokens_per_pair": None, "capped": False, "status": "ok", "note": ""}
    reason = method.unavailable(device)
    if reason is not None:
        rec["status"] = reason
        return rec
    try:
        best, capped = search(lambda t: fits(method, t, device, dtype), cap=cap)
        rec.update(max_tokens_per_pair=best, capped=capped)
    except Exception as err:
        rec.update(status="error", note=f"{type(err).__name__}: {str(err)[:200]}")
    return rec
