"""Severity of a confirmed defect: configured classes by region area and peak score -> an action.

Classes are tried in their configured order; the first class that one region of the frame satisfies
(area at least ``min_area_px`` AND peak at least ``min_peak_ratio`` x the image threshold) decides.
A defect that matches no class is logged only. Actions rank ``log < alarm < stop``: within an
event's cool-down a later frame may *escalate* the event to a higher-ranked action (a defect often
enters the camera's view gradually), never lower it.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from knitwatch.pipeline.decision.regions import Region

ACTIONS = ("log", "alarm", "stop")
RANK = {a: i for i, a in enumerate(ACTIONS)}
UNCLASSIFIED = "unclassified"


@dataclass(frozen=True)
class SeverityClass:
    name: str
    action: str
    min_area_px: int = 0
    min_peak_ratio: float = 0.0

    def matches(self, region: Region, image_threshold: float) -> bool:
        return region.area >= self.min_area_px and region.peak >= self.min_peak_ratio * image_threshold

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SeverityClass:
        if d["action"] not in RANK:
            raise ValueError(f"unknown action {d['action']!r} (one of {', '.join(ACTIONS)})")
        return cls(str(d["name"]), str(d["action"]), int(d.get("min_area_px", 0)),
                   float(d.get("min_peak_ratio", 0.0)))


@dataclass(frozen=True)
class Severity:
    name: str
    action: str

    @property
    def rank(self) -> int:
        return RANK[self.action]


def classify(regions: Iterable[Region], image_threshold: float, classes: Sequence[SeverityClass]) -> Severity:
    """The severity of a confirmed defect frame's regions (first matching class, else log-only)."""
    regions = list(regions)
    for c in classes:
        if any(c.matches(r, image_threshold) for r in regions):
            return Severity(c.name, c.action)
    return Severity(UNCLASSIFIED, "log")
