"""TRL DPOTrainer / KTOTrainer with and without pyfused_po's switch: same losses, metrics, gradients.

A tiny random Llama, a word-level tokenizer and four preference rows, all local; two
optimizer steps on the CPU.  The reference is TRL's own fused-LM-head path (its chunked
torch log-softmax); the switched run computes the same per-token quantities through
``pyfused_po.linear_token_logprobs``.
"""
import contextlib
import math
import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")
import torch  # noqa: E402

from _hf_tiny import preference_rows, tiny_model, tiny_tokenizer  # noqa: E402

pfi = pytest.importorskip("pyfused_po.integrations.trl")

# TRL's own reference forward (no_grad) and policy forward differ by ~1e-4 nats per sequence in
# float32 even when policy == reference, where pyfused_po gives exactly the same value on both; the
# tolerances below cover that noise, which IPO's 1/(2β) target amplifies.
RTOL, ATOL = 1e-3, 1e-4
# Wall-clock / throughput entries differ between runs by nature; everything else must match.
_TIMING = {"train_runtime", "train_samples_per_second", "train_steps_per_second", "total_flos", "epoch", "step"}


def _dpo(tmp_path, name, peft=False, bf16=False, **config):
    from trl import DPOConfig, DPOTrainer

    args = DPOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=2, max_steps=2,
                     learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                     seed=0, data_seed=0, max_length=32, bf16=bf16, **config)
    peft_config = None
    if peft:
        from peft import LoraConfig
        peft_config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 init_lora_weights=False)
    torch.manual_seed(0)
    # Same seed: the reference starts as an exact copy of the policy, as TRL's default would.
    return DPOTrainer(model=tiny_model(), ref_model=None if peft else tiny_model(), args=args,
                      processing_class=tiny_tokenizer(), train_dataset=datasets.Dataset.from_list(preference_rows(4)),
                      peft_config=peft_config)


def _grads(trainer):
    """Gradients of one compute_loss on the first batch (before any step)."""
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    trainer.model.zero_grad(set_to_none=True)
    for values in trainer._metrics.values():
        values.clear()
    return loss.detach(), grads


def _logs(trainer):
    trainer.train()
    return [{k: v for k, v in row.items() if k not in _TIMING} for row in trainer.state.log_history]


def _assert_same_logs(base, fused, skip_first=()):
    assert len(base) == len(fused) == 3  # two steps and the summary
    for i, (b, f) in enumerate(zip(base, fused)):
        assert b.keys() == f.keys()
        for key in b:
            if i == 0 and key in skip_first:
                continue
            assert math.isclose(b[key], f[key], rel_tol=RTOL, abs_tol=ATOL), (key, b[key], f[key])


def _compare(tmp_path, peft=False, **config):
    base, fused = _dpo(tmp_path, "base", peft, **config), _dpo(tmp_path, "fused", peft, **config)
    assert pfi.apply(fused) is fused
    base_loss, base_grads = _grads(base)
    fused_loss, fused_grads = _grads(fused)
    torch.testing.assert_close(fused_loss, base_loss, rtol=RTOL, atol=ATOL)
    assert base_grads.keys() == fused_grads.keys() and base_grads
    for name, g in base_grads.items():
        torch.testing.assert_close(fused_grads[name], g, rtol=RTOL, atol=1e-5, msg=name)
    _assert_same_logs(_logs(base), _logs(fused))
    return fused, fused_grads


def test_dpo_switch_matches_trl(tmp_path):
    """sigmoid + IPO mixture, LD-DPO and WPO at once: every per-token field TRL asks for is used."""
    _compare(tmp_path, loss_type=["sigmoid", "ipo"], loss_weights=[1.0, 0.5], ld_alpha=0.5, use_weighting=True)


def test_dpo_switch_matches_trl_lora(tmp_path):
    """PEFT LoRA, no ref model (the reference is the adapter-disabled policy); the frozen head gets no gradient."""
    fused, grads = _compare(tmp_path, peft=True, loss_type="sigmoid")
    assert all("lora_" in name for name in grads)
    head = fused.model.get_base_model().get_output_embeddings().weight
    assert head.grad is None and not head.requires_grad


# TRL < 1.16 runs its chunked log-prob Triton kernel on the CPU under the Triton interpreter, whose
# bf16 tl.dot is wrong (a known interpreter defect): its bf16 numbers are no reference there.
_TRL_BF16_REFERENCE = pytest.mark.skipif(pfi._release(trl.__version__) < (1, 16),
                                         reason="TRL < 1.16's CPU path is its Triton kernel under the interpreter")


@_TRL_BF16_REFERENCE
def test_dpo_switch_matches_trl_bf16(tmp_path):
    """accelerate's bf16 mixed precision.  The trainer prepares the reference model at
    construction, wrapping its forward in autocast; the patch keeps that autocast, so at
    step 1 (policy == reference) the rewards are exactly 0 as in TRL, and the head's GEMMs
    run in bf16 in both models.  The torch backend is used because the Triton interpreter
    truncates bf16 stores where the GPU rounds them to nearest; its numerics equal TRL's."""
    base, fused = _dpo(tmp_path, "base", bf16=True), _dpo(tmp_path, "fused", bf16=True)
    pfi.apply(fused, backend="torch")
    base_logs, fused_logs = _logs(base), _logs(fused)
    for logs in (base_logs, fused_logs):
        assert all(logs[0][k] == 0.0 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    _assert_same_logs(base_logs, fused_logs)


def test_patch_warns_when_it_would_drop_accelerate_autocast():
    from _hf_tiny import tiny_model

    model = tiny_model()
    model._original_forward = model.forward  # what accelerate's prepare() leaves with mixed precision
    with pytest.warns(UserWarning, match="accelerate's mixed-precision autocast"):
        pfi.patch_model(model)


@pytest.mark.parametrize("bf16", [False, pytest.param(True, marks=_TRL_BF16_REFERENCE)], ids=["fp32", "bf16"])
def test_kto_switch_matches_trl(tmp_path, bf16):
    """KTO, also under accelerate's bf16 autocast (torch backend there: see the DPO bf16 test)."""
    from trl import KTOConfig, KTOTrainer

    rows = []
    for i, r in enumerate(preference_rows(4, seed=1)):
        rows.append(dict(prompt=r["prompt"], completion=r["chosen"], label=True))
        rows.append(dict(prompt=r["prompt"], completion=r["rejected"], label=False))

    def make(name):
        args = KTOConfig(output_dir=str(tmp_path / name), per_device_train_batch_size=4, max_steps=2,
                         learning_rate=1e-2, logging_steps=1, report_to=[], use_cpu=True, save_strategy="no",
                         seed=0, data_seed=0, max_length=32, bf16=bf16)
        torch.manual_seed(0)
        return KTOTrainer(model=tiny_model(), ref_model=tiny_model(), args=args, processing_class=tiny_tokenizer(),
                          train_dataset=datasets.Dataset.from_list(rows))

    base, fused = make("base"), pfi.apply(make("fused"), backend="torch" if bf16 else "auto")
    _assert_same_logs(_logs(base), _logs(fused))


def test_use_preference_loss_refuses_dpo_config_mismatches(tmp_path):
    """DPOConfig's loss_type / beta / ld_alpha / use_weighting are TRL's too (its logged rewards,
    its precomputed reference sums): a loss_fn disagreeing on any is refused, each one named."""
    from pyfused_po import FusedPreferenceLoss

    trainer = _dpo(tmp_path, "cfg", loss_type="ipo", beta=0.1)
    loss_fn = FusedPreferenceLoss("sigmoid", beta=0.2, ld_alpha=0.5, use_weighting=True)
    with pytest.raises(ValueError) as info:
        pfi.use_preference_loss(trainer, loss_fn)
    for line in ("loss_type/loss_weights: DPOConfig ['ipo'] [1.0], loss_fn ['sigmoid'] [1.0]",
                 "beta: DPOConfig 0.1, loss_fn 0.2", "ld_alpha: DPOConfig None, loss_fn 0.5",
                 "use_weighting: DPOConfig False, loss_fn True"):
        assert line in str(info.value)
    assert not hasattr(trainer, "pyfused_po_loss")
    # A loss TRL lacks replaces DPOConfig's default loss_type only.
    with pytest.raises(ValueError, match="which TRL lacks"):
        pfi.use_preference_loss(trainer, FusedPreferenceLoss("simpo", beta=0.1))
    default = _dpo(tmp_path, "simpo", beta=2.0)
    assert pfi.use_preference_loss(default, FusedPreferenceLoss("simpo", beta=2.0)) is default


def test_use_preference_loss_precomputed_reference_with_ld_alpha(tmp_path):
    """precompute_ref_log_probs=True with LD-DPO: TRL's precomputed reference sums carry its
    ld_alpha weighting, the policy's sums the loss's; with both equal (enforced), step 1 (policy
    == reference) gives zero rewards, and the run matches TRL's."""
    from pyfused_po import FusedPreferenceLoss

    config = dict(loss_type="sigmoid", ld_alpha=0.5, precompute_ref_log_probs=True)
    base, fused = _dpo(tmp_path, "base", **config), _dpo(tmp_path, "fused", **config)
    pfi.use_preference_loss(fused, FusedPreferenceLoss("sigmoid", beta=base.beta, ld_alpha=0.5, backend="torch"))
    base_logs, fused_logs = _logs(base), _logs(fused)
    assert all(abs(fused_logs[0][k]) < 1e-5 for k in ("rewards/chosen", "rewards/rejected", "rewards/margins"))
    # Step 1's rewards are float32 noise around 0 here (the precomputed reference went through TRL's
    # kernel, the policy through pyfused_po's), so which side of 0 they fall on is arbitrary.
    _assert_same_logs(base_logs, fused_logs, skip_first=("rewards/accuracies",))


def test_rejects_trainers_without_fused_head_and_old_versions(monkeypatch):
    import types

    with pytest.raises(TypeError, match="DPOTrainer"):
        pfi.apply(object())
    with pytest.raises(TypeError, match="never calls model"):  # a trainer whose model TRL did not patch
        pfi.apply(types.SimpleNamespace(model=tiny_model()))
    monkeypatch.setattr(pfi.metadata, "version", lambda name: "1.15.0")
    assert pfi.check_trl_version() == "1.15.0"  # same protocol as 1.16: accepted
    for old in ("1.8.0", "0.24.0"):  # axolotl's and LLaMA-Factory's pins
        monkeypatch.setattr(pfi.metadata, "version", lambda name, old=old: old)
        with pytest.raises(RuntimeError, match=rf"trl=={old}.*model_preference_loss"):
            pfi.apply(object())


def test_rejects_a_release_whose_protocol_differs(monkeypatch):
    from trl.trainer import utils

    def add_fused_lm_head(model, temperature=1.0):  # a hypothetical release without outputs=
        pass

    monkeypatch.setattr(utils, "add_fused_lm_head", add_fused_lm_head)
    with pytest.raises(RuntimeError, match=r"add_fused_lm_head lacks \['cast_lm_head_to_fp32', 'outputs'\]"):
        pfi.check_trl_version()


def _float64_token_logps(model, ids, labels, temperature):
    """Independent reference: log-softmax of the model's own logits / T, and the entropy."""
    with torch.no_grad():
        logits = model(input_ids=ids).logits.double()[:, :-1] / temperature
    logp = torch.log_softmax(logits, -1)
    y = labels[:, 1:]
    mask = y != -100
    token = logp.gather(-1, y.clamp(min=0)[..., None])[..., 0] * mask
    entropy = -(logp.exp() * logp).sum(-1) * mask
    return token, entropy


def test_apply_model_keeps_trl_temperature_and_settings():
    """GRPO/RLOO patch with temperature=0.7 (and GRPO cast_lm_head_to_fp32): apply(model) keeps them."""
    from trl.trainer.utils import add_fused_lm_head

    model = tiny_model()
    add_fused_lm_head(model, temperature=0.7, cast_lm_head_to_fp32=True, outputs=("log_probs", "entropy"))
    ids = torch.randint(3, model.config.vocab_size, (3, 8), generator=torch.Generator().manual_seed(5))
    labels = ids.clone()
    labels[:, :3] = -100
    with torch.no_grad():
        trl_out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    pfi.apply(model)
    assert pfi.trl_head_settings(model) == dict(temperature=0.7, cast_lm_head_to_fp32=True,
                                                outputs=("log_probs", "entropy"))
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
    token, entropy = _float64_token_logps(model, ids, labels, 0.7)
    torch.testing.assert_close(out.log_probs.double(), token, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.entropy.double(), entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.log_probs, trl_out.log_probs, rtol=1e-4, atol=1e-5)
    assert out.mean_logits is None and out.is_top1 is None  # TRL's outputs, not more
    # Explicit arguments still win; a model TRL never patched gets temperature 1 and every output.
    plain = pfi.patch_model(tiny_model(), temperature=2.0)
    assert pfi.trl_head_settings(plain)["temperature"] == 2.0
    assert pfi.trl_head_settings(pfi.patch_model(tiny_model()))["outputs"] == pfi._ALL_OUTPUTS


def test_fsdp1_wrapped_reference_is_patched_inside_the_wrapper(tmp_path):
    """FSDP1 holds flat shards outside its forward: the fused forward must go on the wrapped
    module (run inside FSDP's forward, parameters unsharded), not on the wrapper, where it read a
    1-D shard as the head ('weight' must be 2-D on several ranks).  One gloo rank (NO_SHARD)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP
    from trl.trainer.utils import add_fused_lm_head

    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs torch.distributed with gloo")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/store", rank=0, world_size=1)
    try:
        model = tiny_model()
        add_fused_lm_head(model)  # as DPOTrainer does before prepare_fsdp(ref_model)
        ids = torch.randint(3, model.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(2))
        with torch.no_grad():
            expected = model(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        wrapped = FSDP(model, device_id=torch.device("cpu"))
        pfi.patch_model(wrapped)
        assert "forward" not in vars(wrapped)  # FSDP's own forward still unshards
        assert "_pyfused_po_fused_forward" in vars(wrapped.module)
        with torch.no_grad():
            got = wrapped(input_ids=ids, labels=ids, fused_lm_head=True).log_probs
        torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    finally:
        dist.destroy_process_group()


class _MatmulFlops(torch.utils._python_dispatch.TorchDispatchMode):
    """2·m·k·n of every matmul-family aten op run under it (mm, addmm, addmm_, bmm, baddbmm)."""

    OPERANDS = {"mm": (0, 1), "addmm": (1, 2), "addmm_": (1, 2), "bmm": (0, 1), "baddbmm": (1, 2)}

    def __init__(self):
        super().__init__()
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        where = self.OPERANDS.get(func.overloadpacket.__name__)
        if where is not None:
            a, b = args[where[0]], args[where[1]]
            self.flops += 2 * a.shape[-2] * a.shape[-1] * b.shape[-1] * (a.shape[0] if a.dim() == 3 else 1)
        return func(*args, **(kwargs or {}))


def _one_step(trainer, count=False, batch=None):
    """One compute_loss + backward on the first batch (or ``batch``): (loss, grads, logged metrics,
    matmul FLOPs, the loss module's inputs when it ran)."""
    batch = next(iter(trainer.get_train_dataloader())) if batch is None else batch
    trainer.model.zero_grad(set_to_none=True)
    trainer.model.train()
    for values in trainer._metrics.values():
        values.clear()
    seen, hook = {}, None
    loss_fn = getattr(trainer, "pyfused_po_loss", None)
    if loss_fn is not None:
        hook = loss_fn.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    counter = _MatmulFlops()
    with counter if count else contextlib.nullcontext():
        loss = trainer.compute_loss(trainer.model, trainer._prepare_inputs(batch))
        loss.backward()
    if hook is not None:
        hook.remove()
    grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters() if p.grad is not None}
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items() if v}  # cleared keys stay, empty
    trainer.model.zero_grad(set_to_none=True)
    return loss, grads, metrics, counter.flops, seen


def test_use_preference_loss_matches_trl_sigmoid(tmp_path):
    """The three-GEMM plan runs under use_preference_loss (one LM-head GEMM fewer than the
    staged plan, counted); its loss, gradients and every logged metric, TRL's token metrics
    (entropy, mean_token_accuracy, num_tokens) included, equal TRL's own step and the staged
    plan's; so does every other DPOTrainer loss type (one step each); then two training steps
    log what TRL logs."""
    from pyfused_po import FusedPreferenceLoss

    base, fused = _dpo(tmp_path, "base", loss_type="sigmoid"), _dpo(tmp_path, "fused", loss_type="sigmoid")
    loss_fn = FusedPreferenceLoss("sigmoid", beta=base.beta, backend="torch")
    pfi.use_preference_loss(fused, loss_fn)
    loss, grads, metrics, flops, seen = _one_step(fused, count=True)
    assert "StoredGradient" in type(loss.grad_fn).__name__
    assert "fused_gradient" not in vars(loss_fn) and "token_capture" not in vars(loss_fn)
    loss_fn.fused_gradient = False
    s_loss, s_grads, s_metrics, s_flops, _ = _one_step(fused, count=True)
    assert "StoredGradient" not in type(s_loss.grad_fn).__name__
    M = int((seen["labels"] != -100).sum())
    V, D = seen["weight"].shape
    assert s_flops - flops == 2 * M * D * V  # the backward's logits recompute is gone
    b_loss, b_grads, b_metrics, _, _ = _one_step(base)
    assert {"entropy", "mean_token_accuracy"} <= set(metrics) and metrics.keys() == b_metrics.keys()
    for key in b_metrics:
        if key != "num_tokens":  # a running total: the staged step was this trainer's second
            assert math.isclose(metrics[key], s_metrics[key], rel_tol=1e-6, abs_tol=1e-7), key
        assert math.isclose(metrics[key], b_metrics[key], rel_tol=RTOL, abs_tol=ATOL), (key, metrics[key], b_metrics[key])
    torch.testing.assert_close(loss.detach(), b_loss.detach(), rtol=RTOL, atol=ATOL)
    for name, g in b_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=RTOL, atol=1e-5, msg=name)
        torch.testing.assert_close(grads[name], s_grads[name], rtol=1e-5, atol=1e-7, msg=name)
    del loss_fn.fused_gradient
    _every_trl_loss_type(base, fused)
    for trainer in (base, fused):  # the checks above ran extra steps: restart the running token count
        trainer._total_train_tokens = 0
    base_logs = _logs(base)
    assert {"entropy", "mean_token_accuracy", "num_tokens"} <= set(base_logs[0])
    _assert_same_logs(base_logs, _logs(fused))


def _every_trl_loss_type(base, fused):
    """Every DPOTrainer loss type through use_preference_loss (``fused`` already switched): the
    three-GEMM plan runs (the batch-sorting AOT losses fall back to the staged plan) and one step's
    loss, gradients and logged metrics equal TRL's.  The loss type is switched on both trainers
    (building trainers per type would cost seconds each); the caller's settings are restored."""
    from pyfused_po import FusedPreferenceLoss
    from pyfused_po.integrations.trl_preference_loss import TRL_DPO_LOSS_TYPES, dpo_config_mismatches
    from pyfused_po.objectives import get_objective

    saved = [(t, t.loss_types, t.loss_weights, t.label_smoothing) for t in (base, fused)]
    own_loss = fused.pyfused_po_loss
    for trainer in (base, fused):  # equal running token counts from here on
        trainer._total_train_tokens = 0
    batches = {id(t): next(iter(t.get_train_dataloader())) for t in (base, fused)}
    for loss_type in sorted(TRL_DPO_LOSS_TYPES):
        # TRL 1.16 smooths labels in exo_pair (where it must be > 0) and robust, not in sigmoid.
        eps = 0.1 if loss_type in ("exo_pair", "robust") else 0.0
        for trainer in (base, fused):
            trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = [loss_type], [1.0], eps
        smoothing = {"label_smoothing": eps} if "label_smoothing" in get_objective(loss_type).hyperparameters else {}
        loss_fn = FusedPreferenceLoss(loss_type, beta=base.beta, backend="torch", **smoothing)
        fused.pyfused_po_loss = loss_fn
        assert dpo_config_mismatches(fused, loss_fn) == []
        loss, grads, metrics, _, _ = _one_step(fused, batch=batches[id(fused)])
        assert ("StoredGradient" in type(loss.grad_fn).__name__) == (loss_type not in ("aot", "aot_unpaired"))
        b_loss, b_grads, b_metrics, _, _ = _one_step(base, batch=batches[id(base)])
        torch.testing.assert_close(loss.detach(), b_loss.detach(), rtol=RTOL, atol=ATOL, msg=loss_type)
        for name, g in b_grads.items():
            torch.testing.assert_close(grads[name], g, rtol=RTOL, atol=1e-5, msg=lambda m, n=name: f"{loss_type} {n}: {m}")
        # pyfused_po logs its objective's own extras too (bco_pair: bco_delta, sft: nll_loss).
        assert set(b_metrics) <= set(metrics) and set(metrics) - set(b_metrics) <= {"bco_delta", "nll_loss"}, loss_type
        assert "entropy" in metrics and "mean_token_accuracy" in metrics
        for key in b_metrics:
            assert math.isclose(metrics[key], b_metrics[key], rel_tol=RTOL, abs_tol=ATOL), (loss_type, key)
    for trainer, types, weights, eps in saved:
        trainer.loss_types, trainer.loss_weights, trainer.label_smoothing = types, weights, eps
    fused.pyfused_po_loss = own_loss
