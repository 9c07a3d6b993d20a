"""The token stage: the only code that touches the vocabulary.

Logits (or hidden states and the LM head) in, per-token log-probs, the LSE and extras out;
the backward turns a per-token coefficient into the gradient of the logits (or of H and W).
It knows nothing of sequences, pairs or losses (docs/architecture.md).
"""
