"""Issue 26, classes 7 and 8: an input given twice is refused, and every per-token input must be
shaped exactly like ``labels``.

Class 7: ``hf.model_preference_loss(..., ref_model=m, ref_chosen_logps=a, ref_rejected_logps=b)``
used ``ref_model`` and dropped the sums (the issue's example: loss 0.711 against 0.0069).  Class 8:
``sequence_sums(token_values [1, T], labels [4, T])`` broadcast into four "sums" of the first row.
Both now raise a ``ValueError`` naming the inputs before anything runs.
"""
import os

import pytest
import torch

import pyfused_po
from pyfused_po.validation import check_exclusive, check_per_token

os.environ["HF_HUB_OFFLINE"] = "1"


# ----------------------------------------------------------------------------- class 8: per-token shapes

@pytest.mark.parametrize("values_rows,label_rows", [(1, 4), (4, 1)])
def test_sequence_sums_refuses_token_values_broadcast_against_labels(values_rows, label_rows):
    values, labels = torch.randn(values_rows, 6), torch.zeros(label_rows, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"token_values must have the shape of labels"):
        pyfused_po.sequence_sums(values, labels)


@pytest.mark.parametrize("weights_shape", [(4, 1), (1, 6), (6,)])
def test_sequence_sums_refuses_broadcast_token_weights(weights_shape):
    values, labels = torch.randn(4, 6), torch.zeros(4, 6, dtype=torch.long)
    with pytest.raises(ValueError, match=r"token_weights must have the shape of labels \(4, 6\)"):
        pyfused_po.sequence_sums(values, labels, token_weights=torch.ones(weights_shape))


@pytest.mark.parametrize("weights_shape", [(1,), (1, 1)])
def test_packed_sequence_sums_refuses_broadcast_token_weights(weights_shape):
    labels = torch.zeros(1, 5, dtype=torch.long)
    with pytest.raises(ValueError, match=r"token_weights must have the shape of labels \(1, 5\)"):
        pyfused_po.sequence_sums(torch.randn(1, 5), labels, cu_seqlens=torch.tensor([0, 2, 5]),
                                 token_weights=torch.full(weights_shape, 2.0))


def test_sequence_parallel_sums_checks_through_sequence_sums():
    # sequence_parallel_sums runs sequence_sums on the rank's slice first: the check fires before
    # any collective, so no process group is needed to see it.
    with pytest.raises(ValueError, match="token_values must have the shape of labels"):
        pyfused_po.sequence_parallel_sums(torch.randn(1, 6), torch.zeros(4, 6, dtype=torch.long), group=None)


def test_sequence_sums_still_sums_when_shapes_agree():
    values = torch.tensor([[1.0, 2.0, 4.0], [8.0, 16.0, 32.0]], dtype=torch.float64)
    labels = torch.tensor([[0, -100, 1], [-100, 2, 3]])
    weights = torch.tensor([[0.5, 9.0, 2.0], [9.0, 1.0, 0.25]], dtype=torch.float64)
    out = pyfused_po.sequence_sums(values, labels, token_weights=weights)
    assert out.logps.tolist() == [1.0 * 0.5 + 4.0 * 2.0, 16.0 + 32.0 * 0.25]
    assert out.lengths.tolist() == [2.0, 2.0]


def test_check_per_token_names_input_and_accepts_masks():
    labels = torch.zeros(2, 3, dtype=torch.long)
    check_per_token(labels, floating=None, mask=torch.ones(2, 3, dtype=torch.bool), weights=None)
    with pytest.raises(ValueError, match=r"loss_mask must have the shape of labels \(2, 3\) .*got \(2, 1\)"):
        check_per_token(labels, floating=None, loss_mask=torch.ones(2, 1, dtype=torch.bool))
    with pytest.raises(TypeError, match="token_weights must be a floating tensor"):
        check_per_token(labels, token_weights=torch.ones(2, 3, dtype=torch.long))


# ----------------------------------------------------------------------------- class 7: one source each

def test_check_exclusive_names_every_source_given():
    check_exclusive("reference source", a=None, b=torch.zeros(1), c=None)
    with pytest.raises(ValueError, match="pass one reference source, not both: got a and c"):
        check_exclusive("reference source", a=1, b=None, c=torch.zeros(1))
    with pytest.raises(ValueError, match="pass one KL estimate, not several: got a and b and c"):
        check_exclusive("KL estimate", a=1, b=2, c=3)


@pytest.fixture(scope="module")
def tiny():
    pytest.importorskip("transformers")
    from _hf_tiny import tiny_model
    from pyfused_po.integrations import hf

    model, ref = tiny_model(seed=0), tiny_model(seed=1)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (4, 7), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    loss_fn = pyfused_po.FusedPreferenceLoss("sigmoid", beta=0.1, backend="torch", **hf.lm_head_transform(model))
    return hf, model, ref, ids, labels, loss_fn


def test_hf_ref_model_and_precomputed_sums_is_refused(tiny):
    hf, model, ref, ids, labels, loss_fn = tiny
    sums = dict(ref_chosen_logps=torch.tensor([-20.0, -22.0]), ref_rejected_logps=torch.tensor([-21.0, -19.5]))
    with pytest.raises(ValueError, match="pass one reference source, not both: got ref_model and "
                                         "ref_chosen_logps/ref_rejected_logps"):
        hf.model_preference_loss(model, loss_fn, ids, labels, ref_model=ref, **sums)
    # Each source alone still works, and they differ (so dropping one was a wrong loss, not a no-op).
    by_model = hf.model_preference_loss(model, loss_fn, ids, labels, ref_model=ref).loss
    by_sums = hf.model_preference_loss(model, loss_fn, ids, labels, **sums).loss
    assert torch.isfinite(by_model) and torch.isfinite(by_sums) and not torch.allclose(by_model, by_sums)


def test_hf_packed_ref_model_and_precomputed_sums_is_refused(tiny):
    hf, model, ref, ids, labels, loss_fn = tiny
    sums = dict(ref_chosen_logps=torch.tensor([-20.0]), ref_rejected_logps=torch.tensor([-21.0]))
    with pytest.raises(ValueError, match="got ref_model and ref_chosen_logps/ref_rejected_logps"):
        hf.model_preference_loss(model, loss_fn, ids[:2].reshape(1, -1), labels[:2].reshape(1, -1),
                                 cu_seqlens=torch.tensor([0, 7, 14]), ref_model=ref, **sums)


def test_hf_ref_model_and_ref_token_logps_is_refused(tiny):
    hf, model, ref, ids, labels, loss_fn = tiny
    with pytest.raises(ValueError, match="got ref_model and ref_token_logps"):
        hf.model_preference_loss(model, loss_fn, ids, labels, ref_model=ref,
                                 ref_token_logps=torch.zeros(labels.shape))


def test_hf_one_of_two_precomputed_sums_is_refused(tiny):
    hf, model, ref, ids, labels, loss_fn = tiny
    with pytest.raises(ValueError, match="ref_chosen_logps and ref_rejected_logps together"):
        hf.model_preference_loss(model, loss_fn, ids, labels, ref_chosen_logps=torch.tensor([-20.0, -22.0]))


@pytest.mark.parametrize("name,shape", [("attention_mask", (1, 7)), ("input_ids", (2, 7)),
                                        ("token_weights", (4, 1)), ("ref_token_logps", (1, 7))])
def test_hf_per_token_inputs_must_match_labels(tiny, name, shape):
    hf, model, ref, ids, labels, loss_fn = tiny
    kwargs = dict(attention_mask=torch.ones(4, 7, dtype=torch.long))
    if name == "input_ids":
        ids = ids[:2]
    elif name == "attention_mask":
        kwargs[name] = torch.ones(shape, dtype=torch.long)
    else:
        kwargs[name] = torch.ones(shape)
    with pytest.raises(ValueError, match=rf"{name} must have the shape of labels \(4, 7\)"):
        hf.model_preference_loss(model, loss_fn, ids, labels, **kwargs)


def test_merge_labels_refuses_extra_labels_broadcast():
    from pyfused_po.sequence.sums import merge_labels

    labels = torch.full((4, 5), -100)
    with pytest.raises(ValueError, match=r"nll_labels must have the shape of labels \(4, 5\)"):
        merge_labels(labels, torch.zeros(1, 5, dtype=torch.long))


def test_hf_packed_called_directly_refuses_two_sources(tiny):
    from pyfused_po.integrations.hf_packed import packed_model_preference_loss

    hf, model, ref, ids, labels, loss_fn = tiny
    with pytest.raises(ValueError, match="got ref_model and ref_chosen_logps/ref_rejected_logps"):
        packed_model_preference_loss(model, loss_fn, ids[:2].reshape(1, -1), labels[:2].reshape(1, -1), None,
                                     position_ids=None, cu_seqlens=torch.tensor([0, 7, 14]), ref_model=ref,
                                     ref_chosen_logps=torch.tensor([-20.0]), ref_rejected_logps=torch.tensor([-21.0]),
                                     shift=True, loss_kwargs={})
