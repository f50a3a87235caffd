"""Defects as objects on the fabric: one camera's tracker, across frames and across revolutions.

The fabric is a tube that turns past the camera; a defect is a thing at a *place* on it. Each
confirmed-or-not defect region of a frame is put at its place:

* with the frame's fabric position (:class:`FramePosition`, the result header's ``pos``): at the tube
  coordinate ``u = (offset_px + x) mod circumference_px`` of its columns and at its rows. A defect
  does not move on the tube, so a region belongs to the track whose tube interval lies within
  ``gate_px`` of it (columns, on the circle, and rows);
* without one (no position source, or the source says ``ok: false``): in frame coordinates, at the
  track's last box moved by the track's own measured speed (frame columns per frame); until that speed
  is measured (a track seen once) the column gate ``frame_gate_px`` must cover the web's motion between
  two inspected frames, then it is ``gate_px`` plus a quarter of the predicted move (rows: ``gate_px``).

Each region goes to its nearest track within the gates (a defect that splits into several regions
stays one track). Regions of one frame within ``gate_px`` of each other are one defect, and so are the
pieces of one vertical line (columns overlapping by half the wider, one piece taller than wide: a
needle line the model sees in pieces) whatever the rows between them: such a region joins the track of
its neighbour, and regions matching no track start one new track per group.

**Confirmation is per track**: a track is confirmed once it was seen in ``k`` of the camera's last
``n`` frames in capture order (frames that never arrive count as not seen) - two unrelated blips at
different places never confirm each other. For the per-frame audit a frame is
*confirmed* when it shows at least one confirmed track.

One track = one physical defect = one *event*: created when the track is confirmed, then updated while
it stays in view (frames seen, largest area, peak, best picture = the frame with the highest peak);
a later frame whose severity ranks higher *escalates* it. A region at another place is another track
and so another event, whatever is latched. A confirmed track not seen for up to ``lost_frames`` frames
(the ``cooldown_frames`` setting) and found again at its place is still the same defect; it is closed
when it leaves the view (its place lies outside the frame's tube window, or its predicted frame box
outside the frame) or stays lost longer.

**Recurrence.** A closed track with an event is remembered by its tube interval (a *site*). A track
confirmed at the same tube columns (within ``gate_px``; its rows do not matter, the take-down has moved
the fabric) and of the same shape (both taller than wide - a needle line, seen in pieces of any length -
or of about the same width and height: within 2x, give or take ``gate_px``) in a later revolution is
the same recurring defect - a broken needle's line, a faulty feeder's
stripe: it updates the same event, whose ``revolutions`` counts the revolutions it was seen in and
``streak`` the consecutive ones; at ``recurrence_stop_revolutions`` consecutive revolutions its
severity becomes ``recurring`` / ``stop``. A site not seen for ``recurrence_memory_revolutions``
revolutions is forgotten. Recurrence needs the position with a known circumference; places seen before
it was known (unwrapped offsets: the distance moved since the first frame) wrap onto the tube once it
is, but a defect confirmed while it is still unknown cannot be recognised as one seen before.

**Acknowledge.** A tracked defect whose event was acknowledged is not stopped for again while it is
in view (the operator has seen it) unless its severity rises; then, and when an acknowledged recurring
defect comes back in a later revolution, it becomes a *new* event (and a new stop) that names the
acknowledged one as ``previous_event_id``.

The tracker is pure (no store, no sockets, no clock): :meth:`Tracker.update` returns what happened in
the frame; the alert stage commits the events and binds their ids (:attr:`EventState.event_id`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from knitwatch.pipeline.decision.cutline import CutlineLevel
from knitwatch.pipeline.decision.regions import Confirmation, Region
from knitwatch.pipeline.decision.severity import Severity, SeverityClass, classify

#: the severity of a defect that recurred in ``recurrence_stop_revolutions`` consecutive revolutions
RECURRING = Severity("recurring", "stop")
MAX_TRACKS = 64  # per camera; regions beyond are counted, not tracked (a flood of noise, a covered lens)
MAX_SITES = 256  # remembered places per camera; the oldest are forgotten first
MAX_REGIONS = 256  # per frame, highest peaks first (find_regions' order); the rest are counted, not tracked

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive), frame pixels


@dataclass(frozen=True)
class FramePosition:
    """Where a frame lies on the fabric tube: its column x = 0 is at tube coordinate ``offset_px`` of
    revolution ``rev``; ``circumference_px`` None when the source does not know it."""

    rev: int
    offset_px: float
    circumference_px: float | None = None
    source: str = ""
    cutline_px: float | None = None  # tube coordinate of the cutline, when the source knows it

    def tube_x(self, x: float) -> float:
        """The tube coordinate of frame column ``x``."""
        u = self.offset_px + x
        return u % self.circumference_px if self.circumference_px else u

    def pass_of(self, x: float) -> int:
        """The revolution in which tube coordinate ``tube_x(x)`` passes the camera (a frame's columns
        right of the tube's seam already belong to the next revolution)."""
        if not self.circumference_px:
            return self.rev
        return self.rev + math.floor(((self.offset_px % self.circumference_px) + x) / self.circumference_px)


def parse_position(value: object) -> tuple[FramePosition | None, str]:
    """The ``pos`` header field -> (position, ``"ok"``) or (None, why: ``missing`` | ``not_ok`` | ``bad``)."""
    if value is None:
        return None, "missing"
    if not isinstance(value, dict):
        return None, "bad"
    if not value.get("ok", False):
        return None, "not_ok"
    try:
        rev = int(value["rev"])
        offset = float(value["offset_px"])
        circ_raw = value.get("circumference_px")
        circ = float(circ_raw) if circ_raw is not None else None
        cut_raw = value.get("cutline_px")
        cut = float(cut_raw) if cut_raw is not None else None
    except (KeyError, TypeError, ValueError):
        return None, "bad"
    if not math.isfinite(offset) or (circ is not None and not (math.isfinite(circ) and circ > 0)):
        return None, "bad"
    if cut is not None and not math.isfinite(cut):
        cut = None
    return FramePosition(rev, offset, circ, str(value.get("source", "")), cut), "ok"


@dataclass
class TrackerConfig:
    """The tracker's settings: the ``[alert]`` section's (their defaults and meaning live in config/)."""

    confirm_k: int
    confirm_n: int
    gate_px: float  # tube columns and rows: track_gate_px
    frame_gate_px: float  # frame columns, without a position: track_gate_frame_px
    lost_frames: int  # a confirmed track unseen this long is closed (the cool-down of one defect): cooldown_frames
    recurrence_stop_revolutions: int  # 0: recurrence never escalates
    recurrence_memory_revolutions: int  # 0: no recurrence
    image_threshold: float
    classes: Sequence[SeverityClass]
    cutline_factor: float = 0.0  # 0: the cutline is judged like any fabric (pipeline/decision/cutline.py)
    cutline_margin_px: float = 0.0
    cutline_memory_revolutions: int = 1


@dataclass
class EventState:
    """One physical defect's event, shared by the tracks of its revolutions."""

    severity: Severity
    event_id: int | None = None  # bound by the stage once the event is committed
    previous_event_id: int | None = None  # the acknowledged event this one follows (same place)
    frames_seen: int = 0
    max_area: int = 0
    best_peak: float = -math.inf
    best_seq: int = -1
    revolutions: int = 1  # revolutions it was seen in (known only with a position)
    streak: int = 1  # consecutive revolutions up to the last one
    passes: list[int] = field(default_factory=list)  # the revolutions it was seen in (the last 32)

    def recurrence(self) -> dict[str, Any]:
        return {"revolutions": self.revolutions, "streak": self.streak, "passes": list(self.passes)}


@dataclass
class Track:
    id: int
    first_seq: int
    last_seq: int
    box: Box  # union of its regions in its last frame (frame coordinates)
    confirm: Confirmation
    vx: float | None = None  # frame columns per frame, measured from its own boxes
    tube: tuple[float, float] | None = None  # (u0, width): tube columns it covered (u0 in [0, C) when C is known)
    circ: float | None = None
    pass_: int | None = None  # the revolution it was first seen in (with a position)
    confirmed: bool = False
    frames_seen: int = 0
    event: EventState | None = None
    regions: list[Region] = field(default_factory=list)  # this frame's (empty when not seen in it)
    area: int = 0  # this frame's
    peak: float = 0.0  # this frame's


@dataclass
class Site:
    """A remembered place of a defect that left the view."""

    event: EventState
    u0: float
    width: float
    circ: float | None
    last_pass: int
    rows: tuple[int, int]
    last_seq: int


@dataclass
class TrackDecision:
    """What a confirmed track did in this frame (the stage acts on it)."""

    track: Track
    event: EventState
    regions: list[Region]
    severity: Severity  # this frame's (with the recurrence rule)
    new_event: bool = False  # commit a new event, then bind ``event.event_id``
    escalated: bool = False  # the event's severity rose to ``event.severity``
    recurrence: bool = False  # a remembered defect came back in a new revolution
    best: bool = False  # the highest peak of the event so far: its best picture


@dataclass
class FrameTracks:
    seen: list[Track]  # tracks with regions in this frame (confirmed or not)
    decisions: list[TrackDecision]  # one per confirmed track seen in this frame
    closed: list[Track]  # tracks that ended with this frame (those with an event: final numbers to store)
    untracked_regions: int = 0


def _gap(a0: float, a1: float, b0: float, b1: float) -> float:
    """Distance between intervals [a0, a1) and [b0, b1) (0 when they overlap)."""
    return max(0.0, max(a0, b0) - min(a1, b1))


def _tube_gap(a: tuple[float, float], b: tuple[float, float], circ: float | None) -> float:
    """Distance between tube intervals (u0, width), on the circle when the circumference is known."""
    if not circ:
        return _gap(a[0], a[0] + a[1], b[0], b[0] + b[1])
    d = (b[0] - a[0]) % circ
    return max(0.0, min(d - a[1], circ - d - b[1]))


def _tube_union(a: tuple[float, float], b: tuple[float, float], circ: float | None) -> tuple[float, float]:
    """The smallest tube interval covering two near intervals."""
    if not circ:
        lo, hi = min(a[0], b[0]), max(a[0] + a[1], b[0] + b[1])
        return lo, hi - lo
    d = (b[0] - a[0]) % circ  # b starts d after a
    fwd = max(a[1], d + b[1])  # a first
    back = max(b[1], (circ - d) + a[1])  # b first
    return (a[0], min(fwd, circ)) if fwd <= back else (b[0], min(back, circ))


def _box_gap(a: Box, b: Box) -> float:
    return max(_gap(a[0], a[2], b[0], b[2]), _gap(a[1], a[3], b[1], b[3]))


def _one_line(a0: float, a1: float, b0: float, b1: float, ha: float, hb: float) -> bool:
    """Two pieces of one vertical line (a needle line the model sees in pieces): their columns overlap by
    at least half the wider one, and one of them is taller than wide."""
    wa, wb = a1 - a0, b1 - b0
    overlap = min(a1, b1) - max(a0, b0)
    return overlap >= 0.5 * max(wa, wb) > 0 and (ha > wa or hb > wb)


def _same_circ(a: float | None, b: float | None) -> bool:
    """Tube coordinates measured with these circumferences are comparable: both unknown (unwrapped), or
    known and within 1 % (an image estimate refines it every revolution)."""
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= 0.01 * max(a, b)


def _union(boxes: Sequence[Box]) -> Box:
    return (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))


def _max_severity(a: Severity, b: Severity | None) -> Severity:
    return b if b is not None and b.rank > a.rank else a


class Tracker:
    """One camera's defects as tracks (see the module's description)."""

    def __init__(self, cfg: TrackerConfig) -> None:
        if not 1 <= cfg.confirm_k <= cfg.confirm_n:
            raise ValueError(f"need 1 <= confirm_k <= confirm_n, got {cfg.confirm_k}, {cfg.confirm_n}")
        self.cfg = cfg
        self.tracks: list[Track] = []
        self.sites: list[Site] = []
        self.newest = -1
        self._next_id = 1
        # counters
        self.tracks_total = 0
        self.events = 0
        self.escalations = 0
        self.recurrences = 0
        self.recurring_defects = 0
        self.untracked_regions = 0
        self.cutline = CutlineLevel(cfg.cutline_factor, cfg.cutline_margin_px, cfg.cutline_memory_revolutions)

    # ------------------------------------------------------------------ geometry
    def _tube_of(self, box: Box, pos: FramePosition) -> tuple[float, float]:
        return pos.tube_x(box[0]), float(box[2] - box[0])

    def _distance(self, t: Track, box: Box, seq: int, pos: FramePosition | None) -> float | None:
        """Distance from track ``t``'s predicted place to a region's box; None beyond the gates."""
        cfg = self.cfg
        if pos is not None and t.tube is not None and _same_circ(t.circ, pos.circumference_px):
            u0, w = self._tube_of(box, pos)
            a0, a1, b0 = t.tube[0], t.tube[0] + t.tube[1], u0
            if pos.circumference_px:  # b as near a as the circle allows
                c = pos.circumference_px
                b0 = a0 + ((u0 - a0 + c / 2) % c) - c / 2
            b1 = b0 + w
            gate = cfg.gate_px
        else:
            dt = seq - t.last_seq
            shift = (t.vx or 0.0) * dt
            a0, a1, b0, b1 = t.box[0] + shift, t.box[2] + shift, float(box[0]), float(box[2])
            # its speed unknown: anywhere the web can have moved it; known: near the prediction
            gate = cfg.frame_gate_px if t.vx is None else cfg.gate_px + 0.25 * abs(t.vx * dt)
        dx = _gap(a0, a1, b0, b1)
        if dx > gate:
            return None
        dy = _gap(t.box[1], t.box[3], box[1], box[3])
        if dy > cfg.gate_px and not _one_line(a0, a1, b0, b1, t.box[3] - t.box[1], box[3] - box[1]):
            return None
        return dx + min(dy, cfg.gate_px)

    def _in_view(self, t: Track, seq: int, width: int, pos: FramePosition | None) -> bool:
        """False once track ``t``'s place has left the frame (by more than a gate)."""
        cfg = self.cfg
        if pos is not None and t.tube is not None and _same_circ(t.circ, pos.circumference_px):
            if pos.circumference_px and width >= pos.circumference_px:
                return True
            view = (pos.tube_x(0), float(width))
            return _tube_gap(t.tube, view, pos.circumference_px) <= cfg.gate_px
        if t.vx is None:
            return True
        shift = t.vx * (seq - t.last_seq)
        return _gap(t.box[0] + shift, t.box[2] + shift, 0, width) <= cfg.gate_px

    # ------------------------------------------------------------------ the frame
    def update(self, seq: int, regions: Sequence[Region], *, width: int, pos: FramePosition | None = None,
               acknowledged: Callable[[int], bool] | None = None) -> FrameTracks:
        """Associate frame ``seq``'s defect regions (``width``: frame columns) with the tracks; confirm,
        create / update / escalate events, link recurring defects, close tracks that left.
        ``acknowledged(event_id)``: whether an event was acknowledged (None: never)."""
        cfg = self.cfg
        acked = acknowledged or (lambda _event_id: False)
        self.newest = max(self.newest, seq)
        untracked = max(0, len(regions) - MAX_REGIONS)
        regions = regions[:MAX_REGIONS]
        for t in self.tracks:
            t.regions, t.area, t.peak = [], 0, 0.0
        if pos is not None and pos.circumference_px:
            self._wrap_sites(pos.circumference_px)

        # 1. each region to its nearest track within the gates
        pairs = []
        for i, r in enumerate(regions):
            for t in self.tracks:
                d = self._distance(t, r.bbox, seq, pos)
                if d is not None:
                    pairs.append((d, t.id, i))
        pairs.sort()
        owner: dict[int, Track] = {}
        by_id = {t.id: t for t in self.tracks}
        for _d, tid, i in pairs:
            owner.setdefault(i, by_id[tid])
        # 2. regions of the frame near each other are one defect: the others join a near region's
        #    track, or start one
        for g in self._group([r.bbox for r in regions]):
            owned = [i for i in g if i in owner]
            loose = [i for i in g if i not in owner]
            if not loose:
                continue
            if owned:
                for i in loose:
                    near = min(owned, key=lambda j: _box_gap(regions[i].bbox, regions[j].bbox))
                    owner[i] = owner[near]
                continue
            if len(self.tracks) >= MAX_TRACKS:
                untracked += len(loose)
                continue
            t = Track(self._next_id, seq, seq, _union([regions[i].bbox for i in loose]),
                      Confirmation(cfg.confirm_k, cfg.confirm_n))
            self._next_id += 1
            self.tracks_total += 1
            self.tracks.append(t)
            for i in loose:
                owner[i] = t
        self.untracked_regions += untracked
        for i, t in sorted(owner.items()):
            t.regions.append(regions[i])

        # 3. update the tracks seen, confirm, decide
        seen: list[Track] = []
        decisions: list[TrackDecision] = []
        for t in self.tracks:
            if not t.regions:
                continue
            seen.append(t)
            self._observe(t, seq, width, pos)
            confirmed_now = t.confirm.update(seq, True)
            if not t.confirmed and not confirmed_now:
                continue
            decisions.append(self._decide(t, seq, acked))

        # 4. close the tracks that left, or were lost too long; forget old sites
        closed: list[Track] = []
        keep: list[Track] = []
        for t in self.tracks:
            if t.regions:
                keep.append(t)
                continue
            lost = self.newest - t.last_seq
            if not t.confirmed:
                alive = lost < cfg.confirm_n
            else:
                limit = cfg.lost_frames if (t.vx is not None or t.tube is not None) else cfg.confirm_n
                alive = lost <= limit and self._in_view(t, seq, width, pos)
            if alive:
                keep.append(t)
            elif t.confirmed:
                closed.append(t)
                self._remember(t)
        self.tracks = keep
        if pos is not None and cfg.recurrence_memory_revolutions > 0:
            self.sites = [s for s in self.sites if pos.rev - s.last_pass <= cfg.recurrence_memory_revolutions]
        return FrameTracks(seen, decisions, closed, untracked)

    def _group(self, boxes: Sequence[Box]) -> list[list[int]]:
        """Indices of ``boxes`` grouped by single linkage: within ``gate_px`` of each other (columns and
        rows), or pieces of one vertical line (frame coordinates)."""
        gate = self.cfg.gate_px
        parent = list(range(len(boxes)))

        def root(i: int) -> int:
            while parent[i] != i:
                parent[i] = parent[parent[i]]
                i = parent[i]
            return i

        for i in range(len(boxes)):
            for j in range(i + 1, len(boxes)):
                a, b = boxes[i], boxes[j]
                if _gap(a[0], a[2], b[0], b[2]) > gate:
                    continue
                if (_gap(a[1], a[3], b[1], b[3]) <= gate
                        or _one_line(a[0], a[2], b[0], b[2], a[3] - a[1], b[3] - b[1])):
                    parent[root(j)] = root(i)
        out: dict[int, list[int]] = {}
        for i in range(len(boxes)):
            out.setdefault(root(i), []).append(i)
        return list(out.values())

    def _observe(self, t: Track, seq: int, width: int, pos: FramePosition | None) -> None:
        box = _union([r.bbox for r in t.regions])
        dt = seq - t.last_seq
        if dt > 0 and t.frames_seen > 0:  # speed from an edge that is inside the frame in both boxes
            if box[2] < width and t.box[2] < width:
                v = (box[2] - t.box[2]) / dt
            elif box[0] > 0 and t.box[0] > 0:
                v = (box[0] - t.box[0]) / dt
            else:
                v = None
            if v is not None:
                t.vx = v if t.vx is None else 0.5 * (t.vx + v)
        if pos is not None:
            tube = self._tube_of(box, pos)
            if t.tube is not None and _same_circ(t.circ, pos.circumference_px):
                t.tube = _tube_union(t.tube, tube, pos.circumference_px)
                t.circ = pos.circumference_px
            else:  # its first place, or the circumference just became known: places wrap from now on
                t.tube, t.circ = tube, pos.circumference_px
                t.pass_ = pos.pass_of(box[0])
        if seq >= t.last_seq:
            t.box, t.last_seq = box, seq
        t.frames_seen += 1
        t.area = sum(r.area for r in t.regions)
        t.peak = max(r.peak for r in t.regions)

    # ------------------------------------------------------------------ events
    def _severity(self, t: Track, ev: EventState | None) -> Severity:
        sev = classify(t.regions, self.cfg.image_threshold, self.cfg.classes)
        n = self.cfg.recurrence_stop_revolutions
        if ev is not None and n > 0 and ev.streak >= n:
            sev = _max_severity(sev, RECURRING)
        return sev

    def _successor(self, old: EventState, severity: Severity) -> EventState:
        """A new event at the place of an acknowledged one (its revolutions go on)."""
        self.events += 1
        return EventState(severity, previous_event_id=old.event_id, revolutions=old.revolutions,
                          streak=old.streak, passes=list(old.passes))

    def _decide(self, t: Track, seq: int, acked: Callable[[int], bool]) -> TrackDecision:
        new_event = escalated = recurrence = False
        if not t.confirmed:  # confirmed with this frame
            t.confirmed = True
            site = self._find_site(t)
            if site is None:
                sev = self._severity(t, None)
                ev = EventState(sev, passes=[t.pass_] if t.pass_ is not None else [])
                self.events += 1
                new_event = True
            else:
                self.sites.remove(site)
                ev = site.event
                if t.pass_ is not None and t.pass_ > site.last_pass:  # came back in a later revolution
                    recurrence = True
                    self.recurrences += 1
                    ev.streak = ev.streak + 1 if t.pass_ == site.last_pass + 1 else 1
                    ev.revolutions += 1
                    ev.passes.append(t.pass_)
                    del ev.passes[:-32]  # a broken needle may go on for days
                    if ev.revolutions == 2:
                        self.recurring_defects += 1
                sev = self._severity(t, ev)
                if ev.event_id is not None and acked(ev.event_id):
                    if recurrence or sev.rank > ev.severity.rank:  # back after the acknowledge: a new stop
                        ev = self._successor(ev, sev)
                        new_event = True
                elif sev.rank > ev.severity.rank:
                    escalated = True
            t.event = ev
            ev.frames_seen += t.frames_seen - 1  # its frames before this one count too
        else:
            assert t.event is not None
            ev = t.event
            sev = self._severity(t, ev)
            if sev.rank > ev.severity.rank:
                if ev.event_id is not None and acked(ev.event_id):  # acknowledged, then it grew: a new event
                    ev = t.event = self._successor(ev, sev)
                    new_event = True
                else:
                    escalated = True
        if escalated:
            self.escalations += 1
        if new_event or escalated:
            ev.severity = _max_severity(ev.severity, sev)
        ev.frames_seen += 1
        ev.max_area = max(ev.max_area, t.area)
        best = t.peak > ev.best_peak
        if best:
            ev.best_peak, ev.best_seq = t.peak, seq
        return TrackDecision(t, ev, list(t.regions), sev, new_event=new_event, escalated=escalated,
                             recurrence=recurrence, best=best and not new_event)

    def _find_site(self, t: Track) -> Site | None:
        """The remembered place track ``t`` (just confirmed) is at: the same defect, found again in the
        same revolution (rows must match too) or back in a later one."""
        if t.tube is None or t.pass_ is None or self.cfg.recurrence_memory_revolutions <= 0:
            return None
        best: tuple[float, Site] | None = None
        for s in self.sites:
            if not _same_circ(s.circ, t.circ) or t.pass_ < s.last_pass:
                continue
            d = _tube_gap((s.u0, s.width), t.tube, t.circ)
            if d > self.cfg.gate_px:
                continue
            if t.pass_ == s.last_pass:  # lost and found again: the rows must match too
                if _gap(s.rows[0], s.rows[1], t.box[1], t.box[3]) > self.cfg.gate_px:
                    continue
            elif not self._alike(s.width, s.rows[1] - s.rows[0], t.tube[1], t.box[3] - t.box[1]):
                continue  # back in a later revolution: of the same shape (not another defect at that angle)
            if best is None or (d, -s.last_pass) < (best[0], -best[1].last_pass):  # a tie: its latest pass
                best = (d, s)
        return best[1] if best else None

    def _wrap_sites(self, circ: float) -> None:
        """Places remembered before the circumference was known were unwrapped tube coordinates (the
        distance moved since the first frame, the position's contract): now they wrap onto the tube."""
        for s in self.sites:
            if s.circ is None:
                n = math.floor(s.u0 / circ)
                s.u0, s.circ = s.u0 - n * circ, circ
                s.last_pass = n if n >= 0 else -n - 1

    def _alike(self, wa: float, ha: float, wb: float, hb: float) -> bool:
        """Two sightings (width, height in px) of one recurring defect: both vertical lines (taller than
        wide: a needle line, seen in pieces of any length) of about the same width, or of about the same
        width and height (within 2x, give or take ``gate_px``)."""
        def near(a: float, b: float) -> bool:
            return max(a, b) <= 2 * min(a, b) + self.cfg.gate_px

        if ha > wa and hb > wb:
            return near(wa, wb)
        return near(wa, wb) and near(ha, hb)

    def _remember(self, t: Track) -> None:
        if (t.event is None or t.tube is None or t.pass_ is None
                or self.cfg.recurrence_memory_revolutions <= 0):
            return
        self.sites.append(Site(t.event, t.tube[0], t.tube[1], t.circ, t.pass_, (t.box[1], t.box[3]), t.last_seq))
        if len(self.sites) > MAX_SITES:
            self.sites.pop(0)

    # ------------------------------------------------------------------ reporting
    def stats(self) -> dict[str, float | int | None]:
        return {"tracks_open": len(self.tracks), "tracks_confirmed_open": sum(t.confirmed for t in self.tracks),
                "tracks_total": self.tracks_total, "remembered_places": len(self.sites),
                "recurrences": self.recurrences, "recurring_defects": self.recurring_defects,
                "untracked_regions": self.untracked_regions, **self.cutline.stats()}
