"""The K = 4 demo (examples/listwise_smollm2.py) and its ranked data file.

* the shipped file parses, every group holds the pair's chosen / rejected answers and two model
  answers, scored by the stated rule (re-implemented here, not imported);
* the example's loss and gradients on a tiny random Llama equal a float64 recomputation from the
  model's full logits (plain ``log_softmax`` and the Plackett–Luce / all-pairs formulas written
  out below), on both backends;
* (slow) the same on the real model and the shipped data after one real training step.
"""
import copy
import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from pyfused_po.testing import ranked, smollm2

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "listwise_smollm2.py"


@pytest.fixture(scope="module")
def example():
    spec = importlib.util.spec_from_file_location("listwise_smollm2", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ---- the data file and its rule ------------------------------------------------------------

def _bag(text):
    """Lower-cased ASCII letter/digit runs, counted (written apart from ranked.words)."""
    counts = {}
    for word in "".join(c if c.isascii() and c.isalnum() else " " for c in text.lower()).split():
        counts[word] = counts.get(word, 0) + 1
    return counts


def _rule_score(answer, chosen):
    a, c = _bag(answer), _bag(chosen)
    common = sum(min(n, c.get(w, 0)) for w, n in a.items())
    if common == 0:
        return 1.0
    precision, recall = common / sum(a.values()), common / sum(c.values())
    return 1.0 + 2 * precision * recall / (precision + recall)


def test_ranked_file_follows_its_rule():
    groups = ranked.ranked_groups()
    pairs = {p["prompt"]: p for p in smollm2.preference_pairs()}
    assert 20 <= len(groups) <= len(pairs)
    assert len({g["prompt"] for g in groups}) == len(groups)
    for group in groups:
        pair = pairs[group["prompt"]]
        by_source = {r["source"]: r for r in group["responses"]}
        assert len(group["responses"]) == 4 and sorted(by_source) == ["chosen", "greedy", "rejected", "sampled"]
        assert by_source["chosen"]["text"] == pair["chosen"] and by_source["chosen"]["score"] == 3.0
        assert by_source["rejected"]["text"] == pair["rejected"] and by_source["rejected"]["score"] == 0.0
        for source in ("greedy", "sampled"):
            response = by_source[source]
            assert isinstance(response["text"], str)
            assert response["score"] == pytest.approx(_rule_score(response["text"], pair["chosen"]), abs=1e-12)
            assert 1.0 <= response["score"] <= 2.0
        scores = [r["score"] for r in group["responses"]]
        assert len(set(scores)) == 4, (group["prompt"], scores)  # Plackett–Luce ranks every member


@pytest.mark.parametrize("answer, chosen, expected", [
    ("Paris is the capital.", "The capital of France is Paris.", 1 + 2 * 4 / (4 + 6)),
    ("Lyon!", "The capital of France is Paris.", 1.0),
    ("a a b", "a b b", 1 + 2 * 2 / 6),
])
def test_rule_on_hand_cases(answer, chosen, expected):
    assert ranked.model_answer_score(answer, chosen) == pytest.approx(expected, abs=1e-15)
    assert _rule_score(answer, chosen) == pytest.approx(expected, abs=1e-15)


# ---- the example's loss against float64 full logits ---------------------------------------

def _sequence_logps64(model, input_ids, attention_mask, labels):
    """float64 summed log-probs of each row's labelled tokens from the model's full logits."""
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits.double()
    logp = torch.log_softmax(logits[:, :-1], dim=-1)
    target = labels[:, 1:]
    mask = target != -100
    token = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (token * mask).sum(1)


def _plackett_luce64(u, scores, K):
    losses = []
    for g in range(u.numel() // K):
        order = torch.argsort(scores[g * K:(g + 1) * K], descending=True)
        ranked_u = u[g * K:(g + 1) * K][order]
        losses.append(-sum(ranked_u[k] - torch.logsumexp(ranked_u[k:], 0) for k in range(K)))
    return torch.stack(losses).mean()


def _all_pairs_sigmoid64(u, scores, K):
    losses = []
    for g in range(u.numel() // K):
        rows = range(g * K, (g + 1) * K)
        pairs = [(i, j) for i, j in itertools.permutations(rows, 2) if scores[i] > scores[j]]
        losses.append(torch.stack([-F.logsigmoid(u[i] - u[j]) for i, j in pairs]).mean())
    return torch.stack(losses).mean()


REFERENCE_LOSSES = {"plackett_luce": _plackett_luce64, "sigmoid": _all_pairs_sigmoid64}


def _reference_loss(policy, ref_model, batch, loss_type, beta, K=4):
    input_ids, labels, attention_mask, scores = batch
    with torch.no_grad():
        ref = _sequence_logps64(ref_model, input_ids, attention_mask, labels)
    u = beta * (_sequence_logps64(policy, input_ids, attention_mask, labels) - ref)
    return REFERENCE_LOSSES[loss_type](u, scores.double(), K)


def _tiny_llama(seed):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(vocab_size=96, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                      max_position_embeddings=32)
    return transformers.LlamaForCausalLM(config).eval()


def _tiny_batch():
    """Two groups of 4 rows, 3 prompt tokens, response lengths 2..6, right padding."""
    torch.manual_seed(1)
    S, T = 8, 9
    input_ids = torch.randint(0, 96, (S, T))
    lengths = torch.tensor([5, 9, 7, 6, 8, 9, 5, 7])
    attention_mask = (torch.arange(T) < lengths[:, None]).long()
    labels = torch.where(attention_mask.bool(), input_ids, torch.full_like(input_ids, -100))
    labels[:, :3] = -100
    scores = torch.tensor([0.5, 2.0, 1.0, 3.0, 1.5, 0.25, 4.0, 2.5])
    return input_ids, labels, attention_mask, scores


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("loss_type", ["plackett_luce", "sigmoid"])
def test_example_loss_and_gradients_match_float64_full_logits(example, loss_type, backend):
    policy, ref_model = _tiny_llama(0), _tiny_llama(1)
    batch = _tiny_batch()
    beta = 2.0  # large enough that the two models' log-prob gaps move the loss well away from u = 0
    out = example.group_loss(policy, ref_model, batch, loss_type=loss_type, beta=beta, backend=backend)
    out.loss.backward()

    policy64 = copy.deepcopy(policy).double()
    policy64.zero_grad(set_to_none=True)
    expected = _reference_loss(policy64, copy.deepcopy(ref_model).double(), batch, loss_type, beta)
    expected.backward()
    at_zero = math.log(24) if loss_type == "plackett_luce" else math.log(2)  # the loss when every u = 0
    assert abs(float(expected.detach()) - at_zero) > 1e-3
    torch.testing.assert_close(out.loss.double(), expected.detach(), rtol=1e-5, atol=1e-6)
    for name in ("model.norm.weight", "model.embed_tokens.weight", "model.layers.0.mlp.up_proj.weight"):
        got = dict(policy.named_parameters())[name].grad
        want = dict(policy64.named_parameters())[name].grad
        torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-6, msg=name)


def test_example_metrics_per_rank_and_order(example):
    """The logged record: reward per rank position is the mean of β·(ℓ − ℓʳ) over the groups'
    members of that rank; the accuracy counts the ordered pairs whose rewards agree."""
    policy, ref_model = _tiny_llama(0), _tiny_llama(1)
    input_ids, labels, attention_mask, scores = batch = _tiny_batch()
    beta = 2.0
    with torch.no_grad():
        out = example.group_loss(policy, ref_model, batch, loss_type="plackett_luce", beta=beta, backend="torch")
        u = beta * (_sequence_logps64(policy, input_ids, attention_mask, labels)
                    - _sequence_logps64(ref_model, input_ids, attention_mask, labels))
    record = example.step_record(3, out)
    ranks, agree, pairs = [[], [], [], []], 0, 0
    for g in range(2):
        rows = list(range(4 * g, 4 * g + 4))
        for k, row in enumerate(sorted(rows, key=lambda r: -float(scores[r]))):
            ranks[k].append(float(u[row]))
        for i, j in itertools.permutations(rows, 2):
            if scores[i] > scores[j]:
                pairs += 1
                agree += bool(u[i] > u[j])
    assert record["step"] == 3
    assert record["rank_rewards"] == pytest.approx([sum(r) / 2 for r in ranks], abs=2e-5)  # fp32 sums of ~-40
    assert record["accuracy"] == pytest.approx(agree / pairs)


def test_batches_cycle_a_seeded_order(example):
    groups = list(range(5))
    steps = example.batches(groups, steps=4, groups_per_step=2)
    flat = [g for step in steps for g in step]
    assert [len(s) for s in steps] == [2, 2, 2, 2]
    assert sorted(flat[:5]) == groups  # every group once before any repeats
    assert steps == example.batches(groups, steps=4, groups_per_step=2)


@pytest.mark.parametrize("argv, named", [(["--steps", "0"], "--steps"), (["--runs", "sigmoid,nope"], "nope")])
def test_bad_arguments_are_named(example, argv, named, capsys):
    with pytest.raises(SystemExit):
        example.main(argv)
    assert named in capsys.readouterr().err


# ---- the real model on the shipped data ----------------------------------------------------

@pytest.mark.slow
def test_real_step_matches_float64_full_logits(example, real_model):
    model, tokenizer = real_model
    # the group with the fewest characters: the shortest batch (the check is per token)
    group = min(ranked.ranked_groups(), key=lambda g: sum(len(r["text"]) for r in g["responses"]) + 4 * len(g["prompt"]))
    batch = ranked.group_batch(tokenizer, [group])
    input_ids, labels, attention_mask, scores = batch
    for row, response in enumerate(group["responses"]):  # labels: the response and the end-of-turn token
        answer = labels[row][labels[row] != -100].tolist()
        assert answer[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(answer[:-1]) == response["text"]
        assert float(scores[row]) == pytest.approx(response["score"])

    policy = copy.deepcopy(model).requires_grad_(True)
    optimizer = torch.optim.SGD(policy.parameters(), lr=1e-2)
    beta = 0.1
    first = example.train_step(policy, model, optimizer, batch, loss_type="plackett_luce", beta=beta, backend="torch")
    # Step 1: policy = reference, so every u is 0 and the loss is Σ_k log(K − k) = log 4!.
    assert float(first.loss.detach()) == pytest.approx(math.log(24), abs=1e-5)
    with torch.no_grad():
        second = example.group_loss(policy, model, batch, loss_type="plackett_luce", beta=beta, backend="torch")
        expected = _reference_loss(policy, model, batch, "plackett_luce", beta)
    assert abs(float(expected) - math.log(24)) > 1e-3  # the step moved the policy
    assert float(second.loss) == pytest.approx(float(expected), abs=2e-5)


def _results(example):
    def steps(offset):
        return [{"step": i + 1, "loss": 3.17 - 0.05 * i + offset, "accuracy": 0.25 * i, "margin": 0.01 * i,
                 "rank_rewards": [0.03 * i, 0.01 * i, -0.01 * i, -0.03 * i], "tokens": 400} for i in range(3)]
    return [dict(loss_type=name, label=example.RUNS[name], steps=steps(offset), train_s=60.0, train_cpu_s=50.0,
                 peak_rss_mb=3000.0, threads=2) for name, offset in (("plackett_luce", 0.0), ("sigmoid", -2.4))]


def test_report_and_plot(example, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    results = _results(example)
    example.print_table(results)
    out = capsys.readouterr().out
    assert "plackett_luce" in out and "sigmoid" in out and "rank 3" in out
    assert f"{0.5:>16.6f}" in out and f"{-0.06:>12.5f}" in out  # step 3: accuracy 0.25 · 2, rank 3 reward

    class Args:
        steps, groups, lr, beta = 3, 2, 2e-5, 0.1

    path = tmp_path / "plot.png"
    fig = example.plot(results, path, Args)
    assert path.stat().st_size > 10_000
    ax_loss, ax_acc, ax_rank = fig.axes
    assert len(ax_rank.patches) == 2 * 4  # one bar per run and rank
    for ax in (ax_loss, ax_acc):  # steps are whole numbers: no 1.25, 1.50, ... ticks
        ticks = [t for t in ax.get_xticks() if ax.get_xlim()[0] <= t <= ax.get_xlim()[1]]
        assert ticks and all(float(t).is_integer() for t in ticks), ticks


def test_builder_redraws_tied_samples_and_scores_by_the_rule(monkeypatch):
    """examples/build_ranked_data.py with the model's answers stubbed: a sample whose score ties the
    greedy answer's is redrawn with the next seed; a prompt tied on every attempt is left out."""
    spec = importlib.util.spec_from_file_location("build_ranked_data", EXAMPLE.with_name("build_ranked_data.py"))
    builder = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(builder)
    pairs = [dict(prompt="p0", chosen="red is a color", rejected="no"),
             dict(prompt="p1", chosen="two plus two is four", rejected="five"),
             dict(prompt="p2", chosen="blue", rejected="green")]
    answers = {None: {"p0": "red", "p1": "four", "p2": "blue sky"},
               builder.SEED: {"p0": "red", "p1": "it is four", "p2": "sky blue"},  # p0, p2 tie the greedy score
               builder.SEED + 1: {"p0": "a red color", "p2": "sky blue"}}  # p2 ties again

    def fake_generate(model, tokenizer, prompts, *, seed=None):
        return [(answers[seed][p], seed is not None) for p in prompts]

    monkeypatch.setattr(builder, "generate", fake_generate)
    groups = builder.build(None, None, pairs, attempts=2)
    assert [g["prompt"] for g in groups] == ["p0", "p1"]
    for group, pair in zip(groups, pairs):
        by_source = {r["source"]: r for r in group["responses"]}
        assert by_source["chosen"]["score"] == 3.0 and by_source["rejected"]["score"] == 0.0
        for source in ("greedy", "sampled"):
            assert by_source[source]["score"] == pytest.approx(_rule_score(by_source[source]["text"], pair["chosen"]))
    assert [r["text"] for r in groups[0]["responses"]] == ["red is a color", "red", "a red color", "no"]
    assert groups[0]["responses"][2]["seed"] == builder.SEED + 1 and groups[1]["responses"][2]["seed"] == builder.SEED


def test_example_runs_lipo_lambda(example):
    """``--runs lipo_lambda`` (LiPO-λ's formula is checked in the listwise loss tests): the example's
    path accepts it, gives a finite positive loss and sends gradient into the backbone."""
    policy = _tiny_llama(0)
    out = example.group_loss(policy, _tiny_llama(1), _tiny_batch(), loss_type="lipo_lambda", beta=2.0,
                             backend="torch")
    out.loss.backward()
    assert torch.isfinite(out.loss) and float(out.loss.detach()) > 0
    assert float(policy.model.layers[0].mlp.up_proj.weight.grad.abs().sum()) > 0
