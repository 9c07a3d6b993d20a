"""Hugging Face causal LMs: backbone hidden states + LM head → :class:`FusedPreferenceLoss`.

The model's own ``forward`` would multiply every hidden state by the LM head and hold
``[batch, seq, vocab]`` logits.  These helpers run only the backbone (``model.base_model``)
and hand its last hidden states and the head's ``weight``/``bias`` to the fused-linear
path, so the logits are never formed.  The logit transform a model applies after its head
(Gemma's ``final_logit_softcapping``, Cohere's ``logit_scale``, Granite's
``logits_scaling``, …) is read from the config and applied inside the kernel.

Sharded heads are gathered for the duration of the loss:

* FSDP2 holds the head as a ``DTensor``: ``full_tensor()`` once per call (its autograd
  reduces the gradient back to the shards);
* DeepSpeed ZeRO-3 partitions parameters to ``numel 0`` outside their module's forward:
  the fused loss runs *as the head module's forward* (:func:`with_lm_head`), so ZeRO-3's
  own hooks gather the head for the forward and again for the backward, and reduce-scatter
  its gradient, as for ``lm_head(hidden)``.  The forward-only reference model's head is
  gathered with ``deepspeed.zero.GatheredParameters`` (:func:`gathered_lm_head`).
"""
import contextlib
import dataclasses

import torch

from .. import _dispatch
from ..validation import check_exclusive, check_per_token, check_tensor
from .lora_head import lora_head_operands

__all__ = ["lm_head_transform", "backbone", "last_hidden_states", "gathered_lm_head", "with_lm_head",
           "model_preference_loss"]


def _text_config(model):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def lm_head_transform(model):
    """``dict(logit_scale=..., softcap=...)`` for the head's output transform in ``model``'s config.

    Reads ``final_logit_softcapping`` (Gemma 2/3) and a multiplier from ``logit_scale``
    (Cohere), ``output_multiplier``, ``lm_head_multiplier`` (Falcon-H1) or
    ``logits_scaling`` (Granite, MiniCPM3 divide by it; HyperCLOVA X multiplies), in that
    order, as Transformers' modelling code applies them: ``softcap(logits · scale)``.
    """
    cfg = _text_config(model)
    softcap = getattr(cfg, "final_logit_softcapping", None)
    scale = None
    for name in ("logit_scale", "output_multiplier", "lm_head_multiplier"):
        scale = getattr(cfg, name, None)
        if scale is not None:
            break
    if scale is None and getattr(cfg, "logits_scaling", None) is not None:
        scaling = cfg.logits_scaling
        scale = scaling if getattr(cfg, "model_type", None) == "hyperclovax" else 1.0 / scaling
    return dict(logit_scale=1.0 if scale is None else float(scale),
                softcap=None if not softcap else float(softcap))


def _unwrap(model):
    """The ``PreTrainedModel`` under a PEFT wrapper (LoRA layers stay injected in it)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def backbone(model):
    """The transformer stack of a causal LM (``model.base_model``, e.g. ``LlamaModel``)."""
    inner = _unwrap(model)
    stack = getattr(inner, "base_model", None)
    if stack is None or stack is inner:
        raise TypeError(f"{type(inner).__name__} exposes no backbone through base_model; pass a "
                        "transformers causal LM (AutoModelForCausalLM) or a PEFT model wrapping one")
    return stack


def last_hidden_states(model, input_ids=None, attention_mask=None, **kwargs):
    """Run only the backbone of ``model`` and return its last hidden states ``[B, T, D]``.

    Gradient checkpointing, LoRA layers and device maps act as in the full forward; no
    logits are computed.  Extra keyword arguments go to the backbone (``position_ids``,
    ``inputs_embeds``, …).
    """
    kwargs.setdefault("use_cache", False)
    out = backbone(model)(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def _zero3_params(*params):
    """The ZeRO-3 partitioned parameters among ``params`` (empty without DeepSpeed)."""
    return [p for p in params if p is not None and hasattr(p, "ds_id")]


def _head(model):
    head = _unwrap(model).get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise TypeError(f"{type(_unwrap(model)).__name__}.get_output_embeddings() returned no head with a weight")
    return head


@contextlib.contextmanager
def gathered_lm_head(model):
    """Yield the LM head's ``(weight, bias)`` as full tensors for the duration of the block.

    FSDP2 ``DTensor`` parameters are gathered once with ``full_tensor()`` (differentiable).
    DeepSpeed ZeRO-3 parameters are gathered with ``deepspeed.zero.GatheredParameters`` —
    forward-only: ZeRO-3 re-partitions them on exit, before a backward could accumulate
    their gradient, so a differentiable use raises; use :func:`with_lm_head` for that.
    """
    head = _head(model)
    weight, bias = head.weight, getattr(head, "bias", None)
    zero3 = _zero3_params(weight, bias)
    if zero3 and torch.is_grad_enabled() and any(p.requires_grad for p in zero3):
        raise RuntimeError("gathered_lm_head gives a ZeRO-3 head for forward-only use (torch.no_grad()); "
                           "for gradients call pyfused_po.integrations.hf.with_lm_head")
    # Gather only what is partitioned: a head tied to the embeddings can already be AVAILABLE,
    # and re-partitioning it on exit would break the embedding module's own gather.
    to_gather = [p for p in zero3 if getattr(getattr(p, "ds_status", None), "name", None) != "AVAILABLE"]
    ctx = contextlib.nullcontext()
    if to_gather:
        import deepspeed
        ctx = deepspeed.zero.GatheredParameters(to_gather, modifier_rank=None)
    with ctx:
        yield _full(weight), _full(bias)


def with_lm_head(model, fn, *inputs):
    """``fn(*inputs, weight, bias)`` with ``model``'s LM head as full tensors, differentiably.

    Under DeepSpeed ZeRO-3 the call runs *as the head module's forward* (its ``forward``
    is swapped for the duration of one call): ZeRO-3's module hooks then gather the head
    for the forward, gather it again when the backward reaches the outputs, and release
    it after its gradient is accumulated and reduce-scattered — what they do for the
    model's own ``lm_head(hidden)``.  Pass the tensors the head consumes (the hidden
    states) in ``inputs``; ``fn`` returns a tensor, a tuple/list/dict of tensors, or a
    dataclass of them (e.g. :class:`~pyfused_po.PreferenceLossOutput`), and only the
    returned tensors carry the backward re-gather.  Without ZeRO-3 this is a plain call
    (FSDP2 ``DTensor`` heads are gathered with ``full_tensor()``).
    """
    head = _head(model)
    if not _zero3_params(head.weight, getattr(head, "bias", None)):
        return fn(*inputs, _full(head.weight), _full(getattr(head, "bias", None)))
    computed = {}

    def forward(*args):
        out = computed["out"] = fn(*args, head.weight, getattr(head, "bias", None))
        # ZeRO-3 hooks tensors inside tuples, lists and dicts, not dataclasses.
        return tuple(getattr(out, f.name) for f in dataclasses.fields(out)) if _is_dataclass(out) else out

    original = head.__dict__.get("forward")
    head.forward = forward
    try:
        hooked = head(*inputs)
    finally:
        if original is None:
            del head.forward
        else:
            head.forward = original
    out = computed["out"]
    if _is_dataclass(out):
        return dataclasses.replace(out, **{f.name: v for f, v in zip(dataclasses.fields(out), hooked)})
    return hooked


def _is_dataclass(value):
    return dataclasses.is_dataclass(value) and not isinstance(value, type)


def _full(t):
    """A DTensor's full value (differentiable back to its shards); other tensors unchanged."""
    if t is None:
        return None
    full_tensor = getattr(t, "full_tensor", None)
    return full_tensor() if callable(full_tensor) and type(t).__name__ == "DTensor" else t


def model_preference_loss(model, loss_fn, input_ids, labels, attention_mask=None, *, ref_model=None,
                          ref_chosen_logps=None, ref_rejected_logps=None, shift=True, position_ids=None,
                          cu_seqlens=None, **loss_kwargs):
    """``loss_fn`` (a :class:`~pyfused_po.FusedPreferenceLoss`) on ``model``'s hidden states and head.

    Args:
        model: a Transformers causal LM exposing ``get_output_embeddings()`` (or a PEFT model
            wrapping one).  Its config's logit softcap / scale must match ``loss_fn``'s
            (build the loss with ``**lm_head_transform(model)``); a mismatch raises.
        loss_fn: the :class:`~pyfused_po.FusedPreferenceLoss`; built with ``shift=False``
            (this helper shifts: hidden state ``t`` predicts token ``t + 1``).
        input_ids, attention_mask: ``[2P, T]``, pairs laid out ``[chosen; rejected]``; or ``[S, T]``,
            groups of responses when ``loss_fn`` has ``group_size=K`` (or with ``group_index=`` /
            ``layout=`` in ``loss_kwargs``; then ``scores=[S]``, and ``ref_logps=[S]`` or ``ref_model``).
        labels: ``[2P, T]`` token ids with ``ignore_index`` on prompt and padding, aligned with
            ``input_ids`` (``shift=True``; per-token ``loss_kwargs`` such as ``token_weights``
            are then aligned with ``input_ids`` too) or already shifted (``shift=False``).
        ref_model: a frozen reference model, run forward-only through the same path; or
            ``ref_chosen_logps`` / ``ref_rejected_logps`` precomputed (both), or ``loss_fn``'s own
            ``ref_token_logps`` in ``loss_kwargs``.  One source: two raise a ``ValueError`` naming
            them.  Reference-free losses need none.
        position_ids, cu_seqlens: a packed batch, ``input_ids`` / ``labels`` ``[1, N]`` and no
            ``attention_mask`` (:mod:`pyfused_po.integrations.hf_packed`); pair layouts go in
            ``loss_kwargs`` (``pair_layout=``, ``chosen_index=`` / ``rejected_index=``).
        **loss_kwargs: passed to ``loss_fn`` (``weights``, ``token_weights``, …).

    Returns:
        the loss's :class:`~pyfused_po.PreferenceLossOutput` (``.loss``, ``.metrics``).
    """
    expected = lm_head_transform(model)
    got = {k: loss_fn.token_kwargs[k] for k in ("logit_scale", "softcap")}
    if {k: (None if v is None else float(v)) for k, v in got.items()} != expected:
        raise ValueError(f"loss_fn's logit transform {got} differs from the model config's {expected}; "
                         "build it with FusedPreferenceLoss(..., **lm_head_transform(model))")
    if loss_fn.token_kwargs["shift"]:
        raise ValueError("model_preference_loss shifts labels itself; build loss_fn with shift=False")
    check_model_inputs(input_ids, labels, attention_mask, ref_model, ref_chosen_logps, ref_rejected_logps,
                        loss_kwargs, packed=position_ids is not None or cu_seqlens is not None)
    if position_ids is not None or cu_seqlens is not None:
        packed_model_preference_loss = _dispatch.entry("packed_model_preference_loss")  # .hf_packed builds on hf
        return packed_model_preference_loss(
            model, loss_fn, input_ids, labels, attention_mask, position_ids=position_ids, cu_seqlens=cu_seqlens,
            ref_model=ref_model, ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps,
            shift=shift, loss_kwargs=loss_kwargs)
    if shift:
        # Hidden state t predicts token t + 1: move the labels (and any per-token argument)
        # one place left instead of slicing the hidden states, which would copy them.
        ignore_index = loss_fn.token_kwargs["ignore_index"]
        labels = _shift_left(labels, ignore_index)
        for name in ("token_weights", "ref_token_logps", "nll_labels"):
            if loss_kwargs.get(name) is not None:
                value = loss_kwargs[name]
                loss_kwargs[name] = _shift_left(value, ignore_index if not value.is_floating_point() else 0)
    hidden = last_hidden_states(model, input_ids, attention_mask)
    ref_hidden = None
    if ref_model is not None:
        with torch.no_grad():
            ref_hidden = last_hidden_states(ref_model, input_ids, attention_mask)
    refs = dict(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    if ref_model is not None:
        with torch.no_grad(), gathered_lm_head(ref_model) as (ref_w, ref_b):
            ref_lora = lora_head_operands(_head(ref_model), ref_hidden)
            if ref_lora is not None:
                ref_hidden, ref_w, ref_b = ref_lora.hidden, ref_lora.weight, ref_lora.bias
            # Forward-only reference per token (nothing of its head is kept): the loss sums it like
            # the policy, so its pair layout, token_weights and LD-DPO weights apply to both sides.
            refs = dict(ref_token_logps=_reference_tokens(loss_fn, ref_hidden, ref_w, ref_b, labels))

    def policy_loss(hidden, labels, weight, bias):
        return loss_fn(labels=labels, hidden=hidden, weight=weight, bias=bias, **refs, **loss_kwargs)

    lora = lora_head_operands(_head(model), hidden)
    if lora is not None:  # a LoRA adapter on the head: its delta enters as extra columns (see lora_head.py)
        return policy_loss(lora.hidden, labels, lora.weight, lora.bias)
    return with_lm_head(model, policy_loss, hidden, labels)


# Reference inputs loss_fn itself takes; with ref_model= or ref_*_logps= here they would be a second source.
_LOSS_REFERENCE_ARGS = ("ref_token_logps", "ref_logits", "ref_hidden", "ref_logps")


def check_model_inputs(input_ids, labels, attention_mask, ref_model, ref_chosen_logps, ref_rejected_logps,
                        loss_kwargs, *, packed):
    """Before the backbone runs: one reference source at most (a second one was silently dropped:
    ``ref_model`` won over ``ref_chosen_logps``), both precomputed sums or neither, and every
    per-token input shaped like ``labels`` (``[2P, T]``, or ``[1, N]`` packed)."""
    check_exclusive("reference source", ref_model=ref_model,
                    **{"ref_chosen_logps/ref_rejected_logps": ref_chosen_logps if ref_chosen_logps is not None
                       else ref_rejected_logps},
                    **{name: loss_kwargs.get(name) for name in _LOSS_REFERENCE_ARGS})
    if (ref_chosen_logps is None) != (ref_rejected_logps is None):
        raise ValueError("pass ref_chosen_logps and ref_rejected_logps together (or neither)")
    check_tensor("labels", labels, floating=False)
    check_per_token(labels, floating=None, input_ids=input_ids)
    if not packed:  # a packed batch takes no attention_mask (hf_packed refuses one, naming why)
        check_per_token(labels, floating=None, attention_mask=attention_mask)
    check_per_token(labels, token_weights=loss_kwargs.get("token_weights"),
                    ref_token_logps=loss_kwargs.get("ref_token_logps"))


def _shift_left(x, fill):
    """``x[:, 1:]`` padded back to ``x``'s length with ``fill``: position t holds token t + 1."""
    return torch.cat([x[:, 1:], x.new_full((x.shape[0], 1), fill)], dim=1)


def _reference_tokens(loss_fn, ref_hidden, weight, bias, labels):
    """Reference per-token log-probs ``[2P, T]`` under ``loss_fn``'s token settings (forward only).

    Per-sequence sums split as ``[chosen; rejected]`` here would ignore a ``pair_layout`` /
    ``chosen_index`` and the ``token_weights`` the loss applies to its own reference sums."""
    from ..token.linear_token_logprobs import linear_token_logprobs
    return linear_token_logprobs(ref_hidden, weight, labels, bias=bias, impl=loss_fn.linear_impl,
                                 **loss_fn.token_kwargs)
