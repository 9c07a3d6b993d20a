"""The work counters themselves: FLOPs of every matmul form, the live-bytes peak, the traffic model."""
import gc
import math

import torch

import pytest

from bench.work_counters import SECTIONS, WorkCounter, run


def _ab(m=3, k=5, n=7):
    return torch.randn(m, k), torch.randn(k, n)


def test_every_matmul_form_is_counted():
    a, b = _ab()
    flops = 2 * 3 * 5 * 7
    acc = torch.zeros(3, 7)
    out = torch.empty(3, 7)
    with WorkCounter() as c:
        torch.mm(a, b)
        torch.mm(a, b, out=out)  # mm.out: missed by torch.utils.flop_counter
        torch.addmm(acc, a, b)
        torch.addmm(acc, a, b, out=acc)
        acc.addmm_(a, b)  # addmm_: missed by torch.utils.flop_counter
        torch.matmul(a, b)
        torch.nn.functional.linear(a, b.t())
    assert c.gemm_flops == 7 * flops
    with WorkCounter() as c:
        x, y = torch.randn(4, 3, 5), torch.randn(4, 5, 2)
        torch.bmm(x, y)
        torch.baddbmm(torch.zeros(4, 3, 2), x, y)
        torch.mv(a, torch.randn(5))
    assert c.gemm_flops == 2 * (2 * 4 * 3 * 5 * 2) + 2 * 3 * 5


def test_backward_matmuls_are_counted():
    a = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(4, 9, requires_grad=True)
    with WorkCounter() as c:
        (a @ b).sum().backward()
    assert c.gemm_flops == 3 * 2 * 6 * 4 * 9  # forward, dA, dB


def test_live_bytes_peak_and_release():
    with WorkCounter() as c:
        x = torch.zeros(1000)  # 4000 bytes
        y = torch.zeros(500)  # 6000 alive
        v = x[10:]  # a view allocates nothing
        del x
        gc.collect()
        assert c.live_bytes == 6000  # the view keeps x's storage alive
        del v
        gc.collect()
        z = torch.zeros(200)  # 2000 + 800
        assert c.live_bytes == 2800
        del y, z
    assert c.peak_bytes == 6000
    assert c.live_bytes == 0


def test_traffic_model_in_place_against_temporary():
    h, g = torch.randn(64, 8), torch.randn(64, 16)
    acc = torch.zeros(16, 8)
    n = acc.numel() * 4
    with WorkCounter(hidden_dim=8) as c:
        acc.addmm_(g.t(), h)  # read + write the accumulator
    assert c.acc_bytes == 2 * n
    with WorkCounter(hidden_dim=8) as c:
        acc.add_(torch.mm(g.t(), h))  # write temp, read temp, read acc, write acc
    assert c.acc_bytes == 4 * n
    with WorkCounter(hidden_dim=16) as c:
        torch.mm(h, torch.randn(8, 32))  # last dim != D: a logits GEMM, not a gradient GEMM
    assert c.acc_bytes == 0


def test_table_runs_at_a_tiny_shape():
    # Chunks hold a pair (109 tokens); the long-pair section's rows of 80 tokens make pairs of ~130.
    own_batch = [s for s in SECTIONS if s[1] is not None]  # the trainer section: its own test
    result = run(pairs=1, seq=40, vocab=300, dim=16, budget=1 << 15, liger=False, long_seq=80, sections=own_batch)
    trl = [r for r in result["rows"] if r["method"].startswith("TRL")]
    trl = [r for r in trl if r["section"] == "padded"]
    assert [r["gemms"] for r in trl] == [4.0, 3.0]  # TRL: logits, recompute, dH (, dW)
    frozen = [r for r in result["rows"] if r["method"].startswith("pyfused_po") and r["head"] == "frozen"
              and r["section"] == "padded" and "batch_invariant" not in r["method"]]
    assert [r["gemms"] for r in frozen] == [2.0] * 3  # logits, ∂log p/∂h in the forward; no backward GEMM
    # batch_invariant: the same GEMMs on tiles of 128 tokens, the last one padded (the module: the
    # staged plan's 4 with a trainable head).
    invariant = [r for r in result["rows"] if "batch_invariant" in r["method"]]
    assert len(invariant) == 4
    for r in invariant:
        padded = math.ceil(r["labelled_tokens"] / 128) * 128 / r["labelled_tokens"]
        assert r["gemms"] == pytest.approx((4.0 if r["head"] == "trainable" else 2.0) * padded, rel=1e-12)
    assert all(r["peak_bytes"] > 0 for r in result["rows"])
    kto = [r for r in result["rows"] if "FusedKTOLoss" in r["method"]]
    assert [r["gemms"] for r in kto] == [4.0, 3.0]  # staged: logits, recompute, dH, dW; fused: no recompute
    # Packed batches reach the three-GEMM plan (issue 24): 4 → 3 with a trainable head, 2 frozen.
    packed = {(r["method"], r["head"]): r for r in result["rows"] if r["section"] == "packed"}
    assert [packed[k]["gemms"] for k in packed if k[0].startswith("pyfused_po")] == [4.0, 3.0, 2.0, 2.0]
    assert [r["gemm_vs_floor"] for k, r in packed.items() if "fused gradient (default)" in k[0]] == [1.0, 1.0]
    # Long pairs: the default falls back by name (4 GEMMs), 'three_gemm' keeps 3.
    long = [r for r in result["rows"] if r["section"] == "long pairs"]
    assert [r["gemms"] for r in long] == [4.0, 3.0, 4.0]
    assert long[1]["gemm_vs_trl"] == 0.75


def test_frozen_head_with_metric_extras_counts_two_gemms():
    # TRL's DPOTrainer asks the switch for entropy, mean logits and top-1 as metrics: still 2 GEMMs.
    from pyfused_po import linear_token_logprobs

    hidden = torch.randn(2, 50, 16, requires_grad=True)
    weight = torch.randn(300, 16)
    labels = torch.randint(0, 300, (2, 50))
    M = labels.numel()
    with WorkCounter() as c:
        out = linear_token_logprobs(hidden, weight, labels, backend="torch", extras=("entropy", "mean_logit", "is_top1"))
        out.logps.sum().backward()
    assert c.gemm_flops == 2 * (2 * M * 16 * 300)


def test_models_at_the_headline_shape():
    # M = 16,384, V = 128,256, D = 4096, bf16: the three-GEMM plan's 4096-token chunks re-read dW
    # 4 times: 7·|dW| fp32 bytes + dH terms, under TRL's 2·4·|dW| + dH; its peak under TRL's.
    from bench.work_counters import HEADLINE, peak_model, traffic_model

    t, p = traffic_model(**HEADLINE), peak_model(**HEADLINE)
    fused, trl = "pyfused_po fused module, chunks of pairs (trainable)", "TRL 1.16 (trainable)"
    dw = HEADLINE["V"] * HEADLINE["D"] * 4
    dh = HEADLINE["M"] * HEADLINE["D"]
    assert t[fused] == 7 * dw + 3 * 2 * dh
    assert t[trl] == 2 * (4 * dw + 4 * dh * 4)  # 4 token tiles × |dW|, 4 vocabulary tiles × |dH| fp32
    assert t[fused] < t[trl] and p[fused] < p[trl]


@pytest.mark.slow
def test_trainer_rows_through_apply():
    """One step of each TRL trainer, TRL's own and through apply(): the plan is at the floor for
    DPO (trainable and LoRA), KTO, SFT, GRPO and RLOO.
    TRL's head runs over every position it is handed (prompt and padding too): above the floor."""
    pytest.importorskip("trl")
    from bench.trainer_counters import trainer_rows

    rows = trainer_rows()
    by = {(r["section"], r["method"].startswith("TRL")): r for r in rows}
    assert len(by) == len(rows) == 12
    expected = {"DPOTrainer": 1.0, "DPOTrainer + LoRA": 1.0, "KTOTrainer": 1.0, "SFTTrainer": 1.0,
                "GRPOTrainer (β = 0)": 1.0, "RLOOTrainer": 1.0}
    for label, ratio in expected.items():
        ours, trl = by[(f"apply(): {label}", False)], by[(f"apply(): {label}", True)]
        assert ours["gemm_vs_floor"] == pytest.approx(ratio, abs=1e-12), (label, ours["gemm_vs_floor"])
        assert trl["gemm_vs_floor"] > 4 / 3, (label, trl["gemm_vs_floor"])
        assert 0 < ours["peak_bytes"] < trl["peak_bytes"], label
    # The floor by hand: 3 (2 frozen) per policy token + 1 per reference token, KTO's KL pass 1 + 1.
    assert by[("apply(): DPOTrainer", False)]["floor_gemms"] == 4.0
    assert by[("apply(): DPOTrainer + LoRA", False)]["floor_gemms"] == 3.0
    assert by[("apply(): SFTTrainer", False)]["floor_gemms"] == 3.0
    assert by[("apply(): KTOTrainer", False)]["floor_gemms"] > 4.0  # the KL completions
