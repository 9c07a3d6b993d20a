"""Run a Python script with the CUDA caching allocator capped at a number of bytes.

    python bench/gpu/memcap.py 80e9 bench/run.py --only-max-context ...

The max-context target is stated for an 80 GB card; on a larger one (an H200 has ~141 GB)
``torch.cuda.set_per_process_memory_fraction(cap / total)`` makes allocations past the cap
raise the same out-of-memory error, so the search answers "fits in 80 GB".  The CUDA context
and libraries' own allocations are outside the allocator and not counted (a few hundred MB).
Without CUDA the script just runs (the cap is reported as not applied).
"""
import runpy
import sys
from pathlib import Path


def main(argv):
    if len(argv) < 2:
        raise SystemExit("usage: memcap.py CAP_BYTES SCRIPT [ARGS...]")
    cap = float(argv[0])
    if not cap > 0:
        raise SystemExit(f"CAP_BYTES must be > 0, got {argv[0]!r}")
    import torch

    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        frac = min(1.0, cap / total)
        torch.cuda.set_per_process_memory_fraction(frac, 0)
        print(f"memcap: allocator capped at {cap / 1e9:.1f} GB = {frac:.3f} of {total / 1e9:.1f} GB", flush=True)
    else:
        print("memcap: no CUDA, cap not applied", flush=True)
    script = argv[1]
    sys.argv = [script] + argv[2:]
    sys.path.insert(0, str(Path(script).resolve().parent))
    runpy.run_path(script, run_name="__main__")


if __name__ == "__main__":
    main(sys.argv[1:])
