"""Counts read from a kernel's SASS (``cuobjdump -sass``) and resource use (``-res-usage``).

Only text parsing lives here, so it is unit-testable without ptxas.  A SASS line looks like

    /*0700*/              @!P1 LDG.E.128 R4, desc[UR6][R24.64] ;      /* 0x0000000618049981 */

(address, optional predicate, opcode with modifiers, operands).  A *loop* is a branch
whose target lies before it (``BRA 0x680`` at ``0x1600``); its body is every
instruction from the target up to and including the branch (a nested loop's
instructions count once, as in a listing).  ``BRA`` to its own
address is the end-of-kernel trap and not a loop.
"""
import re
from dataclasses import dataclass, field

_INSTR = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_RES = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SPILL = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGS = re.compile(r"Used (\d+) registers")


@dataclass(frozen=True)
class Instr:
    addr: int
    opcode: str     # with modifiers, e.g. "LDG.E.128"
    operands: str
    predicated: bool


@dataclass
class Loop:
    start: int      # address of the first instruction of the body
    end: int        # address of the backward branch
    body: list = field(default_factory=list)

    @property
    def size(self) -> int:
        return len(self.body)


def parse_sass(text: str) -> list:
    """Instructions of the SASS listing, in address order."""
    out = []
    for m in _INSTR.finditer(text):
        out.append(Instr(int(m.group(1), 16), m.group(3), m.group(4).strip(), m.group(2) is not None))
    return out


def loops(instrs) -> list:
    """Every backward branch as a :class:`Loop`, innermost and outermost alike."""
    found = []
    for i, ins in enumerate(instrs):
        if not ins.opcode.startswith("BRA"):
            continue
        targets = re.findall(r"0x([0-9a-f]+)", ins.operands)
        if not targets:
            continue
        target = int(targets[-1], 16)
        if target >= ins.addr:
            continue
        body = [x for x in instrs[: i + 1] if x.addr >= target]
        found.append(Loop(target, ins.addr, body))
    return found


def main_loop(instrs):
    """The vocabulary loop of a token kernel, or None when there is no loop.

    With an unmasked body and a masked edge loop, the body is the loop whose loads are
    unpredicated (most such LDGs); of several such loops (the token forward's second pass over
    the rows its one-pass frame cannot take walks the body again), the first in program order,
    which is the first pass.  Kernels whose every load is masked have no such loop, and then the
    largest loop body is taken."""
    found = loops(instrs)
    if not found:
        return None

    def unmasked_loads(lp):
        return sum(1 for x in lp.body if x.opcode.startswith("LDG") and not x.predicated)

    most = max(unmasked_loads(lp) for lp in found)
    if most == 0:
        return max(found, key=lambda lp: lp.size)
    return min((lp for lp in found if unmasked_loads(lp) == most), key=lambda lp: lp.start)


def _count(instrs, pattern):
    rx = re.compile(pattern)
    return sum(1 for x in instrs if rx.search(x.opcode))


def opcode_counts(instrs) -> dict:
    """The counts the static profile reports, over the whole kernel."""
    return {
        "hgmma": _count(instrs, r"^HGMMA"),
        "hmma": _count(instrs, r"^HMMA"),
        "ldg128": _count(instrs, r"^LDG\..*128"),
        "ldg_u16": _count(instrs, r"^LDG\..*U16"),
        "stg128": _count(instrs, r"^STG\..*128"),
        "stg_u16": _count(instrs, r"^STG\..*U16"),
        "redg": _count(instrs, r"^REDG?\."),
        "atomg": _count(instrs, r"^ATOMG?\."),
        "membar_gpu": _count(instrs, r"^MEMBAR\..*GPU"),
        "bar_sync": _count(instrs, r"^BAR\.SYNC"),
        "mufu_ex2": _count(instrs, r"^MUFU\.EX2"),
    }


def loop_counts(loop) -> dict:
    """What one main-loop iteration issues: instructions, bytes loaded by LDG, barriers."""
    def ldg_bytes(op):
        for width, nbytes in ((".128", 16), (".64", 8), (".U16", 2), (".S16", 2), (".U8", 1)):
            if width in op:
                return nbytes
        return 4

    return {
        "loop_instr": loop.size,
        "loop_ldg_bytes": sum(ldg_bytes(x.opcode) for x in loop.body if x.opcode.startswith("LDG")),
        "loop_ldg128": _count(loop.body, r"^LDG\..*128"),
        "loop_stg128": _count(loop.body, r"^STG\..*128"),
        "loop_bar_sync": _count(loop.body, r"^BAR\.SYNC"),
        "loop_shfl": _count(loop.body, r"^SHFL"),
        "loop_mufu": _count(loop.body, r"^MUFU"),
    }


def resource_usage(text: str) -> dict:
    """``REG``, ``STACK``, ``SHARED``, ``LOCAL`` of the (single) function in ``cuobjdump -res-usage``."""
    m = _RES.search(text)
    if m is None:
        raise ValueError(f"no resource line in cuobjdump output: {text[:200]!r}")
    reg, stack, shared, local = map(int, m.groups())
    return {"regs": reg, "stack": stack, "smem_static": shared, "local": local}


def ptxas_spills(log: str):
    """Spill-store bytes from a ``ptxas -v`` log (None when the log has no such line)."""
    m = _SPILL.search(log)
    return None if m is None else int(m.group(1)) + int(m.group(2))


def occupancy_warps(regs: int, smem_bytes: int, num_warps: int) -> int:
    """Resident warps per SM on sm_90 from registers and shared memory.

    Hopper SM: 64 K registers allocated per warp in units of 256 (8 per thread),
    at most 64 warps and 32 blocks, 228 KB shared memory of which each block also
    reserves 1 KB.
    """
    per_warp = -(-max(regs, 1) * 32 // 256) * 256
    blocks_by_regs = (65536 // per_warp) // num_warps
    blocks_by_smem = (228 * 1024) // (smem_bytes + 1024)
    blocks_by_warps = 64 // num_warps
    blocks = min(blocks_by_regs, blocks_by_smem, blocks_by_warps, 32)
    return blocks * num_warps
