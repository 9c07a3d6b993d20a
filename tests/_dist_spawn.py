"""Starts W gloo ranks on 127.0.0.1 running ``_dist_worker.py`` and collects their reports.

Each rank runs every check of the worker (both backends) in one process, so a whole
suite costs one process start per rank; it writes ``{check: None | traceback}`` to
``rank<r>.json``.  Loopback only; the port is a free one picked by the OS.
"""
import json
import os
import socket
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
WORKER = os.path.join(HERE, "_dist_worker.py")


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(world, out_dir, timeout=120):
    """Runs ``world`` ranks to completion; returns ``[{check: error or None}]`` per rank."""
    port = free_port()
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")])))
    procs = [subprocess.Popen([sys.executable, WORKER, str(rank), str(world), str(port), str(out_dir)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world)]
    logs = []
    try:
        for p in procs:
            logs.append(p.communicate(timeout=timeout)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (p, log) in enumerate(zip(procs, logs)):
        if p.returncode != 0:
            raise RuntimeError(f"rank {rank} of {world} exited with {p.returncode}:\n{log[-4000:]}")
    reports = []
    for rank in range(world):
        with open(os.path.join(out_dir, f"rank{rank}.json")) as f:
            reports.append(json.load(f))
    return reports
