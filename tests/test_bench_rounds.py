"""The bench's rounds (scripts/benchlib/streams.py): the order of a round's phases and how a
mode's phases of one round make its figure. The API/direct targets rest on both."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("bench_streams", ROOT / "scripts" / "benchlib" / "streams.py")
streams = importlib.util.module_from_spec(_spec)
sys.modules["bench_streams"] = streams  # its dataclasses look their module up while being built
_spec.loader.exec_module(streams)


def test_api_and_direct_run_a_b_b_a_and_the_lead_rotates():
    order = streams.round_order
    assert order(["API", "direct"], 0, 2) == ["API", "direct", "direct", "API"]
    assert order(["API", "direct"], 1, 2) == ["direct", "API", "API", "direct"]
    assert order(["API", "direct"], 0, 3) == ["API", "direct", "direct", "API", "API", "direct"]
    assert order(["API", "direct"], 1, 1) == ["direct", "API"]


def test_the_peer_runs_once_beside_the_block():
    modes = ["API", "direct", "peer"]
    assert streams.round_order(modes, 0, 2) == ["API", "direct", "direct", "API", "peer"]
    assert streams.round_order(modes, 1, 2) == ["direct", "API", "API", "direct", "peer"]
    assert streams.round_order(modes, 2, 2) == ["peer", "API", "direct", "direct", "API"]


def phase(t0: float, wall: float, tokens: int, loop: float | None = None, own: float | None = 0.5):
    one = streams.Stream(t_submit=t0, t_first=t0 + 0.1, t_done=t0 + wall, tokens=tokens)
    return streams.Phase("API", 16, [one], max_batch=8, loop_cpu_s=loop, own_cpu_s=own)


def test_a_merged_phase_counts_only_its_parts_wall_time():
    # 100 tokens in 2 s, then (after 5 s of the other mode) 300 tokens in 4 s: 400 / 6 s.
    merged = streams.Phase.merge([phase(0.0, 2.0, 100, loop=0.2), phase(7.0, 4.0, 300, loop=0.4)])
    assert merged.tokens == 400
    assert merged.wall_s == pytest.approx(6.0)
    assert merged.tok_s == pytest.approx(400 / 6)
    assert merged.loop_cpu_s == pytest.approx(0.6)
    assert merged.own_cpu_s == pytest.approx(1.0)
    assert len(merged.streams) == 2 and merged.max_batch == 8


def test_a_cpu_figure_missing_in_one_part_is_missing_in_the_merge():
    merged = streams.Phase.merge([phase(0.0, 1.0, 10, loop=0.1), phase(2.0, 1.0, 10, loop=None)])
    assert merged.loop_cpu_s is None


def test_one_part_is_itself():
    one = phase(0.0, 2.0, 100)
    assert streams.Phase.merge([one]) is one
