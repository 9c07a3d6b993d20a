"""The runner's machinery on the CPU: max-context search, status reporting (OOM, not
installed, a wrong loss caught), result writers, plots, progress fallback, and the
``--quick`` CPU run end to end at toy sizes."""
import json
import re
import statistics
import sys
from pathlib import Path

import pytest
import torch

from bench import max_context, roofline
from bench.cases import Case
from bench.measure import measure_case
from bench.methods import methods_for
from bench.methods.base import NOT_INSTALLED, Method
from bench.methods.common import dpo_loss, pair_sums
from bench.methods.trl import chunked_positional_args
from bench.progress import progress
from bench.report_json import PYTEST_BENCHMARK, SUMMARY, benchmark_stats, write_json
from bench.report_md import render

CPU = torch.device("cpu")
CASE = Case(path="logits", pairs=2, seq_len=9, vocab=97, dtype="fp32")


def test_search_finds_largest_fitting_multiple():
    calls = []

    def fits(t):
        calls.append(t)
        return t <= 37_000
    assert max_context.search(fits) == (36 * 1024, False)
    assert len(calls) <= 20
    assert max_context.search(lambda t: True, cap=1 << 16) == (1 << 16, True)
    assert max_context.search(lambda t: False) == (0, False)


def _swapped(case, device):
    """A wrong adapter: chosen and rejected exchanged."""
    def loss_fn(inp):
        logps = torch.log_softmax(inp.logits.float(), -1).gather(-1, inp.labels.unsqueeze(-1)).squeeze(-1)
        chosen, rejected = pair_sums(logps, case.pairs)
        return dpo_loss(rejected, chosen, inp.ref_chosen, inp.ref_rejected)
    return loss_fn


def _oom(case, device):
    def loss_fn(inp):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB")
    return loss_fn


def test_measure_case_reports_every_status():
    fakes = [Method("absent", "Absent peer", "logits", _oom, probe=lambda: NOT_INSTALLED),
             Method("oom", "OOM peer", "logits", _oom),
             Method("swapped", "Swapped peer", "logits", _swapped)]
    eager = [m for m in methods_for("logits") if m.name == "torch_eager"]
    records = {r["method"]: r for r in measure_case(CASE, eager + fakes, CPU, {}, warmup=0, reps=2)}
    assert records["absent"]["status"] == NOT_INSTALLED
    assert records["oom"]["status"] == "OOM"
    assert records["torch_eager"]["status"] == "ok" and records["torch_eager"]["agrees"] is True
    assert records["swapped"]["status"] == "ok" and records["swapped"]["agrees"] is False
    assert len(records["torch_eager"]["times_s"]) == 2
    md = render({"environment": {"device": "CPU"}, "roofline": {}, "records": list(records.values()),
                 "max_context": []})
    for text in ("not installed", "OOM", "✗", "Absent peer"):
        assert text in md


def test_json_writers_follow_pytest_benchmark_layout(tmp_path):
    times = [0.004, 0.002, 0.003, 0.010]
    stats = benchmark_stats(times)
    assert stats["median"] == statistics.median(times) and stats["rounds"] == 4
    assert stats["min"] == 0.002 and stats["max"] == 0.010
    pb = pytest.importorskip("pytest_benchmark.stats")
    assert set(pb.Stats.fields) <= set(stats)
    rec = {"method": "m", "case": CASE.key, "status": "ok", "times_s": times, "peak_extra_bytes": None,
           "score_pct": None, "loss": 0.2, "agrees": True, "tokens": CASE.tokens,
           "tokens_per_pair": CASE.tokens_per_pair, "vocab": CASE.vocab, "dtype": "fp32", "path": "logits"}
    oom = {**rec, "method": "o", "status": "OOM", "times_s": []}
    env = {"device": "CPU", "device_type": "cpu", "libraries": {}}
    write_json(tmp_path, {"environment": env, "records": [rec, oom]})
    doc = json.loads((tmp_path / PYTEST_BENCHMARK).read_text())
    assert {"machine_info", "commit_info", "benchmarks", "datetime", "version"} <= set(doc)
    assert [b["params"]["method"] for b in doc["benchmarks"]] == ["m"]  # OOM has no timings
    assert len(json.loads((tmp_path / SUMMARY).read_text())["records"]) == 2


def test_roofline_scores():
    case = Case(path="logits", pairs=1, seq_len=1024, vocab=1000, dtype="bf16")
    roof = {"copy_bytes_per_s": 1e12, "bf16_flops_per_s": 1e15}
    floor = 3 * 2048 * 1000 * 2 / 1e12
    assert roofline.score(case, 2 * floor, roof) == pytest.approx(50.0)
    lin = Case(path="linear", pairs=1, seq_len=1024, vocab=1000, dtype="bf16", hidden=64)
    t = 6 * 2048 * 64 * 1000 / 1e15
    assert roofline.score(lin, t, roof) == pytest.approx(100.0)
    assert roofline.score(case, 1.0, {}) is None


def test_trl_chunked_arguments_built_by_name():
    class Newer:
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, temperature, final_logit_softcapping=None,
                    logit_scale=1.0):
            pass

    class WithChunk:
        @staticmethod
        def forward(ctx, hidden, weight, bias, targets, temperature, chunk_size, final_logit_softcapping=None):
            pass

    class Unknown:
        @staticmethod
        def forward(ctx, hidden, weight, mystery, targets):
            pass
    vals = {"hidden": "H", "weight": "W", "bias": None, "targets": "Y", "temperature": 1.0}
    assert chunked_positional_args(Newer, vals) == ["H", "W", None, "Y", 1.0, None, 1.0]
    assert chunked_positional_args(WithChunk, vals)[5] == 32768
    with pytest.raises(TypeError, match="mystery"):
        chunked_positional_args(Unknown, vals)


def test_progress_falls_back_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` fail
    bar = progress(2, "demo")
    bar.set_postfix_str("first")
    bar.update()
    bar.close()
    err = capsys.readouterr().err
    assert "[1/2] demo: first" in err and "1/2 done" in err


def test_quick_cpu_run_writes_results(tmp_path, capsys):
    """The CPU form end to end at toy shapes (``--toy``): timings with their spread, memory
    from the per-process probe (one subprocess: a few seconds), all files, honest pointers."""
    from bench.run import main

    summary = main(["--quick", "--device", "cpu", "--toy", "--no-progress", "--out", str(tmp_path),
                    "--methods", "pyfused,torch_eager,torch_compile,torch_eager_linear", "--warmup", "0",
                    "--reps", "5"])
    ok = [r for r in summary["records"] if r["status"] == "ok"]
    assert {r["method"] for r in ok} == {"pyfused", "torch_eager", "torch_eager_linear"}
    assert all(r["agrees"] for r in ok)
    assert all(len(r["times_s"]) == 5 for r in ok)
    # every step allocates at least the gradient it returns
    assert all(r["peak_extra_bytes"] is not None and r["peak_extra_bytes"] > 0 for r in ok)
    assert any(r["status"] == "GPU only" for r in summary["records"])
    for name in (SUMMARY, PYTEST_BENCHMARK, "README.md"):
        assert (tmp_path / name).stat().st_size > 0
    md = (tmp_path / "README.md").read_text()
    assert "What they do not tell" in md and "GPU speed" in md and "min – max" in md
    lines = [line for line in capsys.readouterr().out.splitlines()
             if line.startswith(("CPU results:", "GPU results:"))]
    assert len(lines) == 2
    paths = [Path(p) for line in lines for p in re.findall(r"(/\S+README\.md)", line)]
    assert paths and all(p.is_file() for p in paths)  # it points to nothing that does not exist
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return  # plots are skipped with a message; the rest must still be written
    pngs = list((tmp_path / "plots").glob("cpu-*.png"))
    assert len(pngs) == 2 and all(p.stat().st_size > 1000 for p in pngs)
