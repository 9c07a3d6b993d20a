"""The code blocks of README's "Use it with TRL" and "Use it with a Hugging Face model"
sections run as written."""
import os
import re
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
DOC = Path(__file__).resolve().parents[1] / "README.md"


def _section_code(title):
    text = DOC.read_text()
    section = text.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1, f"expected one python block under {title!r}"
    return blocks[0]


def test_hf_model_snippet_runs(capsys):
    pytest.importorskip("transformers")
    exec(compile(_section_code("Use it with a Hugging Face model"), str(DOC), "exec"), {})
    loss, metrics = capsys.readouterr().out.strip().split(" ", 1)
    assert float(loss) > 0 and "rewards/margins" in metrics


def test_trl_snippet_runs(capsys, tmp_path, monkeypatch):
    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    monkeypatch.chdir(tmp_path)
    code = _section_code("Use it with TRL").replace("/tmp/pyfused_po_dpo", str(tmp_path / "out"))
    exec(compile(code, str(DOC), "exec"), {})
    loss, margin = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert float(loss) > 0 and abs(float(margin)) < 10


def test_rl_snippet_runs(capsys):
    exec(compile(_section_code("RL log-probs (PPO / GRPO actors, verl, OpenRLHF)"), str(DOC), "exec"), {})
    assert capsys.readouterr().out.strip() == "torch.Size([2, 6]) torch.Size([2, 6])"
