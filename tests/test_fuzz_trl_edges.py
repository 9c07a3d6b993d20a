"""Differential fuzz of the TRL integration's edges (issue 26 classes 1, 3 and 4).

* Sequences of patches on one model, as a pipeline of trainers does (TRL's ``add_fused_lm_head``
  with random settings, pyfused_po's ``apply`` / ``patch_model``): after each step the settings in
  force are the last patch's, the fused log-probs are the float64 log-softmax of the class
  forward's logits at that temperature, and the plain forward is the class forward.
* Copies of patched models (``copy.deepcopy`` at random points, weights moved afterwards): every
  model computes with its own weights and its own settings.
* ``use_preference_loss`` option combinations against TRL's loss: a random ``FusedPreferenceLoss``
  and a random DPOConfig; whenever :func:`dpo_config_mismatches` accepts the pair, the module's loss
  equals TRL 1.16's loss of that DPOConfig, written here independently in float64 from its formulas.

Seeds are fixed; each case is small (tiny Llama, torch backend) so the file runs in well under a
minute on 2 cores.
"""
import copy
import math
import os
import random
import types

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
pytest.importorskip("transformers")
pytest.importorskip("trl")
import torch  # noqa: E402

from _hf_tiny import tiny_model  # noqa: E402

pfi = pytest.importorskip("pyfused_po.integrations.trl")

_OUTPUTS = ("log_probs", "entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _batch(seed):
    ids = torch.randint(3, 61, (2, 6), generator=torch.Generator().manual_seed(seed))
    labels = ids.clone()
    labels[:, :2] = -100
    return ids, labels


def _reference(model, ids, labels, temperature):
    """float64 per-token log-probs from the class forward's logits (no patch on the path)."""
    with torch.no_grad():
        logits = type(model).forward(model, input_ids=ids).logits.double()[:, :-1] / temperature
    y = labels[:, 1:]
    return torch.log_softmax(logits, -1).gather(-1, y.clamp(min=0)[..., None])[..., 0] * (y != -100)


def _check_model(model, settings, seed):
    """``model`` runs with ``settings`` (what the last patch set), its own weights, in both forwards."""
    ids, labels = _batch(seed)
    assert pfi.trl_head_settings(model) == settings
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels, fused_lm_head=True)
        torch.testing.assert_close(model(input_ids=ids).logits, type(model).forward(model, input_ids=ids).logits)
    torch.testing.assert_close(out.log_probs.double(), _reference(model, ids, labels, settings["temperature"]),
                               rtol=1e-5, atol=1e-5)
    for name in _OUTPUTS[1:]:
        assert (getattr(out, name) is None) == (name not in settings["outputs"]), name


def _random_trl_settings(rng):
    extra = tuple(o for o in _OUTPUTS[1:] if rng.random() < 0.5)
    return dict(temperature=rng.choice([1.0, 0.7, 1.3]), cast_lm_head_to_fp32=rng.random() < 0.5,
                outputs=("log_probs",) + extra)


@pytest.mark.parametrize("seed", range(3))
def test_sequences_of_patches_on_one_model(seed):
    """A random pipeline: TRL patches (a new trainer), pyfused_po's apply (keeps TRL's settings) or
    patch_model with an explicit temperature, four steps."""
    from trl.trainer.utils import add_fused_lm_head

    rng = random.Random(seed)
    model = tiny_model()
    settings = _random_trl_settings(rng)
    add_fused_lm_head(model, **settings)
    for step in range(4):
        action = rng.choice(["trl", "apply", "patch"])
        if action == "trl":
            settings = _random_trl_settings(rng)
            add_fused_lm_head(model, **settings)
        elif action == "apply":
            pfi.apply(model, backend="torch")
        else:
            settings = dict(settings, temperature=rng.choice([0.5, 2.0]))
            pfi.patch_model(model, temperature=settings["temperature"], backend="torch")
        if action != "trl":  # TRL's own forward is TRL's business; ours must follow the last patch
            _check_model(model, settings, seed * 10 + step)
        else:
            assert pfi.trl_head_settings(model) == settings


@pytest.mark.parametrize("seed", range(3))
def test_copies_of_patched_models(seed):
    """Deep copies taken at random points of a patch sequence, then every model's weights moved by
    a different amount: each computes with its own weights and settings; gradients stay its own."""
    from trl.trainer.utils import add_fused_lm_head

    rng = random.Random(100 + seed)
    models = [tiny_model()]
    settings = [_random_trl_settings(rng)]
    add_fused_lm_head(models[0], **settings[0])
    pfi.apply(models[0], backend="torch")
    for _ in range(3):
        i = rng.randrange(len(models))
        if rng.random() < 0.6:
            models.append(copy.deepcopy(models[i]))
            settings.append(dict(settings[i]))
        else:
            settings[i] = dict(settings[i], temperature=rng.choice([0.5, 2.0]))
            pfi.patch_model(models[i], temperature=settings[i]["temperature"], backend="torch")
    with torch.no_grad():
        for k, model in enumerate(models):
            for p in model.parameters():
                p.add_(0.3 * (k + 1))
    for k, (model, expected) in enumerate(zip(models, settings)):
        _check_model(model, expected, seed * 10 + k)
    ids, labels = _batch(seed)
    target = rng.randrange(len(models))
    models[target](input_ids=ids, labels=labels, fused_lm_head=True).loss.backward()
    for k, model in enumerate(models):
        assert (model.get_output_embeddings().weight.grad is not None) == (k == target)


# ---- use_preference_loss options against TRL's loss -------------------------------------------------

_SIMPLE_TYPES = ("sigmoid", "hinge", "robust", "exo_pair", "bco_pair", "nca_pair", "sppo_hard", "apo_zero",
                 "apo_down", "discopop")


def _trl_loss(kind, beta, eps, tau, pc, pr, rc, rr):
    """TRL 1.16 DPOTrainer's per-pair loss (reverse KL, no LD/WPO), float64, from its formulas."""
    lc, lr = pc - rc, pr - rr
    d = lc - lr
    logsig = torch.nn.functional.logsigmoid
    if kind == "sigmoid":
        return -logsig(beta * d)
    if kind == "hinge":
        return torch.relu(1 - beta * d)
    if kind == "robust":
        return (-(1 - eps) * logsig(beta * d) + eps * logsig(-beta * d)) / (1 - 2 * eps)
    if kind == "exo_pair":
        q = torch.sigmoid(beta * d)
        return q * (logsig(beta * d) - math.log1p(-eps)) + (1 - q) * (logsig(-beta * d) - math.log(eps))
    if kind == "bco_pair":
        return -logsig(beta * lc) - logsig(-beta * lr)
    if kind == "nca_pair":
        return -logsig(beta * lc) - 0.5 * logsig(-beta * lc) - 0.5 * logsig(-beta * lr)
    if kind == "sppo_hard":
        return (lc - 0.5 / beta) ** 2 + (lr + 0.5 / beta) ** 2
    if kind == "apo_zero":
        return 1 - torch.sigmoid(beta * lc) + torch.sigmoid(beta * lr)
    if kind == "apo_down":
        return torch.sigmoid(beta * lc) + 1 - torch.sigmoid(beta * (lc - lr))
    assert kind == "discopop"
    z = beta * d
    m = torch.sigmoid(z / tau)
    return -logsig(z) * (1 - m) + torch.exp(-z) * m


def _random_loss_fn(rng, trainer_type, trl_eps, trl_tau, trl_beta):
    from pyfused_po import FusedPreferenceLoss
    from pyfused_po.objectives import get_objective

    kind = trainer_type if rng.random() < 0.7 else rng.choice(_SIMPLE_TYPES)
    kw = dict(beta=trl_beta if rng.random() < 0.8 else 0.3)
    takes = get_objective(kind).hyperparameters
    if "label_smoothing" in takes and rng.random() < 0.6:
        kw["label_smoothing"] = rng.choice([0.0, trl_eps, 0.2])
    if "bco_delta" in takes and rng.random() < 0.6:
        kw["bco_delta"] = rng.choice([0.0, 0.5])
    if "discopop_tau" in takes and rng.random() < 0.6:
        kw["discopop_tau"] = rng.choice([trl_tau, 0.2])
    if rng.random() < 0.2:
        kw["reduction"] = "sum"
    return FusedPreferenceLoss(kind, **kw)


def test_use_preference_loss_options_against_trl_loss():
    """Whatever dpo_config_mismatches accepts computes TRL's loss (1e-9 in float64); every
    difference from TRL's loss is refused.  Both outcomes occur many times."""
    from pyfused_po.integrations.trl_preference_loss import dpo_config_mismatches
    from pyfused_po.objectives.preference_loss import preference_loss

    rng = random.Random(7)
    gen = torch.Generator().manual_seed(7)
    accepted = refused = 0
    for case in range(200):
        kind = rng.choice(_SIMPLE_TYPES)
        eps = rng.choice([0.05, 0.1]) if kind in ("exo_pair", "robust") else rng.choice([0.0, 0.1])
        tau, beta = rng.choice([0.05, 0.1]), rng.choice([0.1, 0.5])
        trainer = types.SimpleNamespace(
            args=types.SimpleNamespace(loss_weights=None, discopop_tau=tau), loss_types=[kind], loss_weights=[1.0],
            beta=beta, ld_alpha=None, use_weighting=False, f_divergence_type="reverse_kl", label_smoothing=eps)
        try:
            loss_fn = _random_loss_fn(rng, kind, eps, tau, beta)
        except (ValueError, TypeError):
            continue  # a combination pyfused_po itself rejects
        sums = [-torch.rand(4, generator=gen, dtype=torch.float64) * 20 for _ in range(4)]
        got = preference_loss(*sums, loss_type=loss_fn.loss_type, beta=loss_fn.beta, reduction=loss_fn.reduction,
                              **loss_fn.hyperparameters).loss
        want = _trl_loss(kind, beta, eps, tau, *sums).mean()
        if dpo_config_mismatches(trainer, loss_fn):
            refused += 1
        else:
            accepted += 1
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-12, msg=f"case {case}: {loss_fn}")
    assert accepted > 30 and refused > 30, (accepted, refused)
