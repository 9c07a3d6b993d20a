"""This process's resident memory: current RSS, its high-water mark, and resetting the mark.

Linux keeps the high-water mark of the resident set (``VmHWM`` in ``/proc/self/status``)
and resets it to the current RSS when ``5`` is written to ``/proc/self/clear_refs``
(Linux ≥ 4.0).  Elsewhere ``resource.getrusage`` gives the mark (never reset).
"""
import re
import resource
import sys

_STATUS = "/proc/self/status"


def _status_kib(field):
    try:
        with open(_STATUS) as f:
            text = f.read()
    except OSError:
        return None
    m = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.MULTILINE)
    return None if m is None else int(m.group(1))


def high_water_bytes():
    """Peak RSS of this process since it started (or since the last reset), in bytes."""
    kib = _status_kib("VmHWM")
    if kib is not None:
        return kib * 1024
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB on Linux


def resident_bytes():
    """Current RSS in bytes (``None`` where ``/proc`` is missing)."""
    kib = _status_kib("VmRSS")
    return None if kib is None else kib * 1024


def reset_high_water():
    """Sets the high-water mark to the current RSS; ``False`` where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True
