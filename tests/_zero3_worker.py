"""DeepSpeed ZeRO-3 check, one gloo rank on the CPU: ``python _zero3_worker.py OUT_JSON``.

ZeRO-3 partitions every parameter to ``numel 0`` and re-materializes it only inside its
module's forward and backward hooks; the fused paths read the LM head directly.  A tiny
Llama is wrapped by ``deepspeed.initialize`` (stage 3, persistence threshold 0, so even
the head is partitioned) and the gradients ZeRO-3 ends up with (``safe_get_full_grad``)
are compared with the same computation on an unwrapped copy.  One rank: on this CPU
machine DeepSpeed's multi-rank gloo reduction returns zero gradients even for a plain
``engine(input_ids).logits`` loss, so only the single-rank partitioned path is checked.
"""
import json
import os
import sys
import traceback

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

from reference import max_rel_err  # noqa: E402

CHECKS = {}


def check(fn):
    CHECKS[fn.__name__] = fn
    return fn


def _setup():
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)

    def build():
        torch.manual_seed(0)
        return LlamaForCausalLM(config)

    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 97, (4, 12), generator=g)
    labels = input_ids.masked_fill(torch.arange(12) < 5, -100)
    ds_config = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0},
                 "zero_allow_untested_optimizer": True}
    model = build()
    engine, *_ = deepspeed.initialize(model=model, config=ds_config,
                                      optimizer=torch.optim.SGD(model.parameters(), lr=0.0))
    assert engine.module.lm_head.weight.numel() == 0, "the head should be partitioned outside its forward"
    return build, engine, input_ids, labels


def _compare_grads(engine, plain):
    from deepspeed.utils import safe_get_full_grad

    expected = dict(plain.named_parameters())
    errors = {}
    for name, p in engine.module.named_parameters():
        got = safe_get_full_grad(p)
        assert got is not None, f"{name}: no gradient under ZeRO-3"
        errors[name] = max_rel_err(got, expected[name].grad)
    worst = max(errors, key=errors.get)
    assert errors[worst] < 1e-5, f"{worst}: relative error {errors[worst]:.2e} vs the unwrapped model"


@check
def model_preference_loss():
    from pyfused_po import FusedPreferenceLoss
    from pyfused_po.integrations.hf import lm_head_transform, model_preference_loss

    build, engine, input_ids, labels = _setup()
    plain, ref = build(), build().eval()
    loss_fn = FusedPreferenceLoss("sigmoid", beta=0.1, backend="torch", **lm_head_transform(plain))
    # A nonzero margin: the reference is perturbed so that the policy gradient is not symmetric.
    with torch.no_grad():
        ref.lm_head.weight.add_(0.05 * torch.randn(ref.lm_head.weight.shape, generator=torch.Generator().manual_seed(2)))
    expected = model_preference_loss(plain, loss_fn, input_ids, labels, ref_model=ref)
    expected.loss.backward()
    got = model_preference_loss(engine.module, loss_fn, input_ids, labels, ref_model=ref)
    engine.backward(got.loss)
    assert abs(got.loss.item() - expected.loss.item()) < 1e-6, (got.loss.item(), expected.loss.item())
    assert got.metrics.keys() == expected.metrics.keys()
    _compare_grads(engine, plain)


@check
def trl_fused_forward():
    """The TRL switch's forward (``fused_lm_head=True``) on a ZeRO-3 model."""
    from pyfused_po.integrations.trl import patch_model

    build, engine, input_ids, labels = _setup()
    plain = build()
    weights = torch.randn(labels.shape, generator=torch.Generator().manual_seed(3))
    for model, backward in ((plain, lambda loss: loss.backward()), (engine.module, engine.backward)):
        patch_model(model, backend="torch")
        out = model(input_ids=input_ids, labels=labels, fused_lm_head=True)
        backward((out.log_probs * weights[:, 1:]).sum() + out.entropy.sum())
    _compare_grads(engine, plain)


@check
def gathered_head_is_forward_only():
    from pyfused_po.integrations.hf import gathered_lm_head

    build, engine, _, _ = _setup()
    with torch.no_grad(), gathered_lm_head(engine.module) as (weight, _):
        assert torch.equal(weight, build().lm_head.weight)
    try:
        with gathered_lm_head(engine.module):
            pass
    except RuntimeError as err:
        assert "with_lm_head" in str(err), err
    else:
        raise AssertionError("gathered_lm_head with gradients enabled should raise under ZeRO-3")


def main():
    import deepspeed

    deepspeed.init_distributed(dist_backend="gloo")
    report = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            report[name] = None
        except Exception:  # noqa: BLE001 - reported to the test process
            report[name] = traceback.format_exc()
    with open(sys.argv[1], "w") as f:
        json.dump(report, f)


if __name__ == "__main__":
    main()
