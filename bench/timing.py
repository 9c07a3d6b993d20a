"""Timing and peak-memory measurement of one forward + backward step.

* Time: CUDA events around each step, the median after warm-up; each rep uses the next
  copy of the inputs (rotation), so repeated reads do not come from L2.  On the CPU,
  ``time.perf_counter`` with the same protocol.
* Memory: peak allocated bytes *above* what was allocated before the step (inputs,
  weights, other methods' leftovers), via ``reset_peak_memory_stats`` and
  ``max_memory_allocated``.  It includes the gradients the step produces.  CUDA only.
"""
import gc
import statistics
import time


def run_step(loss_fn, inputs):
    """One training step of the loss: forward, backward; returns the detached loss."""
    inputs.zero_grads()
    loss = loss_fn(inputs.for_step())
    loss.backward()
    return loss.detach()


def _sync(device):
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def time_calls_ms(fn, device, *, warmup=1, reps=5):
    """Per-call milliseconds of ``fn()`` after ``warmup`` calls: CUDA events on a GPU (each
    rep synchronized, so a rep is one call's device time), the wall clock elsewhere."""
    for _ in range(warmup):
        fn()
    _sync(device)
    out = []
    for _ in range(reps):
        if device.type == "cuda":
            import torch

            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
            fn()
            e.record()
            e.synchronize()
            out.append(s.elapsed_time(e))
        else:
            t0 = time.perf_counter()
            fn()
            out.append(1e3 * (time.perf_counter() - t0))
    return out


def time_steps(loss_fn, inputs_list, device, *, warmup=3, reps=10):
    """Per-rep seconds of ``run_step`` over rotated inputs (``reps`` values)."""
    n = len(inputs_list)
    for i in range(warmup):
        run_step(loss_fn, inputs_list[i % n])
    _sync(device)
    if device.type != "cuda":
        times = []
        for i in range(reps):
            inp = inputs_list[i % n]
            inp.zero_grads()
            t0 = time.perf_counter()
            run_step(loss_fn, inp)
            times.append(time.perf_counter() - t0)
        return times
    import torch

    events = []
    for i in range(reps):
        inp = inputs_list[i % n]
        inp.zero_grads()  # freeing last rep's gradients is not part of the step
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        run_step(loss_fn, inp)
        end.record()
        events.append((start, end))
    torch.cuda.synchronize(device)
    return [s.elapsed_time(e) / 1e3 for s, e in events]


def peak_extra_bytes(loss_fn, inputs, device):
    """Peak bytes allocated during one step above the bytes allocated before it (CUDA);
    ``None`` on other devices."""
    if device.type != "cuda":
        return None
    import torch

    inputs.zero_grads()
    gc.collect()
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    run_step(loss_fn, inputs)
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def median(values):
    return statistics.median(values) if values else None


def release(device):
    """Return cached blocks after a method (or an OOM) so the next starts clean."""
    gc.collect()
    if device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
