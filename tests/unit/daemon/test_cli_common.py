from __future__ import annotations

from knitwatch.daemon.cli.common import fmt_coverage


def test_coverage_is_never_rounded_up_to_complete() -> None:
    assert fmt_coverage(185 / 188) == "98.4%"  # the demo once printed 100% for these
    assert fmt_coverage(0.99999) == "99.9%"
    assert fmt_coverage(1.0) == "100.0%"
    assert fmt_coverage(0.0) == "0.0%"
    assert fmt_coverage(None) == "-"
