"""A PEFT LoRA adapter on the LM head through the fused-linear path.

The head's delta must reach the loss and its A/B matrices must get the gradients of the
model's own forward (``model(...).logits`` runs PEFT's LoRA layer); adapters the fused path
cannot express exactly are refused.  The reference DPO loss is float64 from those logits."""
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _hf_tiny import tiny_model  # noqa: E402
from pyfused_po import FusedPreferenceLoss  # noqa: E402
from pyfused_po.integrations import hf  # noqa: E402
from pyfused_po.integrations.lora_head import lora_head_operands  # noqa: E402

BETA = 0.1


def _lora(**kw):
    config = dict(r=3, lora_alpha=6, target_modules=["q_proj", "lm_head"], init_lora_weights=False, lora_dropout=0.0)
    config.update(kw)
    return peft.get_peft_model(tiny_model(), peft.LoraConfig(**config))


def _batch(vocab):
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, vocab, (4, 7), generator=g)
    labels = ids.clone()
    labels[:, :2] = -100
    labels[3, 5:] = -100
    return ids, labels


def _reference_loss(model, ids, labels, rc, rr):
    logits = model(input_ids=ids).logits.double()[:, :-1]
    y = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)
    s = logp.sum(-1)
    return -F.logsigmoid(BETA * ((s[:2] - rc) - (s[2:] - rr))).mean()


def _grads(model):
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def test_lora_on_lm_head_trains_through_the_fused_path():
    model = _lora()
    ids, labels = _batch(model.config.vocab_size)
    rc, rr = torch.tensor([-14.0, -15.0]), torch.tensor([-13.0, -16.5])
    loss_fn = FusedPreferenceLoss("sigmoid", beta=BETA, backend="torch")
    out = hf.model_preference_loss(model, loss_fn, ids, labels, ref_chosen_logps=rc, ref_rejected_logps=rr)
    out.loss.backward()
    fused = _grads(model)
    ref = _reference_loss(model, ids, labels, rc.double(), rr.double())
    ref.backward()
    expected = _grads(model)
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert any("lm_head.lora_A" in n for n in expected) and any("lm_head.lora_B" in n for n in expected)
    assert fused.keys() == expected.keys()
    for name, g in expected.items():
        torch.testing.assert_close(fused[name].double(), g.double(), rtol=1e-4, atol=1e-7, msg=name)


def test_lora_head_operands_follow_disabled_and_merged_adapters():
    model = _lora()
    head = model.get_base_model().get_output_embeddings()
    hidden = torch.randn(2, 5, model.config.hidden_size)
    ops = lora_head_operands(head, hidden)
    torch.testing.assert_close(ops.hidden @ ops.weight.T, head(hidden), rtol=1e-5, atol=1e-6)
    with model.disable_adapter():
        assert lora_head_operands(head, hidden) is None  # the base head: the reference under PEFT
    model.merge_adapter()
    assert lora_head_operands(head, hidden) is None  # the delta lives in the base weight now
    model.unmerge_adapter()
    assert lora_head_operands(torch.nn.Linear(4, 5), hidden) is None


def test_lora_head_variants_are_refused():
    model = _lora(use_dora=True)
    ids, labels = _batch(model.config.vocab_size)
    with pytest.raises(TypeError, match="DoRA"):
        hf.model_preference_loss(model, FusedPreferenceLoss("simpo", beta=BETA), ids, labels)


def test_trl_switch_applies_the_lm_head_adapter():
    """TRL's own fused head reads the base weight (the adapter's delta is dropped); the switch's
    forward scores the adapted head and trains its A/B like the model's own forward."""
    pfi = pytest.importorskip("pyfused_po.integrations.trl")
    from trl.trainer.utils import add_fused_lm_head

    model = _lora()
    add_fused_lm_head(model.get_base_model())  # as DPOTrainer does on a PEFT policy
    pfi.patch_model(model, backend="torch")
    ids, labels = _batch(model.config.vocab_size)
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    out.log_probs.sum().backward()
    fused = _grads(model)
    logits = model(input_ids=ids).logits.double()[:, :-1]
    y = labels[:, 1:]
    expected = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)
    expected.sum().backward()
    torch.testing.assert_close(out.log_probs.double(), expected.detach(), rtol=1e-5, atol=1e-5)
    reference = _grads(model)
    assert any("lm_head.lora_B" in n for n in reference) and fused.keys() == reference.keys()
    for name, g in reference.items():
        torch.testing.assert_close(fused[name].double(), g.double(), rtol=1e-4, atol=1e-6, msg=name)


def test_lora_on_lm_head_packed_equals_padded():
    """The packed route ([1, N] + cu_seqlens) applies the head adapter too: same loss and
    adapter gradients as the padded batch (itself checked against the model's logits above)."""
    model = _lora()
    ids, labels = _batch(model.config.vocab_size)
    rc, rr = torch.tensor([-14.0, -15.0]), torch.tensor([-13.0, -16.5])
    loss_fn = FusedPreferenceLoss("sigmoid", beta=BETA, backend="torch")
    padded = hf.model_preference_loss(model, loss_fn, ids, labels, ref_chosen_logps=rc, ref_rejected_logps=rr)
    padded.loss.backward()
    want = _grads(model)
    cu = torch.arange(0, ids.numel() + 1, ids.shape[1], dtype=torch.int32)  # every row one sequence
    packed = hf.model_preference_loss(model, loss_fn, ids.reshape(1, -1), labels.reshape(1, -1), cu_seqlens=cu,
                                      ref_chosen_logps=rc, ref_rejected_logps=rr)
    packed.loss.backward()
    got = _grads(model)
    torch.testing.assert_close(packed.loss, padded.loss, rtol=1e-5, atol=1e-6)
    assert any("lm_head.lora_B" in n for n in want) and got.keys() == want.keys()
    for name, g in want.items():
        torch.testing.assert_close(got[name], g, rtol=1e-4, atol=1e-6, msg=name)
