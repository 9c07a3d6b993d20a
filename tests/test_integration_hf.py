"""pyfused_po.integrations.hf: backbone hidden states + LM head → FusedPreferenceLoss, no logits.

Each case compares the loss and the parameter gradients with a float64 DPO loss computed
from the model's own full logits (``model(...).logits``, which applies the config's
softcap), so the config transform, the shift and the head all have to be right."""
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
transformers = pytest.importorskip("transformers")
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from _hf_tiny import tiny_config, tiny_model  # noqa: E402
from pyfused_po import FusedPreferenceLoss  # noqa: E402
from pyfused_po.integrations import hf  # noqa: E402

BETA = 0.1


def _batch(vocab, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (4, 9), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100  # prompt
    labels[1, 7:] = -100  # padding
    return ids, labels


def _reference(model, ids, labels, ref_chosen, ref_rejected):
    """Float64 DPO loss from the model's own logits (hidden state t predicts token t+1)."""
    logits = model(input_ids=ids).logits.double()[:, :-1]
    y = labels[:, 1:]
    logp = torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)
    s = logp.sum(-1)
    return -F.logsigmoid(BETA * ((s[:2] - ref_chosen) - (s[2:] - ref_rejected))).mean()


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _check(model, loss_fn=None, **kw):
    ids, labels = _batch(model.config.vocab_size)
    rc, rr = torch.tensor([-20.0, -22.0]), torch.tensor([-21.0, -19.5])
    loss_fn = loss_fn or FusedPreferenceLoss("sigmoid", beta=BETA, **hf.lm_head_transform(model))
    out = hf.model_preference_loss(model, loss_fn, ids, labels, ref_chosen_logps=rc, ref_rejected_logps=rr, **kw)
    out.loss.backward()
    fused = _grads(model)
    model.zero_grad(set_to_none=True)
    ref = _reference(model, ids, labels, rc.double(), rr.double())
    ref.backward()
    expected = _grads(model)
    model.zero_grad(set_to_none=True)
    torch.testing.assert_close(out.loss.double(), ref.detach(), rtol=1e-5, atol=1e-6)
    assert fused.keys() == expected.keys() and fused
    for name, g in expected.items():
        torch.testing.assert_close(fused[name].double(), g.double(), rtol=1e-3, atol=1e-6, msg=name)
    return fused


def test_llama_loss_and_gradients_match_full_logits():
    _check(tiny_model())


def test_gradient_checkpointing_gives_the_same_gradients():
    model = tiny_model()
    plain = _check(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    checkpointed = _check(model)
    for name, g in plain.items():
        torch.testing.assert_close(checkpointed[name], g, rtol=1e-5, atol=1e-7)


def test_softcap_and_scale_from_config():
    from transformers import Gemma2Config

    cfg = Gemma2Config(vocab_size=61, hidden_size=16, intermediate_size=24, num_hidden_layers=1,
                       num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=2.0,
                       max_position_embeddings=32, pad_token_id=0)
    model = tiny_model(config=cfg)
    assert hf.lm_head_transform(model) == dict(logit_scale=1.0, softcap=2.0)
    _check(model)
    with pytest.raises(ValueError, match="logit transform"):
        _check(model, loss_fn=FusedPreferenceLoss("sigmoid", beta=BETA))
    assert hf.lm_head_transform(tiny_model(config=tiny_config(logits_scaling=4.0))) == dict(logit_scale=0.25,
                                                                                             softcap=None)


def test_lora_frozen_head_gets_no_gradient():
    peft = pytest.importorskip("peft")
    model = peft.get_peft_model(tiny_model(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                              init_lora_weights=False))
    grads = _check(model)
    assert grads and all("lora_" in n for n in grads)
    assert model.get_base_model().get_output_embeddings().weight.grad is None


def test_fsdp2_dtensor_head_is_gathered_once(tmp_path, monkeypatch):
    dist = pytest.importorskip("torch.distributed")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard, distribute_tensor

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny_model()
        full = model.lm_head.weight.detach().clone()
        mesh = init_device_mesh("cpu", (1,))
        model.lm_head.weight = torch.nn.Parameter(distribute_tensor(full, mesh, [Shard(0)]))
        calls = []
        original = DTensor.full_tensor
        monkeypatch.setattr(DTensor, "full_tensor", lambda self, **kw: calls.append(1) or original(self, **kw))
        ids, labels = _batch(model.config.vocab_size)
        loss_fn = FusedPreferenceLoss("simpo", beta=2.0)
        hf.model_preference_loss(model, loss_fn, ids, labels).loss.backward()
        assert len(calls) == 1
        grad = model.lm_head.weight.grad
        assert isinstance(grad, DTensor)
        # Same model with a plain head: the gathered gradient must equal it.
        plain = tiny_model()
        hf.model_preference_loss(plain, loss_fn, ids, labels).loss.backward()
        torch.testing.assert_close(grad.full_tensor(), plain.lm_head.weight.grad, rtol=1e-5, atol=1e-7)
    finally:
        dist.destroy_process_group()


def test_per_token_arguments_are_aligned_with_input_ids():
    """token_weights given like labels (aligned with input_ids): a zero weight on a response
    token removes exactly that token from the sums, as masking its label does."""
    model = tiny_model()
    ids, labels = _batch(model.config.vocab_size)
    rc, rr = torch.tensor([-20.0, -22.0]), torch.tensor([-21.0, -19.5])
    loss_fn = FusedPreferenceLoss("sigmoid", beta=BETA, **hf.lm_head_transform(model))
    weights = torch.ones(ids.shape)
    weights[0, 5] = 0.0
    masked = labels.clone()
    masked[0, 5] = -100
    with torch.no_grad():
        by_weight = hf.model_preference_loss(model, loss_fn, ids, labels, ref_chosen_logps=rc,
                                             ref_rejected_logps=rr, token_weights=weights)
        by_label = hf.model_preference_loss(model, loss_fn, ids, masked, ref_chosen_logps=rc, ref_rejected_logps=rr)
    torch.testing.assert_close(by_weight.losses, by_label.losses, rtol=1e-6, atol=1e-7)
