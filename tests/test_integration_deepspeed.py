"""DeepSpeed ZeRO-3: the fused paths under a partitioned LM head give the unwrapped model's
gradients (``model_preference_loss``, the TRL switch's forward) — see ``_zero3_worker.py``."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("deepspeed")
pytest.importorskip("transformers")

from _dist_spawn import free_port  # noqa: E402
from _zero3_worker import CHECKS  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    out = tmp_path_factory.mktemp("zero3") / "report.json"
    env = dict(os.environ, RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    run = subprocess.run([sys.executable, os.path.join(HERE, "_zero3_worker.py"), str(out)], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("name", list(CHECKS))
def test_zero3(report, name):
    assert name in report, f"{name} did not run"
    assert report[name] is None, report[name]
