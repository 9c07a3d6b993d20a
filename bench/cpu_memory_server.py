"""The subprocess behind ``bench/cpu_memory.py``: one fresh process per method, forked.

``python -m bench.cpu_memory_server SPEC.json`` starts fresh (the parent sets glibc's
malloc options in its environment), builds every method of every case once so that all
their packages are imported, then for each case forks children from that state:

* the **baseline** child loads the case's tensors into leaves and stops;
* a **method** child does the same, builds its loss and runs two forward + backward
  steps: a warm-up (its gradients freed), then the measured step, whose loss and
  gradients stay alive (as on the GPU).

Every child first runs the same tiny matmul and autograd step, so the thread pool and
autograd's one-time allocations are in the baseline too.  Each reports its whole-life
RSS high-water mark, its RSS just before the measured step, and the mark of the measured
step alone when the mark could be reset just before it.  The server computes no heavy
tensor op itself, so no OpenMP thread pool exists when it forks.
"""
import gc
import importlib
import json
import os
import sys
import traceback

import torch

from bench import rss
from bench.cases import Case
from bench.inputs import make_inputs
from bench.methods import all_methods
from bench.timing import run_step


def resolve(name):
    """A registered method by name, or ``"module:ATTR"`` naming a ``Method`` (tests)."""
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    by_name = {m.name: m for m in all_methods()}
    if name not in by_name:
        raise ValueError(f"unknown method {name!r}; known: {sorted(by_name)}")
    return by_name[name]


def _warm_up_torch():
    # The intra-op thread pool and autograd's first-use allocations, the same in every child.
    a = torch.ones(256, 256, requires_grad=True)
    (a @ a).logsumexp(-1).sum().backward()


def child(job, method):
    """Runs in the forked child: the measurement of ``method`` (``None``: baseline) as a dict."""
    case = Case(**job["case"])
    cpu = torch.device("cpu")
    _warm_up_torch()
    inp = make_inputs(case, cpu, tensors=torch.load(job["tensors"], weights_only=True), copy_tensors=False)[0]
    # Reference log-probs are [P] scalars: their values change no allocation of the step.
    inp.ref_chosen, inp.ref_rejected = torch.zeros(case.pairs), torch.zeros(case.pairs)
    loss_fn = None if method is None else method.build(case, cpu)
    if loss_fn is not None:
        run_step(loss_fn, inp)  # warm-up: lazy imports and caches of the first call
        inp.zero_grads()
    gc.collect()
    out = {"rss_before_step_bytes": rss.resident_bytes(), "hwm_before_step_bytes": rss.high_water_bytes()}
    reset = rss.reset_high_water()
    if loss_fn is not None:
        loss = run_step(loss_fn, inp)  # inp keeps the gradients alive, as on the GPU
        out["loss"] = loss.item()
    after = rss.high_water_bytes()  # since the reset, or since the start when it failed
    out["hwm_bytes"] = max(out["hwm_before_step_bytes"], after)  # the whole child's mark
    out["step_hwm_bytes"] = after if reset else None
    return out


def run_job(job, name, result_path):
    """Forks one child for ``name`` (``None``: baseline) and returns what it reported."""
    method = None if name is None else resolve(name)
    pid = os.fork()
    if pid == 0:  # the child: measure, write, leave without running the parent's cleanup
        code = 0
        try:
            result = {"status": "ok", **child(job, method)}
        except Exception as err:
            result = {"status": "error", "note": f"{type(err).__name__}: {str(err)[:200]}",
                      "traceback": traceback.format_exc()[-2000:]}
            code = 1
        with open(result_path, "w") as f:
            json.dump(result, f)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    if os.path.exists(result_path):
        with open(result_path) as f:
            return json.load(f)
    return {"status": "error", "note": f"child died (wait status {status}: killed for memory?)"}


def main(spec_path):
    """Spec: ``{"jobs": [{"case", "methods", "tensors"}, ...], "out"}``; writes a list of
    ``{"baseline": {...}, method: {...}}``, one per job."""
    with open(spec_path) as f:
        spec = json.load(f)
    for job in spec["jobs"]:  # import every package the children will use, once
        for name in job["methods"]:
            resolve(name).build(Case(**job["case"]), torch.device("cpu"))
    gc.collect()
    results = []
    for j, job in enumerate(spec["jobs"]):
        res = {"baseline": run_job(job, None, f"{spec_path}.{j}.baseline.json")}
        for i, name in enumerate(job["methods"]):
            res[name] = run_job(job, name, f"{spec_path}.{j}.{i}.json")
        results.append(res)
    with open(spec["out"], "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1])
