"""Measure every method on one case: value check, time, peak memory, roofline score.

Each result is a plain dict (a *record*) so that it goes straight into the JSON files.
``status`` is ``"ok"``, ``"OOM"``, ``"not installed"``, ``"GPU only"``, another reason
the method cannot run, or ``"error"`` (with the message in ``note``).
"""
import dataclasses

import torch

from . import roofline
from .inputs import make_inputs, rotation_copies
from .reference import attach_reference, expected_reference_free, loss_tolerance, reference_pair_sums
from .timing import median, peak_extra_bytes, release, run_step, time_steps


def base_record(method, case, status, note=""):
    return {"method": method.name, "label": method.label, "case": case.key,
            **dataclasses.asdict(case), "tokens": case.tokens, "tokens_per_pair": case.tokens_per_pair,
            "headline": case.is_headline(), "input_bytes": case.input_bytes(),
            "status": status, "note": note or method.note, "reference_free": method.reference_free,
            "time_s": None, "times_s": [],
            "peak_extra_bytes": None, "loss": None, "reference_loss": None, "loss_error": None, "agrees": None,
            "score_pct": None}


def _is_oom(err):
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def measure_method(method, case, inputs_list, device, expected, tol, roof, *, warmup, reps):
    """One record for ``method`` on ``case`` with prepared (rotated) inputs."""
    rec = base_record(method, case, "ok")
    loss_fn = None
    try:
        loss_fn = method.build(case, device)
        loss = run_step(loss_fn, inputs_list[0]).item()  # before any in-place backward clobbers
        rec["loss"] = loss
        if method.compares_loss:
            rec["reference_loss"] = expected
            rec["loss_error"] = abs(loss - expected)
            rec["agrees"] = bool(rec["loss_error"] <= tol)
        times = time_steps(loss_fn, inputs_list, device, warmup=warmup, reps=reps)
        rec["times_s"], rec["time_s"] = times, median(times)
        rec["peak_extra_bytes"] = peak_extra_bytes(loss_fn, inputs_list[-1], device)
        rec["score_pct"] = roofline.score(case, rec["time_s"], roof)
    except Exception as err:  # a peer failing must not stop the sweep; it is reported
        rec["status"] = "OOM" if _is_oom(err) else "error"
        rec["note"] = f"{type(err).__name__}: {str(err).splitlines()[0][:200]}" if str(err) else type(err).__name__
    finally:
        for inp in inputs_list:
            inp.zero_grads()
        del loss_fn
        release(device)
    return rec


def measure_case(case, methods, device, roof, *, warmup, reps, seed=0, tensors=None, on_record=None):
    """Records for every method on ``case`` (unavailable ones reported, never dropped).

    ``tensors``: prepared base tensors (the real model's activations) instead of a draw.
    ``on_record(record)``: called after each measured method (the GPU session saves there, so a
    timeout loses at most the method in flight).
    """
    records, runnable = [], []
    for m in methods:
        reason = m.unavailable(device)
        if reason is None:
            runnable.append(m)
        else:
            records.append(base_record(m, case, reason))
    if not runnable:
        return records
    try:
        inputs_list = make_inputs(case, device, seed=seed, copies=rotation_copies(case, device),
                                  tensors=tensors)
        sums = reference_pair_sums(case, inputs_list[0])
        expected, scale = attach_reference(inputs_list, sums)
        expected_free = expected_reference_free(sums)
    except Exception as err:
        release(device)
        status = "OOM" if _is_oom(err) else "error"
        return records + [base_record(m, case, status, note=f"inputs: {type(err).__name__}")
                          for m in runnable]
    tol = loss_tolerance(case, scale)
    runnable.sort(key=lambda m: m.destroys_inputs)  # in-place methods last
    for m in runnable:
        target = expected_free if m.reference_free else expected
        records.append(measure_method(m, case, inputs_list, device, target, tol, roof,
                                      warmup=warmup, reps=reps))
        if on_record is not None:
            on_record(records[-1])
    del inputs_list
    release(device)
    order = {m.name: i for i, m in enumerate(methods)}
    return sorted(records, key=lambda r: order[r["method"]])
