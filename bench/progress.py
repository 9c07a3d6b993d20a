"""A progress bar over the sweep: tqdm when installed, one plain line per step otherwise."""
import sys


class _Plain:
    def __init__(self, total, desc):
        self.total, self.desc, self.n = total, desc, 0

    def set_postfix_str(self, text):
        print(f"[{self.n + 1}/{self.total}] {self.desc}: {text}", file=sys.stderr, flush=True)

    def update(self, n=1):
        self.n += n

    def close(self):
        print(f"{self.desc}: {self.n}/{self.total} done", file=sys.stderr, flush=True)


def progress(total, desc, *, enabled=True):
    """An object with ``set_postfix_str``, ``update`` and ``close``."""
    if enabled:
        try:
            from tqdm import tqdm

            return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)
        except ImportError:
            pass
    return _Plain(total, desc)
