"""Plans: the execution orders that chain the three stages.

The staged plan runs the token stage, then the sequence and objective stages, and lets
autograd run the backward; the three-GEMM plan (fused_gradient.py, with fused_pairs.py and
fused_kto.py) forms the LM head's exact gradient in the forward, per chunk of whole groups.
head_source.py resolves a module's token-stage input (logits, or hidden states + head).
"""
