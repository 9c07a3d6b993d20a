"""examples/dpo_smollm2.py: its report and plot on synthetic results (the training runs
themselves take minutes: run the example, README shows its output)."""
import importlib.util
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "dpo_smollm2.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("dpo_smollm2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(example):
    def steps(offset):
        return [{"step": i + 1, "loss": 0.69 - 0.01 * i + offset, "rewards/margins": 0.02 * i,
                 "rewards/accuracies": 0.5} for i in range(3)]
    return [dict(mode=m, label=example.RUNS[m], steps=steps(off), train_s=10.0, train_cpu_s=19.0, rss_before_train_mb=1600.0,
                 peak_rss_mb=peak, threads=2)
            for m, off, peak in (("trl", 0.0, 3300.0), ("trl+pyfused_po", 3e-6, 3100.0), ("hdpo", -0.01, 3100.0))]


def test_report_lists_every_run_and_the_agreement(example, capsys):
    example.print_table(_results(example))
    out = capsys.readouterr().out
    assert "max |loss(trl+pyfused_po) - loss(trl)| over the steps: 3.00e-06" in out
    for mode in example.RUNS:
        assert mode in out


def test_plot_is_written(example, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "plot.png"

    class Args:
        steps, batch_size, lr, beta = 3, 2, 2e-5, 0.1

    fig = example.plot(_results(example), path, Args)
    assert path.stat().st_size > 10_000
    ax_loss, ax_margin, ax_mem = fig.axes
    for ax in (ax_loss, ax_margin):  # steps are whole numbers: no 1.25, 1.50, ... ticks
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks
    legend = ax_mem.get_legend().get_window_extent()  # display boxes as saved
    bars = [p.get_window_extent() for p in ax_mem.patches]
    assert bars and not any(legend.overlaps(b) for b in bars)  # the legend hides no bar


@pytest.mark.parametrize("argv, named", [(["--steps", "0"], "--steps"), (["--runs", "trl,nope"], "nope")])
def test_bad_arguments_are_named(example, argv, named, capsys):
    with pytest.raises(SystemExit):
        example.main(argv)
    assert named in capsys.readouterr().err
