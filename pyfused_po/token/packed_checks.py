"""Value checks of the packed-layout tensors — ``cu_seqlens``, ``position_ids``, pair indices —
eagerly and inside a ``torch.compile``-d graph.

Reading values back to Python breaks a compiled graph, so eager code used to skip these checks
while Dynamo traced, and a compiled step then took a ``cu_seqlens`` that does not start at 0,
goes backwards or ends before the last token (or repeated pair indices) and returned a finite,
wrong loss.  Here every check is one function returning the error message (or ``None``); eager
calls run it directly, compiled ones through the opaque custom op ``pyfused_po::check_packed_values``,
which runs it on the real tensors when the graph executes and returns a copy the caller uses in
place of its input (so the compiler cannot drop it).  As everywhere, the values are read on CPU
tensors always and on CUDA only with ``PYFUSED_PO_DEBUG=1`` (a host sync).
"""
import torch
from torch import Tensor

from ..validation import debug_checks_enabled


def cu_seqlens_problem(cu, n_tokens, token_offset, name):
    """What is wrong with int64 ``cu`` as the boundaries of ``n_tokens`` tokens (``token_offset``
    ≥ 0: the tokens are a slice starting there, the stream may go on; < 0: the whole stream)."""
    if int(cu[0]) != 0:
        return f"{name} must start at 0, got {name}[0] = {int(cu[0])}"
    steps = cu[1:] - cu[:-1]
    if bool((steps < 0).any()):
        s = int(torch.nonzero(steps < 0)[0, 0])
        return (f"{name} must be non-decreasing (sequence boundaries in order), got "
                f"{name}[{s}] = {int(cu[s])} > {name}[{s + 1}] = {int(cu[s + 1])}")
    end = int(cu[-1])
    if token_offset < 0 and end != n_tokens:
        return f"{name} must end at the number of tokens N = {n_tokens}, got {name}[-1] = {end}"
    if token_offset >= 0 and end < token_offset + n_tokens:
        return (f"{name} must end at or after token_offset + this slice's tokens = "
                f"{token_offset + n_tokens}, got {name}[-1] = {end}")
    return None


def position_ids_problem(pos, _unused, _unused2, name):
    """What is wrong with flat ``pos`` as packed positions: it must start at 0, and each step is
    +1 inside a sequence or a restart at 0.  Any other step is ambiguous — Transformers' packed
    mask (sdpa / eager) starts a new sequence there, while counting restarts would not, and a
    shift would then predict across that boundary — so it is refused."""
    if pos.numel() and int(pos[0]) != 0:
        return f"{name} must start a sequence at the first token ({name}[0] == 0), got {int(pos[0])}"
    if pos.numel() > 1:
        step_ok = (pos[1:] == pos[:-1] + 1) | (pos[1:] == 0)
        if not bool(step_ok.all()):
            t = int(torch.nonzero(~step_ok)[0, 0]) + 1
            return (f"{name} must count 0, 1, 2, … inside each sequence and restart at 0 where the next "
                    f"one starts; got {name}[{t - 1}] = {int(pos[t - 1])} followed by {name}[{t}] = "
                    f"{int(pos[t])} (neither +1 nor a restart at 0)")
    return None


def sequence_ids_problem(index, num_sequences, _unused, name):
    """What is wrong with ``index`` as sequence ids of a stream of ``num_sequences`` sequences."""
    bad = (index < 0) | (index >= num_sequences)
    if index.numel() and bool(bad.any()):
        return f"{name} must hold sequence ids in [0, {num_sequences}), got {int(index[bad][0])}"
    return None


def pair_sides_problem(both, _unused, _unused2, name):
    """What is wrong with ``[chosen; rejected]`` ids (equal halves) as pair sides: a repeat."""
    if torch.unique(both).numel() != both.numel():
        half = both.numel() // 2
        return ("chosen_index and rejected_index must not overlap or repeat: each sequence belongs to at most "
                f"one pair side, got chosen {both[:half].tolist()} and rejected {both[half:].tolist()}")
    return None


_PROBLEMS = {"cu_seqlens": cu_seqlens_problem, "position_ids": position_ids_problem,
             "sequence_ids": sequence_ids_problem, "pair_sides": pair_sides_problem}


def _readable(x):
    return not x.is_cuda or debug_checks_enabled()


@torch.library.custom_op("pyfused_po::check_packed_values", mutates_args=())
def check_packed_values(x: Tensor, kind: str, a: int, b: int, name: str) -> Tensor:
    """``x`` (a copy) after the ``kind`` check of :data:`_PROBLEMS` with arguments ``a``, ``b``."""
    if _readable(x):
        problem = _PROBLEMS[kind](x, a, b, name)
        if problem is not None:
            raise ValueError(problem)
    return x.clone()


@check_packed_values.register_fake
def _(x, kind, a, b, name):
    return torch.empty_like(x)


def checked_values(x, kind, name, a=0, b=0):
    """``x`` after its value check (:data:`_PROBLEMS` ``kind``), eagerly or inside a compiled graph.

    Use the returned tensor in place of ``x``: under ``torch.compile`` it is the custom op's
    output, which keeps the check in the graph."""
    if torch.compiler.is_compiling():
        return check_packed_values(x, kind, a, b, name)
    if _readable(x):
        problem = _PROBLEMS[kind](x, a, b, name)
        if problem is not None:
            raise ValueError(problem)
    return x
