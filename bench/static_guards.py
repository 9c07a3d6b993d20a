"""The static profile's CI guards, as plain functions of its records (import-safe:
no Triton, so tests can import it under TRITON_INTERPRET=1)."""
import json
import os

# Logits rows each token kernel reads per element (instructions per element are per vocabulary entry).
ROWS_READ = {"token_forward": 1, "token_forward_extras": 1, "token_backward": 1,
             "token_kl_forward": 2, "token_kl_backward": 2}
IPE_TOLERANCE = 0.005  # the committed figures are rounded to 3 decimals


def _minor(version):
    return ".".join(version.split(".")[:2])


def committed_records(directory, version):
    """The committed profile for Triton ``version`` (matched on major.minor), or [] if none."""
    version = _minor(version)
    path = os.path.join(directory, f"profile-triton{version}.json")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return json.load(f)


def check(records, committed, fence_kernels=("linear_backward",)):
    """CI guards. Returns ``{guard: [failure messages]}`` (empty lists when all hold):

    * ``spills``: no kernel spills;
    * ``membar_gpu``: no GPU-scope fence in the fused backward;
    * ``ldg128``: token kernels' main loops use 128-bit loads (and the backward kernels
      128-bit stores) where the row stride is a multiple of 16 elements, and wherever the
      committed profile has them;
    * ``instr_per_elem``: no main loop costs more instructions per element than committed.
    """
    base = {(r["kernel"], r["V"]): r for r in committed}
    fails = {"spills": [], "membar_gpu": [], "ldg128": [], "instr_per_elem": []}
    for r in records:
        key = f"{r['kernel']} V={r['V']} (triton {r['triton']})"
        old = base.get((r["kernel"], r["V"]))
        if r["spills"]:
            fails["spills"].append(f"{key}: {r['spills']} bytes of spills")
        if r["kernel"] in fence_kernels and r["membar_gpu"]:
            fails["membar_gpu"].append(f"{key}: {r['membar_gpu']} MEMBAR.*.GPU")
        if r["kernel"] in ROWS_READ:
            def vec_loads(rec):
                return rec.get("loop_ldg128", rec["ldg128"])

            want_vec = r["V"] % 16 == 0 or (old is not None and vec_loads(old) > 0)
            if want_vec and vec_loads(r) == 0:
                fails["ldg128"].append(f"{key}: no LDG.128 in the main loop")
            if want_vec and r["kernel"].endswith("backward") and r.get("loop_stg128", 1) == 0:
                fails["ldg128"].append(f"{key}: no STG.128 in the main loop")
            if old is not None and old["instr_per_elem"] is not None and \
                    r["instr_per_elem"] > old["instr_per_elem"] + IPE_TOLERANCE:
                fails["instr_per_elem"].append(
                    f"{key}: {r['instr_per_elem']} instructions per element > committed "
                    f"{old['instr_per_elem']}")
    return fails
