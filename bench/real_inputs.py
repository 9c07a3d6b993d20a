"""Benchmark tensors from the real model: SmolLM2-135M's final hidden states, head and text.

``pyfused_po.testing.smollm2.activations()`` runs the model on the shipped preference
pairs (``[chosen; rejected]`` rows, right-padded).  A benchmark case needs every token
labelled, so each row contributes its last ``seq_len`` positions that have a next token:
the hidden state at position ``t`` with label ``input_ids[t + 1]`` (the model's shift), up
to the end-of-turn token.  Those positions cover the end of the prompt and the answer:
real text, with the real model's peaked next-token distributions.  On the logits path the
case's logits are ``hidden @ weightᵀ`` in fp32, the model's own logits.
"""
import functools

import torch


def unavailable_reason():
    """``None`` when the real model can be used, else why not (what to install)."""
    try:
        from pyfused_po.testing import smollm2
    except ImportError as err:
        return f"pyfused_po.testing.smollm2 does not import: {err}"
    return smollm2.unavailable_reason()


@functools.lru_cache(maxsize=1)
def _activations():
    from pyfused_po.testing import smollm2

    return smollm2.activations()


def rows_from_activations(acts, pairs, seq_len):
    """``(hidden [2P, S, D], labels [2P, S])`` from ``activations()``-style tensors.

    Row ``i`` of chosen pair ``p`` is activation row ``p``; rejected is row ``n + p`` where
    ``n`` is the number of pairs in ``acts``.  Raises ``ValueError`` when there are fewer
    pairs, or a row has fewer than ``seq_len + 1`` real tokens.
    """
    hidden, input_ids, mask = acts["hidden"], acts["input_ids"], acts["attention_mask"]
    n = hidden.shape[0] // 2
    if pairs > n:
        raise ValueError(f"pairs must be <= {n} (pairs in the real activations), got {pairs}")
    lengths = mask.sum(1)
    rows = list(range(pairs)) + list(range(n, n + pairs))
    short = min(int(lengths[r]) for r in rows)
    if short < seq_len + 1:
        raise ValueError(f"seq_len must be <= {short - 1} (shortest used row has {short} tokens), got {seq_len}")
    h_rows, y_rows = [], []
    for r in rows:
        end = int(lengths[r]) - 1  # the last position that has a next token is end - 1
        h_rows.append(hidden[r, end - seq_len:end])
        y_rows.append(input_ids[r, end - seq_len + 1:end + 1])
    return torch.stack(h_rows).contiguous(), torch.stack(y_rows).contiguous()


def case_tensors(case, acts=None):
    """Base tensors of a ``kind="smollm2"`` case (keys as ``bench.inputs.make_inputs``)."""
    acts = _activations() if acts is None else acts
    weight = acts["weight"]
    if (case.vocab, case.hidden or weight.shape[1]) != tuple(weight.shape):
        raise ValueError(f"case {case.key} needs vocab {weight.shape[0]} and hidden {weight.shape[1]} "
                         f"(the real model's head), got vocab {case.vocab}, hidden {case.hidden}")
    hidden, labels = rows_from_activations(acts, case.pairs, case.seq_len)
    dt = case.torch_dtype
    if case.path == "logits":
        with torch.no_grad():
            logits = (hidden.float() @ weight.float().t()).to(dt)
        return dict(labels=labels, logits=logits)
    return dict(labels=labels, hidden=hidden.to(dt).contiguous(), weight=weight.to(dt).contiguous())
