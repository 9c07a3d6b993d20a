"""model_preference_loss on a packed batch ([1, N] + position_ids or cu_seqlens, no padding)
equals the padded batch on a tiny Llama (float64): loss, metrics and every parameter gradient.

The packed twin gathers each padded row's real tokens; Transformers derives the
block-diagonal causal mask from the position restarts, so equality also checks that no
token attends across a sequence boundary."""
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
import torch  # noqa: E402

from _hf_tiny import tiny_model  # noqa: E402
from pyfused_po import FusedPreferenceLoss  # noqa: E402
from pyfused_po.integrations import hf  # noqa: E402

LENGTHS = [7, 2, 5, 6, 1, 4]  # [chosen; rejected], P = 3; a length-1 sequence
PROMPTS = [3, 1, 2, 2, 0, 4]  # the last has an empty response


def _padded(vocab, seed=3):
    g = torch.Generator().manual_seed(seed)
    T = max(LENGTHS) + 1
    ids = torch.randint(3, vocab, (len(LENGTHS), T), generator=g)
    pos = torch.arange(T)
    real = pos[None] < torch.tensor(LENGTHS)[:, None]
    ids = torch.where(real, ids, torch.zeros_like(ids))  # pad token 0
    labels = torch.where(real & (pos[None] >= torch.tensor(PROMPTS)[:, None]), ids, torch.full_like(ids, -100))
    return ids, labels, real.long()


def _pack(x, real, perm):
    return torch.cat([x[r][real[r].bool()] for r in perm]).unsqueeze(0)


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _run(model, fn):
    out = fn()
    out.loss.backward()
    grads = _grads(model)
    model.zero_grad(set_to_none=True)
    return out, grads


@pytest.mark.parametrize("layout", ["position_ids", "cu_seqlens_interleaved"])
def test_packed_equals_padded_on_a_tiny_llama(layout):
    model = tiny_model(seed=0).double()
    ref_model = tiny_model(seed=1).double()
    ids, labels, mask = _padded(model.config.vocab_size)
    loss_fn = FusedPreferenceLoss("sigmoid", beta=0.3, ld_alpha=0.5, **hf.lm_head_transform(model))
    pad, pad_grads = _run(model, lambda: hf.model_preference_loss(model, loss_fn, ids, labels, mask,
                                                                  ref_model=ref_model))
    P = len(LENGTHS) // 2
    if layout == "position_ids":
        perm, extra = list(range(2 * P)), {}
    else:
        perm, extra = [0, 3, 1, 4, 2, 5], dict(pair_layout="interleaved")
    lengths = torch.tensor([LENGTHS[r] for r in perm])
    cu = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    if layout == "position_ids":
        extra["position_ids"] = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    else:
        extra["cu_seqlens"] = cu
    pk_ids, pk_labels = _pack(ids, mask, perm), _pack(labels, mask, perm)
    assert pk_ids.shape == (1, sum(LENGTHS))  # no padding rows at all
    pk, pk_grads = _run(model, lambda: hf.model_preference_loss(model, loss_fn, pk_ids, pk_labels,
                                                                ref_model=ref_model, **extra))
    torch.testing.assert_close(pk.losses, pad.losses, rtol=1e-9, atol=1e-12)
    for k in pad.metrics:
        torch.testing.assert_close(pk.metrics[k], pad.metrics[k], rtol=1e-9, atol=1e-12, msg=k)
    assert pk_grads.keys() == pad_grads.keys() and pad_grads
    for name, g in pad_grads.items():
        torch.testing.assert_close(pk_grads[name], g, rtol=1e-8, atol=1e-12, msg=name)


def test_packed_rejects_an_attention_mask():
    model = tiny_model(seed=0)
    ids = torch.randint(3, 20, (1, 6))
    loss_fn = FusedPreferenceLoss("simpo", beta=2.0, **hf.lm_head_transform(model))
    with pytest.raises(ValueError, match="takes no attention_mask"):
        hf.model_preference_loss(model, loss_fn, ids, ids, torch.ones_like(ids), cu_seqlens=torch.tensor([0, 2, 6]))
    with pytest.raises(ValueError, match=r"packed input_ids must be \[1, N\]"):
        hf.model_preference_loss(model, loss_fn, ids.view(2, 3), ids.view(2, 3), cu_seqlens=torch.tensor([0, 2, 6]))
