"""Work counters for one DPO step on the fused-linear path, counted on the CPU.

(Also one KTO step of :class:`~pyfused_po.FusedKTOLoss` on the same rows, trainable head,
fused and staged plans: its ratios are against TRL's DPO step, the same GEMM shapes.)

``python bench/work_counters.py`` runs one step (hidden states + LM head → per-token log-probs →
DPO loss → backward) for each method under a :class:`WorkCounter` and prints, side by side:

* **GEMM FLOPs** over every matmul-family aten op — ``mm``, ``addmm``, ``bmm``, ``baddbmm``,
  ``mv``/``addmv``/``dot`` and their in-place (``addmm_``) and ``out=`` (``mm.out``,
  ``addmm.out``) forms; ``matmul``/``linear`` decompose into these before the dispatcher.
  ``torch.utils.flop_counter`` has no entry for ``mm.out`` nor ``addmm_``, which TRL uses, so it
  would undercount TRL.  Reported in units of one ``[M, D] × [D, V]`` GEMM (``2·M·D·V``
  FLOPs, M = labelled tokens).
* **Peak live tensor bytes**: every storage an op creates during the step is tracked from its
  creation to its release (a weakref finalizer on the storage), so the peak is exactly the
  largest sum of simultaneously alive bytes allocated inside the step (inputs excluded,
  parameter ``.grad`` included).
* **Accumulator traffic** (a model): bytes moved by the gradient GEMMs (output last dim = D: dH,
  dW, ∂log p/∂h) — the output written, the accumulator read when the GEMM adds into it
  (``addmm_``, ``addmm(out=acc)``, ``baddbmm``), and, when the product lands in a fresh
  temporary, the temporary read again plus the target read (for an add) and written by the op
  that consumes it.  It is what the GEMMs cost in memory traffic beyond their operands.

Every method runs at the same chunk budget (elements of one logits tile).
"""
import argparse
import json
import math
import sys
import weakref
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "cpu-work"

_MATMUL_OPS = {"mm", "addmm", "addmm_", "bmm", "baddbmm", "baddbmm_", "mv", "addmv", "addmv_",
               "dot", "vdot", "_addmm_activation"}
# Ops that add the product they read into a target (so the target is also read).
_ACCUMULATING = {"add", "add_", "sub", "sub_", "index_add", "index_add_", "index_put_", "index_put"}


def _matmul_operands(name, args):
    """The two multiplied tensors of a matmul-family op (the additive input skipped)."""
    if name in ("mm", "bmm", "mv", "dot", "vdot"):
        return args[0], args[1]
    return args[1], args[2]  # addmm / addmm_ / baddbmm / addmv / _addmm_activation(self, a, b)


def matmul_flops(name, a, b):
    """2·(output elements)·(reduced length) for ``a @ b`` (batched for bmm/baddbmm)."""
    if name in ("dot", "vdot"):
        return 2 * a.numel()
    if name in ("mv", "addmv", "addmv_"):
        return 2 * a.shape[0] * a.shape[1]
    if a.dim() == 3:  # bmm / baddbmm
        return 2 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
    return 2 * a.shape[0] * a.shape[1] * b.shape[1]


def _tensors(tree):
    if isinstance(tree, torch.Tensor):
        yield tree
    elif isinstance(tree, (list, tuple)):
        for x in tree:
            yield from _tensors(x)
    elif isinstance(tree, dict):
        for x in tree.values():
            yield from _tensors(x)


class WorkCounter(TorchDispatchMode):
    """Counts matmul FLOPs, live tensor bytes and gradient-GEMM traffic of the ops run under it.

    ``hidden_dim``: D; a matmul whose output's last dimension is D is a gradient GEMM for the
    traffic model (dH, dW, ∂log p/∂h).  Results: ``gemm_flops``, ``ops`` (op name → calls),
    ``peak_bytes``, ``live_bytes`` (still alive now), ``acc_bytes``.
    """

    def __init__(self, hidden_dim=None):
        super().__init__()
        self.hidden_dim = hidden_dim
        self.gemm_flops = 0
        self.ops = {}
        self.live_bytes = 0
        self.peak_bytes = 0
        self.acc_bytes = 0
        self._live = {}  # data_ptr → (weakref to storage, nbytes)
        self._products = {}  # data_ptr of a fresh gradient-GEMM output not yet consumed → nbytes

    # -- live bytes -------------------------------------------------------------------
    def _free(self, key, nbytes):
        entry = self._live.get(key)
        if entry is not None and entry[0]() is None:
            del self._live[key]
            self.live_bytes -= nbytes
        self._products.pop(key, None)

    def _track(self, t):
        if t.device.type == "meta":
            return
        st = t.untyped_storage()
        nbytes, key = st.nbytes(), st.data_ptr()
        if nbytes == 0:
            return
        entry = self._live.get(key)
        if entry is not None and entry[0]() is st:
            if nbytes > entry[1]:  # an out= tensor resized in place
                self.live_bytes += nbytes - entry[1]
                self._live[key] = (entry[0], nbytes)
                self.peak_bytes = max(self.peak_bytes, self.live_bytes)
            return
        if entry is not None:  # a dead storage whose finalizer has not run yet
            self.live_bytes -= entry[1]
        self._live[key] = (weakref.ref(st), nbytes)
        weakref.finalize(st, self._free, key, nbytes)
        self.live_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.live_bytes)

    # -- dispatch ---------------------------------------------------------------------
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        self.ops[name] = self.ops.get(name, 0) + 1
        before = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs)) if t.device.type != "meta"}
        consumed = [p for p in before if p in self._products]
        out = func(*args, **kwargs)
        outputs = list(_tensors(out))
        if name in _MATMUL_OPS:
            a, b = _matmul_operands(name, args)
            self.gemm_flops += matmul_flops(name, a, b)
            self._gemm_traffic(name, args, kwargs, outputs)
        elif consumed:
            out_ptrs = {t.untyped_storage().data_ptr() for t in outputs if t.device.type != "meta"}
            for p in consumed:
                if p in out_ptrs:
                    continue  # a view of the product (t, view, ...) moves nothing
                # A fresh gradient product read back: read it and write the result, reading
                # the target first when the op adds into it.
                n = self._products.pop(p)
                self.acc_bytes += n * (3 if name in _ACCUMULATING else 2)
        for t in outputs:
            self._track(t)
        return out

    def _gemm_traffic(self, name, args, kwargs, outputs):
        if not outputs or self.hidden_dim is None or outputs[0].shape[-1] != self.hidden_dim:
            return
        o = outputs[0]
        nbytes = o.numel() * o.element_size()
        ptr = o.untyped_storage().data_ptr()
        accumulates = name in ("addmm_", "baddbmm_", "addmv_") or (
            name in ("addmm", "baddbmm", "addmv") and kwargs.get("beta", 1) != 0)
        self.acc_bytes += nbytes * (2 if accumulates else 1)
        if not accumulates:
            # A product written (fresh, or out= into a buffer kept for later): whoever reads
            # it back pays for it again.
            self._products[ptr] = self._products.get(ptr, 0) + nbytes


# -----------------------------------------------------------------------------------------
# One DPO step per method
# -----------------------------------------------------------------------------------------

def make_batch(pairs=2, seq=256, vocab=8192, dim=128, seed=0, dtype=torch.float32):
    """``[2P, T]`` labels (variable prompt lengths ignored, the rest labelled, no shift), hidden
    states ``[2P, T, D]``, a head ``[V, D]`` and precomputed reference sums ``[P]`` each."""
    g = torch.Generator().manual_seed(seed)
    n = 2 * pairs
    labels = torch.randint(0, vocab, (n, seq), generator=g)
    prompts = torch.randint(8, max(9, seq // 4), (n,), generator=g)
    for i in range(n):
        labels[i, : int(prompts[i])] = -100
    hidden = torch.randn(n, seq, dim, generator=g, dtype=dtype)
    weight = torch.randn(vocab, dim, generator=g, dtype=dtype) / math.sqrt(dim)
    ref = -torch.rand(n, generator=g, dtype=torch.float64) * 50 - 300
    return dict(hidden=hidden, weight=weight, labels=labels, ref_chosen=ref[:pairs].to(dtype),
                ref_rejected=ref[pairs:].to(dtype), beta=0.1)


def packed_batch(batch, seed=1):
    """The same sequences without their padding: each of the ``2P`` rows cut at a random length
    (between half and all of it) and packed back to back, ``[1, N]`` with ``cu_seqlens``, pairs
    in halves (``layout=BatchLayout(cu_seqlens=…)``)."""
    from pyfused_po import BatchLayout

    g = torch.Generator().manual_seed(seed)
    labels, hidden = batch["labels"], batch["hidden"]
    n, T = labels.shape
    lengths = torch.randint(T // 2, T + 1, (n,), generator=g).tolist()
    cu = torch.tensor([0] + lengths).cumsum(0)
    packed = dict(batch, labels=torch.cat([labels[i, :k] for i, k in enumerate(lengths)]).unsqueeze(0),
                  hidden=torch.cat([hidden[i, :k] for i, k in enumerate(lengths)]).unsqueeze(0),
                  layout=BatchLayout(cu_seqlens=cu), segments=torch.repeat_interleave(torch.arange(n),
                                                                                      torch.tensor(lengths)))
    return packed


def _sequence_sums(per_token, batch):
    """``[2P]`` sums of a ``[rows, T]`` (or packed ``[1, N]``) per-token tensor."""
    if "segments" not in batch:
        return per_token.sum(-1)
    n = batch["ref_chosen"].shape[0] * 2
    return per_token.new_zeros(n).index_add(0, batch["segments"], per_token.reshape(-1))


def _dpo(seq_logps, batch):
    """−log σ(β((ℓ_w − ℓʳ_w) − (ℓ_l − ℓʳ_l))), mean over pairs (TRL's sigmoid loss)."""
    P = seq_logps.shape[0] // 2
    margin = (seq_logps[:P] - batch["ref_chosen"]) - (seq_logps[P:] - batch["ref_rejected"])
    return -F.logsigmoid(batch["beta"] * margin).mean()


def _module_chunk_tokens(batch, budget, fused, trainable):
    """A module's ``chunk_tokens`` at this budget: the staged plan's chunk fills the budget; the
    three-GEMM plan's is the library's rule (torch_backend.linear.gradient_chunk_size) at that
    budget for a trainable head (a frozen head keeps the staged chunk)."""
    from pyfused_po.token.torch_backend.linear import gradient_chunk_size

    V, D = batch["weight"].shape
    staged = max(1, budget // V)
    M = int((batch["labels"] != -100).sum())
    return gradient_chunk_size(M, D, min(staged, M)) if fused and trainable else staged


def _pyfused_module(batch, budget, *, fused, long_group_plan="staged", batch_invariant=False):
    from pyfused_po import FusedPreferenceLoss

    def step(hidden, weight):
        module = FusedPreferenceLoss("sigmoid", beta=batch["beta"], backend="torch", linear_impl="chunked",
                                     logit_metrics=False, batch_invariant=batch_invariant)
        module.fused_gradient = fused
        module.long_group_plan = long_group_plan
        module.chunk_tokens = _module_chunk_tokens(batch, budget, fused, weight.requires_grad)
        out = module(hidden=hidden, weight=weight, labels=batch["labels"], layout=batch.get("layout"),
                     ref_chosen_logps=batch["ref_chosen"], ref_rejected_logps=batch["ref_rejected"])
        out.loss.backward()
    return step


def _pyfused_kto(batch, budget, *, fused):
    """FusedKTOLoss on the same rows: the chosen half desirable, the rejected half undesirable,
    the precomputed reference sums, a given KL point."""
    from pyfused_po import FusedKTOLoss

    P = batch["ref_chosen"].shape[0]
    desirable = torch.arange(2 * P) < P
    ref = torch.cat([batch["ref_chosen"], batch["ref_rejected"]])

    def step(hidden, weight):
        module = FusedKTOLoss(beta=batch["beta"], backend="torch", linear_impl="chunked")
        module.fused_gradient = fused
        module.chunk_tokens = _module_chunk_tokens(batch, budget, fused, weight.requires_grad)
        out = module(hidden=hidden, weight=weight, labels=batch["labels"], is_desirable=desirable, ref_logps=ref,
                     kl=0.1)
        out.loss.backward()
    return step


def _pyfused_token_stage(batch, budget, batch_invariant=False):
    from pyfused_po import linear_token_logprobs

    V = batch["weight"].shape[0]

    def step(hidden, weight):
        logps = linear_token_logprobs(hidden, weight, batch["labels"], backend="torch", impl="chunked",
                                      chunk_tokens=max(1, budget // V), batch_invariant=batch_invariant)
        _dpo(_sequence_sums(logps, batch), batch).backward()
    return step


def _trl(batch, budget, objective=None):
    """TRL's chunked head for the per-token log-probs, then ``objective(sums, batch)`` (DPO's by default)."""
    from trl.kernels.chunked_logprob import TOKEN_CHUNK_SIZE, ChunkedLogProbFunction

    labels = batch["labels"]
    mask = labels != -100
    # TRL's tile is [min(M, TOKEN_CHUNK_SIZE), chunk_size]: the same element budget as the others.
    chunk = max(1, budget // min(int(mask.sum()), TOKEN_CHUNK_SIZE))

    def step(hidden, weight):
        logps = ChunkedLogProbFunction.apply(hidden[mask], weight, None, labels[mask], 1.0, chunk, None, 1.0, ())[0]
        per_token = logps.new_zeros(mask.shape).masked_scatter(mask, logps)
        (objective or _dpo)(_sequence_sums(per_token, batch), batch).backward()
    return step


def liger_unavailable_reason():
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # noqa: F401
    except Exception as err:  # noqa: BLE001  (any import failure means "skip")
        return f"liger-kernel not importable ({type(err).__name__}: {err})"
    return None


def _liger(batch, budget):
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss

    # Liger takes no precomputed reference log-probs: it runs the reference head on ref_input
    # (one more forward GEMM) and chunks by pair, whatever the budget.
    loss_fn = LigerFusedLinearDPOLoss(beta=batch["beta"], compiled=False, use_ref_model=True)
    ref_hidden = batch["hidden"] * 0.5

    def step(hidden, weight):
        out = loss_fn(weight, hidden, batch["labels"], ref_input=ref_hidden, ref_weight=weight.detach())
        (out[0] if isinstance(out, tuple) else out).backward()
    return step


def methods(batch, budget, liger=True):
    """``[(name, head_trainable, step factory)]``; a step is ``step(hidden, weight)``."""
    out = []
    for trainable in (True, False):
        head = "trainable" if trainable else "frozen"
        out += [
            (f"pyfused_po module, fused_gradient=False ({head})", trainable, _pyfused_module(batch, budget, fused=False)),
            (f"pyfused_po module, fused gradient (default) ({head})", trainable, _pyfused_module(batch, budget, fused=True)),
            (f"pyfused_po linear_token_logprobs ({head})", trainable, _pyfused_token_stage(batch, budget)),
            (f"pyfused_po linear_token_logprobs, batch_invariant ({head})", trainable,
             _pyfused_token_stage(batch, budget, batch_invariant=True)),
            (f"pyfused_po module, batch_invariant ({head})", trainable,
             _pyfused_module(batch, budget, fused=True, batch_invariant=True)),
            (f"TRL 1.16 ChunkedLogProbFunction + DPO ({head})", trainable, _trl(batch, budget)),
        ]
        if liger and liger_unavailable_reason() is None:
            out.append((f"Liger LigerFusedLinearDPOLoss ({head})", trainable, _liger(batch, budget)))
    out += [("pyfused_po FusedKTOLoss, fused_gradient=False (trainable)", True, _pyfused_kto(batch, budget, fused=False)),
            ("pyfused_po FusedKTOLoss, fused gradient (default) (trainable)", True, _pyfused_kto(batch, budget, fused=True))]
    return out


def _plan_rows(module_name, module_step, others):
    """Rows for a trainable then a frozen head: the module's staged and default plans
    (``module_step(fused=…)``), then ``others`` (``[(name, step)]``)."""
    out = []
    for trainable in (True, False):
        head = "trainable" if trainable else "frozen"
        out += [(f"{module_name}, fused_gradient=False ({head})", trainable, module_step(fused=False)),
                (f"{module_name}, fused gradient (default) ({head})", trainable, module_step(fused=True))]
        out += [(f"{name} ({head})", trainable, step) for name, step in others]
    return out


def packed_methods(batch, budget, liger=False):
    """The packed-batch section: the module on ``[1, N]`` with ``cu_seqlens`` (both plans) and TRL."""
    return _plan_rows("pyfused_po module packed", lambda fused: _pyfused_module(batch, budget, fused=fused),
                      [("TRL 1.16 ChunkedLogProbFunction + DPO", _trl(batch, budget))])


def long_pair_methods(batch, budget, liger=False):
    """The long-pair section: every pair has more labelled tokens than the plan's chunk
    (min(M, 4096, D) tokens): the default falls back by name, ``three_gemm`` keeps 3 GEMMs."""
    return [("pyfused_po module, long_group_plan='staged' (default) (trainable)", True,
             _pyfused_module(batch, budget, fused=True)),
            ("pyfused_po module, long_group_plan='three_gemm' (trainable)", True,
             _pyfused_module(batch, budget, fused=True, long_group_plan="three_gemm")),
            ("TRL 1.16 ChunkedLogProbFunction + DPO (trainable)", True, _trl(batch, budget))]


# ----------------------------------------------------------------------------- groups of K responses

GROUPS = 2  # groups per batch in the *groups* sections
GROUP_SEQ = 128  # row length there: a group of K = 8 rows stays under the plan's min(M, 4096, D) chunk


def group_batch(K, shape):
    """``GROUPS`` groups of ``K`` consecutive rows of ``GROUP_SEQ`` tokens (:func:`make_batch`'s
    rows), scores K−1 … 0 in each group, reference sums ``[S]``."""
    batch = make_batch(GROUPS * K // 2, GROUP_SEQ, shape["vocab"], shape["hidden_dim"], seed=K)
    S = GROUPS * K
    return dict(batch, group_size=K, scores=(K - 1 - torch.arange(S) % K).to(torch.float32),
                ref_logps=torch.cat([batch["ref_chosen"], batch["ref_rejected"]]))


def _listwise(seq_logps, batch):
    from pyfused_po import listwise_preference_loss

    return listwise_preference_loss(seq_logps, batch["ref_logps"], batch["scores"], group_size=batch["group_size"],
                                    loss_type="plackett_luce", beta=batch["beta"]).loss


def _pyfused_groups(batch, budget, *, fused):
    from pyfused_po import FusedPreferenceLoss

    def step(hidden, weight):
        module = FusedPreferenceLoss("plackett_luce", beta=batch["beta"], group_size=batch["group_size"],
                                     backend="torch", linear_impl="chunked")
        module.fused_gradient = fused
        module.chunk_tokens = _module_chunk_tokens(batch, budget, fused, weight.requires_grad)
        out = module(hidden=hidden, weight=weight, labels=batch["labels"], scores=batch["scores"],
                     ref_logps=batch["ref_logps"])
        out.loss.backward()
    return step


def _naive_listwise(batch, budget):
    """The plain PyTorch computation: logits ``[S, T, V]`` in fp32 over every position, log-softmax,
    gather the labels, sum per sequence, the listwise loss; autograd keeps the log-softmax."""
    labels = batch["labels"]
    mask = labels != -100

    def step(hidden, weight):
        logp = torch.log_softmax((hidden @ weight.t()).float(), dim=-1)
        picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        _listwise(torch.where(mask, picked, torch.zeros_like(picked)).sum(-1), batch).backward()
    return step


def group_methods(batch, budget, liger=False):
    """A *groups* section: plackett_luce on groups of K through the module (both plans), TRL's
    head + the same loss, and the naive full-logits computation."""
    return _plan_rows(f"pyfused_po module K={batch['group_size']}",
                      lambda fused: _pyfused_groups(batch, budget, fused=fused),
                      [("TRL 1.16 ChunkedLogProbFunction + plackett_luce", _trl(batch, budget, objective=_listwise)),
                       ("naive full logits [S, T, V] fp32 + plackett_luce", _naive_listwise(batch, budget))])


# The table's sections: (name, the section's batch from the main one, its methods), or
# (name, None, rows(shape)) for a section that builds and counts its own steps
# (bench/trainer_counters.py: each trainer through apply()).  Every row of a section is compared
# with the TRL row of the same section and head.
SECTIONS = [
    ("padded", lambda batch, shape: batch, methods),
    ("packed", lambda batch, shape: packed_batch(batch), packed_methods),
    ("long pairs", lambda batch, shape: make_batch(1, shape["long_seq"], shape["vocab"], shape["hidden_dim"]),
     long_pair_methods),
    ("groups K=4", lambda batch, shape: group_batch(4, shape), group_methods),
    ("groups K=8", lambda batch, shape: group_batch(8, shape), group_methods),
    ("trainers through apply()", None, lambda shape: _trainer_rows(shape)),
]


def _trainer_rows(shape):
    from bench.trainer_counters import trainer_rows  # imported late: it imports this module

    return trainer_rows(shape)


def count_step(step, batch, trainable):
    """Runs ``step`` once under a :class:`WorkCounter` on fresh leaf inputs."""
    hidden = batch["hidden"].clone().requires_grad_(True)
    weight = batch["weight"].clone().requires_grad_(trainable)
    counter = WorkCounter(hidden_dim=hidden.shape[-1])
    with counter:
        step(hidden, weight)
        grads = [hidden.grad, weight.grad]  # kept alive to the end: part of the step's memory
    assert hidden.grad is not None and (weight.grad is not None) == trainable
    del grads
    return counter


def floor_gemms(trainable):
    """The floor: 3 GEMMs over the labelled tokens with a trainable head, 2 with a frozen one."""
    return 3.0 if trainable else 2.0


def run(pairs=2, seq=256, vocab=8192, dim=1024, budget=1 << 22, liger=True, long_seq=None, sections=None):
    """The table as a dict: one row per method and section, ratios against TRL with the same head
    in the same section and against the floor.  ``long_seq``: the long-pair section's row length
    (default 1.25·D, so each pair has more labelled tokens than the plan's min(M, 4096, D) chunk)."""
    torch.manual_seed(0)
    batch = make_batch(pairs, seq, vocab, dim)
    M = int((batch["labels"] != -100).sum())
    unit = 2 * M * dim * vocab
    shape = dict(pairs=pairs, seq=seq, labelled_tokens=M, vocab=vocab, hidden_dim=dim, chunk_budget=budget,
                 unit_flops=unit, torch=torch.__version__, long_seq=long_seq or (5 * dim) // 4)
    rows = []
    for section, make, section_methods in (SECTIONS if sections is None else sections):
        if make is None:  # a section that counts its own steps: finished rows
            rows += section_methods(shape)
            continue
        b = make(batch, shape)
        m = int((b["labels"] != -100).sum())
        section_unit = 2 * m * dim * vocab
        for name, trainable, step in section_methods(b, budget, liger):
            c = count_step(step, b, trainable)
            rows.append(dict(section=section, method=name, head="trainable" if trainable else "frozen",
                             labelled_tokens=m, gemm_flops=c.gemm_flops, gemms=c.gemm_flops / section_unit,
                             gemm_vs_floor=c.gemm_flops / section_unit / floor_gemms(trainable),
                             peak_bytes=c.peak_bytes, acc_bytes=c.acc_bytes,
                             mm_calls={k: v for k, v in sorted(c.ops.items()) if k in _MATMUL_OPS}))
    for r in rows:
        trl = next(x for x in rows if x["method"].startswith("TRL") and x["head"] == r["head"]
                   and x["section"] == r["section"])
        r["gemm_vs_trl"] = r["gemm_flops"] / trl["gemm_flops"]
        r["peak_vs_trl"] = r["peak_bytes"] / trl["peak_bytes"]
        r["acc_vs_trl"] = r["acc_bytes"] / max(trl["acc_bytes"], 1)
    skipped = liger_unavailable_reason() if liger else "not asked for"
    return dict(shape=shape, rows=rows, liger_skipped=skipped)


def _tile(n):
    return n - n % 256 if n >= 256 else max(1, n)


def _plans(M, V, D, budget, trl_tokens):
    """Chunking of each plan under the counters' rules: TRL's token tile and vocabulary tile, the
    staged path's token chunk and vocabulary slice, the three-GEMM plan's token chunk
    (``torch_backend.linear.gradient_chunk_size``: at least ``min(M, 4096, D)`` tokens)."""
    from pyfused_po.token.torch_backend.linear import gradient_chunk_size

    trl_t = min(M, trl_tokens)
    trl_v = min(V, max(1, budget // trl_t))
    c = _tile(max(1, budget // V))
    cf = gradient_chunk_size(M, D, min(c, M))
    width = _tile(budget // M)
    return trl_t, trl_v, c, cf, width


def traffic_model(M, V, D, budget, trl_tokens=4096, hidden_bytes=2):
    """Gradient-accumulator bytes per step by formula (the counters' rules at any shape):
    a GEMM writing its fp32 result counts it once, accumulating into it twice (read + write);
    dH rows finished inside a chunk are written once in hidden's dtype (plus a gather copy)."""
    f32, dw, dh = 4, V * D, M * D
    trl_t, trl_v, c, cf, width = _plans(M, V, D, budget, trl_tokens)
    kt, kv = math.ceil(M / trl_t), math.ceil(V / trl_v)
    k, kf = math.ceil(M / c), math.ceil(M / cf)  # token chunks: staged budget, three-GEMM plan
    slices = math.ceil(V / max(width, 1))
    return {
        "TRL 1.16 (trainable)": 2 * f32 * (dw * kt + dh * kv),
        "pyfused_po before: temporary per chunk (trainable)": 4 * f32 * dw * k + 3 * hidden_bytes * dh,
        "pyfused_po staged, vocabulary-outer (trainable)": f32 * dw + (2 * slices - 1) * f32 * dh + 3 * hidden_bytes * dh,
        "pyfused_po fused module, chunks of pairs (trainable)": (2 * kf - 1) * f32 * dw + 3 * hidden_bytes * dh,
        "TRL 1.16 (frozen)": 2 * f32 * dh * kv,
        "pyfused_po frozen head (J stored, scaled)": 3 * f32 * dh,
    }


def peak_model(M, V, D, budget, trl_tokens=4096, hidden_bytes=2, weight_bytes=2, pair_tokens=None):
    """Peak extra bytes of the trainable-head step by formula, the largest of each plan's phases
    (gradient buffers, the logits chunk, the gathered hidden rows; parameters and hidden excluded).
    Both plans end the backward holding the fp32 dW and its copy in the weight's dtype (none when
    the weight is fp32); TRL also holds its fp32 dH, the dH copy and its tile buffer there.  The
    three-GEMM plan keeps dH in fp32 too until the backward has applied the upstream gradient (the
    loss scale), then rounds it (issue 26, class 2).  ``pair_tokens``: labelled tokens of the
    longest pair; when it exceeds the plan's chunk, the ``long_group_plan='three_gemm'`` row holds
    a chunk of that many tokens (the default falls back to the staged plan's peak)."""
    f32, dw, dh = 4, V * D, M * D
    trl_t, trl_v, _, cf, width = _plans(M, V, D, budget, trl_tokens)
    if pair_tokens is not None:
        cf = max(cf, pair_tokens)
    dw_copy = 0 if weight_bytes == f32 else weight_bytes * dw
    h = hidden_bytes
    trl_tile = h * trl_t * trl_v
    trl = f32 * dw + f32 * dh + trl_tile + max(h * trl_t * D, dw_copy + h * dh)
    staged_loop = f32 * dw + f32 * dh + h * dh + h * M * min(width, V)
    staged_end = f32 * dw + f32 * dh + dw_copy + h * dh
    fused_loop = f32 * dw + f32 * dh + h * cf * (V + D)
    fused_end = f32 * dw + h * dh + max(f32 * dh, dw_copy)  # dH rounded first, then dW
    return {"TRL 1.16 (trainable)": trl,
            "pyfused_po staged, vocabulary-outer (trainable)": max(staged_loop, staged_end),
            "pyfused_po fused module, chunks of pairs (trainable)": max(fused_loop, fused_end)}


HEADLINE = dict(M=16384, V=128256, D=4096, budget=1 << 27)


def render_model(shape=HEADLINE):
    model, peak = traffic_model(**shape), peak_model(**shape)
    lines = [f"By formula at M={shape['M']}, V={shape['V']}, D={shape['D']}, bf16 hidden and weight, "
             f"chunk budget {shape['budget']} logits (TRL: 4096-token tiles of the same budget); "
             "the three-GEMM plan's chunk is 4096 tokens:", "",
             "| method | accumulator GB | × TRL | peak extra GB | × TRL |", "|---|---|---|---|---|"]
    for name, b in model.items():
        ref = "TRL 1.16 (frozen)" if "frozen" in name else "TRL 1.16 (trainable)"
        p = (f"{peak[name] / 1e9:.2f} | {peak[name] / peak[ref]:.2f}" if name in peak else "— | —")
        lines.append(f"| {name} | {b / 1e9:.1f} | {b / model[ref]:.2f} | {p} |")
    fused, trl = "pyfused_po fused module, chunks of pairs (trainable)", "TRL 1.16 (trainable)"
    staged = "pyfused_po staged, vocabulary-outer (trainable)"
    lines += ["", "Long pairs (issue 24): pairs with more labelled tokens than the plan's chunk, same M, V, D. "
              "The default (`long_group_plan='staged'`) runs the staged plan, logs the reason once and keeps it "
              "in `module.fallback_reason`; `'three_gemm'` holds one chunk as long as the longest pair:", "",
              "| labelled tokens per pair | default 'staged': GEMMs, peak × TRL | 'three_gemm': GEMMs, peak × TRL |",
              "|---|---|---|"]
    for L in (8192, 16384):
        pk = peak_model(**shape, pair_tokens=L)
        lines.append(f"| {L} | 4 (1.00 × TRL, 1.33 × floor), {pk[staged] / pk[trl]:.2f} | "
                     f"3 (0.75 × TRL, 1.00 × floor), {pk[fused] / pk[trl]:.2f} |")
    lines += ["", "The trade-off by hidden size (same M, V and budget): the chunk is min(4096, D) tokens, so "
              "below D = 4096 the plan keeps its peak under TRL's and pays in accumulator traffic:", "",
              "| D | chunk tokens | accumulator × TRL | peak extra × TRL |", "|---|---|---|---|"]
    for d in (1024, 2048, 4096, 8192):
        sh = dict(shape, D=d)
        t, pk = traffic_model(**sh), peak_model(**sh)
        cf = _plans(sh["M"], sh["V"], d, sh["budget"], 4096)[3]
        lines.append(f"| {d} | {cf} | {t[fused] / t[trl]:.2f} | {pk[fused] / pk[trl]:.2f} |")
    return "\n".join(lines)


NOTES = """Notes.
* TRL's peak on the CPU includes the temporaries of its torch fold (`_forward_tile`/`_backward_tile`,
  several `[tile]` fp32 tensors); on a GPU that fold is a Triton kernel without them.
* Liger takes no precomputed reference log-probs: it runs the reference head (one more forward GEMM)
  and scores prompt rows too (its GEMMs are over all B·T rows, not the labelled M).
* The fused module (trainable) does one GEMM less but holds a `[C, V]` chunk of whole pairs until
  their gradient is known, so its fp32 dW is re-read once per chunk of pairs ((2K−1)·|dW| for K
  chunks); the staged path loops vocabulary-outer and writes dW once. Its chunk is therefore sized
  in tokens, not by the budget: at least min(M, 4096, D) tokens (4096 is TRL's token tile: then
  K ≤ TRL's number of token tiles and its dW traffic is (2K−1)/(2K) of TRL's; C ≤ D keeps the
  `[C, V]` chunk no larger than dW). This counter shape has D = 128, so the rule gives the budget's
  chunk and the ratio above 1; the model below is at a real head (D = 4096).
* The fused module holds dW (fp32 `[V, D]`), db and dH (fp32 too, until the backward has applied
  the upstream gradient, e.g. a loss scale) from its forward to the backward; the staged path
  allocates them in the backward only.
* *Packed* rows run the module with `layout=BatchLayout(cu_seqlens=…)`: the plan is asked on the
  same batch representation as the padded rows. *Long pairs*: the default `long_group_plan='staged'`
  falls back by name (logged once, `module.fallback_reason`); `'three_gemm'` holds a chunk as long
  as the pair. More sections go in `SECTIONS`.
* *apply(): …* rows (bench/trainer_counters.py): LM-head GEMMs only (matmuls with an operand of
  size V), `compute_loss` + backward on one prepared batch. TRL's own step runs its head over every
  position it is handed (prompt and padding included; GRPO: 40 positions for 26 completion tokens),
  so on these short, padded rows its × floor is above the 1.33 of its 4 GEMMs; its peak there is mostly its fixed-size tile buffers, so the peak
  ratio says little about a real shape. GRPO (β = 0) and RLOO run their own losses on the plan through
  `apply()` (`integrations/trl_rl_plan.py`); their samplers' GEMMs are not counted.
* *groups K=4 / K=8* (issue 25): 2 groups of K rows of 128 tokens, `plackett_luce`,
  `FusedPreferenceLoss(group_size=K)`; TRL's row is its chunked head with the same listwise loss on
  its sums (TRL has no listwise loss); the *naive* row is plain PyTorch: logits `[S, T, V]` in fp32
  over every position (prompt included: its GEMMs are over S·T rows, not the labelled M),
  log-softmax, gather, sums, the loss, autograd. Frozen head at K=8: a group (~880 labelled tokens)
  is longer than the frozen plan's chunk (the staged chunk, 512 tokens at this budget), so the default
  falls back by name to the staged frozen path (2 GEMMs as well: the same numbers)."""


def render(result):
    s = result["shape"]
    lines = [f"One DPO step, {s['pairs']} pairs × 2 × {s['seq']} rows ({s['labelled_tokens']} labelled), "
             f"V={s['vocab']}, D={s['hidden_dim']}, chunk budget {s['chunk_budget']} logits; "
             f"1 GEMM = 2·M·D·V FLOPs over the section's M labelled tokens (padded: {s['unit_flops']:.3g}). "
             "Sections: *padded* `[2P, T]`; *packed*: the same rows cut at random lengths and packed "
             "`[1, N]` with `cu_seqlens`; *long pairs*: rows of "
             f"{s.get('long_seq', '—')} tokens, every pair longer than the plan's chunk; *groups K=…*: "
             f"{GROUPS} groups of K rows of {GROUP_SEQ} tokens, plackett_luce. The floor is 3 GEMMs "
             "(trainable head), 2 (frozen); *apply(): …* sections: one step of a TRL 1.16 trainer on the tiny "
             "local Llama (V=61, D=24), its own and through `apply()`, M = the policy's labelled tokens, the floor "
             "3 (2 frozen) per policy token + 1 per forward-only pass token (bench/trainer_counters.py); no "
             "traffic model there.", "",
             "| section | method | M | GEMMs | × floor | × TRL | peak live MiB | × TRL | acc. traffic MiB | × TRL |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r.get('section', 'padded')} | {r['method']} | {r.get('labelled_tokens', '')} | "
                     f"{r['gemms']:.2f} | {r.get('gemm_vs_floor', float('nan')):.2f} | {r['gemm_vs_trl']:.2f} | "
                     f"{r['peak_bytes'] / 2**20:.1f} | {r['peak_vs_trl']:.2f} | "
                     + (f"{r['acc_bytes'] / 2**20:.1f} | {r['acc_vs_trl']:.2f} |" if "floor_gemms" not in r
                        else "— | — |"))
    if result["liger_skipped"]:
        lines += ["", f"Liger skipped: {result['liger_skipped']}"]
    return "\n".join(lines)


def save(result, out_dir=RESULTS):
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "work_counters.json").write_text(json.dumps(result, indent=1) + "\n")
    md = ["# Work counters (CPU): one DPO step on the fused-linear path", "",
          "Written by `python bench/work_counters.py` (see its docstring for what each column counts).", "",
          render(result), "", NOTES, "", render_model(), ""]
    (out_dir / "README.md").write_text("\n".join(md))
    return [out_dir / "work_counters.json", out_dir / "README.md"]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=2)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--dim", type=int, default=1024, help="hidden size (the three-GEMM plan widens its chunk up to D tokens)")
    p.add_argument("--budget", type=int, default=1 << 22, help="elements of one logits tile")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    result = run(args.pairs, args.seq, args.vocab, args.dim, args.budget)
    print(render(result))
    print()
    print(render_model())
    if not args.no_save:
        for path in save(result):
            print(f"wrote {path}")
    return result


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    main()
