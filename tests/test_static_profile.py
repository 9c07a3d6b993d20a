"""CI guards on the compiled machine code for sm_90a, read from the static profile (no GPU).

``bench/static_profile.py`` compiles every kernel variant a default entry point launches
(``static_guards.VARIANTS``) through its launcher with the launch specialization and reads its
SASS; the guards compare against the committed profile in ``bench/results/static-sm90a/``.  The
profile run takes about two minutes on two cores (28 compilations); it is skipped where
Triton's ptxas is missing.
"""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, ROOT)

from bench import sass_stats, static_guards  # noqa: E402

RESULTS = os.path.join(ROOT, "bench", "results", "static-sm90a")

SASS = """
        /*0000*/                   LDC R1, c[0x0][0x28] ;                    /* 0x00000a00ff017b82 */
        /*0010*/              @!P0 BRA 0x60 ;                                /* 0x0000000000148947 */
        /*0020*/                   LDG.E.128 R4, desc[UR6][R24.64] ;         /* 0x0000000618049981 */
        /*0030*/              @!P1 LDG.E.U16 R8, desc[UR6][R12.64] ;         /* 0x000000060c0c7981 */
        /*0040*/                   MUFU.EX2 R30, R35 ;                       /* 0x00000023001e7308 */
        /*0050*/              @!P1 BRA 0x20 ;                                /* 0xfffffff0001c9947 */
        /*0060*/                   MEMBAR.ALL.GPU ;                          /* 0x0000000000007992 */
        /*0070*/                   RED.E.ADD.F32.FTZ.RN.STRONG.GPU desc[UR4][R2.64], R5 ;  /* 0x0 */
        /*0080*/                   ATOMG.E.ADD.F32.FTZ.RN.STRONG.GPU PT, R3, desc[UR4][R2.64], R5 ; /* 0x0 */
        /*0090*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR4], RZ, !UPT ; /* 0x0 */
        /*00a0*/                   EXIT ;                                    /* 0x000000000000794d */
        /*00b0*/                   BRA 0xb0;                                 /* 0xfffffffc00fc7947 */
"""


def test_sass_parser_finds_the_loop_and_counts_opcodes():
    instrs = sass_stats.parse_sass(SASS)
    assert len(instrs) == 12
    loop = sass_stats.main_loop(instrs)
    # Body: from the branch target 0x20 to the backward branch at 0x50 (4 instructions);
    # the forward branch at 0x10 and the self-branch trap at 0xb0 are not loops.
    assert (loop.start, loop.end, loop.size) == (0x20, 0x50, 4)
    assert len(sass_stats.loops(instrs)) == 1
    counts = sass_stats.opcode_counts(instrs)
    assert counts["ldg128"] == 1 and counts["ldg_u16"] == 1
    assert counts["membar_gpu"] == 1 and counts["redg"] == 1 and counts["atomg"] == 1
    assert counts["hgmma"] == 1 and counts["hmma"] == 0 and counts["mufu_ex2"] == 1
    assert sass_stats.loop_counts(loop)["loop_ldg_bytes"] == 16 + 2


def test_main_loop_is_the_unmasked_one():
    """An unmasked body loop and a larger masked edge loop: the body is the main loop."""
    sass = """
        /*0000*/                   LDG.E.128 R4, desc[UR6][R24.64] ;
        /*0010*/                   FADD R1, R2, R3 ;
        /*0020*/              @P0 BRA 0x0 ;
        /*0030*/              @!P1 LDG.E.U16 R8, desc[UR6][R12.64] ;
        /*0040*/              @!P2 LDG.E.U16 R9, desc[UR6][R14.64] ;
        /*0050*/                   FADD R1, R2, R3 ;
        /*0060*/                   FADD R1, R2, R3 ;
        /*0070*/              @P0 BRA 0x30 ;
    """
    loop = sass_stats.main_loop(sass_stats.parse_sass(sass))
    assert (loop.start, loop.size) == (0x0, 3)


def test_main_loop_is_the_first_of_several_unmasked_ones():
    """The token forward's second pass (rows its one-pass frame cannot take) walks the body again,
    after the first pass: of two loops with as many unpredicated loads, the first is the main loop,
    even when the later one is larger."""
    sass = """
        /*0000*/                   LDG.E.128 R4, desc[UR6][R24.64] ;
        /*0010*/                   FFMA R1, R2, R3, R4 ;
        /*0020*/              @P0 BRA 0x0 ;
        /*0030*/                   LDG.E.128 R4, desc[UR6][R24.64] ;
        /*0040*/                   FADD R1, R2, R3 ;
        /*0050*/                   FMUL R1, R2, R3 ;
        /*0060*/                   FADD R1, R2, R3 ;
        /*0070*/              @P0 BRA 0x30 ;
    """
    loop = sass_stats.main_loop(sass_stats.parse_sass(sass))
    assert (loop.start, loop.size) == (0x0, 3)


def test_committed_profiles_meet_the_issue_targets():
    """Issue 15: main loops at ≤ 8 (forward), ≤ 12 (backward), ≤ 20 (KL forward) instructions
    per element on Triton 3.6 and 3.9, and 128-bit loads in every token kernel's main loop
    at V = 50,257 too (odd row stride), 128-bit stores in the backward kernels' main loops."""
    targets = {"token_forward": 8, "token_backward": 12, "token_kl_forward": 20}
    for version in ("3.6", "3.9"):
        records = static_guards.committed_records(RESULTS, version)
        assert records, version
        for r in records:
            if r["kernel"] in targets:
                assert r["instr_per_elem"] <= targets[r["kernel"]], (version, r["kernel"], r["V"])
            if r["kernel"] in static_guards.VECTOR_ROWS:
                assert r["loop_ldg128"] > 0, (version, r["kernel"], r["V"])
                if r["kernel"].endswith("backward"):
                    assert r["loop_stg128"] > 0, (version, r["kernel"], r["V"])
            if r["kernel"] in static_guards.ROWS_READ:
                assert r["spills"] == 0


def test_every_default_entry_point_has_a_profiled_variant():
    """Issue 27: the rows are the variants the defaults launch.  The extras sets are TRL's own
    (its trainers' ``add_fused_lm_head(outputs=...)``, mapped to the kernel's names) and the
    modules' defaults; each committed profile holds every variant at both vocabularies, with its
    budget."""
    sets = {v["extras"] for v in static_guards.VARIANTS.values() if v["kernel"] == "token_forward"}
    trl = {"DPOTrainer": ("entropy", "mean_logit", "is_top1"), "KTOTrainer": ("entropy", "mean_logit"),
           "SFTTrainer": ("entropy", "is_top1"), "GRPOTrainer": ("entropy",), "ref model": (),
           "logit_metrics": ("mean_logit",),
           "WPO": ("entropy", "log_sum_sq_probs", "mean_logit", "is_top1")}
    for who, extras in trl.items():
        assert extras in sets, who
    for version in ("3.6", "3.9"):
        records = static_guards.committed_records(RESULTS, version)
        assert {(r["kernel"], r["V"]) for r in records} == {
            (k, V) for k in static_guards.VARIANTS for V in (128256, 50257)}, version
        assert all(r["budget"] == static_guards.VARIANTS[r["kernel"]]["budget"] for r in records)


def test_rows_over_budget_are_the_known_open_ones():
    """Issue 27's budgets on both Triton versions: every committed row meets its budget except those
    listed as open work (static_guards.OPEN_OVER_BUDGET, empty since the extras diet)."""
    for version in ("3.6", "3.9"):
        over = {r["kernel"] for r in static_guards.over_budget(static_guards.committed_records(RESULTS, version))}
        assert over <= static_guards.OPEN_OVER_BUDGET, (version, over - static_guards.OPEN_OVER_BUDGET)
        assert "token_forward_mean" not in over and "fold_forward" not in over
        assert not over & {"token_forward_rl", "token_forward_sft", "token_forward_kto", "token_forward_dpo",
                           "token_forward_extras"}, (version, over)


def test_budget_guard_flags_a_row_that_leaves_its_budget():
    base = dict(triton="3.9.0", V=128256, regs=40, smem=0, hgmma=0, membar_gpu=0, spills=0, ldg128=2,
                loop_ldg128=2, loop_stg128=2)
    committed = [dict(base, kernel="token_forward_dpo", instr_per_elem=9.9),
                 dict(base, kernel="token_forward_extras", instr_per_elem=15.0)]
    records = [dict(base, kernel="token_forward_dpo", instr_per_elem=10.2),
               dict(base, kernel="token_forward_extras", instr_per_elem=15.0)]
    fails = static_guards.check(records, committed, fence_kernels=())
    assert len(fails["budget"]) == 1 and "token_forward_dpo" in fails["budget"][0]
    assert [r["kernel"] for r in static_guards.over_budget(records)] == ["token_forward_dpo",
                                                                         "token_forward_extras"]


def test_occupancy_matches_the_hopper_limits():
    # 40 registers × 256 threads: 1280 registers per warp → 51 warps → 6 blocks of 8.
    assert sass_stats.occupancy_warps(40, 1024, 8) == 48
    # 255 registers round to 256 per thread: one 8-warp block fills the register file.
    assert sass_stats.occupancy_warps(255, 0, 8) == 8
    # 32 registers: the 64-warp limit binds.
    assert sass_stats.occupancy_warps(32, 0, 8) == 64
    # 160 KB of shared memory: one block per SM.
    assert sass_stats.occupancy_warps(32, 160 * 1024, 4) == 4


def test_guards_flag_each_regression():
    base = dict(triton="3.9.0", regs=40, smem=0, hgmma=0, membar_gpu=0)
    committed = [dict(base, kernel="token_forward", V=128256, spills=0, ldg128=2, instr_per_elem=6.0),
                 dict(base, kernel="token_backward", V=128256, spills=0, ldg128=2, loop_ldg128=2,
                      loop_stg128=2, instr_per_elem=7.0)]
    records = [
        dict(base, kernel="token_forward", V=128256, spills=8, ldg128=0, instr_per_elem=6.5),
        dict(base, kernel="linear_backward", V=128256, spills=0, ldg128=0, instr_per_elem=None,
             membar_gpu=16),
        dict(base, kernel="token_backward", V=128256, spills=0, ldg128=2, loop_ldg128=2,
             loop_stg128=0, instr_per_elem=7.0),
    ]
    fails = static_guards.check(records, committed)
    assert all(len(fails[g]) == 1 for g in ("spills", "membar_gpu", "instr_per_elem"))
    assert len(fails["ldg128"]) == 2  # no LDG.128 in the forward, no STG.128 in the backward
    assert not any(static_guards.check(committed, committed).values())


@pytest.fixture(scope="module")
def profile():
    try:
        from triton.backends.nvidia import compiler as nv
    except ImportError:
        pytest.skip("triton's NVIDIA backend is not installed")
    bindir = os.path.join(os.path.dirname(nv.__file__), "bin")
    if not all(os.path.exists(os.path.join(bindir, t)) for t in ("ptxas", "cuobjdump")):
        pytest.skip(f"ptxas/cuobjdump not found in {bindir}")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1",
           "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    run = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "static_profile.py"), "--json"],
                         env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    records = json.loads(run.stdout)
    committed = static_guards.committed_records(RESULTS, records[0]["triton"])
    return records, committed, static_guards.check(records, committed)


@pytest.mark.static_sass
def test_profile_covers_every_kernel_at_both_vocabularies(profile):
    records, committed, _ = profile
    assert {(r["kernel"], r["V"]) for r in records} == {
        (k, V) for k in static_guards.VARIANTS for V in (128256, 50257)}
    assert committed, "no committed profile for this Triton version: run static_profile.py --write"
    for key in ("kernel", "triton", "shape", "regs", "spills", "smem", "instr_per_elem", "ldg128",
                "hgmma", "membar_gpu"):
        assert all(key in r for r in records), key


@pytest.mark.static_sass
def test_launch_specialization_is_what_a_launch_gets(profile):
    records, _, _ = profile
    spec = {(r["kernel"], r["V"]): r["specialization"] for r in records}
    aligned, odd = spec[("token_forward", 128256)], spec[("token_forward", 50257)]
    assert aligned["stride_xv"] == "constexpr=1" and aligned["x_ptr"] == "*bf16 div16"
    assert aligned["V"] == "i32 div16" and aligned["stride_xt"] == "i32 div16"
    assert odd["V"] == "i32" and odd["stride_xt"] == "i32"


@pytest.mark.static_sass
def test_no_kernel_spills(profile):
    assert not profile[2]["spills"], profile[2]["spills"]


@pytest.mark.static_sass
def test_token_kernels_use_128_bit_loads(profile):
    assert not profile[2]["ldg128"], profile[2]["ldg128"]


@pytest.mark.static_sass
def test_main_loops_cost_no_more_than_committed(profile):
    assert not profile[2]["instr_per_elem"], profile[2]["instr_per_elem"]


@pytest.mark.static_sass
def test_fused_backward_has_no_gpu_scope_fences(profile):
    assert not profile[2]["membar_gpu"], profile[2]["membar_gpu"]
