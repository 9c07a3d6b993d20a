"""The code block of README's "Packed sequences" section runs as written."""
import re
from pathlib import Path

DOC = Path(__file__).resolve().parents[1] / "README.md"


def test_packed_snippet_runs(capsys):
    section = DOC.read_text().split("## Packed sequences\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert len(blocks) == 1
    exec(compile(blocks[0], str(DOC), "exec"), {})
    loss, margin = capsys.readouterr().out.split()
    assert float(loss) > 0 and abs(float(margin)) < 100
