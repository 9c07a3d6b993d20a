"""Benchmark problems (one ``Case`` per measured shape) and the sweeps that list them.

Token counts follow the trainers' vocabulary: a *pair* is one chosen and one rejected
sequence of ``seq_len`` tokens each, so a pair has ``2·seq_len`` tokens and a batch of
``pairs`` pairs has ``N = 2·pairs·seq_len`` token rows.  Every token is labelled
(completion-only batches): each method does the same work on every row.
"""
from dataclasses import dataclass, replace

import torch

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PATHS = ("logits", "linear")
SYNTHETIC_KINDS = ("random", "realistic")
KINDS = SYNTHETIC_KINDS + ("smollm2",)  # smollm2: the real model's hidden states, head and text

HEADLINE_VOCAB = 128_256  # Llama-3 vocabulary
HEADLINE_HIDDEN = 4096
HEADLINE_PAIRS, HEADLINE_SEQ = 8, 1024  # 16,384 token rows
SWEEP_VOCABS = (32_000, 128_256, 256_000)
SWEEP_TOKENS_PER_PAIR = tuple(1024 << i for i in range(8))  # 1k … 128k

# The CPU form runs at the shapes of the real model the project ships (SmolLM2-135M):
# V = 49,152, D = 576.  4 pairs × 32 tokens per sequence = 256 token rows keeps the three
# 256 × 576 × 49,152 GEMMs of a linear-path step near a second on two cores.
SMOLLM2_VOCAB, SMOLLM2_HIDDEN = 49_152, 576
CPU_PAIRS, CPU_SEQ = 4, 32


@dataclass(frozen=True)
class Case:
    """One shape of one path.  ``hidden`` (D) is used by the fused-linear path only."""

    path: str
    pairs: int
    seq_len: int
    vocab: int
    dtype: str = "bf16"
    hidden: int = 0
    kind: str = "random"
    frozen_head: bool = False  # linear path: the LM head takes no gradient (LoRA's usual case)

    def __post_init__(self):
        if self.path not in PATHS:
            raise ValueError(f"path must be one of {PATHS}, got {self.path!r}")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {tuple(DTYPES)}, got {self.dtype!r}")
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.frozen_head and self.path != "linear":
            raise ValueError("frozen_head applies to the linear path only")
        if self.path == "linear" and self.hidden <= 0:
            raise ValueError(f"the linear path needs hidden > 0, got {self.hidden}")
        if min(self.pairs, self.seq_len, self.vocab) <= 0:
            raise ValueError(f"pairs, seq_len and vocab must be positive, got {self}")

    @property
    def tokens(self) -> int:
        return 2 * self.pairs * self.seq_len

    @property
    def tokens_per_pair(self) -> int:
        return 2 * self.seq_len

    @property
    def torch_dtype(self):
        return DTYPES[self.dtype]

    @property
    def element_size(self) -> int:
        return torch.empty((), dtype=self.torch_dtype).element_size()

    def input_bytes(self) -> int:
        """Bytes of the differentiable inputs (logits, or hidden + weight)."""
        if self.path == "logits":
            return self.tokens * self.vocab * self.element_size
        return (self.tokens + self.vocab) * self.hidden * self.element_size

    @property
    def key(self) -> str:
        """Stable identifier used to merge runs and name pytest-benchmark entries."""
        d = f"-D{self.hidden}" if self.path == "linear" else ""
        return (f"{self.path}-P{self.pairs}xT{self.seq_len}-V{self.vocab}{d}-{self.dtype}"
                f"-{self.kind}" + ("-frozen" if self.frozen_head else ""))

    def is_headline(self) -> bool:
        return (self.pairs, self.seq_len, self.vocab) == (HEADLINE_PAIRS, HEADLINE_SEQ, HEADLINE_VOCAB) \
            and self.dtype == "bf16" and self.hidden in (0, HEADLINE_HIDDEN)


def headline_cases():
    """16,384 tokens × 128,256 vocab in bf16 (8 pairs × 1,024 tokens per sequence), both
    paths, on random (flat softmax) and realistic (peaked, few-nat entropy) inputs."""
    base = dict(pairs=HEADLINE_PAIRS, seq_len=HEADLINE_SEQ, vocab=HEADLINE_VOCAB, dtype="bf16")
    return [Case(path=p, hidden=HEADLINE_HIDDEN if p == "linear" else 0, kind=k, **base)
            for p in PATHS for k in SYNTHETIC_KINDS]


SMALL_BATCH = dict(pairs=1, seq_len=512)  # 1 pair × 2 sequences × 512 tokens: one short step
ODD_VOCAB = 50_257  # GPT-2's vocabulary: an odd row stride


def session_cases(path, toy=False):
    """The GPU session's cases for one path (``bench/gpu/session.sh``): the headline (random and
    realistic), on the linear path also with a frozen head, a small batch, and V = 50,257 beside
    128,256.  ``toy``: the same structure at CPU sizes (the session's dry run)."""
    if toy:
        big = dict(pairs=2, seq_len=16, vocab=512, hidden=32 if path == "linear" else 0)
        small, odd = dict(pairs=1, seq_len=4), 257
    else:
        big = dict(pairs=HEADLINE_PAIRS, seq_len=HEADLINE_SEQ, vocab=HEADLINE_VOCAB,
                   hidden=HEADLINE_HIDDEN if path == "linear" else 0)
        small, odd = SMALL_BATCH, ODD_VOCAB
    cases = [Case(path=path, dtype="bf16", kind=k, **big) for k in SYNTHETIC_KINDS]
    if path == "linear":
        cases.append(Case(path=path, dtype="bf16", kind="realistic", frozen_head=True, **big))
    cases.append(Case(path=path, dtype="bf16", kind="realistic", **{**big, **small}))
    cases.append(Case(path=path, dtype="bf16", kind="realistic", **{**big, "vocab": odd}))
    return cases


def _sweep(tokens_per_pair, vocabs, dtypes):
    cases = []
    for path in PATHS:
        for dtype in dtypes:
            for vocab in vocabs:
                for tpp in tokens_per_pair:
                    cases.append(Case(path=path, pairs=1, seq_len=tpp // 2, vocab=vocab, dtype=dtype,
                                      hidden=HEADLINE_HIDDEN if path == "linear" else 0))
    return cases


def full_cases():
    """Issue 5's sweep: tokens per pair 1k → 128k, V ∈ {32k, 128k, 256k}, bf16 and fp32."""
    return headline_cases() + _sweep(SWEEP_TOKENS_PER_PAIR, SWEEP_VOCABS, ("bf16", "fp32"))


def quick_cases():
    """A few minutes on one GPU: the headline plus a short bf16 sweep at V = 128,256."""
    return headline_cases() + _sweep((1024, 4096, 16384, 65536), (HEADLINE_VOCAB,), ("bf16",))


def cpu_cases(kind="smollm2", pairs=CPU_PAIRS, seq_len=CPU_SEQ):
    """The CPU form: SmolLM2-135M's head shapes (V = 49,152, D = 576), fp32, both paths.

    ``kind="smollm2"`` asks for the real model's activations (``bench/real_inputs.py``);
    the runner falls back to ``"random"`` at the same shapes when the model is missing.
    """
    base = dict(pairs=pairs, seq_len=seq_len, vocab=SMOLLM2_VOCAB, dtype="fp32", kind=kind)
    return [Case(path="logits", **base), Case(path="linear", hidden=SMOLLM2_HIDDEN, **base)]


def toy_cpu_cases():
    """Tiny random shapes (V = 2,003, D = 64) for the runner's own tests (``--toy``)."""
    base = dict(pairs=2, seq_len=16, vocab=2003, dtype="fp32")
    return [Case(path="logits", **base), Case(path="linear", hidden=64, **base)]


def select(cases, *, paths=None, vocabs=None, dtypes=None, kinds=None, max_tokens_per_pair=None):
    """Filter a sweep by the runner's command-line options (``None`` keeps everything)."""
    def keep(c):
        return ((paths is None or c.path in paths) and (vocabs is None or c.vocab in vocabs)
                and (dtypes is None or c.dtype in dtypes) and (kinds is None or c.kind in kinds)
                and (max_tokens_per_pair is None or c.tokens_per_pair <= max_tokens_per_pair))
    return [c for c in cases if keep(c)]


def with_tokens_per_pair(case: Case, tokens_per_pair: int) -> Case:
    """The same case with one pair of ``tokens_per_pair`` tokens (max-context probes)."""
    return replace(case, pairs=1, seq_len=max(1, tokens_per_pair // 2))
