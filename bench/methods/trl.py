"""TRL's own log-prob code, as a TRL user gets it (APIs read from huggingface/trl sources).

* ``trl.trainer.utils.selective_log_softmax(logits, index)`` → per-token log-probs
  (row-looped ``log_softmax`` + ``gather`` in older releases; 1.16 dispatches CUDA tensors
  to the Triton kernel below, so the two rows then measure the same kernel).
* ``trl.kernels.selective_log_softmax_and_entropy(logits, index, ...)`` → ``(logps, entropy)``,
  TRL's fused Triton kernel over materialized logits (newer releases).
* ``ChunkedLogProbFunction`` in ``trl/kernels/chunked_logprob.py`` — the fused LM head:
  ``apply(hidden[N,H], weight[V,H], bias, targets[N], temperature, ...)`` → a tuple whose
  first item is the per-token log-probs.  Releases differ in the trailing positional
  arguments (1.16 takes ``chunk_size`` sixth and ``outputs`` last; the trainer passes
  ``_CHUNKED_LOGPROB_CHUNK_SIZE = 32768`` and ``outputs=("log_probs",)``), so the call is
  assembled from the installed signature; an unknown required parameter marks the
  adapter "API not verified".  Verified against trl 1.16.0.  On the CPU, 1.16 folds its
  tiles in torch ops (``_use_triton`` is false there), so the CPU run measures that path;
  a release without the torch fold would run its Triton kernel under the interpreter
  and is marked "GPU only" on a CPU run instead.
"""
import importlib
import inspect

from .base import NEEDS_CUDA, NOT_INSTALLED, Method, installed
from .common import token_dpo

CHUNK_SIZE_FALLBACK = 32768  # TRL's vocabulary tile when the module does not name one


def _trl_attr(candidates):
    """First ``(module, attribute)`` of ``candidates`` that imports, else ``None``."""
    for module, attr in candidates:
        try:
            obj = getattr(importlib.import_module(module), attr, None)
        except ImportError:
            continue
        if obj is not None:
            return obj
    return None


def _selective():
    return _trl_attr([("trl.trainer.utils", "selective_log_softmax")])


def _kernel():
    return _trl_attr([("trl.kernels", "selective_log_softmax_and_entropy"),
                      ("trl.kernels.logprob_entropy", "selective_log_softmax_and_entropy")])


def _chunked():
    return _trl_attr([("trl.kernels", "ChunkedLogProbFunction"),
                      ("trl.kernels.chunked_logprob", "ChunkedLogProbFunction")])


def _probe(getter):
    def probe():
        if installed("trl") is not None:
            return NOT_INSTALLED
        return None if getter() is not None else "not in this trl version"
    return probe


def trainer_chunk_size(module=None):
    """The vocabulary tile TRL's trainer passes (``trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE``
    in 1.16), else the kernel module's constant, else 32,768."""
    trainer = _trl_attr([("trl.trainer.utils", "_CHUNKED_LOGPROB_CHUNK_SIZE")])
    return trainer or getattr(module, "VOCAB_CHUNK_SIZE", CHUNK_SIZE_FALLBACK)


def chunked_positional_args(fn_cls, values, module=None):
    """Positional arguments for ``fn_cls.apply`` built by parameter name from ``values``;
    parameters not in ``values`` take their defaults.  Raises ``TypeError`` on a required
    parameter this adapter does not know (the API changed: not verified)."""
    params = list(inspect.signature(fn_cls.forward).parameters.values())[1:]  # drop ctx
    args, known = [], dict(values)
    if "chunk_size" not in known:
        known["chunk_size"] = trainer_chunk_size(module)
    # Releases with optional outputs compute entropy etc. by default; the benchmark needs
    # only the log-probs, as every other method computes only them.
    known.setdefault("outputs", ())
    for p in params:
        if p.name in known:
            args.append(known[p.name])
        elif p.default is not inspect.Parameter.empty:
            args.append(p.default)
        else:
            raise TypeError(f"ChunkedLogProbFunction.forward needs {p.name!r}: API not verified")
    return args


def _build_selective(case, device):
    fn = _selective()
    return lambda inp: token_dpo(fn(inp.logits, inp.labels), inp, case.pairs)


def _build_kernel(case, device):
    fn = _kernel()
    return lambda inp: token_dpo(fn(inp.logits, inp.labels)[0], inp, case.pairs)


# The outputs TRL 1.16's DPOTrainer asks of its fused LM head besides the log-probs
# (trl/trainer/dpo_trainer.py; ChunkedLogProbFunction's ``outputs`` names only the optional ones).
DPO_OUTPUTS = ("entropy", "mean_logits", "is_top1")


def _build_chunked(case, device, outputs=()):
    fn_cls = _chunked()
    module = inspect.getmodule(fn_cls)
    # 1.16's backward imports trl.trainer.utils on first use; a TRL trainer has it loaded
    # already, so load it here rather than charge its import to the first step's memory.
    _trl_attr([("trl.trainer.utils", "selective_log_softmax")])

    def loss_fn(inp):
        hidden = inp.hidden.reshape(-1, case.hidden)
        args = chunked_positional_args(
            fn_cls, {"hidden": hidden, "weight": inp.weight, "bias": None,
                     "targets": inp.labels.reshape(-1), "temperature": 1.0, "outputs": outputs}, module)
        out = fn_cls.apply(*args)
        logps = out[0] if isinstance(out, (tuple, list)) else out
        return token_dpo(logps, inp, case.pairs)
    return loss_fn


def _probe_chunked():
    reason = _probe(_chunked)()
    if reason is not None:
        return reason
    fn_cls = _chunked()
    names = ("hidden", "weight", "bias", "targets", "temperature")
    try:
        chunked_positional_args(fn_cls, dict.fromkeys(names), inspect.getmodule(fn_cls))
    except TypeError as err:
        return str(err)
    return None


def _cpu_probe_chunked():
    """1.16 folds the tiles in torch ops off CUDA (``_use_triton``); older releases do not."""
    try:
        module = importlib.import_module("trl.kernels.chunked_logprob")
    except ImportError:
        return NEEDS_CUDA
    return None if hasattr(module, "_use_triton") else NEEDS_CUDA


METHODS = [
    Method("trl_selective", "TRL selective_log_softmax", "logits", _build_selective,
           probe=_probe(_selective)),
    Method("trl_kernel", "TRL logprob kernel", "logits", _build_kernel, probe=_probe(_kernel),
           cuda_only=True),
    Method("trl_chunked", "TRL ChunkedLogProbFunction", "linear", _build_chunked,
           probe=_probe_chunked, cpu_probe=_cpu_probe_chunked),
    Method("trl_chunked_dpo", "TRL ChunkedLogProbFunction, DPOTrainer's outputs", "linear",
           lambda case, device: _build_chunked(case, device, DPO_OUTPUTS), probe=_probe_chunked,
           cpu_probe=_cpu_probe_chunked, note="outputs=" + ",".join(DPO_OUTPUTS)),
]
