"""The per-camera defect tracker: one physical defect = one track = one event, across frames and revolutions."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from knitwatch.pipeline.decision.regions import Region
from knitwatch.pipeline.decision.severity import SeverityClass
from knitwatch.pipeline.decision.tracking import (
    FramePosition,
    FrameTracks,
    Tracker,
    TrackerConfig,
    parse_position,
)

W = 640  # frame columns
SPEED = 32.0  # the web moves this many columns to the left per frame
CIRC = 2560.0  # tube circumference: 80 frames per revolution
CLASSES = [SeverityClass("major", "stop", min_area_px=500), SeverityClass("minor", "alarm")]


def tracker(**kw: object) -> Tracker:
    cfg = {"confirm_k": 2, "confirm_n": 3, "gate_px": 48.0, "frame_gate_px": 128.0, "lost_frames": 10,
           "recurrence_stop_revolutions": 2, "recurrence_memory_revolutions": 3, "image_threshold": 1.0,
           "classes": CLASSES, **kw}
    return Tracker(TrackerConfig(**cfg))  # type: ignore[arg-type]


def pos(seq: int, speed: float = SPEED) -> FramePosition:
    start = seq * speed
    return FramePosition(int(start // CIRC), start % CIRC, CIRC, "test")


def at(seq: int, tube_x: float, y: int, w: int = 30, h: int = 20, peak: float = 2.0) -> list[Region]:
    """The region of a defect at tube column ``tube_x`` (rows y..y+h) as frame ``seq`` shows it (or none)."""
    p = pos(seq)
    x0 = int(round((tube_x - p.offset_px) % CIRC))
    x1 = min(W, x0 + w)
    if x0 >= W:
        return []
    return [Region((x0, y, x1, y + h), (x1 - x0) * h, peak)]


def events(frames: list[FrameTracks]) -> list[tuple[int, int, str]]:
    """(frame index, track id, action) of every new event."""
    return [(i, d.track.id, d.severity.action) for i, f in enumerate(frames) for d in f.decisions if d.new_event]


def run(t: Tracker, seqs: range, regions_of: Callable[[int], list[Region]],
        acked: set[int] | None = None) -> list[FrameTracks]:
    """Frames ``seqs`` with their positions; new events get ids 101, 102, ... (as the stage binds them)."""
    out = []
    for seq in seqs:
        f = t.update(seq, regions_of(seq), width=W, pos=pos(seq),
                     acknowledged=(lambda e: e in acked) if acked is not None else None)
        for d in f.decisions:
            if d.new_event:  # what the stage does: commit, then bind the id
                d.event.event_id = 100 + t.events
        out.append(f)
    return out


def test_two_defects_in_consecutive_frames_are_two_events() -> None:
    """Defect A (tube 500) in frames 0-3, defect B (tube 700, other rows) from frame 4 on, the very
    next frame: the old per-camera cool-down swallowed B; now each is its own track and event."""
    t = tracker()
    frames = run(t, range(0, 8), lambda s: at(s, 500, 100) if s < 4 else at(s, 700, 300))
    assert events(frames) == [(1, 1, "stop"), (5, 2, "stop")]
    assert t.tracks_total == 2 and t.events == 2
    # two defects in the same frames, far apart: two events too
    t2 = tracker()
    frames = run(t2, range(0, 3), lambda s: at(s, 500, 40) + at(s, 560, 400))
    assert [e[:2] for e in events(frames)] == [(1, 1), (1, 2)]


def test_isolated_blips_at_different_places_do_not_confirm_each_other() -> None:
    t = tracker()
    frames = run(t, range(0, 4), lambda s: at(s, 400 + 300 * s, 200))  # every frame, each at another place
    assert events(frames) == [] and not any(f.decisions for f in frames)


def test_the_same_defect_moving_through_the_view_is_one_event_updated_while_in_view() -> None:
    """A defect enters at the right edge, crosses the view (20 frames at 32 px/frame), growing and
    with a peak that rises then falls; one track, one event, escalated once, best frame = highest peak."""
    peaks = [1.2, 1.5, 3.0, 2.0] + [1.5] * 20

    def regions(s: int) -> list[Region]:
        h = 10 if s < 3 else 30  # small (alarm) at first, then large (stop)
        return at(s, 620, 200, h=h, peak=peaks[s])

    t = tracker()
    frames = run(t, range(0, 24), regions)
    ds = [d for f in frames for d in f.decisions]
    assert {d.track.id for d in ds} == {1} and t.tracks_total == 1
    assert events(frames) == [(1, 1, "alarm")]
    assert [i for i, f in enumerate(frames) for d in f.decisions if d.escalated] == [3]
    ev = ds[-1].event
    assert ev.severity.name == "major" and ev.best_seq == 2 and ev.best_peak == 3.0
    assert [i for i, f in enumerate(frames) for d in f.decisions if d.best] == [2]
    assert ev.max_area == 30 * 30 and ev.frames_seen == len(ds) + 1  # + frame 0, before it was confirmed
    # it left the view (tube 620..650 is out of the frame's window after frame 20): closed, remembered
    closed = [i for i, f in enumerate(frames) if f.closed]
    assert closed and closed[0] <= 22 and not t.tracks and len(t.sites) == 1


def test_a_new_defect_after_an_acknowledge_stops_again_the_acknowledged_one_does_not() -> None:
    t = tracker()
    acked: set[int] = set()
    frames = run(t, range(0, 3), lambda s: at(s, 500, 100), acked)
    first = events(frames)
    assert first == [(1, 1, "stop")]
    acked.add(101)  # the operator acknowledged the stop; the defect is still in view
    frames = run(t, range(3, 6), lambda s: at(s, 500, 100) + (at(s, 700, 300) if s >= 4 else []), acked)
    assert events(frames) == [(2, 2, "stop")]  # only the new defect (frame 5) is a new event
    assert not any(d.escalated for f in frames for d in f.decisions)


def test_an_acknowledged_defect_that_grows_is_a_new_event() -> None:
    t = tracker()
    acked: set[int] = set()
    frames = run(t, range(0, 3), lambda s: at(s, 500, 100, h=5), acked)  # small: alarm
    assert events(frames) == [(1, 1, "alarm")]
    acked.add(101)
    frames = run(t, range(3, 5), lambda s: at(s, 500, 100, h=30), acked)  # grown: stop, but acknowledged
    (d,) = frames[0].decisions
    assert d.new_event and d.event.severity.action == "stop" and d.event.previous_event_id == 101
    assert not frames[1].decisions[0].new_event


def test_a_lost_defect_found_again_at_its_place_is_the_same_event() -> None:
    t = tracker()
    frames = run(t, range(0, 6), lambda s: at(s, 400, 100) if s not in (3, 4) else [])  # missed twice
    assert events(frames) == [(1, 1, "stop")] and t.tracks_total == 1


def test_recurrence_across_revolutions_is_one_defect_escalated_at_the_configured_count() -> None:
    """A broken needle's line at tube column 1000: every revolution (80 frames) it crosses the view.
    Small (alarm) in revolution 0; back in revolution 1: the same event, 2 revolutions, escalated to
    stop (recurrence_stop_revolutions = 2); acknowledged, back in revolution 2: a new stop, 3 revolutions."""
    acked: set[int] = set()
    t = tracker()

    def line(s: int) -> list[Region]:  # 480 px: a "minor" (alarm) region; other rows each revolution (take-down)
        return at(s, 1000, 100 * (s // 80), w=8, h=60)

    frames = run(t, range(0, 80), line, acked)
    assert events(frames) == [(13, 1, "alarm")]  # tube 1000 enters the view at frame 12
    assert len(t.sites) == 1 and t.sites[0].last_pass == 0
    frames = run(t, range(80, 160), line, acked)
    ds = [d for f in frames for d in f.decisions]
    assert not any(d.new_event for d in ds)
    (rec,) = [d for d in ds if d.recurrence]
    assert rec.escalated and rec.event.event_id == 101 and rec.event.severity.name == "recurring"
    assert rec.event.severity.action == "stop" and rec.event.revolutions == 2 and rec.event.streak == 2
    assert t.recurring_defects == 1 and t.recurrences == 1 and t.tracks_total == 2
    acked.add(101)
    frames = run(t, range(160, 240), line, acked)
    new = [d for f in frames for d in f.decisions if d.new_event]
    assert len(new) == 1 and new[0].event.previous_event_id == 101
    assert new[0].event.revolutions == 3 and new[0].event.severity.action == "stop"


def test_recurrence_counts_need_consecutive_revolutions_to_escalate() -> None:
    t = tracker(recurrence_stop_revolutions=3)
    frames = run(t, range(0, 240), lambda s: at(s, 1000, 0, w=8, h=60) if s // 80 != 1 else [])  # missed in rev 1
    ds = [d for f in frames for d in f.decisions]
    (rec,) = [d for d in ds if d.recurrence]
    assert rec.event.revolutions == 2 and rec.event.streak == 1 and not rec.escalated
    assert rec.event.passes == [0, 2] and len({d.event.event_id for d in ds}) == 1


def test_a_defect_across_the_tube_seam_is_one_track() -> None:
    t = tracker()
    # tube column 2550 (10 px before the seam) 40 px wide: its columns wrap to 0..30
    frames = run(t, range(60, 80), lambda s: at(s, 2550, 100, w=40))
    assert len(events(frames)) == 1 and t.tracks_total == 1


@pytest.mark.parametrize("value", [None, {"rev": 1, "offset_px": 3.0, "ok": False}, {"offset_px": "x", "ok": True},
                                   "garbage"])
def test_position_missing_or_not_ok_tracks_in_frame_coordinates(value: object) -> None:
    p, why = parse_position(value)
    assert p is None and why in ("missing", "not_ok", "bad")
    t = tracker()
    # the defect moves 32 px per frame; frames 2 and 3 never arrive (dropped at capture): 96 px in one step
    seqs = [0, 1, 4, 5, 6, 7]
    frames = [t.update(s, at(s, 500, 100), width=W, pos=p) for s in seqs]
    assert len({d.track.id for f in frames for d in f.decisions}) == 1
    assert sum(d.new_event for f in frames for d in f.decisions) == 1
    assert t.tracks[0].vx == pytest.approx(-SPEED)
    # a second defect 200 px away in the same frames is its own track
    frames = [t.update(s, at(s, 500, 100) + at(s, 700, 100), width=W, pos=p) for s in range(8, 11)]
    assert sum(d.new_event for f in frames for d in f.decisions) == 1 and t.tracks_total == 2


def test_position_parsing() -> None:
    p, why = parse_position({"rev": 3, "offset_px": 2600.0, "circumference_px": 2560.0, "source": "plc", "ok": True})
    assert why == "ok" and p is not None and p.rev == 3 and p.source == "plc"
    assert p.tube_x(0) == 40.0 and p.pass_of(10) == 3
    assert parse_position({"rev": 0, "offset_px": 2500.0, "circumference_px": 2560.0, "ok": True})[0].pass_of(100) == 1
    assert parse_position({"rev": 0, "offset_px": 1.0, "circumference_px": 0, "ok": True}) == (None, "bad")
    p, _ = parse_position({"rev": 0, "offset_px": 5000.0, "circumference_px": None, "ok": True})
    assert p is not None and p.tube_x(10) == 5010.0


def oracle_events(frames: int, with_position: bool) -> tuple[dict[int, list[str]], Tracker, list[int]]:
    """The tracker over the knit simulator's truth (every visible defect box a region, a perfect
    detector) with the simulator's own position or none: new events -> kinds in view, and the
    revolutions counted for the needle line's event."""
    from knitwatch.daemon.bench.detection import detection_schedule
    from knitwatch.pipeline.sources.knitsim import FabricSpec, KnitStream, ScheduledDefect

    width, speed = 512, 32.0
    stream = KnitStream(width, 160, FabricSpec(pitch_px=6.0), seed=5, speed_px=speed, revolution_frames=80,
                        defects=[ScheduledDefect(**d) for d in detection_schedule(400)])
    t = tracker(classes=[SeverityClass("defect", "stop")])
    made: dict[int, list[str]] = {}
    needle_revolutions: list[int] = []
    for i in range(frames):
        _, truth = stream.frame(i)
        regions = [Region(tuple(d["box"]), (d["box"][2] - d["box"][0]) * (d["box"][3] - d["box"][1]), 2.0)
                   for d in truth.defects]
        start = round(i * speed)
        p = FramePosition(start // stream.circumference, start % stream.circumference, stream.circumference, "sim")
        f = t.update(i, [r for r in regions if r.area >= 20], width=width, pos=p if with_position else None)
        for d in f.decisions:
            if d.new_event:
                d.event.event_id = len(made) + 1
                made[d.event.event_id] = sorted(x["kind"] for x in truth.defects)
            if d.recurrence:
                needle_revolutions.append(d.event.revolutions)
    return made, t, needle_revolutions


def test_every_simulated_defect_is_one_event_and_the_broken_needle_one_recurring_defect() -> None:
    """The detection benchmark's schedule (one defect of each kind; the needle line comes back every
    revolution of 80 frames) with a perfect detector: 7 defects, 7 events; the needle line's event counts
    3 revolutions by frame 240 and is a stop from its second on."""
    made, t, revs = oracle_events(240, with_position=True)
    kinds = [k for ks in made.values() for k in ks]
    assert len(made) == 7, made
    for kind in ("hole", "ladder", "needle_line", "tension_stripe", "oil_stain", "slub", "fly"):
        assert kind in kinds
    assert revs == [2, 3] and t.recurring_defects == 1
    # without a position: the same defects, but the needle line is a new event in each revolution
    made, t, revs = oracle_events(240, with_position=False)
    assert len(made) == 9 and revs == [] and t.recurring_defects == 0


def test_a_refined_circumference_keeps_tracks_and_recurrence() -> None:
    """An image position refines the circumference at every cutline (here by 0.3 %): the places stay
    comparable, the broken needle still recurs."""
    t = tracker()
    revs = []
    for seq in range(0, 240):
        circ = CIRC * (1.0 + 0.003 * (seq // 80))
        start = seq * SPEED
        p = FramePosition(int(start // CIRC), start % CIRC, circ, "image")
        f = t.update(seq, at(seq, 1000, 0, w=8, h=60), width=W, pos=p)
        revs += [d.event.revolutions for d in f.decisions if d.recurrence]
    assert revs == [2, 3] and t.events == 1


def test_places_seen_before_the_circumference_was_known_recur_once_it_is() -> None:
    """An image position knows the circumference only after the second cutline; until then the offset is
    the distance moved since the first frame (unwrapped). The needle line seen then is still recognised;
    a pass confirmed while it was unknown is a new event, recognised from the next revolution on."""
    for known_from, events, revs_expected in ((60, 1, [2, 3]), (100, 2, [2])):
        t = tracker()
        revs = []
        for seq in range(0, 240):
            start = seq * SPEED
            p = (FramePosition(0, start, None, "image") if seq < known_from
                 else FramePosition(int(start // CIRC), start % CIRC, CIRC, "image"))
            f = t.update(seq, at(seq, 1000, 0, w=8, h=60), width=W, pos=p)
            revs += [d.event.revolutions for d in f.decisions if d.recurrence]
            streak = [d.event.streak for d in f.decisions if d.recurrence]
            assert streak == [] or streak[0] >= 2, "the consecutive revolutions are counted"
        assert (t.events, revs) == (events, revs_expected), known_from


def test_the_pieces_of_one_needle_line_are_one_defect() -> None:
    """The model sees a needle line in pieces (rows 20-64 and 128-165, a tile row between them below the
    threshold), sometimes only one of them: one track, one event. A hole in the same frames, beside it
    in other columns, is its own."""
    t = tracker()
    frames = run(t, range(0, 8), lambda s: (at(s, 500, 20, w=28, h=44) + at(s, 500, 128, w=27, h=37)
                                           if s % 3 else at(s, 500, 128, w=27, h=37))
                 + (at(s, 600, 140, w=40, h=40) if s >= 4 else []))
    assert [e[1] for e in events(frames)] == [1, 2] and t.tracks_total == 2
