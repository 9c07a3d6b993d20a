"""issue 26, classes 1 and 3: the switch's patch state lives with the forward it installed.

* Class 1: TRL patches a model again when a second trainer is built on it (SFT, then GRPO at
  temperature 0.7); applying the switch again must take TRL's new settings, not the first patch's.
* Class 3: ``copy.deepcopy`` of a switched model (a reference or EMA copy) must compute with the
  copy's weights, in the plain forward and in the fused one.

References: float64 log-softmax of the logits of the model's class forward (never patched), written
here from the formula.
"""
import copy
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
pytest.importorskip("trl")
import torch  # noqa: E402

from _hf_tiny import tiny_model  # noqa: E402

pfi = pytest.importorskip("pyfused_po.integrations.trl")


def _batch(seed=5):
    ids = torch.randint(3, 61, (2, 7), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels


def _class_logits(model, ids):
    """The model's own logits through its class forward (whatever is patched on the instance)."""
    with torch.no_grad():
        return type(model).forward(model, input_ids=ids).logits


def _float64_token_logps(model, ids, labels, temperature=1.0):
    logp = torch.log_softmax(_class_logits(model, ids).double()[:, :-1] / temperature, -1)
    y = labels[:, 1:]
    return logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)


def _fused_logps(model, ids, labels):
    with torch.no_grad():
        return model(input_ids=ids, labels=labels, fused_lm_head=True).log_probs.double()


def test_reapply_after_trl_patched_again_takes_trl_new_settings():
    """SFTTrainer's patch (T = 1, log-probs), the switch, then GRPOTrainer's patch (T = 0.7, with
    entropy) and the switch again: the log-probs come at T = 0.7 and the entropy is returned."""
    from trl.trainer.utils import add_fused_lm_head

    model, (ids, labels) = tiny_model(), _batch()
    add_fused_lm_head(model, temperature=1.0, outputs=("log_probs",))  # what SFTTrainer does
    pfi.apply(model)
    add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))  # what GRPOTrainer does
    # Before the second apply the model runs TRL's new forward: its settings are TRL's.
    assert pfi.trl_head_settings(model) == dict(temperature=0.7, cast_lm_head_to_fp32=False,
                                                outputs=("log_probs", "entropy"))
    pfi.apply(model)
    assert pfi.trl_head_settings(model)["temperature"] == 0.7
    out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    assert out.entropy is not None
    torch.testing.assert_close(out.log_probs.detach().double(), _float64_token_logps(model, ids, labels, 0.7),
                               rtol=1e-5, atol=1e-5)
    # The plain forward is still the class forward (no patch layer of either left on its path).
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, _class_logits(model, ids))


def test_explicit_patch_settings_are_replaced_on_the_next_patch():
    model, (ids, labels) = tiny_model(), _batch()
    pfi.patch_model(model, temperature=2.0)
    pfi.patch_model(model, temperature=0.5)
    assert pfi.trl_head_settings(model)["temperature"] == 0.5
    torch.testing.assert_close(_fused_logps(model, ids, labels), _float64_token_logps(model, ids, labels, 0.5),
                               rtol=1e-5, atol=1e-5)


def _accelerate_wrap(model):
    """What accelerate's prepare() does to a forward under mixed precision (its own wrappers; the
    autocast here is disabled, so the numbers stay fp32)."""
    import types

    from accelerate.utils.operations import convert_outputs_to_fp32

    model._original_forward = model.forward
    wrapped = torch.autocast(device_type="cpu", enabled=False)(model.forward.__func__)
    model.forward = types.MethodType(convert_outputs_to_fp32(wrapped), model)


@pytest.mark.parametrize("trl_first", [False, True, "accelerate"], ids=["plain", "trl-patched", "accelerate"])
def test_deepcopy_of_a_switched_model_uses_its_own_weights(trl_first):
    """apply(model), deepcopy, then the original moves: the copy's plain and fused forwards compute
    with the copy's weights, its gradients land on the copy's parameters, and the original's own
    forward is unchanged."""
    from trl.trainer.utils import add_fused_lm_head

    model, (ids, labels) = tiny_model(), _batch()
    if trl_first:
        add_fused_lm_head(model, temperature=0.7, outputs=("log_probs", "entropy"))
    if trl_first == "accelerate":  # TRL's forward inside accelerate's wrapper, as a prepared reference model
        _accelerate_wrap(model)
        pfi.patch_model(model, autocast=lambda: torch.autocast(device_type="cpu", enabled=False))
    else:
        pfi.apply(model)
    twin = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    temperature = 0.7 if trl_first else 1.0
    with torch.no_grad():
        torch.testing.assert_close(twin(input_ids=ids).logits, _class_logits(twin, ids))
        torch.testing.assert_close(model(input_ids=ids).logits, _class_logits(model, ids))
    torch.testing.assert_close(_fused_logps(twin, ids, labels), _float64_token_logps(twin, ids, labels, temperature),
                               rtol=1e-5, atol=1e-5)
    twin(input_ids=ids, labels=labels, fused_lm_head=True).loss.backward()
    assert all(p.grad is None for p in model.parameters())
    assert twin.get_output_embeddings().weight.grad is not None
    # Each keeps its own patch: re-patching the copy leaves the original's settings alone.
    pfi.patch_model(twin, temperature=3.0)
    assert pfi.trl_head_settings(model)["temperature"] == temperature
