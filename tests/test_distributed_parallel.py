"""Vocabulary- and sequence-parallel fused losses on 2 and 3 gloo ranks (CPU, loopback).

One spawn per world size runs every check of ``_dist_worker.py`` on every rank (both
backends; Triton under TRITON_INTERPRET=1): the token stage, the fused-linear path and
DPO / SimPO / AOT-unpaired / KTO losses, each compared — loss, metrics and every
gradient — with the single-process float64 result, and with the collectives counted
(one all-gather per vocabulary-parallel forward, one all-reduce per sequence-parallel
forward, none in either backward).  With 3 ranks the 37-entry vocabulary splits
13/12/12 and the 7-token sequences 3/2/2.
"""
import pytest

from _dist_spawn import run_ranks
from _dist_worker import CHECK_NAMES

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
