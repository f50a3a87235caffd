"""``knitwatch status`` names the frames lost in flight when a stage died (from the daemon's stats)."""

from __future__ import annotations

from knitwatch.daemon.cli.status import render_status


def test_status_reports_frames_lost_in_flight() -> None:
    st = {"healthy": True, "ready": True, "uptime_s": 60, "cameras": {},
          "stages": {"infer.0": {"alive": True, "restarts": 1}},
          "lost_in_flight": {"total": 7, "by_stage": {"infer.0": 5, "tiler": 2}}}
    text = render_status(st, "http://127.0.0.1:8080")
    assert "frames lost in flight when a stage died: 7 (infer.0 5, tiler 2)" in text
    st["lost_in_flight"] = {"total": 0, "by_stage": {}}
    assert "lost in flight" not in render_status(st, "http://127.0.0.1:8080")
