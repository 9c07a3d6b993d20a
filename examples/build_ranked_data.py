"""Build ``pyfused_po/testing/data/ranked_responses.jsonl``: K = 4 ranked responses per prompt.

For each of the 44 shipped preference pairs, SmolLM2-135M-Instruct (fp32, CPU, offline; see
:mod:`pyfused_po.testing.smollm2`) answers the prompt twice: greedily, and by sampling
(temperature 1.0, top-p 0.9, seed ``SEED + attempt``).  The four responses are scored by the
rule in :mod:`pyfused_po.testing.ranked` (chosen 3, rejected 0, a model answer 1 + its
bag-of-words F1 with the chosen answer).  Where the sampled answer's score ties the greedy
one's (the same text, or the same overlap), the prompt's sample is redrawn with the next seed,
up to ``--attempts`` times; a prompt still tied after that is left out (none was, on the
shipped file).

All prompts generate as one left-padded batch (per attempt), so the file is deterministic on
the same torch / transformers versions.  It took 19 minutes on a shared 2-core machine
(load average about 12).

    python examples/build_ranked_data.py            # rewrites the shipped file
    python examples/build_ranked_data.py --out /tmp/ranked.jsonl
"""
import argparse
import json
from pathlib import Path

import torch

from pyfused_po.testing import ranked, smollm2

SEED = 1000
MAX_NEW_TOKENS = 32
SAMPLING = dict(do_sample=True, temperature=1.0, top_p=0.9, top_k=0)


@torch.no_grad()
def generate(model, tokenizer, prompts, *, seed=None):
    """``[(text, truncated)]``: the model's answer to each prompt (greedy when ``seed`` is None,
    else sampled with :data:`SAMPLING` after ``torch.manual_seed(seed)``); ``truncated`` when it
    reached :data:`MAX_NEW_TOKENS` without the end-of-turn token."""
    encoded = [list(smollm2.prompt_ids(tokenizer, p)) for p in prompts]
    width = max(len(ids) for ids in encoded)
    pad = tokenizer.pad_token_id
    input_ids = torch.tensor([[pad] * (width - len(ids)) + ids for ids in encoded])
    attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded])
    options = dict(do_sample=False) if seed is None else SAMPLING
    if seed is not None:
        torch.manual_seed(seed)
    out = model.generate(input_ids, attention_mask=attention_mask, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=pad,
                         eos_token_id=tokenizer.eos_token_id, **options)
    answers = []
    for row in out[:, width:].tolist():
        ended = tokenizer.eos_token_id in row
        tokens = row[: row.index(tokenizer.eos_token_id)] if ended else row
        answers.append((tokenizer.decode(tokens, skip_special_tokens=True).strip(), not ended))
    return answers


def _response(source, text, score, **extra):
    return dict(source=source, text=text, score=score, **extra)


def build(model, tokenizer, pairs, attempts):
    """The groups (see :mod:`pyfused_po.testing.ranked`), in the pairs' order."""
    prompts = [p["prompt"] for p in pairs]
    greedy = generate(model, tokenizer, prompts)
    greedy_scores = [ranked.model_answer_score(text, p["chosen"]) for (text, _), p in zip(greedy, pairs)]
    sampled = {}
    pending = list(range(len(pairs)))
    for attempt in range(attempts):
        if not pending:
            break
        seed = SEED + attempt
        drawn = generate(model, tokenizer, [prompts[i] for i in pending], seed=seed)
        still = []
        for i, (text, truncated) in zip(pending, drawn):
            score = ranked.model_answer_score(text, pairs[i]["chosen"])
            if score == greedy_scores[i]:
                still.append(i)
            else:
                sampled[i] = _response("sampled", text, score, truncated=truncated, seed=seed)
        pending = still
    groups = []
    for i, pair in enumerate(pairs):
        if i not in sampled:
            print(f"left out (sample tied the greedy answer {attempts} times): {pair['prompt']!r}")
            continue
        text, truncated = greedy[i]
        groups.append(dict(prompt=pair["prompt"], responses=[
            _response("chosen", pair["chosen"], ranked.CHOSEN_SCORE),
            _response("greedy", text, greedy_scores[i], truncated=truncated),
            sampled[i],
            _response("rejected", pair["rejected"], ranked.REJECTED_SCORE)]))
    return groups


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(ranked.RANKED_FILE))
    parser.add_argument("--attempts", type=int, default=4, help="sampling attempts per prompt (default 4)")
    args = parser.parse_args(argv)
    if args.attempts < 1:
        parser.error(f"--attempts must be ≥ 1, got {args.attempts}")
    model, tokenizer = smollm2.load()
    groups = build(model, tokenizer, smollm2.preference_pairs(), args.attempts)
    with open(args.out, "w", encoding="utf-8") as f:
        for group in groups:
            f.write(json.dumps(group, ensure_ascii=False) + "\n")
    print(f"wrote {len(groups)} groups of {ranked.GROUP_SIZE} to {args.out}")


if __name__ == "__main__":
    main()
