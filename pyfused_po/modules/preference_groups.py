"""Groups of K responses in :class:`~pyfused_po.FusedPreferenceLoss`: the checks of a call and the
objective stage of a batch of groups.

A batch of groups is the module's one batch representation (:mod:`pyfused_po.sequence.batch_layout`) with
``group_size=K`` or ``group_index=[S]`` in its :class:`~pyfused_po.BatchLayout` (the module's own
``group_size`` fills a layout that names no groups).  The token and sequence stages are the pair
path's (:class:`~pyfused_po.sequence.preference_batch.PackedPairs`, columns per sequence); the objective is
:meth:`pyfused_po.objectives.listwise_loss.ListwisePlan.loss`, built once per call before any kernel by
:func:`group_plan`.  Its gradient with respect to a sequence's sum reads only that sequence's
group, so the three-GEMM plan (:mod:`pyfused_po.plans.fused_pairs`) runs on chunks of whole groups.

Options defined on pairs only are refused on groups with their reason (:data:`PAIR_ONLY_OPTIONS`,
:data:`PAIR_ONLY_ARGUMENTS`); the group arguments (``scores``, ``ref_logps``, ``nll_index``,
``nll_alpha``) are refused on pairs.
"""
import torch

from ..objectives.listwise_loss import NOT_ON_GROUPS, ListwisePlan, listwise_plan
from ..validation import check_same_device, check_shape, check_tensor

# Module options that only a pair defines, with the reason.
PAIR_ONLY_OPTIONS = {
    "ld_alpha": "LD-DPO weighs tokens past a pair's shared length min(n_w, n_l), which a group does not have",
    "use_weighting": "WPO weights a pair by its two sequences' probabilities",
    "bco_running_mean": "BCO's running mean is a pair-batch statistic",
}
# forward() arguments that only a pair batch takes, with what a group batch takes instead.
PAIR_ONLY_ARGUMENTS = {
    "ref_chosen_logps": "ref_logps=[S]", "ref_rejected_logps": "ref_logps=[S]",
    "weights": "no per-pair weights (pairs are formed inside each group)",
    "label_smoothing": "label_smoothing as a module hyper-parameter (a number)",
    "pair_layout": "group_size or group_index", "chosen_index": "group_index", "rejected_index": "group_index",
}


def _types(loss_type):
    return [loss_type] if isinstance(loss_type, str) else list(loss_type)


def check_group_options(module):
    """Raises when the module's configuration has no meaning on groups (construction time with
    ``group_size``, else the first call with groups)."""
    for name, reason in PAIR_ONLY_OPTIONS.items():
        if getattr(module, name):
            raise ValueError(f"{name} does not apply to groups of responses: {reason}")
    if module.reduction != "mean":
        raise ValueError(f"reduction={module.reduction!r} is not available on groups: the loss is the mean over "
                         f"groups (out.losses holds the per-group values)")
    for name in _types(module.loss_type):
        if name in NOT_ON_GROUPS:
            raise ValueError(f"loss_type={name!r} does not apply to groups: it {NOT_ON_GROUPS[name]}")


def check_group_call(module, layout, *, scores, ref_logps, nll_index, **pair_arguments):
    """The call's group / pair arguments agree with its layout (before any kernel)."""
    if not layout.grouped:
        group_arguments = (("scores", scores), ("ref_logps", ref_logps), ("nll_index", nll_index))
        given = [name for name, value in group_arguments if value is not None]
        if module.nll_alpha is not None:
            given.append("nll_alpha")
        if given:
            raise ValueError(f"{', '.join(given)} go with groups of responses: pass group_size=K (to the module or "
                             f"a BatchLayout) or group_index=[S]; a pair batch takes ref_chosen_logps / "
                             f"ref_rejected_logps")
        return
    check_group_options(module)
    for name, value in pair_arguments.items():
        if value is not None:
            raise ValueError(f"{name} is an argument of pair batches; a batch of groups takes "
                             f"{PAIR_ONLY_ARGUMENTS[name]}")
    if scores is None:
        raise ValueError("a batch of groups (group_size / group_index) needs scores=[S]: one score per sequence, "
                         "higher is preferred")
    check_tensor("scores", scores)


def group_plan(module, batch, ref_logps, nll_index, has_reference) -> ListwisePlan:
    """The checked listwise plan of a batch of groups (:func:`~pyfused_po.objectives.listwise_loss.listwise_plan`
    on the batch's :class:`~pyfused_po.sequence.groups.GroupLayout`), before any kernel."""
    S = batch.group_layout.group_of.numel()
    if ref_logps is not None:
        check_tensor("ref_logps", ref_logps, floating=True)
        check_shape("ref_logps", ref_logps, (S,), "one summed reference log-prob per sequence")
        check_same_device(ref_logps=ref_logps, labels=batch.labels)
    if nll_index is not None and isinstance(nll_index, torch.Tensor):
        check_same_device(nll_index=nll_index, labels=batch.labels)
    alpha = 1.0 if module.nll_alpha is None else module.nll_alpha
    plan = listwise_plan(S, layout=batch.group_layout, loss_type=module.loss_type, beta=module.beta,
                         nll_index=nll_index, nll_alpha=alpha, **module.objective_kwargs, **module.hyperparameters)
    if plan.needs_reference and not has_reference:
        raise ValueError(f"loss_type={module.loss_type!r} needs a reference: pass ref_logps=[S], ref_token_logps, "
                         f"ref_logits or ref_hidden")
    return plan


def group_objective(plan, columns, ref_logps):
    """The objective stage of a batch of groups on its per-sequence columns (``[S]``, stream order)."""
    ref = columns["ref"].detach() if "ref" in columns else ref_logps
    return plan.loss(columns["logps"], ref, columns["lengths"].detach().to(torch.float32), columns["nll_logps"],
                     columns["nll_lengths"].detach().to(torch.float32))
