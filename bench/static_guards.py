"""The static profile's CI guards, as plain functions of its records (import-safe:
no Triton, so tests can import it under TRITON_INTERPRET=1)."""
import json
import os

# Every kernel variant that a default entry point launches: its kernel, its extras (constexpr flags)
# and its budget in main-loop instructions per vocabulary element (issue 15: plain forward ≤ 8, KL
# forward ≤ 20; issue 27: any set of extras ≤ 10, backward ≤ 8).  H200's issue rate against its 4.8
# TB/s is about 13.9 instructions per bf16 element read (132 SMs × 4 schedulers × 1.98 GHz × 32
# lanes over 2.4 G elements/s): a one-row kernel above that is issue-bound, not memory-bound.
_EXTRAS_BUDGET = 10
# The truncated fold (top-k and top-p): 1 (max) + 8 (top-k digits) + 8 (top-p digits) + 1 (sums) passes
# over its row, summed.  Each digit pass compares every element with 16 buckets and reduces the bucket
# totals across the block every trip (≈ 250–400 instructions per element per pass, 8–10 BAR.SYNC per
# trip): the kernel is issue-bound by ~300× H200's per-element budget, not memory-bound.  Until it is
# rewritten (per-thread bucket totals reduced once per pass) its budget only guards against growth: the
# largest first committed figure, rounded up (forward 4652 / 4550 on Triton 3.9, 4774 / 7334 on 3.6 at
# V = 128,256 / 50,257; backward 32.5–42.5; bench/NOTES.md).
TRUNCATED_BUDGET = 7400
TRUNCATED_BACKWARD_BUDGET = 43
VARIANTS = {
    "token_forward": dict(kernel="token_forward", extras=(), budget=8,
                          launched_by="token_logprobs(logits), the reference model (TRL: outputs=('log_probs',))"),
    "token_forward_mean": dict(kernel="token_forward", extras=("mean_logit",), budget=_EXTRAS_BUDGET,
                               launched_by="FusedPreferenceLoss(logits=) / FusedKTOLoss(logits=) "
                                           "(default logit_metrics)"),
    "token_forward_rl": dict(kernel="token_forward", extras=("entropy",), budget=_EXTRAS_BUDGET,
                             launched_by="apply(GRPOTrainer / RLOOTrainer)"),
    "token_forward_sft": dict(kernel="token_forward", extras=("entropy", "is_top1"), budget=_EXTRAS_BUDGET,
                              launched_by="apply(SFTTrainer)"),
    "token_forward_kto": dict(kernel="token_forward", extras=("entropy", "mean_logit"), budget=_EXTRAS_BUDGET,
                              launched_by="apply(KTOTrainer)"),
    "token_forward_dpo": dict(kernel="token_forward", extras=("entropy", "mean_logit", "is_top1"),
                              budget=_EXTRAS_BUDGET, launched_by="apply(DPOTrainer)"),
    "token_forward_extras": dict(kernel="token_forward",
                                 extras=("entropy", "log_sum_sq_probs", "mean_logit", "is_top1"),
                                 budget=_EXTRAS_BUDGET, launched_by="apply(DPOTrainer) with WPO (use_weighting)"),
    "token_backward": dict(kernel="token_backward", extras=(), budget=8,
                           launched_by="every logits-path backward (log-prob gradient only)"),
    "fold_forward": dict(kernel="token_forward", extras=("mean_logit",), budget=_EXTRAS_BUDGET,
                         launched_by="the chunked fused-linear fold on a [1, 4096, V] chunk: "
                                     "FusedPreferenceLoss(hidden=, weight=)'s three-GEMM plan, linear_token_logprobs"),
    "fold_backward": dict(kernel="token_backward", extras=(), budget=8,
                          launched_by="the same fold's in-place gradient (G = g·(onehot − p))"),
    "token_kl_forward": dict(kernel="token_kl_forward", extras=(), budget=20, launched_by="expo_loss / token_kl"),
    "token_kl_backward": dict(kernel="token_kl_backward", extras=(), budget=20,
                              launched_by="expo_loss / token_kl backward (two rows read, as the KL forward)"),
    # The truncated-support fold (issue 28): launched when rl_token_logprobs / the RL drop-ins get a
    # sampler's top_k and top_p (its defaults truncate nothing and launch the token kernels).  A
    # multi-pass kernel: its figure is the sum over its passes (``passes``: each reads the row once,
    # L2-resident after the first), and its loads are scalar (a tile's row stride is not specialized).
    "truncated_forward": dict(kernel="truncated_forward", extras=("top_k", "top_p"), budget=TRUNCATED_BUDGET,
                              passes=18, launched_by="rl_token_logprobs(top_k=, top_p=) and the RL drop-ins "
                                                     "given a sampler's top_k and top_p (one [128, V] tile)"),
    "truncated_backward": dict(kernel="truncated_backward", extras=(), budget=TRUNCATED_BACKWARD_BUDGET, passes=2,
                               launched_by="the same call's backward (gradient of the log-probs)"),
    "linear_forward": dict(kernel="linear_forward", extras=(), budget=None,
                           launched_by="linear_token_logprobs(impl='fused') (opt-in)"),
    "linear_backward": dict(kernel="linear_backward", extras=(), budget=None,
                            launched_by="linear_token_logprobs(impl='fused') backward (opt-in)"),
}
# Rows the committed profiles still hold over budget: none since the extras diet (bench/NOTES.md,
# 2026-12-07, "extras diet, part 2"); a row added over its budget is listed here as open work.
OPEN_OVER_BUDGET = frozenset()
# Logits rows each token kernel reads per element (instructions per element are per vocabulary entry);
# for a multi-pass kernel (``passes``), the passes over its one row.
ROWS_READ = {name: v.get("passes", 2 if v["kernel"].startswith("token_kl") else 1)
             for name, v in VARIANTS.items() if not v["kernel"].startswith("linear")}
# Kernels whose main loops must use 128-bit loads (and the backwards 128-bit stores) where the row stride allows.
VECTOR_ROWS = frozenset(name for name in ROWS_READ if "passes" not in VARIANTS[name])
IPE_TOLERANCE = 0.005  # the committed figures are rounded to 3 decimals


def _minor(version):
    return ".".join(version.split(".")[:2])


def committed_records(directory, version):
    """The committed profile for Triton ``version`` (matched on major.minor), or [] if none."""
    version = _minor(version)
    path = os.path.join(directory, f"profile-triton{version}.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def check(records, committed, fence_kernels=("linear_backward",)):
    """CI guards. Returns ``{guard: [failure messages]}`` (empty lists when all hold):

    * ``spills``: no kernel spills;
    * ``membar_gpu``: no GPU-scope fence in the fused backward;
    * ``ldg128``: token kernels' main loops use 128-bit loads (and the backward kernels
      128-bit stores) where the row stride is a multiple of 16 elements, and wherever the
      committed profile has them;
    * ``instr_per_elem``: no main loop costs more instructions per element than committed;
    * ``budget``: no row that the committed profile has within its budget goes over it (rows
      still over budget in the committed profile are open work: :func:`over_budget` lists them).
    """
    base = {(r["kernel"], r["V"]): r for r in committed}
    fails = {"spills": [], "membar_gpu": [], "ldg128": [], "instr_per_elem": [], "budget": []}
    for r in records:
        key = f"{r['kernel']} V={r['V']} (triton {r['triton']})"
        old = base.get((r["kernel"], r["V"]))
        if r["spills"]:
            fails["spills"].append(f"{key}: {r['spills']} bytes of spills")
        if r["kernel"] in fence_kernels and r["membar_gpu"]:
            fails["membar_gpu"].append(f"{key}: {r['membar_gpu']} MEMBAR.*.GPU")
        if r["kernel"] in ROWS_READ:
            def vec_loads(rec):
                return rec.get("loop_ldg128", rec["ldg128"])

            want_vec = r["kernel"] in VECTOR_ROWS and (r["V"] % 16 == 0 or (old is not None and vec_loads(old) > 0))
            if want_vec and vec_loads(r) == 0:
                fails["ldg128"].append(f"{key}: no LDG.128 in the main loop")
            if want_vec and r["kernel"].endswith("backward") and r.get("loop_stg128", 1) == 0:
                fails["ldg128"].append(f"{key}: no STG.128 in the main loop")
            if old is not None and old["instr_per_elem"] is not None and \
                    r["instr_per_elem"] > old["instr_per_elem"] + IPE_TOLERANCE:
                fails["instr_per_elem"].append(
                    f"{key}: {r['instr_per_elem']} instructions per element > committed "
                    f"{old['instr_per_elem']}")
            if over_budget([r]) and (old is None or not over_budget([old])):
                fails["budget"].append(f"{key}: {r['instr_per_elem']} instructions per element > "
                                       f"budget {VARIANTS[r['kernel']]['budget']}")
    return fails


def over_budget(records):
    """The records whose main loop costs more instructions per element than their variant's budget."""
    def budget(r):
        v = VARIANTS.get(r["kernel"])
        return None if v is None else v["budget"]

    return [r for r in records if budget(r) is not None and r.get("instr_per_elem") is not None
            and r["instr_per_elem"] > budget(r)]
