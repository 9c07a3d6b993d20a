"""pyfused_po benchmark suite: the same DPO loss through every peer, timed side by side.

Run ``python bench/run.py`` (full sweep) or ``python bench/run.py --quick``; see
``bench/README.md``.  Nothing here is imported by the library itself.
"""
