"""The stamp written into every result file: device, driver, library versions, date, command."""
import datetime
import importlib.metadata
import os
import platform
import re
import shlex
import subprocess
import sys
from pathlib import Path

import torch

from .cpu_load import load_average

REPO = Path(__file__).resolve().parent.parent

LIBRARIES = ("pyfused_po", "torch", "triton", "trl", "liger-kernel", "cut-cross-entropy",
             "flash-attn", "pytest-benchmark", "matplotlib", "tqdm")


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _run(cmd):
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False, cwd=REPO)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({platform.processor() or platform.machine()})"


def slug(name: str) -> str:
    """A folder name for a device: ``"NVIDIA H100 80GB HBM3"`` → ``"nvidia-h100-80gb-hbm3"``."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-") or "unknown"


def environment(device, argv=None) -> dict:
    """Everything needed to know where and how a result was produced."""
    info = {
        "device": device_name(device),
        "device_type": device.type,
        "date_utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv)),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "libraries": {name: _version(name) for name in LIBRARIES},
        "git_commit": _run(["git", "rev-parse", "HEAD"]),
    }
    if device.type != "cuda":
        info["cpu_threads"] = torch.get_num_threads()
        info["cpu_cores"] = os.cpu_count()
        info["load_average"] = load_average()  # CPU times move with other processes' load
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            driver=_run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            cuda=torch.version.cuda,
            memory_bytes=props.total_memory,
            sm_count=props.multi_processor_count,
            capability=f"{props.major}.{props.minor}",
        )
    return info
