"""A tiny randomly initialised Llama-style model, a word-level tokenizer and a preference
data set, all built locally (nothing fetched from the Hub)."""
import os
import random

os.environ["HF_HUB_OFFLINE"] = "1"

WORDS = [f"w{i}" for i in range(58)]
SPECIAL = ["<pad>", "<unk>", "<eos>"]


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIAL + WORDS)}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<eos>")


def tiny_config(**overrides):
    from transformers import LlamaConfig

    kw = dict(vocab_size=len(SPECIAL) + len(WORDS), hidden_size=24, intermediate_size=40, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False,
              pad_token_id=0, eos_token_id=2, bos_token_id=None)
    kw.update(overrides)
    return LlamaConfig(**kw)


def tiny_model(seed=0, config=None):
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config or tiny_config()).float()


def preference_rows(n=4, seed=0):
    rng = random.Random(seed)

    def text(lo, hi):
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(lo, hi)))

    return [dict(prompt=text(2, 4) + " ", chosen=text(2, 5), rejected=text(1, 6)) for _ in range(n)]
