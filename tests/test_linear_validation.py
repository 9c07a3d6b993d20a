"""linear_token_logprobs: bad input fails with a clear error before any kernel runs."""
import pytest
import torch

from pyfused_po.token.linear_token_logprobs import linear_token_logprobs


def inputs(T=5, D=8, V=20):
    return torch.randn(2, T, D), torch.randn(V, D), torch.randint(0, V, (2, T))


def test_hidden_dim_mismatch_names_both_shapes():
    hidden, _, labels = inputs()
    weight = torch.randn(20, 9)
    with pytest.raises(ValueError, match=r"hidden \(2, 5, 8\) and weight \(20, 9\)"):
        linear_token_logprobs(hidden, weight, labels)


def test_labels_shape_mismatch():
    hidden, weight, _ = inputs()
    with pytest.raises(ValueError, match=r"labels.shape.*got hidden \(2, 5, 8\) and labels \(2, 4\)"):
        linear_token_logprobs(hidden, weight, torch.zeros(2, 4, dtype=torch.long))


@pytest.mark.parametrize("name", ["weight", "bias"])
def test_dtype_mismatch(name):
    hidden, weight, labels = inputs()
    bias = torch.zeros(20)
    if name == "weight":
        weight = weight.double()
    else:
        bias = bias.half()
    with pytest.raises(TypeError, match=rf"{name} must have the dtype of hidden \(torch.float32\)"):
        linear_token_logprobs(hidden, weight, labels, bias=bias)


def test_bad_kinds_and_shapes():
    hidden, weight, labels = inputs()
    with pytest.raises(TypeError, match="labels must be an integer tensor"):
        linear_token_logprobs(hidden, weight, labels.float())
    with pytest.raises(TypeError, match="hidden must be a floating tensor"):
        linear_token_logprobs(labels.unsqueeze(-1), weight, labels)
    with pytest.raises(ValueError, match=r"weight must be \[vocab, hidden_dim\]"):
        linear_token_logprobs(hidden, weight.unsqueeze(0), labels)
    with pytest.raises(ValueError, match=r"bias must have shape \(20,\).*got \(19,\)"):
        linear_token_logprobs(hidden, weight, labels, bias=torch.zeros(19))


def test_bad_options():
    hidden, weight, labels = inputs()
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_token_logprobs(hidden, weight, labels, impl="cce")
    with pytest.raises(ValueError, match="impl='fused' runs Triton kernels"):
        linear_token_logprobs(hidden, weight, labels, backend="torch", impl="fused")
    with pytest.raises(ValueError, match="chunk_tokens must be None or an int >= 1, got 0"):
        linear_token_logprobs(hidden, weight, labels, chunk_tokens=0)
    with pytest.raises(ValueError, match="unknown extras"):
        linear_token_logprobs(hidden, weight, labels, extras=("perplexity",))
    with pytest.raises(ValueError, match="temperature must be a finite number > 0"):
        linear_token_logprobs(hidden, weight, labels, temperature=0.0)


def test_label_out_of_range():
    hidden, weight, labels = inputs()
    labels[0, 0] = 20
    with pytest.raises(ValueError, match=r"labels must be in \[0, 20\)"):
        linear_token_logprobs(hidden, weight, labels)
