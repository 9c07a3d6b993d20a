"""Bad packed layouts get a named error before any kernel runs.

Every case runs on the Triton backend with a kernel launcher that fails if reached, so an
error raised from inside a kernel (or no error) fails the test.
"""
import pytest
import torch

import pyfused_po
from pyfused_po import FusedKTOLoss, FusedPreferenceLoss

V = 7


@pytest.fixture(autouse=True)
def no_kernels(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("a kernel launched before the bad input was caught")
    from pyfused_po import _backend
    real = _backend.token_ops

    def ops(backend):
        mod = real(backend)
        return type("NoKernels", (), {"token_forward": staticmethod(fail), "token_backward": staticmethod(fail),
                                       "__getattr__": lambda self, n: getattr(mod, n)})()
    monkeypatch.setattr(_backend, "token_ops", ops)


def stream(n=8):
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, n, V, generator=g), torch.randint(0, V, (1, n), generator=g)


CU_CASES = [
    ("not starting at 0", torch.tensor([1, 3, 8]), ValueError, "must start at 0"),
    ("not increasing", torch.tensor([0, 5, 3, 8]), ValueError, "non-decreasing"),
    ("not ending at N", torch.tensor([0, 3, 7]), ValueError, "must end at the number of tokens N = 8"),
    ("float dtype", torch.tensor([0.0, 3.0, 8.0]), TypeError, "integer tensor"),
    ("2-D", torch.tensor([[0, 3, 8]]), ValueError, "1-D"),
    ("not a tensor", [0, 3, 8], TypeError, "must be a torch.Tensor"),
]


@pytest.mark.parametrize("what, cu, error, match", CU_CASES, ids=[c[0] for c in CU_CASES])
def test_bad_cu_seqlens_token_stage(what, cu, error, match):
    logits, labels = stream()
    with pytest.raises(error, match=match):
        pyfused_po.token_logprobs(logits, labels, shift=True, backend="triton", cu_seqlens=cu)


@pytest.mark.parametrize("what, cu, error, match", CU_CASES, ids=[c[0] for c in CU_CASES])
def test_bad_cu_seqlens_module(what, cu, error, match):
    logits, labels = stream()
    with pytest.raises(error, match=match):
        FusedPreferenceLoss("simpo", backend="triton")(logits, labels, cu_seqlens=cu)


def test_cu_seqlens_on_another_device():
    logits, labels = stream()
    with pytest.raises(ValueError, match="cu_seqlens must be on the device of the tokens"):
        pyfused_po.token_logprobs(logits, labels, backend="triton", cu_seqlens=torch.tensor([0, 8], device="meta"))


def test_position_ids_not_starting_a_sequence():
    logits, labels = stream()
    with pytest.raises(ValueError, match=r"position_ids must start a sequence"):
        pyfused_po.token_logprobs(logits, labels, backend="triton", position_ids=torch.arange(1, 9)[None])
    with pytest.raises(ValueError, match="position_ids must have one entry per token"):
        pyfused_po.token_logprobs(logits, labels, backend="triton", position_ids=torch.arange(7)[None])


def test_two_layouts_at_once():
    logits, labels = stream()
    cu, pos = torch.tensor([0, 3, 8]), torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4]])
    with pytest.raises(ValueError, match="cu_seqlens and position_ids"):
        pyfused_po.token_logprobs(logits, labels, backend="triton", cu_seqlens=cu, position_ids=pos)
    with pytest.raises(ValueError, match="cu_seqlens and position_ids"):
        FusedPreferenceLoss("simpo", backend="triton")(logits, labels, cu_seqlens=cu, position_ids=pos)
    with pytest.raises(ValueError, match="pair_layout='interleaved' and chosen_index/rejected_index"):
        FusedPreferenceLoss("simpo", backend="triton")(logits, labels, cu_seqlens=cu, pair_layout="interleaved",
                                                        chosen_index=torch.tensor([0]), rejected_index=torch.tensor([1]))


def test_odd_sequence_count_for_a_paired_loss():
    logits, labels = stream()
    for layout in (None, "interleaved"):
        with pytest.raises(ValueError, match="even number of sequences .* got 3"):
            FusedPreferenceLoss("simpo", backend="triton")(logits, labels, cu_seqlens=torch.tensor([0, 2, 5, 8]),
                                                            pair_layout=layout)


@pytest.mark.parametrize("chosen, rejected, error, match", [
    (torch.tensor([0, 4]), torch.tensor([1, 2]), ValueError, r"chosen_index must hold sequence ids in \[0, 4\)"),
    (torch.tensor([0, 1]), torch.tensor([-1, 2]), ValueError, r"rejected_index must hold sequence ids in \[0, 4\)"),
    (torch.tensor([0, 1]), torch.tensor([2]), ValueError, "one entry per pair each"),
    (torch.tensor([0, 1]), torch.tensor([1, 2]), ValueError, "must not overlap"),
    (torch.tensor([0.0, 1.0]), torch.tensor([2, 3]), TypeError, "chosen_index must be an integer tensor"),
    (torch.tensor([0, 1]), None, ValueError, "chosen_index and rejected_index go together"),
], ids=["out of range", "negative", "length", "overlap", "dtype", "alone"])
def test_bad_explicit_indices(chosen, rejected, error, match):
    logits, labels = stream()
    with pytest.raises(error, match=match):
        FusedPreferenceLoss("simpo", backend="triton")(logits, labels, cu_seqlens=torch.tensor([0, 2, 4, 6, 8]),
                                                        chosen_index=chosen, rejected_index=rejected)


def test_unknown_pair_layout_and_bad_shapes():
    logits, labels = stream()
    cu = torch.tensor([0, 3, 8])
    with pytest.raises(ValueError, match="pair_layout must be one of"):
        FusedPreferenceLoss("simpo", backend="triton")(logits, labels, cu_seqlens=cu, pair_layout="zigzag")
    with pytest.raises(ValueError, match=r"packed labels must be \[1, N\] or \[N\]"):
        pyfused_po.token_logprobs(logits.view(2, 4, V), labels.view(2, 4), backend="triton", cu_seqlens=cu)
    with pytest.raises(ValueError, match="token_weights must have one value per packed token"):
        FusedPreferenceLoss("simpo", backend="triton")(logits, labels, cu_seqlens=cu, token_weights=torch.ones(1, 7))
    with pytest.raises(ValueError, match="logits must have shape labels.shape"):
        FusedPreferenceLoss("simpo", backend="triton")(logits[:, :7], labels, cu_seqlens=cu)


def test_kto_flags_per_packed_sequence():
    logits, labels = stream()
    module = FusedKTOLoss(backend="triton")
    with pytest.raises(ValueError, match=r"is_desirable must have shape \(2,\)"):
        module(logits, labels, torch.tensor([True, False, True]), ref_logps=torch.zeros(3),
               cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="must end at the number of tokens"):
        module(logits, labels, torch.tensor([True, False]), ref_logps=torch.zeros(2),
               cu_seqlens=torch.tensor([0, 3, 9]))


def test_token_offset_needs_sequence_parallel():
    logits, labels = stream()
    with pytest.raises(ValueError, match="token_offset= .* goes with sequence_parallel_group"):
        FusedPreferenceLoss("simpo", backend="triton")(logits, labels, cu_seqlens=torch.tensor([0, 3, 8]),
                                                        token_offset=0)


def test_the_guard_catches_a_kernel_launch():
    """The fixture is live: a valid packed call reaches the (failing) kernel launcher."""
    logits, labels = stream()
    with pytest.raises(AssertionError, match="a kernel launched"):
        pyfused_po.token_logprobs(logits, labels, shift=True, backend="triton", cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(AssertionError, match="a kernel launched"):
        FusedPreferenceLoss("simpo", backend="triton")(logits, labels, cu_seqlens=torch.tensor([0, 3, 8]))


def test_padded_pair_layout_needs_full_nll_labels():
    logits, labels = stream()
    logits, labels = logits.view(2, 4, V), labels.view(2, 4)
    with pytest.raises(ValueError, match="nll_labels must be shaped like labels"):
        FusedPreferenceLoss("sft", backend="triton")(logits, labels, nll_labels=labels[:1], pair_layout="interleaved")


def test_sequence_parallel_packed_needs_token_offset():
    logits, labels = stream()

    class FakeGroup:  # never used: the check runs before any collective
        pass

    module = FusedPreferenceLoss("simpo", backend="triton", sequence_parallel_group=FakeGroup())
    with pytest.raises(ValueError, match="needs token_offset="):
        module(logits, labels, cu_seqlens=torch.tensor([0, 3, 8]))
    with pytest.raises(ValueError, match="must end at or after token_offset"):
        module(logits, labels, cu_seqlens=torch.tensor([0, 3, 8]), token_offset=2)


def test_packed_entry_points_check_small_label_dtypes():
    """The packed route widens / refuses small label dtypes as the padded route does: uint8
    cannot hold ignore_index −100 (a label 156 would read as ignored), int8 gives int64's result."""
    cu = torch.tensor([0, 3, 7])
    labels = torch.tensor([[4, 1, 156, 2, 0, 3, 5]])
    values = torch.randn(1, 7, dtype=torch.float64)
    with pytest.raises(TypeError, match="cannot hold ignore_index"):
        pyfused_po.sequence_sums(values, labels.to(torch.uint8), shift=True, cu_seqlens=cu)
    with pytest.raises(TypeError, match="cannot hold ignore_index"):
        pyfused_po.token_logprobs(torch.randn(1, 7, 200), labels.to(torch.uint8), shift=True, cu_seqlens=cu,
                                  backend="torch")
    small = torch.tensor([[4, 1, -100, 2, 0, 3, 5]])
    want = pyfused_po.sequence_sums(values, small, shift=True, cu_seqlens=cu)
    got = pyfused_po.sequence_sums(values, small.to(torch.int8), shift=True, cu_seqlens=cu)
    torch.testing.assert_close(got.logps, want.logps)
    torch.testing.assert_close(got.lengths, want.lengths)
