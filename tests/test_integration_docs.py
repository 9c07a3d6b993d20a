"""Every ```python block of README.md runs as written, each in a fresh namespace.

Blocks are collected from the file at test time, so a block added to README is tested
without touching this file.  Sections whose output says something checkable get a check.
"""
import os
import re
import warnings
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
DOC = Path(__file__).resolve().parents[1] / "README.md"


def _python_blocks():
    """``[(section title, index within the section, code)]`` for every python block."""
    blocks, title = [], "(top)"
    counts = {}
    for part in re.split(r"(```python\n.*?```)", DOC.read_text(), flags=re.S):
        if part.startswith("```python\n"):
            i = counts.get(title, 0)
            counts[title] = i + 1
            blocks.append((title, i, part[len("```python\n"):-3]))
        else:
            headings = re.findall(r"^## (.+)$", part, flags=re.M)
            title = headings[-1] if headings else title
    return blocks


BLOCKS = _python_blocks()


def _check_trl(out):
    loss, margin = out.strip().splitlines()[-1].split()
    assert float(loss) > 0 and abs(float(margin)) < 10


def _check_hf(out):
    loss, metrics = out.strip().splitlines()[-1].split(" ", 1)
    assert float(loss) > 0 and "rewards/margins" in metrics


def _check_use_it(index, out):
    last = out.strip().splitlines()[-1]
    if index == 0:
        assert "rewards/margins" in last and "logps/chosen" in last
    else:
        assert float(last.split()[0]) > 0  # a positive loss comes first


def _check_rl(out):
    assert out.strip() == "torch.Size([2, 6]) torch.Size([2, 6])"


CHECKS = {
    "RL log-probs (PPO / GRPO actors, verl, OpenRLHF)": lambda i, out: _check_rl(out),
    "Use it with TRL": lambda i, out: _check_trl(out),
    "Use it with a Hugging Face model": lambda i, out: _check_hf(out),
    "Use it": _check_use_it,
}
# Sections whose block a dedicated test runs (and checks): not run twice.
RUN_ELSEWHERE = {"Packed sequences": "test_packed_docs.py"}
# TRL's own trainer set-up trips transformers' deprecations (gradient_checkpointing): not the block's doing.
WARNS_UPSTREAM = {"Use it with TRL"}
NEEDS = {"Use it with TRL": ("trl", "datasets"), "Use it with a Hugging Face model": ("transformers",)}


def test_blocks_run_elsewhere_are_run_there():
    for title, test_file in RUN_ELSEWHERE.items():
        path = Path(__file__).with_name(test_file)
        assert path.is_file() and f"## {title}" in path.read_text(), (title, test_file)


def test_readme_has_the_core_examples():
    titles = [t for t, _, _ in BLOCKS]
    assert titles.count("Use it") == 3
    assert "Use it with TRL" in titles and "Use it with a Hugging Face model" in titles


RUN_HERE = [pytest.param(*b, marks=[pytest.mark.slow] if b[0] == "Use it with TRL" else [])  # trains two trainers
            for b in BLOCKS if b[0] not in RUN_ELSEWHERE]


@pytest.mark.parametrize("title, index, code", RUN_HERE, ids=[f"{p.values[0]}[{p.values[1]}]" for p in RUN_HERE])
def test_readme_block_runs(title, index, code, capsys, tmp_path, monkeypatch):
    for module in NEEDS.get(title, ()):
        pytest.importorskip(module)
    monkeypatch.chdir(tmp_path)  # anything a block writes stays in the test's folder
    code = code.replace("/tmp/pyfused_po_dpo", str(tmp_path / "out"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(code, f"{DOC}:{title}[{index}]", "exec"), {"__name__": "__readme__"})
    if title not in WARNS_UPSTREAM:  # a newcomer copying a block sees no warning
        # (numpy's inf − inf in masked lanes of Triton's CPU interpreter is the test set-up's, not the block's)
        seen = [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught
                if f"{os.sep}triton{os.sep}" not in w.filename]
        assert not seen, seen
    check = CHECKS.get(title)
    if check is not None:
        check(index, capsys.readouterr().out)
