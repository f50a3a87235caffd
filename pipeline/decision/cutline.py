"""The cutline, learned as a normal once-per-revolution feature of the fabric and never reported.

A circular knitting machine leaves two needles out: the cutline, a pair of dark wale gaps that passes
the camera once per revolution at a fixed tube coordinate (where the tube is cut open after knitting).
It is normal fabric, but it is rare in the training frames, so a model trained for minutes scores it
above the rest of the fabric; and as it recurs at the same place every revolution, a cutline region
above the thresholds would stop the machine by the recurrence rule.

The fabric position (:mod:`knitwatch.pipeline.position`) reports where the cutline lies on the tube
(``cutline_px``). :class:`CutlineLevel` (one per camera) learns how anomalous the cutline normally looks:
the highest region peak at the cutline's columns in each revolution, over the last ``memory_revolutions``
revolutions in which it showed a region. A region at the cutline (its tube columns within
``margin_px`` of it) is a defect only when its peak reaches ``factor`` times the median of those
revolution maxima (before anything is learned: ``factor`` times the image threshold); the regions
below are the normal cutline - left out of the frame's decision and counted. Only regions judged
normal are learned from, so a defect at the cutline does not teach itself away, and the median over
revolutions keeps one odd revolution from moving the level. A hole or a stain on the cutline still
stops the machine: their peaks lie far above the cutline's (`bench detection` reports it).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from statistics import median

from knitwatch.pipeline.decision.regions import Region


@dataclass
class CutlineLevel:
    """One camera's learned cutline level. ``factor`` 0 switches it off (cutline regions are judged like
    any other)."""

    factor: float
    margin_px: float
    memory_revolutions: int
    maxima: deque[tuple[int, float]] = field(default_factory=deque)  # (revolution, highest normal peak), oldest first
    normal_regions: int = 0  # regions found normal cutline (left out of the decisions)
    defect_regions: int = 0  # regions at the cutline above its level (judged as defects)

    def __post_init__(self) -> None:
        self.maxima = deque(maxlen=max(1, self.memory_revolutions))

    def level(self) -> float | None:
        """The learned normal peak of the cutline (None: nothing learned yet)."""
        return median(m for _, m in self.maxima) if self.maxima else None

    def threshold(self, image_threshold: float) -> float:
        """The peak a region at the cutline must reach to be a defect."""
        learned = self.level()
        return self.factor * max(image_threshold, learned if learned is not None else image_threshold)

    def at_cutline(self, region: Region, offset_px: float, circumference_px: float | None,
                   cutline_px: float | None) -> bool:
        """Whether ``region`` (frame pixels) lies on the cutline of a frame whose column 0 is at tube
        coordinate ``offset_px``."""
        if self.factor <= 0 or cutline_px is None:
            return False
        x0, _, x1, _ = region.bbox
        a0, a1 = offset_px + x0 - self.margin_px, offset_px + x1 + self.margin_px
        if circumference_px:  # the cutline's copy nearest the region's columns
            c = circumference_px
            u = cutline_px + c * round((0.5 * (a0 + a1) - cutline_px) / c)
        else:
            u = cutline_px
        return a0 <= u <= a1

    def normal(self, region: Region, revolution: int, image_threshold: float) -> bool:
        """Judge a region at the cutline: True (normal cutline: learned from, counted) or False (a defect)."""
        if region.peak >= self.threshold(image_threshold):
            self.defect_regions += 1
            return False
        self.normal_regions += 1
        if self.maxima and self.maxima[-1][0] == revolution:
            self.maxima[-1] = (revolution, max(self.maxima[-1][1], region.peak))
        else:
            self.maxima.append((revolution, region.peak))
        return True

    def stats(self) -> dict[str, float | int | None]:
        learned = self.level()
        return {"cutline_normal_regions": self.normal_regions, "cutline_defect_regions": self.defect_regions,
                "cutline_level": None if learned is None else round(learned, 5)}
