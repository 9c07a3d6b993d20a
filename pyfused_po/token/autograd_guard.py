"""First-derivative-only backward passes: double backward is refused with a clear error.

The token stage's backward is hand-written (Triton kernels or chunked torch code writing
``g·(onehot − softmax)·dz/dx`` into a buffer): it computes the first derivative and builds
no graph of it.  Under ``create_graph=True`` that gradient would otherwise come back either
without a graph (Triton: a second derivative of 0, silently) or with a partial graph (the
torch backend's ops see the saved ``lse`` as a constant: a wrong second derivative).

:func:`first_derivative_only` wraps a ``backward`` so that it always runs without building
a graph, and, when the engine differentiates with ``create_graph=True``, ties each returned
gradient to the tensors it depends on (the saved inputs and the upstream gradients that
require grad) through :class:`_DoubleBackwardRefused`, whose own backward raises.  First-order
gradients are unchanged (the same tensors); only differentiating them raises.
"""
import functools

import torch

_MESSAGE = (
    "{what}: its backward is hand-written and computes the first derivative only, so a "
    "gradient taken with create_graph=True cannot be differentiated again (double backward, "
    "e.g. a gradient penalty or Hessian-vector product through this op is not supported). "
    "Compute the second-order term through a plain PyTorch log_softmax instead."
)


class _DoubleBackwardRefused(torch.autograd.Function):
    """Identity on ``grad`` (a view, no copy) whose backward raises."""

    @staticmethod
    def forward(ctx, grad, what, *sources):
        ctx.what = what
        return grad.view_as(grad)

    @staticmethod
    def backward(ctx, *unused):
        raise RuntimeError(_MESSAGE.format(what=ctx.what))


def _saved(ctx):
    try:
        return tuple(t for t in ctx.saved_tensors if t is not None)
    except RuntimeError:  # already freed or modified: nothing more to link to
        return ()


def first_derivative_only(what):
    """Decorator for ``autograd.Function.backward``; ``what`` names the op in the error."""

    def decorate(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grads):
            create_graph = torch.is_grad_enabled()
            with torch.no_grad():
                out = backward(ctx, *grads)
            if not create_graph:
                return out
            sources = [t for t in (*grads, *_saved(ctx)) if isinstance(t, torch.Tensor) and t.requires_grad]
            if not sources:
                return out
            single = not isinstance(out, tuple)
            outs = (out,) if single else out
            linked = tuple(_DoubleBackwardRefused.apply(g, what, *sources) if isinstance(g, torch.Tensor) else g
                           for g in outs)
            return linked[0] if single else linked

        return wrapper

    return decorate
