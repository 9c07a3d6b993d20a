"""What a newcomer hits first on a fresh clone: imports from the repository root, the package's
metadata, the main job's output folder and its load warning, and the named errors of the set-up.

The root folder ``kernels/`` (installed as ``pyfused_po.kernels``) must never shadow an installed
top-level ``kernels`` package: transformers >= 5.25 imports Hugging Face's, and ``python -m pytest``,
``bench/run.py`` and any script in the root put the root first on ``sys.path``.
"""
import importlib.metadata
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(code, *flags, cwd=ROOT, env=None):
    """Run ``code`` in a fresh interpreter whose ``sys.path[0]`` is ``cwd`` (as ``python -c``)."""
    full_env = {**os.environ, **(env or {})}
    full_env.pop("PYTHONPATH", None)
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=300)


def test_an_installed_kernels_package_wins_over_the_root_folder(tmp_path):
    """A stand-in for Hugging Face's package right behind the repository root on sys.path."""
    fake = tmp_path / "site" / "kernels"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("WHO = 'installed'\n")
    (fake / "layers.py").write_text("from . import WHO as PARENT\n")
    out = _python(f"""
        import sys
        sys.path.insert(1, {str(tmp_path / 'site')!r})
        import kernels, kernels.layers
        print(kernels.WHO, kernels.layers.PARENT, kernels.__file__)
    """)
    assert out.returncode == 0, out.stderr
    who, parent, path = out.stdout.split()
    assert (who, parent) == ("installed", "installed") and Path(path).parent == fake


def test_without_another_kernels_package_the_error_names_the_right_import():
    # -S: no site-packages, so no other `kernels` anywhere on the path
    out = _python("import kernels", "-S")
    assert out.returncode != 0
    assert "ModuleNotFoundError" in out.stderr and "pyfused_po.kernels" in out.stderr


def test_pyfused_po_kernels_still_imports_as_itself():
    out = _python("import pyfused_po.kernels as k; print(k.__name__, callable(k.token_forward))")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["pyfused_po.kernels", "True"]


def test_transformers_and_pyfused_po_import_from_the_root():
    pytest.importorskip("transformers")
    out = _python("import transformers.activations, pyfused_po; print('ok')")
    assert out.returncode == 0, out.stderr[-2000:]


def test_nothing_in_the_repository_imports_the_root_folder_as_kernels():
    pattern = re.compile(r"^\s*(from\s+kernels(\.|\s)|import\s+kernels\b)", re.M)
    offenders = [str(p.relative_to(ROOT)) for folder in ("pyfused_po", "tests", "bench", "examples")
                 for p in (ROOT / folder).rglob("*.py")
                 if p != Path(__file__).resolve() and pattern.search(p.read_text())]  # this file imports it on purpose
    assert offenders == [], f"import pyfused_po.kernels instead: {offenders}"


def test_version_is_the_distributions():
    import pyfused_po

    try:
        installed = importlib.metadata.version("pyfused_po")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("pyfused_po is not installed (pip install -e .)")
    assert pyfused_po.__version__ == installed


def test_metadata_declares_what_the_interpreter_path_needs():
    import tomllib

    meta = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = [re.split(r"[<>=;\s\[]", d)[0].lower() for d in meta["dependencies"]]
    assert "numpy" in names  # Triton's CPU interpreter imports it; Triton does not declare it
    assert meta["classifiers"] and meta.get("dynamic") == ["version"]
    assert (ROOT / "CHANGELOG.md").is_file()
    caps = {extra: [d for d in deps if d.startswith("trl")] for extra, deps in meta["optional-dependencies"].items()}
    assert len({tuple(v) for v in caps.values() if v}) == 1, caps  # one TRL requirement for every extra


def test_a_missing_interpreter_dependency_is_named():
    out = _python("""
        import sys
        sys.modules["numpy"] = None  # as after installing the wheel without numpy
        from pyfused_po._backend import token_ops
        token_ops("triton")
    """, env={"TRITON_INTERPRET": "1"})
    assert out.returncode != 0
    assert "could not import 'numpy'" in out.stderr and "pip install numpy" in out.stderr


def test_apply_on_a_plain_module_is_a_type_error():
    pytest.importorskip("trl")
    import torch

    from pyfused_po.integrations import trl as pfi

    with pytest.raises(TypeError, match="causal LM.*got Linear"):
        pfi.apply(torch.nn.Linear(2, 2))


def test_the_main_job_writes_a_new_git_ignored_folder(monkeypatch):
    from bench import run

    env = {"device": "CPU (x86_64)", "date_utc": "2026-12-07T12:00:00+00:00"}
    out = run.default_out_dir(env)
    assert out == run.LOCAL_RESULTS / "cpu-x86-64-2026-12-07T120000Z"
    committed = {p.parent for p in (ROOT / "bench" / "results").glob("*/summary.json")}
    assert out.parent not in committed and run.LOCAL_RESULTS not in committed
    ignored = subprocess.run(["git", "check-ignore", "-q", str(out / "summary.json")], cwd=ROOT)
    if ignored.returncode == 128:
        pytest.skip("not a git checkout")
    assert ignored.returncode == 0, "bench/results/local/ must be git-ignored"


@pytest.mark.parametrize("load, cores, warns", [([0.3], 2, False), ([2.0], 2, False), ([2.1], 2, True),
                                                ([0.5, 9.0], 4, True), (None, 2, False)])
def test_busy_machine_timings_are_flagged(load, cores, warns):
    from bench.cpu_load import timing_warning

    text = timing_warning(load, cores, 2)
    assert (text is not None) == warns
    if warns:
        assert "not meaningful" in text and f"{cores} cores" in text


def test_the_cpu_report_carries_the_warning():
    from bench.report_cpu import render_cpu

    md = render_cpu({"environment": {"device": "CPU", "device_type": "cpu", "cpu_cores": 2,
                                     "load_average": [5.0, 4.0, 3.0], "load_average_end": [6.0, 4, 3]},
                     "records": [], "timing_warning": "the machine was busy"})
    assert "Timings not meaningful" in md and "2 cores" in md and "6.0 (1 min) at the end" in md
