"""Random padded batches and their packed (padding-free) twins, for the packed-layout tests.

A padded batch is ``[S, T]`` rows (right padding); its packed twin holds the same
sequences back to back in a chosen order (``perm[k]`` = the padded row of packed sequence
``k``), built by gathering rows — never by the code under test.
"""
import torch


def random_lengths(S, g, *, allow_empty=True):
    """Sequence lengths and prompt lengths with the edge cases forced in: a length-1
    sequence, a prompt-only sequence (empty response) and, optionally, a zero-token one."""
    lengths = torch.randint(2, 8, (S,), generator=g)
    prompts = torch.minimum(torch.randint(0, 3, (S,), generator=g), lengths - 1)
    lengths[1] = 1
    prompts[1] = 0
    prompts[2] = lengths[2]  # empty response: every label ignored
    if allow_empty and S > 4:
        lengths[4], prompts[4] = 0, 0
    return lengths, prompts


class Batch:
    """Padded tensors and the packing maps (``rows``: padded flat index of each packed token)."""

    def __init__(self, S=6, V=13, D=None, seed=0, allow_empty=True, dtype=torch.float64):
        g = torch.Generator().manual_seed(seed)
        self.S, self.V = S, V
        self.lengths, prompts = random_lengths(S, g, allow_empty=allow_empty)
        self.T = T = int(self.lengths.max()) + 1  # at least one padding column
        self.tokens = torch.randint(0, V, (S, T), generator=g)
        pos = torch.arange(T).expand(S, T)
        self.labels = torch.where((pos >= prompts[:, None]) & (pos < self.lengths[:, None]), self.tokens,
                                  torch.full_like(self.tokens, -100))
        self.logits = (torch.randn(S, T, V, generator=g) * 2.0).to(dtype)
        self.ref_logits = (self.logits + torch.randn(S, T, V, generator=g)).to(dtype)
        # A few labels are the argmax so that top-1 and rewards vary.
        self.logits[:, :, 0] += 3.0
        if D is not None:
            self.hidden = torch.randn(S, T, D, generator=g, dtype=dtype)
            self.ref_hidden = torch.randn(S, T, D, generator=g, dtype=dtype)
            self.weight = torch.randn(V, D, generator=g, dtype=dtype) * 0.7
            self.bias = torch.randn(V, generator=g, dtype=dtype) * 0.3
        self.token_weights = torch.rand(S, T, generator=g, dtype=dtype) + 0.5
        self.ref_token_logps = -torch.rand(S, T, generator=g, dtype=dtype) * 3
        self.nll_labels = torch.where(pos < self.lengths[:, None], self.tokens, torch.full_like(self.tokens, -100))
        self.g = g

    def order(self, layout):
        """``perm`` for a pair layout of the [chosen; rejected] padded batch."""
        P = self.S // 2
        if layout == "halves":
            return torch.arange(self.S)
        if layout == "interleaved":
            return torch.stack([torch.arange(P), torch.arange(P, 2 * P)], 1).reshape(-1)
        return torch.randperm(self.S, generator=self.g)  # explicit indices

    def pack(self, perm):
        """``rows`` (flat padded index per packed token) and ``cu_seqlens`` of ``perm``."""
        rows = torch.cat([torch.arange(int(self.lengths[r])) + int(r) * self.T for r in perm])
        cu = torch.cat([torch.zeros(1, dtype=torch.int64), self.lengths[perm].cumsum(0)])
        return rows, cu

    @staticmethod
    def take(x, rows):
        """``x`` ``[S, T, ...]`` gathered to the packed ``[1, N, ...]`` stream (a new leaf)."""
        return x.reshape(-1, *x.shape[2:])[rows].unsqueeze(0).clone()


def position_ids_of(cu):
    n = int(cu[-1])
    out = torch.empty(n, dtype=torch.int64)
    for s in range(cu.numel() - 1):
        a, b = int(cu[s]), int(cu[s + 1])
        out[a:b] = torch.arange(b - a)
    return out.unsqueeze(0)
