"""Holds (crypto_agent.holds): the one model of a service kept stopped or paused on purpose, its marker
run/<name>.paused, and the one reader that process control, the recoveries and monitoring honour."""

from __future__ import annotations

import json
import time

import pytest

from crypto_agent import process, recovery
from crypto_agent.errors import InputError
from crypto_agent.holds import (
    HOLD_PAUSED,
    HOLD_STOPPED,
    ServicePaused,
    covering_hold,
    keep_stopped,
    place_hold,
    read_hold,
    release_hold,
)

try:
    from service_kit import keeper, make_settings
except ImportError:  # tests/ became a package
    from tests.service_kit import keeper, make_settings  # noqa: F401


class TestHolds:
    def test_place_read_release(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        assert read_hold("backtest", settings) is None
        placed = place_hold("backtest", settings, kind=HOLD_STOPPED, by="rollback #3", reason="under investigation")
        read = read_hold("backtest", settings)
        assert read is not None and (read.kind, read.by, read.reason) == (HOLD_STOPPED, "rollback #3",
                                                                         "under investigation")
        assert read.since == int(placed.since or 0)
        assert read.description == "stopped by rollback #3: under investigation"
        assert release_hold("backtest", settings, by="someone else") is None
        assert read_hold("backtest", settings) is not None  # only its owner (or anyone, by=None) releases it
        assert release_hold("backtest", settings) is not None and read_hold("backtest", settings) is None

    def test_it_is_the_hold_marker_that_process_control_honours(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        spec.hold_marker.parent.mkdir(parents=True, exist_ok=True)
        # an older marker (no kind, no end), as `service pause` wrote it: a stopped hold for good
        spec.hold_marker.write_text(json.dumps({"service": "backtest", "reason": "by hand", "by": "an operator",
                                                "since": "2026-01-02T03:04:05Z"}))
        hold = read_hold("backtest", settings)
        assert hold is not None and (hold.kind, hold.by, hold.until) == (HOLD_STOPPED, "an operator", None)
        with pytest.raises(ServicePaused, match=r"paused \(by hand, by an operator since 2026-01-02T03:04:05Z\)"):
            process.start(spec, settings)
        place_hold("backtest", settings, kind=HOLD_STOPPED, by="backtest-window-guard", reason="x")
        assert read_hold(spec) == read_hold("backtest", settings)  # by name or by its files: the same reader
        assert read_hold(spec).by == "backtest-window-guard"

    def test_a_hold_ends_by_itself_at_its_until(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        until = time.time() + 60
        place_hold("backtest", settings, kind=HOLD_STOPPED, by="guard", reason="window", until=until)
        assert read_hold("backtest", settings) is not None
        assert read_hold("backtest", settings, now=until + 1) is None
        ended = read_hold("backtest", settings, now=until + 1, include_ended=True)
        assert ended is not None and ended.until == int(until)

    def test_bad_holds_are_refused_and_nothing_is_written(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        bad = ({"kind": "frozen", "by": "x"}, {"kind": HOLD_PAUSED, "by": "x"}, {"kind": HOLD_STOPPED, "by": " "})
        for kwargs in bad:
            with pytest.raises(InputError):
                place_hold("backtest", settings, reason="r", **kwargs)
        with pytest.raises(InputError):
            place_hold("main.py", settings, kind=HOLD_STOPPED, by="x", reason="r")
        assert read_hold("backtest", settings) is None

    def test_an_unreadable_marker_still_holds(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        marker = process.service_spec("backtest", settings).hold_marker
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("not json")
        hold = read_hold("backtest", settings)
        assert hold is not None and hold.kind == HOLD_STOPPED and hold.reason == "not json"


class TestUntil:
    def test_the_reader_honours_until(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        now = time.time()
        place_hold("backtest", settings, kind=HOLD_STOPPED, by="guard", reason="window", until=now + 60, now=now)
        assert read_hold("backtest", settings, now=now + 59) is not None
        assert read_hold("backtest", settings, now=now + 61) is None
        assert read_hold("backtest", settings, now=now + 61, include_ended=True) is not None
        # what reads holds for others reads the same: an ended hold is no hold
        spec = process.service_spec("backtest", settings)
        assert covering_hold("backtest", settings, process.inspect(spec), now=now + 59) is not None
        assert covering_hold("backtest", settings, process.inspect(spec), now=now + 61) is None

    def test_an_expired_stopped_hold_no_longer_blocks_start(self, tmp_path, keeper) -> None:
        settings = make_settings(tmp_path)
        spec = process.service_spec("backtest", settings)
        place_hold(spec, kind=HOLD_STOPPED, by="backtest-window-guard", reason="window", until=time.time() + 3600)
        with pytest.raises(ServicePaused, match="service resume backtest"):
            process.start(spec, settings)
        place_hold(spec, kind=HOLD_STOPPED, by="backtest-window-guard", reason="window", until=time.time() - 1)
        assert "paused" not in recovery.service_state("backtest", settings)
        started = keeper.start(spec, settings)
        assert started.pid > 0 and process.inspect(spec).alive
        assert read_hold(spec, include_ended=True) is not None  # the ended marker stays for whoever undoes it


class TestKeepStopped:
    def test_keep_stopped_then_release(self, tmp_path) -> None:
        settings = make_settings(tmp_path)
        marker = keep_stopped("backtest", settings, by="rollback-persistent-failures #4", reason="rollback #4")
        assert marker == process.service_spec("backtest", settings).hold_marker and marker.exists()
        hold = read_hold("backtest", settings)
        assert hold is not None and (hold.kind, hold.until) == (HOLD_STOPPED, None)
        assert recovery.service_state("backtest", settings).endswith("; paused (rollback #4)")
        released = release_hold("backtest", settings)
        assert released is not None and released.by == "rollback-persistent-failures #4" and not marker.exists()
        assert release_hold("backtest", settings) is None
