"""Vocabulary- and sequence-parallel fused losses on 2 and 3 gloo ranks (CPU, loopback).

One spawn per world size runs every check of ``_dist_worker.py`` on every rank (both
backends; Triton under TRITON_INTERPRET=1): the token stage, the fused-linear path and
DPO / SimPO / AOT-unpaired / KTO losses, each compared — loss, metrics and every
gradient — with the single-process float64 result, and with the collectives counted
(one all-gather per vocabulary-parallel forward, one all-reduce per sequence-parallel
forward, none in either backward).  With 3 ranks the 37-entry vocabulary splits
13/12/12 and the 7-token sequences 3/2/2.  Packed streams (``cu_seqlens``) run under both options
too: the same rows on every vocabulary rank; contiguous token slices (sequences cut anywhere) per
sequence rank.  Groups of K = 3 responses (plackett_luce under vocabulary parallelism, all-pairs
sigmoid under sequence parallelism) run on the torch backend.  A world of 4 runs the 2 × 2 mesh (vocabulary ×
sequence groups at once) alone.
"""
import pytest

from _dist_spawn import run_ranks
from _dist_worker import CHECK_NAMES, MESH_CHECK_NAMES, MESH_WORLD

WORLDS = (2, 3)


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    return {world: run_ranks(world, tmp_path_factory.mktemp(f"world{world}")) for world in WORLDS}


@pytest.mark.parametrize("world", WORLDS)
@pytest.mark.parametrize("check", CHECK_NAMES)
def test_matches_single_process(reports, world, check):
    for rank, report in enumerate(reports[world]):
        assert check in report, f"rank {rank} did not run {check}"
        assert report[check] is None, f"rank {rank} of {world}, {check}:\n{report[check]}"


@pytest.fixture(scope="module")
def mesh_reports(tmp_path_factory):
    return run_ranks(MESH_WORLD, tmp_path_factory.mktemp("mesh"))


@pytest.mark.parametrize("check", MESH_CHECK_NAMES)
def test_vocab_times_sequence_mesh(mesh_reports, check):
    """Both groups at once on a 2 × 2 mesh of 4 ranks."""
    for rank, report in enumerate(mesh_reports):
        assert check in report, f"rank {rank} did not run {check}"
        assert report[check] is None, f"rank {rank} of the mesh, {check}:\n{report[check]}"
