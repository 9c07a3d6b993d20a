"""What a benchmarked method is: a name, a path, an availability probe and a loss builder."""
import importlib.util
from dataclasses import dataclass
from typing import Callable, Optional

NOT_INSTALLED = "not installed"
NEEDS_CUDA = "GPU only"


@dataclass(frozen=True)
class Method:
    """A peer (or pyfused_po) computing the benchmark's DPO loss through its public API.

    ``build(case, device)`` returns ``loss_fn(inputs) -> scalar loss`` (forward only; the
    runner calls ``backward``).  ``probe()`` returns ``None`` when the method can run, or the
    reason it cannot (``"not installed"``, ``"GPU only"`` for ``cuda_only`` methods on a
    CPU run, an API mismatch); ``cpu_probe()`` is asked too on a run off CUDA (a release
    whose CPU path is the Triton interpreter says ``"GPU only"`` there).
    """

    name: str
    label: str
    path: str                                  # "logits" or "linear"
    build: Callable
    probe: Callable[[], Optional[str]] = lambda: None
    cuda_only: bool = False
    cpu_probe: Callable[[], Optional[str]] = lambda: None  # extra check for a run off CUDA
    compares_loss: bool = True                 # False: its loss differs by design (see note)
    reference_free: bool = False               # takes no reference log-probs: DPO with ref = 0
    destroys_inputs: bool = False              # in-place backward: run last, value check first
    note: str = ""

    def unavailable(self, device) -> Optional[str]:
        try:
            reason = self.probe()
            if reason is None and device.type != "cuda":
                reason = NEEDS_CUDA if self.cuda_only else self.cpu_probe()
        except Exception as err:  # a broken peer install is reported, not fatal
            reason = f"probe failed: {type(err).__name__}: {err}"[:200]
        return reason


def installed(module: str) -> Optional[str]:
    """``None`` when the top-level package ``module`` is importable, else "not installed".

    Uses ``find_spec`` on the top-level name only, which imports nothing.
    """
    return None if importlib.util.find_spec(module) is not None else NOT_INSTALLED
