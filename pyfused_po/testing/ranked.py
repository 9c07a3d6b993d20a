"""Groups of K = 4 ranked responses per prompt, built from the shipped pairs and the real model.

``data/ranked_responses.jsonl`` holds one group per line::

    {"prompt": ..., "responses": [{"source": ..., "text": ..., "score": ...}, ...]}

with four responses per prompt, scored by this rule (higher is preferred):

* ``chosen``   the pair's chosen answer (``data/preference_pairs.jsonl``): score 3;
* ``rejected`` the pair's rejected answer: score 0;
* ``greedy``   SmolLM2-135M-Instruct's greedy answer to the prompt, and
* ``sampled``  one answer sampled from it (seed stored in the line):
  score 1 + F1, where F1 is the bag-of-words overlap of the answer with the chosen answer
  (:func:`overlap_f1`: lower-cased ``[a-z0-9]+`` words, multiset intersection,
  F1 = 2·common / (|answer| + |chosen|), 0 when nothing is shared).

So a model answer always ranks between the pair's two answers (1 ≤ 1 + F1 ≤ 2), and the closer
it is to the correct answer, the higher.  Scores within a group are distinct (Plackett–Luce
ranks every member): the builder redraws the sampled answer while its score ties the greedy
one's.  ``examples/build_ranked_data.py`` writes the file (deterministic on the same torch and
transformers versions).
"""
import json
import re
from collections import Counter

import torch

from .smollm2 import DATA_DIR, prompt_ids, response_rows

RANKED_FILE = DATA_DIR / "ranked_responses.jsonl"
GROUP_SIZE = 4
CHOSEN_SCORE, REJECTED_SCORE = 3.0, 0.0
SOURCES = ("chosen", "greedy", "sampled", "rejected")


def words(text):
    """The rule's words: lower-cased runs of ASCII letters and digits."""
    return re.findall(r"[a-z0-9]+", text.lower())


def overlap_f1(answer, reference):
    """Bag-of-words F1 of ``answer`` against ``reference`` (SQuAD's token F1), in [0, 1]."""
    a, r = Counter(words(answer)), Counter(words(reference))
    common = sum((a & r).values())
    if common == 0:
        return 0.0
    return 2.0 * common / (sum(a.values()) + sum(r.values()))


def model_answer_score(answer, chosen):
    """The score of a model answer: 1 + its overlap F1 with the pair's chosen answer."""
    return 1.0 + overlap_f1(answer, chosen)


def ranked_groups():
    """The shipped groups: a list of ``{prompt, responses: [{source, text, score, ...}] * 4}``."""
    with open(RANKED_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def group_batch(tokenizer, groups, ignore_index=-100):
    """``(input_ids, labels, attention_mask, scores)`` of ``groups``: rows ``g·K … g·K + K − 1``
    are group g's responses in file order (chat-formatted prompt, response, end-of-turn token;
    labels on the response only, unshifted, as :func:`~pyfused_po.testing.smollm2.pair_batch`),
    ``scores`` ``[G·K]`` float32."""
    rows, scores = [], []
    for group in groups:
        prompt = list(prompt_ids(tokenizer, group["prompt"]))
        for response in group["responses"]:
            rows.append((prompt, response["text"]))
            scores.append(float(response["score"]))
    return (*response_rows(tokenizer, rows, ignore_index), torch.tensor(scores, dtype=torch.float32))
