"""The pure part of the user benchmark's broker profile: py-spy raw stacks -> µs per msg."""

from __future__ import annotations

import pytest

from perf.user.profile import costs, parse_raw, render_costs, short_frame

RAW = [
    "<module> (/repo/broker/__main__.py:1);run (/repo/broker/server.py:168);"
    "send (/v/lib/python3.11/site-packages/zmq/sugar/socket.py:638) 60",
    "<module> (/repo/broker/__main__.py:1);run (/repo/broker/server.py:168);"
    "unpack (/repo/broker/codec.py:32) 30",
    "<module> (/repo/broker/__main__.py:1);run (/repo/broker/server.py:168) 10",
    "garbage without a count",
]


def test_own_is_the_leaf_and_cumulative_any_frame_on_the_stack() -> None:
    profile = parse_raw(RAW, ["/repo"])
    assert profile.total == 100
    assert profile.own["send (zmq/sugar/socket.py:638)"] == 60
    assert profile.own["run (broker/server.py:168)"] == 10
    assert profile.cumulative["run (broker/server.py:168)"] == 100
    assert profile.cumulative["unpack (broker/codec.py:32)"] == 30


def test_recursion_counts_once_per_stack() -> None:
    profile = parse_raw(["f (a.py:1);f (a.py:1);f (a.py:1) 5"])
    assert profile.cumulative["f (a.py:1)"] == 5
    assert profile.own["f (a.py:1)"] == 5


def test_short_frame_prefers_site_packages_and_stdlib_over_the_repository() -> None:
    venv_in_repo = "send (/repo/.venv/lib/python3.11/site-packages/zmq/socket.py:9)"
    assert short_frame(venv_in_repo, ["/repo"]) == "send (zmq/socket.py:9)"
    assert short_frame("select (/usr/lib/python3.11/selectors.py:451)") == (
        "select (selectors.py:451)"
    )
    assert short_frame("route (/repo/broker/router.py:5)", ["/repo"]) == (
        "route (broker/router.py:5)"
    )
    assert short_frame("<native>") == "<native>"
    generated = "__create_fn__.<locals>.__init__ (<string>:2)"
    assert short_frame(generated) == "__init__ of a dataclass (generated)"


def test_costs_turn_shares_into_us_per_message() -> None:
    profile = parse_raw(RAW, ["/repo"])
    top = costs(profile, 20.0, 2, "own")
    assert [c.frame for c in top] == [
        "send (zmq/sugar/socket.py:638)",
        "unpack (broker/codec.py:32)",
    ]
    assert top[0].own_share == pytest.approx(0.6)
    assert top[0].own_us == pytest.approx(12.0)
    assert costs(profile, None, 1, "own")[0].own_us is None


def test_cumulative_ranking_leaves_out_frames_that_only_wrap_everything() -> None:
    profile = parse_raw(RAW, ["/repo"])
    frames = [c.frame for c in costs(profile, 20.0, 5, "cumulative")]
    assert "<module> (broker/__main__.py:1)" not in frames  # on every stack, never a leaf
    assert frames[0] == "run (broker/server.py:168)"  # on every stack, but also a leaf
    assert costs(parse_raw([]), 1.0, 5, "own") == []


def test_render_lists_every_row_under_its_title() -> None:
    text = render_costs("by own time", costs(parse_raw(RAW, ["/repo"]), 20.0, 3, "own"))
    lines = text.splitlines()
    assert lines[0] == "by own time"
    assert "own µs/msg" in lines[1]
    assert len(lines) == 5
    assert "12.00" in lines[2]
