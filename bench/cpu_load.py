"""Is the machine quiet enough for CPU timings to mean anything?

A CPU timing shares its cores with every other process: with a load average of L on
``cores`` cores, a single-threaded step gets roughly min(1, cores / (L + 1)) of a core,
and torch's intra-op threads fight the others for the rest.  The committed CPU table was
taken at a load of about 2 on 2 cores; a newcomer's trial saw the logits path at 12× eager
under a heavier load (1.3× quiet).  So every CPU run stamps the load average and thread
count at its start and end, and says plainly when they make its timings meaningless.  The
memory and work counters do not depend on load: they stay the headline on a CPU.
"""
import os

# Other processes' load above this many runnable tasks per core: timings are not comparable
# across runs (within one run the methods still share the same conditions, roughly).
BUSY_PER_CORE = 1.0


def load_average():
    """The 1, 5 and 15 minute load averages, or None where the platform has none."""
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def timing_warning(load, cores, torch_threads):
    """A sentence saying why timings taken at ``load`` (1-minute average, at the start or end of a
    run) are not to be trusted, or None when the machine was quiet enough."""
    if load is None or not cores:
        return None
    busy = max(load) / cores
    if busy <= BUSY_PER_CORE:
        return None
    return (f"the machine was busy (load average up to {max(load):.1f} on {cores} cores, "
            f"{torch_threads} torch threads): CPU timings move with other processes and are not "
            f"meaningful here; read the memory and work counters, which do not depend on load")
